"""How far does a holdout's clean Macro F1 estimate read from the whole training set's? (2-4 minutes,
no fine-tuning)

Every row of RESULTS.md is judged on one stratified 12% holdout (492 images, ~5 a class, ~35% of their
labels wrong), and `noise_rate.clean_scores` turns its noisy confusion matrix into a clean Macro F1
estimate. With ~2-3 images in a small class that estimate is noisy, and a ratio of noisy counts, so it
can also read low on average. This script measures both for a reference model that costs seconds, the
Category 1 probe (`c1_run.cleaned_probe` on Lite0 features): cross-fitted over all ~4,100 images
(k-fold with k = 8, so each probe trains on 87.5% as a run's fit set does, and every image is
predicted by a probe that never saw it) it gives the best available reading; then

  - the same out-of-fold predictions read on many random 12% draws: their mean minus the full reading
    is the estimator's systematic error at this size, their spread the draw's;
  - for each holdout seed given, a probe trained on that split's fit set and read on its holdout: how
    far that particular holdout reads from the full reading. A network judged on the same holdout
    meets the same images, so it shares part of that error (the part due to the draw, not the model).

With --noisy-probe it also reads, cross-fitted the same way, the kind of probe issue 6 scored on the
clean test (frozen Lite0 + logistic regression on all the noisy labels: accuracy 0.753, Macro F1 0.723):
the one model whose clean scores are known, so the ratio of the estimated Macro F1 to the estimated
accuracy checks the estimator against 0.723 / 0.753 = 0.96.

    .venv/bin/python benchmarks/holdout_judge.py [--seeds 0 1 2 3 4] [--image-size 192] [--noisy-probe]
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
from c1_run import backbone_features, cleaned_probe, cross_fitted  # noqa: E402
from noise_rate import ETA, K, clean_scores  # noqa: E402
from results import add_line  # noqa: E402

DATA = REPO.parent / "shared" / "data" / "cusehacks-track1"


def draws_reading(y, pred, frac=0.12, n=50, eta=ETA, k=K, seed=0) -> np.ndarray:
    """Clean Macro F1 estimates of the predictions `pred` read on `n` holdouts drawn as a run draws its
    own (`utils.holdout_split`, seeds seed .. seed + n - 1)."""
    return np.array([clean_scores(y[h], pred[h], eta, k)["macro_f1"]
                     for h in (utils.holdout_split(y, frac, seed + i)[1] for i in range(n))])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4], help="holdout seeds to read")
    ap.add_argument("--image-size", type=int, default=192)
    ap.add_argument("--folds", type=int, default=8)
    ap.add_argument("--noisy-probe", action="store_true", help="also read a probe on all the noisy labels")
    a = ap.parse_args()
    torch.set_num_threads(utils.load_predict_module().cpu_threads())
    t0 = time.time()
    data = utils.prepare_data(DATA, REPO / "benchmarks" / "out", a.image_size)
    dev = torch.device("cpu")
    f = backbone_features(data, a.image_size, dev, utils.amp_dtype_for(dev))[0].numpy()
    y = data["train"]["y"]
    proba, noisy = cross_fitted(f, y, a.folds, noisy=a.noisy_probe)
    oof = proba.argmax(1)
    full = clean_scores(y, oof, ETA)
    draws = draws_reading(y, oof)
    print(f"features and {a.folds} probes in {time.time() - t0:.0f} s", flush=True)
    parts = [f"cross-fitted over all {len(y)} images: clean Macro F1 {full['macro_f1']:.3f}, acc {full['acc']:.3f}",
             f"the same predictions read on {len(draws)} random 12% draws: {draws.mean():.3f} (sd {draws.std():.3f}, "
             f"range {draws.min():.3f}-{draws.max():.3f}), {draws.mean() - full['macro_f1']:+.3f} on average"]
    if a.noisy_probe:
        n = clean_scores(y, noisy, ETA)
        parts.append(f"a probe on all the noisy labels, cross-fitted the same way: noisy acc {(noisy == y).mean():.3f} "
                     f"-> clean acc {n['acc']:.3f}, Macro F1 {n['macro_f1']:.3f}, "
                     f"their ratio {n['macro_f1'] / n['acc']:.3f} "
                     f"(issue 6's probe on the clean test: 0.753, 0.723, ratio 0.960)")
        print(parts[-1], flush=True)
    for s in a.seeds:
        fit, hold = utils.holdout_split(y, seed=s)
        p = cleaned_probe(f[fit], y[fit])[0].predict(f[hold])
        h = clean_scores(y[hold], p, ETA)
        parts.append(f"holdout_seed {s}: the fit-set probe reads {h['macro_f1']:.3f} (acc {h['acc']:.3f}), "
                     f"{h['macro_f1'] - full['macro_f1']:+.3f} from the full reading")
        print(parts[-1], flush=True)
    print(parts[0] + "; " + parts[1], flush=True)
    add_line(f"- holdout_judge ({time.strftime('%Y-%m-%d')}, `benchmarks/holdout_judge.py`; the Category 1 probe, "
             f"prototype cleaning top 5 + logistic regression on Lite0 {a.image_size}px features, clean estimates "
             f"at eta {ETA}) " + "; ".join(parts))


if __name__ == "__main__":
    main()
