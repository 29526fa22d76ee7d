"""How should notebook 03 ship a run's probe members? (no training; ~3 minutes a run)

`fit_probe_members` adds frozen-backbone probes to a Category 1 run's candidates. The greedy choice
(`select_ensemble`, at most `ensemble_k` checkpoints) picks among them on the same ~540 holdout + val
images it is scored on; c1_probe_members.py read a fixed rule instead (every fine-tune checkpoint x view,
plus each probe at half the fine-tune's weight). This reads, per run, the plans notebook 03 could ship,
clean Macro F1 estimated on the noisy holdout at eta ETA:
  - greedy over the fine-tune's checkpoints only (before the probes), at ensemble_k 3;
  - greedy over everything, at ensemble_k 3 and 5;
  - the fine-tune-only greedy plan plus every probe's centre view (`probes_in`);
  - every fine-tune pair plus every probe pair (all-in).

Plans are pooled as a mean, as notebook 03 shipped them when this was read (geometric with probes since 12-07,
`benchmarks/pooling.py`).

    .venv/bin/python benchmarks/probe_plans.py --runs c1_lite0_28_1206 c1_lite0_28_h2_1206 c1_lite0_e6_h1
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
import utils  # noqa: E402
from noise_rate import ETA, clean_scores  # noqa: E402
from results import add_line  # noqa: E402

OUT = REPO / "benchmarks" / "out"
VIEWS = ("center", "flip", "full", "zoom")


def subset(ev, keep):
    """`ev` with only the candidates `keep(candidate)` accepts."""
    cands = {c: info for c, info in ev["candidates"].items() if keep(info)}
    return {**ev, "candidates": cands, "probs": {k: v for k, v in ev["probs"].items() if k[0] in cands},
            "table": ev["table"][ev["table"].candidate.isin(list(cands))]}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", nargs="+", required=True)
    ap.add_argument("--eta", type=float, default=ETA)
    a = ap.parse_args()
    parts = []
    for run in a.runs:
        t0 = time.time()
        ev = utils.evaluate_candidates(OUT, [run], views=VIEWS, ci=False)
        n, k = len(ev["y_hold"]), len(ev["label_values"])
        decide = utils.load_predict_module().decide

        def read(pairs):
            pred = decide(sum(ev["probs"][p] for p in pairs), ev["log_prior"], ev["prior_tau"])
            return (f"{clean_scores(ev['y_hold'], pred[:n], a.eta, k)['macro_f1']:.3f} "
                    f"(val {utils.macro_f1_fast(ev['y_val'], pred[n:], k):.3f}, {len(pairs)} pairs)")

        probes = [c for c, info in ev["candidates"].items() if info["kind"] == "probe"]
        tuned = subset(ev, lambda info: info["kind"] != "probe")
        plans = {"greedy fine-tune only k3": utils.select_ensemble(tuned, ensemble_k=3, ci=False, pooling="mean")["pairs"],
                 "greedy all k3": utils.select_ensemble(ev, ensemble_k=3, ci=False, pooling="mean")["pairs"],
                 "greedy all k5": utils.select_ensemble(ev, ensemble_k=5, ci=False, pooling="mean")["pairs"]}
        plans["fine-tune greedy + probes' centre"] = plans["greedy fine-tune only k3"] + [(c, "center") for c in probes]
        plans["all-in"] = list(ev["probs"])
        plans["fine-tune all-in + probes' centre"] = [p for p in ev["probs"] if p[0] not in probes] + [(c, "center") for c in probes]
        parts.append(f"{run}: " + "; ".join(f"{name} {read(pairs)}" for name, pairs in plans.items()))
        print(parts[-1], f"[{time.time() - t0:.0f} s]", flush=True)
    add_line(f"- probe_plans ({time.strftime('%Y-%m-%d')}, `benchmarks/probe_plans.py --runs {' '.join(a.runs)}`; the plans "
             f"notebook 03 could ship from a run with probe members, greedy ones chosen on the holdout they are read on; "
             f"clean Macro F1 est. at eta {a.eta:g}) " + " | ".join(parts))


if __name__ == "__main__":
    main()
