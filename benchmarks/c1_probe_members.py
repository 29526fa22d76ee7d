"""Do frozen-backbone probes of other offline Lites, averaged into the Lite0 fine-tune, raise Macro F1?
(no fine-tuning: ~1 minute of features a backbone and split)

c1_backbones found the offline Lites err differently as frozen features (the three cleaned probes averaged
read +0.045 over Lite0's alone), and a second fine-tuned backbone paid at equal epochs but not at equal
minutes (c1_pair_1206). A probe costs no fine-tuning: one forward pass over the training images and a
logistic regression on what the prototype cleaning keeps, and at inference one forward pass. So for each
finished Lite0 run given, on its own holdout split: the run's kept checkpoints x 4 views averaged (what
notebook 03 chooses from, `utils.evaluate_candidates`), then the cleaned probe of each `--archs` backbone
at `--size` trained on that run's fit set, and their softmax averages with the fine-tune at probe weight w
(the fine-tune weighs 1). Clean Macro F1 estimated from the noisy holdout at eta ETA.

    .venv/bin/python benchmarks/c1_probe_members.py --runs c1_lite0_28_1206 c1_lite0_28_h2_1206

With --write it instead gives finished runs (trained before `probe_archs` existed) the probe members notebook 01
now fits (`utils.fit_probe_members`, the Category 1 default archs and size), so that notebook 03's functions,
`cross_ensemble.py` and `probe_plans.py` see them as candidates.
"""
from __future__ import annotations

import argparse
import dataclasses
import itertools
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
import utils  # noqa: E402
from c1_run import backbone_features, cleaned_probe  # noqa: E402
from noise_rate import ETA, clean_scores  # noqa: E402
from results import add_line  # noqa: E402

OUT = REPO / "benchmarks" / "out"
VIEWS = ("center", "flip", "full", "zoom")


def probe_probs(data, arch, size, dev, amp, k):
    """The cleaned probe of `arch`'s frozen features, fitted on the fit set: its probabilities on the
    holdout rows then the val rows (a class the fit set lacks gets 0)."""
    f_train, f_val = (f.numpy() for f in backbone_features(data, size, dev, amp, arch=arch))
    fit, hold = data["fit_idx"], data["hold_idx"]
    probe = cleaned_probe(f_train[fit], data["train"]["y"][fit])[0]
    p = np.zeros((len(hold) + len(f_val), k))
    p[:, probe.classes_] = probe.predict_proba(np.concatenate([f_train[hold], f_val]))
    return p


def write_probes(run):
    """`utils.fit_probe_members` on a finished run, with Category 1's default probe members."""
    r = utils.read_run(OUT, run)
    known = {f.name for f in dataclasses.fields(utils.TrainConfig)}
    cfg = utils.TrainConfig(**{k: v for k, v in r["config"].items() if k in known})
    d = utils.CATEGORY_DEFAULTS[1]
    cfg = dataclasses.replace(cfg, probe_archs=d["probe_archs"], probe_size=utils.TrainConfig.probe_size)
    probes = utils.fit_probe_members(cfg)  # into the run's folder: its config.json names it
    utils.with_probes(r["summary"] | {"train_minutes": r["summary"]["train_minutes"] - r["summary"].get("probe_minutes", 0.0)},
                      probes)
    print(run, probes["entries"], flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", nargs="+", required=True, help="finished Category 1 runs under benchmarks/out/runs/")
    ap.add_argument("--archs", nargs="+", default=["efficientnet-lite1", "efficientnet-lite2"])
    ap.add_argument("--size", type=int, default=224, help="the probes' image size")
    ap.add_argument("--weights", type=float, nargs="+", default=[0.5, 1.0], help="probe weights to read")
    ap.add_argument("--eta", type=float, default=ETA)
    ap.add_argument("--write", action="store_true", help="fit the default probe members into the runs instead")
    a = ap.parse_args()
    torch.set_num_threads(utils.load_predict_module().cpu_threads())
    if a.write:
        for run in a.runs:
            write_probes(run)
        return
    dev = torch.device("cpu")
    amp = utils.amp_dtype_for(dev)
    parts = []
    for run in a.runs:
        t0 = time.time()
        ev = utils.evaluate_candidates(OUT, [run], views=VIEWS, ci=False)
        n, k = len(ev["y_hold"]), len(ev["label_values"])
        ft = sum(v for (c, _), v in ev["probs"].items() if ev["candidates"][c]["kind"] != "probe")  # the fine-tune's own
        ft = ft / ft.sum(1, keepdims=True)
        cfg = utils.load_run(OUT, run)["config"]
        data = utils.prepare_data(cfg["data_dir"], OUT, a.size, cfg["holdout_frac"], utils.split_seed(cfg),
                                  cfg.get("fit_frac", 1.0))
        y_hold = data["train"]["y"][data["hold_idx"]]
        if not np.array_equal(y_hold, ev["y_hold"]):
            raise RuntimeError(f"{run}: the holdout prepared at {a.size} px is not the run's")
        probes = {arch: probe_probs(data, arch, a.size, dev, amp, k) for arch in a.archs}

        def read(p):
            pred = p.argmax(1)
            return (f"{clean_scores(y_hold, pred[:n], a.eta, k)['macro_f1']:.3f} "
                    f"(val {utils.macro_f1_fast(ev['y_val'], pred[n:], k):.3f})")

        line = [f"fine-tune {read(ft)}"] + [f"{arch} probe {read(p)}" for arch, p in probes.items()]
        for w in a.weights:
            for size in range(1, len(a.archs) + 1):
                for group in itertools.combinations(a.archs, size):
                    line.append(f"+ {' + '.join(g.replace('efficientnet-', '') for g in group)} x{w:g} "
                                f"{read(ft + w * sum(probes[g] for g in group))}")
        parts.append(f"{run}: " + ", ".join(line))
        print(parts[-1], f"[{time.time() - t0:.0f} s]", flush=True)
    add_line(f"- c1_probe_members ({time.strftime('%Y-%m-%d')}, `benchmarks/c1_probe_members.py {' '.join(sys.argv[1:])}`; "
             f"each run's kept checkpoints x 4 views averaged, plus cleaned probes of frozen {a.size}px features fitted "
             f"on its fit set at weight w; clean Macro F1 est. on its holdout at eta {a.eta:g}, val Macro F1 in brackets) "
             + "; ".join(parts))


if __name__ == "__main__":
    main()
