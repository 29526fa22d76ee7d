"""Does Category 1 gain from more training images? A learning curve in the pretrained feature space
(minutes, no fine-tuning), to decide whether the ~12% holdout is worth training on.

Five-fold cross-fitting over all the training images: in each fold a nested, stratified share (e.g.
0.77 / 0.88 / 1.0) of the other four folds is cleaned as the Category 1 default cleans (Lite0 class
prototypes, top 5), a logistic probe trains on what is kept, and it predicts the left-out fold. Every
image is then predicted once per share by a probe that never saw it, so each share is judged on all
~4,100 noisy labels (8x the holdout), turned into clean accuracy and Macro F1 under symmetric noise
(`noise_rate.clean_scores`), with a paired bootstrap interval on the difference between shares. Going
from 0.88 to 1.0 of the pool is the step from the fit set to the fit set plus the holdout. The probe
scores about what the fine-tune does on the same cleaned labels (RESULTS.md, 12-01 and c1_probe), so
its slope is a proxy for the fine-tune's, not a measurement of it.

    .venv/bin/python benchmarks/data_curve.py [--shares 0.77 0.88 1.0] [--image-size 192]
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
from c1_run import cleaned_probe, backbone_features  # noqa: E402
from noise_rate import ETA, K, clean_by_class, clean_class_counts, clean_scores, size_quarters  # noqa: E402
from results import add_line  # noqa: E402

DATA = REPO.parent / "shared" / "data" / "cusehacks-track1"


def nested_shares(y, shares, seed=0) -> dict:
    """For each share, a boolean mask over y that keeps that share of every class; a smaller share's
    images are a subset of a larger one's, so the curve measures added images, not a new draw."""
    rng = np.random.default_rng(seed)
    rank = np.empty(len(y))  # each image's position in a random order within its class, as a share
    for c in np.unique(y):
        i = np.flatnonzero(y == c)
        rank[i] = (rng.permutation(len(i)) + 1) / len(i)
    return {s: rank <= s + 1e-9 for s in shares}


def paired_ci(y, pa, pb, eta, k=K, n_boot=500, seed=0, alpha=0.05) -> dict:
    """Bootstrap (resampling images) interval of share b's clean Macro F1 and accuracy minus share a's."""
    rng = np.random.default_rng(seed)
    d = {"macro_f1": [], "acc": []}
    for _ in range(n_boot):
        i = rng.integers(0, len(y), len(y))
        a, b = clean_scores(y[i], pa[i], eta, k), clean_scores(y[i], pb[i], eta, k)
        for m in d:
            d[m].append(b[m] - a[m])
    return {m: np.quantile(v, [alpha / 2, 1 - alpha / 2]) for m, v in d.items()}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shares", type=float, nargs="+", default=[0.77, 0.88, 1.0])
    ap.add_argument("--image-size", type=int, default=192)
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    torch.set_num_threads(utils.load_predict_module().cpu_threads())
    from sklearn.model_selection import StratifiedKFold

    data = utils.prepare_data(DATA, REPO / "benchmarks" / "out", a.image_size)
    t0 = time.time()
    # raw features, as `train` gives the probe (prototype_keep normalises its own copy)
    f = backbone_features(data, a.image_size, torch.device("cpu"), utils.amp_dtype_for(torch.device("cpu")))[0].numpy()
    y = data["train"]["y"]
    print(f"features of {len(y)} images in {time.time() - t0:.0f} s", flush=True)

    shares = sorted(a.shares)
    pred = {s: np.full(len(y), -1) for s in shares}
    kept = {s: [] for s in shares}
    for k, (pool, test) in enumerate(StratifiedKFold(a.folds, shuffle=True, random_state=a.seed).split(f, y)):
        masks = nested_shares(y[pool], shares, a.seed + k)
        for s in shares:
            t = time.time()
            tr = pool[masks[s]]
            m, keep = cleaned_probe(f[tr], y[tr], a.seed)
            pred[s][test] = m.predict(f[test])
            kept[s].append(int(keep.sum()))
            print(f"fold {k}, share {s}: {len(tr)} images, {int(keep.sum())} kept, {time.time() - t:.0f} s", flush=True)

    counts = np.bincount(y, minlength=len(data["label_values"]))  # given class sizes
    true_n = clean_class_counts(counts, ETA)
    parts = []
    for s in shares:
        c = clean_scores(y, pred[s], ETA)
        f1 = clean_by_class(y, pred[s], ETA)["f1"]
        by_q = [np.nanmean(f1[q]) for q in size_quarters(counts)]
        parts.append(f"share {s:.2f} (~{int(np.mean(kept[s]))} kept a fold): clean acc {c['acc']:.3f}, "
                     f"Macro F1 {c['macro_f1']:.3f}; by quarter of class size (smallest first) "
                     + "/".join(f"{v:.2f}" for v in by_q))
        print(parts[-1], flush=True)
    for lo, hi in zip(shares, shares[1:]):
        ci = paired_ci(y, pred[lo], pred[hi], ETA, seed=a.seed)
        d = {k: clean_scores(y, pred[hi], ETA)[k] - clean_scores(y, pred[lo], ETA)[k] for k in ("macro_f1", "acc")}
        parts.append(f"{lo:.2f} -> {hi:.2f}: Macro F1 {d['macro_f1']:+.3f} [{ci['macro_f1'][0]:+.3f}, "
                     f"{ci['macro_f1'][1]:+.3f}], acc {d['acc']:+.3f} [{ci['acc'][0]:+.3f}, {ci['acc'][1]:+.3f}]")
        print(parts[-1], flush=True)
    add_line(f"- data_curve ({time.strftime('%Y-%m-%d')}, `benchmarks/data_curve.py`; Lite0 {a.image_size}px features, "
             f"{a.folds}-fold cross-fitting over {len(y)} images, prototype cleaning top 5 + the probe_head "
             f"probe, clean estimates at eta {ETA}; true class sizes ~{true_n.min():.0f}-{true_n.max():.0f}) "
             + "; ".join(parts))


if __name__ == "__main__":
    main()
