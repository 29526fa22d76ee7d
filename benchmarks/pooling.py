"""How should predict.py pool a plan's softmax outputs: their weighted mean, or their weighted geometric mean?
(no training; seconds a run on plan_rules.py's cache)

The arithmetic mean lets one confident member carry a class that the others all but rule out; the geometric
mean (the weighted mean of the log-probabilities, renormalised: a product of experts) needs every member to
find a class likely. For each run this reads notebook 03's fixed plan (`utils.fixed_ensemble`) both ways:
whole at probe weights 0.25 / 0.5 / 1, cut to its first three pairs (what predict.py's planner keeps on a
slow host), and the fine-tune's own zoom + center pairs without the probes. The plan chooses nothing on the
holdout, so the readings are not in-sample; clean Macro F1 estimated on each run's holdout at eta ETA.

    .venv/bin/python benchmarks/pooling.py --runs c1_lite0_28_1206 c1_probes_1206 c1_whole28_1207 c1_lite0_e6_h1 \
        c1_lite0_28_h2_1206 c1_default_h3_1206 c1_mirror_h3_1206 c1_default_h4_1206 c1_b22_h4_1206 c1_whole28_h4_1207
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
import utils  # noqa: E402
from noise_rate import ETA, clean_scores  # noqa: E402
from plan_rules import P, average, cached_ev  # noqa: E402
from results import add_study_line  # noqa: E402


def plans(ev, max_ms):
    """The plans read, by name: [((candidate, view), weight)]."""
    out = {}
    for w in (0.25, 0.5, 1.0):
        sel = utils.fixed_ensemble(ev, probe_weight=w, max_ms=max_ms, ci=False)
        out[f"shipped x{w:g}"] = list(zip(sel["pairs"], sel["weights"]))
    out["shipped x0.5, first 3 pairs"] = out["shipped x0.5"][:3]
    probes = {c for c, info in ev["candidates"].items() if info["kind"] == "probe"}
    out["fine-tune zoom + center, no probes"] = [(key, 1.0) for key in ev["probs"]
                                                 if key[0] not in probes and key[1] in ("zoom", "center")]
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", nargs="+", required=True)
    ap.add_argument("--max-ms", type=float, default=80, help="the shipped rule's cost cap (notebook 03's plan_ms)")
    ap.add_argument("--eta", type=float, default=ETA)
    a = ap.parse_args()
    decide = utils.load_predict_module().decide
    table, parts = {}, []
    for run in a.runs:
        ev = cached_ev(run)
        n, k = len(ev["y_hold"]), len(ev["label_values"])
        res = {}
        for name, plan in plans(ev, a.max_ms).items():
            for pooling in P.POOLINGS:
                pred = decide(average(ev, plan, pooling), ev["log_prior"], ev["prior_tau"])
                res[f"{name} {pooling}"] = clean_scores(ev["y_hold"], pred[:n], a.eta, k)["macro_f1"]
            res[f"{name} geometric - mean"] = res[f"{name} geometric"] - res[f"{name} mean"]
        for name, f in res.items():
            table.setdefault(name, []).append(f)
        parts.append(f"{run}: " + "; ".join(f"{name} {f:+.3f}" if name.endswith("- mean") else f"{name} {f:.3f}"
                                            for name, f in res.items()))
        print(parts[-1], flush=True)
    add_study_line("pooling", f"--runs {' '.join(a.runs)}", "notebook 03's fixed plan pooled as a weighted mean or a "
                   f"weighted geometric mean; clean Macro F1 est. at eta {a.eta:g} on each run's holdout", table, parts,
                   digits=4)


if __name__ == "__main__":
    main()
