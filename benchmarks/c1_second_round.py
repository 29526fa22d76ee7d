"""Category 1: would a second cleaning round in a fine-tuned network's own features give better training
labels than the first round in the pretrained Lite0 features? Minutes, no fine-tuning.

A finished Category 1 run (its best checkpoint) judges the fit labels; each candidate label set then
trains the same judge of label quality, a logistic-regression probe on the *pretrained* Lite0 features,
scored on the noisy holdout (a linear function of true accuracy under symmetric noise) and the clean val.
The fine-tuned network trained on the first round's kept images, so its view of those is in-sample
(memorised); only its view of the images the first round left out is out-of-sample.

    .venv/bin/python benchmarks/c1_second_round.py --run c1_default_1202
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
import utils  # noqa: E402
from c1_run import load_with_features  # noqa: E402
from noise_rate import ETA, clean_from  # noqa: E402
from results import add_line  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--run", required=True)
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "out"))
    a = ap.parse_args()
    r = load_with_features(a.out, a.run)
    cfg, fit, hold, y_fit, y_hold, y_val = r.cfg, r.fit, r.hold, r.y_fit, r.y_hold, r.y_val
    f_fit, f_hold, f_val = r.f_all[fit], r.f_all[hold], r.f_val
    t = time.time()
    g_fit, p_fit = utils.embed(r.tuned["net"], r.x[fit], r.tuned, r.dev, r.amp, with_probs=True)
    g_fit, p_fit = g_fit.numpy(), p_fit.numpy()
    print(f"the fine-tune's features in {time.time() - t:.0f} s", flush=True)

    first = utils.prototype_keep(f_fit, y_fit, 5)  # the default first round
    pred, conf = p_fit.argmax(1), p_fit.max(1)
    sets = {"all given labels": (y_fit, np.ones(len(y_fit), bool)),
            "round 1: Lite0 prototypes top 5 (default)": (y_fit, first)}
    for k in (1, 3, 5):
        sets[f"round 2: fine-tuned prototypes top {k}"] = (y_fit, utils.prototype_keep(g_fit, y_fit, k))
    for r in (0, 1, 3):
        for tau in (0.5, 0.7, 0.9):
            labels, keep, back, swap = utils.second_round(g_fit, p_fit, y_fit, first, r, tau)
            sets[f"utils.second_round(max_rank={r}, min_prob={tau}): {int(back.sum())} given back, "
                 f"{int(swap.sum())} relabelled"] = (labels, keep)
    for tau in (0.5, 0.9):
        sets[f"every image at the fine-tuned prediction where p >= {tau}"] = (pred, conf >= tau)
    from sklearn.linear_model import LogisticRegression
    parts = []
    for name, (labels, keep) in sets.items():
        m = LogisticRegression(C=2.0, max_iter=300, random_state=0).fit(f_fit[keep], labels[keep])
        h, v = utils.score(y_hold, m.predict(f_hold)), utils.score(y_val, m.predict(f_val))
        agree = float((labels[keep] == y_fit[keep]).mean())
        parts.append(f"{name}: {int(keep.sum())} of {len(keep)} fit images ({agree:.2f} at their given label), "
                     f"holdout acc {h['acc']:.3f} (clean est. {clean_from(h['acc'], ETA):.3f}) F1 {h['f1']:.3f}, "
                     f"val acc {v['acc']:.2f}")
        print(parts[-1], flush=True)
    add_line(f"- c1_second_round ({time.strftime('%Y-%m-%d')}, run {a.run}'s best checkpoint judges the fit labels; "
             f"a logistic probe on Lite0 {cfg['image_size']}px features trains on each label set; clean est. at eta {ETA}) " + "; ".join(parts))

if __name__ == "__main__":
    main()
