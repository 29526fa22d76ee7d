"""Can the probe members (frozen Lite1 + Lite2, cleaned logistic probes) be fitted better? (no training;
features ~10 min once, then seconds a run)

The shipped plan (`utils.fixed_ensemble`) weighs each probe's centre view at half the fine-tune's total
weight, and the probes were fitted the one way `utils.fit_probe_members` fits them: prototype cleaning
(top 5) in the backbone's own features, then `utils.fit_probe` (class-balanced logistic regression, C=1)
on the centre view. This reads variants of that fit inside the shipped plan, with everything else as shipped:
  - base: the shipped fit, refitted here (checks this script against the run's own probe files);
  - C 0.3 / C 3: the regularisation of the logistic regression;
  - C 10: weaker still;
  - flip rows: the fit also sees each kept image's mirrored features (twice the rows, no inference cost),
    alone and at C 0.5 (the same L2 pull per row as the base fit: scikit-learn sums the loss over rows) and C 3;
  - joint cleaning: one kept set for both probes, the top 5 of the class means in the three frozen Lites'
    features concatenated (each L2-normalised), instead of each probe's own;
  - + Lite0 probe: a third probe member, frozen Lite0 (the fine-tune's own start), also at half weight.
Features are of what predict.py feeds each member (256 px squares, 224 px centre crop), computed once for
the 4,094 train and 50 val images and cached in out/cache. Each run's holdout split comes from its
config; clean Macro F1 estimated on the holdout at eta ETA. The fixed plan chooses nothing on the holdout,
so there is no in-sample bias to read out of fold.
The plan is pooled as a mean here, as it shipped when these variants were read (geometric since 12-07,
`benchmarks/pooling.py`).

    .venv/bin/python benchmarks/probe_variants.py --runs c1_lite0_28_1206 c1_lite0_28_h2_1206 c1_lite0_e6_h1 c1_probes_1206
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
import utils  # noqa: E402
from noise_rate import ETA, clean_scores  # noqa: E402
from plan_rules import average, cached_ev, shipped  # noqa: E402
from results import add_study_line  # noqa: E402

OUT = REPO / "benchmarks" / "out"
ARCHS = ("efficientnet-lite0", "efficientnet-lite1", "efficientnet-lite2")


def features(data_dir, size):
    """{(arch, view): (train features, val features)} of the frozen offline Lites, cached."""
    path = OUT / "cache" / f"probe_features_{size}.pt"
    if path.is_file():
        return torch.load(path, weights_only=False)
    data = utils.prepare_data(data_dir, OUT, size, 0.0)
    dev = torch.device("cpu")
    amp = utils.amp_dtype_for(dev)
    out = {}
    for arch in ARCHS:
        net, info = utils.build_model(arch, len(data["label_values"]), arch)
        member = {"cache_size": data["cache_size"], "image_size": size, **info["expected_norm"]}
        for view in ("center", "flip"):
            t0 = time.time()
            out[arch, view] = tuple(utils.embed(net, data[s]["x"], member, dev, amp, view=view).numpy()
                                    for s in ("train", "val"))
            print(f"{arch} {view}: {time.time() - t0:.0f} s", flush=True)
    out["y"] = data["train"]["y"]
    out["y_val"] = data["val"]["y"]
    utils._atomic(path, lambda f: torch.save(out, f))
    return out


def unit(f):
    return f / np.linalg.norm(f, axis=1, keepdims=True)


def probe_probs(F, arch, fit, hold, k, keep=None, C=1.0, flip_rows=False):
    """A cleaned probe fitted on the fit rows: probabilities of the holdout rows then the val rows."""
    f_tr, f_val = F[arch, "center"]
    y = F["y"][fit]
    if keep is None:
        keep = utils.prototype_keep(f_tr[fit], y, 5)
    X, Y = f_tr[fit][keep], y[keep]
    if flip_rows:
        X, Y = np.concatenate([X, F[arch, "flip"][0][fit][keep]]), np.concatenate([Y, Y])
    probe = utils.fit_probe(X, Y, C=C)
    p = np.zeros((len(hold) + len(f_val), k))
    p[:, probe.classes_] = probe.predict_proba(np.concatenate([f_tr[hold], f_val]))
    return p


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", nargs="+", required=True)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--probe-weight", type=float, default=0.5)
    ap.add_argument("--max-ms", type=float, default=80)
    ap.add_argument("--eta", type=float, default=ETA)
    a = ap.parse_args()
    torch.set_num_threads(utils.load_predict_module().cpu_threads())
    decide = utils.load_predict_module().decide
    F = None
    table, parts = {}, []
    for run in a.runs:
        cfg = utils.load_run(OUT, run)["config"]
        if F is None:
            F = features(cfg["data_dir"], a.size)
        ev = cached_ev(run)
        n, k = len(ev["y_hold"]), len(ev["label_values"])
        fit, hold = utils.holdout_split(F["y"], cfg["holdout_frac"], utils.split_seed(cfg))
        if not np.array_equal(F["y"][hold], ev["y_hold"]):
            raise RuntimeError(f"{run}: the holdout split here is not the run's")
        plan = shipped(ev, a.probe_weight, a.max_ms)
        probes = {c: ev["candidates"][c]["path"] for (c, _), _ in plan if ev["candidates"][c]["kind"] == "probe"}
        arch_of = {c: torch.load(p, map_location="cpu", weights_only=False)["arch"] for c, p in probes.items()}
        ft_plan = [(key, w) for key, w in plan if key[0] not in probes]
        w_probe = a.probe_weight * sum(w for _, w in ft_plan)
        ft = average(ev, ft_plan, "mean")  # the plan pooled as shipped before 12-07 (notebook 03's pooling then)

        def read(probe_list):
            """The shipped plan with the probes' probabilities replaced by `probe_list`."""
            p = (ft * sum(w for _, w in ft_plan) + w_probe * sum(probe_list)) / (sum(w for _, w in ft_plan)
                                                                                 + w_probe * len(probe_list))
            pred = decide(p, ev["log_prior"], ev["prior_tau"])
            return clean_scores(ev["y_hold"], pred[:n], a.eta, k)["macro_f1"], utils.macro_f1_fast(ev["y_val"], pred[n:], k)

        shipped_probs = [ev["probs"][c, "center"] for c in probes]
        base = {c: probe_probs(F, arch_of[c], fit, hold, k) for c in probes}
        gap = max(float(np.abs(base[c] - ev["probs"][c, "center"]).max()) for c in probes)
        joint_f = np.concatenate([unit(F[arch, "center"][0][fit]) for arch in ARCHS], axis=1)
        joint_keep = utils.prototype_keep(joint_f, F["y"][fit], 5)
        lite0 = probe_probs(F, "efficientnet-lite0", fit, hold, k)
        variants = {
            "shipped": shipped_probs,
            "base (refitted)": list(base.values()),
            "C 0.3": [probe_probs(F, arch_of[c], fit, hold, k, C=0.3) for c in probes],
            "C 3": [probe_probs(F, arch_of[c], fit, hold, k, C=3.0) for c in probes],
            "flip rows": [probe_probs(F, arch_of[c], fit, hold, k, flip_rows=True) for c in probes],
            "C 10": [probe_probs(F, arch_of[c], fit, hold, k, C=10.0) for c in probes],
            "flip rows, C 0.5": [probe_probs(F, arch_of[c], fit, hold, k, C=0.5, flip_rows=True) for c in probes],
            "flip rows, C 3": [probe_probs(F, arch_of[c], fit, hold, k, C=3.0, flip_rows=True) for c in probes],
            "joint cleaning": [probe_probs(F, arch_of[c], fit, hold, k, keep=joint_keep) for c in probes],
            "+ Lite0 probe": list(base.values()) + [lite0],
            "no probes": [],
        }
        res = {name: read(v) if v else read_ft(ft, ev, decide, a.eta) for name, v in variants.items()}
        for name, (f, _) in res.items():
            table.setdefault(name, []).append(f)
        parts.append(f"{run} (kept {int(joint_keep.sum())} jointly; refit max |dp| {gap:.1e}): " + "; ".join(
            f"{name} {f:.3f} (val {v:.3f})" for name, (f, v) in res.items()))
        print(parts[-1], flush=True)
    add_study_line("probe_variants", f"--runs {' '.join(a.runs)}", "the shipped fixed plan with its probe members "
                   f"fitted other ways, clean Macro F1 est. at eta {a.eta:g} on each run's holdout, val Macro F1 in brackets",
                   table, parts)


def read_ft(ft, ev, decide, eta):
    n, k = len(ev["y_hold"]), len(ev["label_values"])
    pred = decide(ft, ev["log_prior"], ev["prior_tau"])
    return clean_scores(ev["y_hold"], pred[:n], eta, k)["macro_f1"], utils.macro_f1_fast(ev["y_val"], pred[n:], k)


if __name__ == "__main__":
    main()
