"""Category 1 label cleaning, compared in the pretrained feature space (minutes, no fine-tuning): each
method cleans the fit labels, a logistic-regression probe trains on the cleaned labels, and the probe
is scored on the noisy holdout and the clean val. Under symmetric noise, holdout accuracy is a linear
function of true accuracy, so it ranks the methods. Appends one line per method to RESULTS.md.

    .venv/bin/python benchmarks/c1_cleaning.py [--image-size 160]
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
from results import add_line  # noqa: E402

DATA = REPO.parent / "shared" / "data" / "cusehacks-track1"


def probe(f_fit, y_fit, seed=0):
    from sklearn.linear_model import LogisticRegression
    return LogisticRegression(C=2.0, max_iter=300, random_state=seed).fit(f_fit, y_fit)


def cv_relabel(f, y, folds=5, min_prob=0.5, seed=0):
    """Confident-learning style: out-of-fold probe probabilities; relabel where another class has >= min_prob."""
    from sklearn.model_selection import StratifiedKFold
    p = np.zeros((len(y), int(y.max()) + 1))
    for tr, te in StratifiedKFold(folds, shuffle=True, random_state=seed).split(f, y):
        m = probe(f[tr], y[tr], seed)
        p[np.ix_(te, m.classes_)] = m.predict_proba(f[te])
    arg, top = p.argmax(1), p.max(1)
    new = np.where((top >= min_prob) & (arg != y), arg, y)
    return new, new != y


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--image-size", type=int, default=160)
    a = ap.parse_args()
    torch.set_num_threads(utils.load_predict_module().cpu_threads())
    out = REPO / "benchmarks" / "out"
    data = utils.prepare_data(DATA, out, a.image_size)
    model, info = utils.build_model("efficientnet-lite0", len(data["label_values"]), "efficientnet-lite0")
    member = {"net": model, "cache_size": data["cache_size"], "image_size": a.image_size, **info["expected_norm"]}
    dev, amp = torch.device("cpu"), utils.amp_dtype_for(torch.device("cpu"))
    t = time.time()
    x = data["train"]["x"]
    fit, hold = data["fit_idx"], data["hold_idx"]
    feats = torch.nn.functional.normalize(utils.embed(model, x, member, dev, amp), dim=1).numpy()
    f_val = torch.nn.functional.normalize(utils.embed(model, data["val"]["x"], member, dev, amp), dim=1).numpy()
    print(f"features in {time.time() - t:.0f} s", flush=True)
    y = data["train"]["y"]
    f_fit, y_fit, f_hold, y_hold, y_val = feats[fit], y[fit], feats[hold], y[hold], data["val"]["y"]
    methods = {"none": lambda: (y_fit, np.zeros(len(y_fit), bool)),
               "knn k10 0.5 (default)": lambda: utils.knn_relabel(f_fit, y_fit, 10, 0.5),
               "knn k20 0.4": lambda: utils.knn_relabel(f_fit, y_fit, 20, 0.4),
               "knn k5 0.6": lambda: utils.knn_relabel(f_fit, y_fit, 5, 0.6),
               "cv-probe 0.5": lambda: cv_relabel(f_fit, y_fit, 5, 0.5),
               "cv-probe 0.3": lambda: cv_relabel(f_fit, y_fit, 5, 0.3)}
    for name, clean in methods.items():
        t = time.time()
        y_new, changed = clean()
        m = probe(f_fit, y_new)
        ph, pv = m.predict(f_hold), m.predict(f_val)
        h, v = utils.score(y_hold, ph), utils.score(y_val, pv)
        line = (f"- c1_cleaning ({time.strftime('%Y-%m-%d')}, efficientnet-lite0 {a.image_size}px features + "
                f"logistic probe) {name}: {int(changed.sum())} of {len(y_fit)} fit labels changed; holdout acc "
                f"{h['acc']:.3f}, F1 {h['f1']:.3f}; val acc {v['acc']:.3f}, F1 {v['f1']:.3f} ({time.time() - t:.0f} s)")
        print(line, flush=True)
        add_line(line)


if __name__ == "__main__":
    main()
