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
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
import utils  # noqa: E402
from results import add_line  # noqa: E402

NOISE = 0.35  # the estimated symmetric noise rate (RESULTS.md): holdout accuracy -> clean accuracy


def clean_estimate(noisy_acc, k=102, noise=NOISE):
    return (noisy_acc - noise / (k - 1)) / (1 - noise - noise / (k - 1))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--run", required=True)
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "out"))
    a = ap.parse_args()
    torch.set_num_threads(utils.load_predict_module().cpu_threads())
    run = utils.load_run(a.out, a.run)
    cfg = run["config"]
    data = utils.prepare_data(cfg["data_dir"], a.out, cfg["image_size"], cfg["holdout_frac"], utils.split_seed(cfg))
    dev = torch.device("cpu")
    amp = utils.amp_dtype_for(dev)
    K = len(data["label_values"])
    x, y = data["train"]["x"], data["train"]["y"]
    fit, hold = data["fit_idx"], data["hold_idx"]
    y_fit, y_hold, y_val = y[fit], y[hold], data["val"]["y"]
    t = time.time()
    base, info = utils.build_model("efficientnet-lite0", K, "efficientnet-lite0")
    member = {"net": base, "cache_size": data["cache_size"], "image_size": cfg["image_size"], **info["expected_norm"]}
    norm = torch.nn.functional.normalize
    f_all = norm(utils.embed(base, x, member, dev, amp), dim=1).numpy()
    f_val = norm(utils.embed(base, data["val"]["x"], member, dev, amp), dim=1).numpy()
    f_fit, f_hold = f_all[fit], f_all[hold]
    net, tinfo = utils.checkpoint_net(run["run_dir"], run["summary"]["topk"][0], dev)
    g_fit, p_fit = utils.embed(net, x[fit], {"net": net, **tinfo}, dev, amp, with_probs=True)
    g_fit, p_fit = g_fit.numpy(), p_fit.numpy()
    print(f"features in {time.time() - t:.0f} s", flush=True)

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
                     f"holdout acc {h['acc']:.3f} (clean est. {clean_estimate(h['acc']):.3f}) F1 {h['f1']:.3f}, "
                     f"val acc {v['acc']:.2f}")
        print(parts[-1], flush=True)
    add_line(f"- c1_second_round ({time.strftime('%Y-%m-%d')}, run {a.run}'s best checkpoint judges the fit labels; "
             f"a logistic probe on Lite0 {cfg['image_size']}px features trains on each label set) " + "; ".join(parts))

if __name__ == "__main__":
    main()
