"""Do runs that fine-tuned different backbones err differently enough to ensemble? No training: the
runs' kept checkpoints (all holding out the same images, `-p holdout_seed`) are scored under every
view through predict.py's own code (`evaluate_candidates`), then each run alone and every group of
them is read with its checkpoints x views softmax-averaged, the greedy choice (at most `--ensemble-k`
checkpoints, chosen and scored on the same holdout, so flattered) and the plan notebook 03 ships, fixed in
advance (`utils.fixed_ensemble`: the newest checkpoints x zoom, center, probe members weighted). Clean
Macro F1 estimated from the noisy holdout as `noise_rate.py --runs` does (`--eta`). Appends one line
to RESULTS.md.

    .venv/bin/python benchmarks/cross_ensemble.py --runs c1_lite0_e6_h1 c1_lite1_e6_h1 c1_lite2_e6_h1
"""
from __future__ import annotations

import argparse
import itertools
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


def group_pairs(candidates: dict, group, views=VIEWS) -> list[tuple[str, str]]:
    """Every (checkpoint, view) of the runs in `group`: what their softmax average reads."""
    return [(c, v) for c, info in candidates.items() if info["run"] in group for v in views]


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", nargs="+", required=True, help="holdout runs under benchmarks/out/runs/, same holdout")
    ap.add_argument("--eta", type=float, default=ETA, help="label noise rate for the clean estimate (noise_rate.py)")
    ap.add_argument("--ensemble-k", type=int, default=3, help="checkpoints the greedy choice and the fixed plan may take")
    ap.add_argument("--plan-ms", type=float, default=80, help="the fixed plan's cost cap (notebook 03's plan_ms)")
    a = ap.parse_args(argv)
    ev = utils.evaluate_candidates(OUT, a.runs, views=VIEWS)
    P = utils.load_predict_module()
    n, k = len(ev["y_hold"]), len(ev["label_values"])

    def read(pairs, weights=None, pooling="mean"):
        weights = weights or [1.0] * len(pairs)
        pred = P.decide(P.pool([ev["probs"][p] for p in pairs], weights, pooling), ev["log_prior"], ev["prior_tau"])
        return (f"holdout F1 {utils.macro_f1_fast(ev['y_hold'], pred[:n], k):.3f} "
                f"(clean est. {clean_scores(ev['y_hold'], pred[:n], a.eta, k)['macro_f1']:.3f}) "
                f"val F1 {utils.macro_f1_fast(ev['y_val'], pred[n:], k):.3f} acc {(pred[n:] == ev['y_val']).mean():.2f}")

    parts = []
    for size in range(1, len(a.runs) + 1):
        for group in itertools.combinations(a.runs, size):
            parts.append(f"{' + '.join(group)} (all checkpoints x 4 views): {read(group_pairs(ev['candidates'], group))}")
            print(parts[-1], flush=True)
    sel = utils.select_ensemble(ev, ensemble_k=a.ensemble_k, ci=False)
    parts.append(f"greedy, at most {a.ensemble_k} checkpoints ({', '.join(utils._short(c) + '/' + v for c, v in sel['pairs'])}; "
                 f"chosen on this holdout): {read(sel['pairs'], pooling=sel['pooling'])}")
    print(parts[-1], flush=True)
    fixed = utils.fixed_ensemble(ev, ensemble_k=a.ensemble_k, max_ms=a.plan_ms, ci=False)
    parts.append(f"notebook 03's fixed plan ({', '.join(utils._short(c) + '/' + v + (f' x{w:g}' if w != 1 else '') for (c, v), w in zip(fixed['pairs'], fixed['weights']))}; "
                 f"not chosen on these images; pooled as a {fixed['pooling']}): {read(fixed['pairs'], fixed['weights'], fixed['pooling'])}")
    print(parts[-1], flush=True)
    add_line(f"- cross_ensemble ({time.strftime('%Y-%m-%d')}, `benchmarks/cross_ensemble.py --runs {' '.join(a.runs)}`, prior tau {ev['prior_tau']:g}, "
             f"clean est. at eta {a.eta:g}) " + "; ".join(parts))


if __name__ == "__main__":
    main()
