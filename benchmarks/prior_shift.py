"""Prior correction at inference: does Macro F1 gain when the balanced-sampled network's log-softmax
is shifted by tau x log(class share of train.csv), as predict.py's `decide` does? A balanced sampler
trains toward a uniform class prior; the test set, like the training set, is not uniform (23-99
images a class). No training: each run's top-k checkpoints are scored through predict.py's
`run_pair` (center view), then `decide` at each tau, on the noisy holdout and the clean val.
Appends one line to RESULTS.md.

    .venv/bin/python benchmarks/prior_shift.py --runs c2_fixed75_1202 c2_112_1202
    .venv/bin/python benchmarks/prior_shift.py --runs c2_e90_1203 --taus 0 0.5 1 1.5 --eta 0.35   # and clean F1 est.
    .venv/bin/python benchmarks/prior_shift.py --runs c2_e90_1203 --eta 0.35 --true-prior   # estimated true sizes
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
import utils  # noqa: E402
from noise_rate import clean_class_counts, clean_scores, given_counts  # noqa: E402
from results import add_line  # noqa: E402

OUT = REPO / "benchmarks" / "out"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", nargs="+", required=True, help="runs under benchmarks/out/runs/")
    ap.add_argument("--taus", type=float, nargs="+", default=[0.0, 0.5, 1.0])
    ap.add_argument("--eta", type=float, default=None, help="also the clean Macro F1 estimated at this noise rate")
    ap.add_argument("--true-prior", action="store_true",
                    help="shift by the estimated true class sizes (the given counts with --eta's wrong labels taken out)")
    a = ap.parse_args()
    if a.true_prior and a.eta is None:
        ap.error("--true-prior needs --eta")
    parts = []
    for run in a.runs:
        ev = utils.evaluate_candidates(OUT, runs=[run], views=("center",), ci=False)
        y_hold, y_val, k = ev["y_hold"], ev["y_val"], len(ev["label_values"])
        n = len(y_hold)
        log_prior, decide = ev["log_prior"], utils.load_predict_module().decide  # what the package ships
        if a.true_prior:
            true = clean_class_counts(given_counts(ev), a.eta)
            log_prior = np.log(true / true.sum())
        f1, val_acc, clean = ({t: [] for t in a.taus} for _ in range(3))
        for p in ev["probs"].values():
            for t in a.taus:
                pred = decide(p, log_prior, t)
                f1[t].append(utils.macro_f1_fast(y_hold, pred[:n], k))
                val_acc[t].append(float((pred[n:] == y_val).mean()))
                if a.eta is not None:
                    clean[t].append(clean_scores(y_hold, pred[:n], a.eta, k)["macro_f1"])
        parts.append(f"{run} ({len(ev['probs'])} checkpoints) " + ", ".join(
            f"tau {t:g}: holdout F1 {np.mean(f1[t]):.3f}"
            + (f" (clean est. {np.mean(clean[t]):.3f} at eta {a.eta:g})" if a.eta is not None else "")
            + f" val acc {np.mean(val_acc[t]):.2f}" for t in a.taus))
        print(parts[-1], flush=True)
    add_line(f"- prior_shift ({pd.Timestamp.now():%Y-%m-%d}, `benchmarks/prior_shift.py`, log-softmax + tau x "
             f"log {'estimated true' if a.true_prior else 'train.csv'} class share, center view, mean over each run's top-k checkpoints) " + "; ".join(parts))


if __name__ == "__main__":
    main()
