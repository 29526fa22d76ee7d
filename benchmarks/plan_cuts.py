"""What should predict.py's time planner cut first from notebook 03's fixed plan: an older checkpoint's pair
or a probe member? And how flat is the probes' weight? (no training; seconds a run on plan_rules.py's cache)

predict.py cuts its plan from the end when the forecast does not fit its budget. For each run this reads
the shipped plan (`utils.fixed_ensemble`, probe weight 0.5, `--max-ms`) whole, without its last probe, and
without its last fine-tune pair (the other weights as they were: predict.py does not re-weigh a cut plan),
and the shipped rule at probe weights 0.5 / 0.75 / 1. Clean Macro F1 estimated on each run's holdout at eta
ETA; the fixed plan chooses nothing on the holdout, so these are not in-sample readings of a choice.

    .venv/bin/python benchmarks/plan_cuts.py --runs c1_lite0_28_1206 c1_lite0_28_h2_1206 c1_lite0_e6_h1 c1_probes_1206 c1_default_h3_1206 c1_mirror_h3_1206
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
import utils  # noqa: E402
from noise_rate import ETA, clean_scores  # noqa: E402
from plan_rules import P, average, cached_ev, shipped  # noqa: E402
from results import add_study_line  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", nargs="+", required=True)
    ap.add_argument("--max-ms", type=float, default=80)
    ap.add_argument("--eta", type=float, default=ETA)
    ap.add_argument("--pooling", choices=P.POOLINGS, default=None,
                    help="how the plans are pooled (default: what notebook 03 ships; lines before 12-07 are 'mean')")
    a = ap.parse_args()
    decide = utils.load_predict_module().decide
    table, parts = {}, []
    for run in a.runs:
        ev = cached_ev(run)
        n, k = len(ev["y_hold"]), len(ev["label_values"])

        def read(plan):
            pred = decide(average(ev, plan, a.pooling), ev["log_prior"], ev["prior_tau"])
            return clean_scores(ev["y_hold"], pred[:n], a.eta, k)["macro_f1"]

        plan = shipped(ev, 0.5, a.max_ms)
        is_probe = [ev["candidates"][key[0]]["kind"] == "probe" for key, _ in plan]
        last_probe = max(i for i, p in enumerate(is_probe) if p)
        last_ft = max(i for i, p in enumerate(is_probe) if not p)
        res = {"shipped": read(plan),
               "without its last probe": read([x for i, x in enumerate(plan) if i != last_probe]),
               "without its last fine-tune pair": read([x for i, x in enumerate(plan) if i != last_ft])}
        for w in (0.5, 0.75, 1.0):
            res[f"probe weight {w:g}"] = read(shipped(ev, w, a.max_ms))
        for name, f in res.items():
            table.setdefault(name, []).append(f)
        parts.append(f"{run} ({len(plan)} pairs): " + "; ".join(f"{name} {f:.3f}" for name, f in res.items()))
        print(parts[-1], flush=True)
    add_study_line("plan_cuts", f"--runs {' '.join(a.runs)}" + (f" --pooling {a.pooling}" if a.pooling else ""), f"notebook 03's fixed plan at max {a.max_ms:g} ms whole, "
                   f"cut by one pair, and at other probe weights; clean Macro F1 est. at eta {a.eta:g} on each run's holdout",
                   table, parts, digits=4)


if __name__ == "__main__":
    main()
