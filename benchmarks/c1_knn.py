"""Category 1: does a neighbour or class-mean classifier in the FINE-TUNED network's feature space add
anything to its softmax? Minutes, no training.

On small fine-grained sets a kNN over the trained features sometimes beats or complements the linear
head, and a vote over the k nearest training images is robust to symmetric label noise by construction.
The references are the run's fit images, either the ones its cleaning kept (`clean_keep` in
sample_scores.npz) or all of them at their given labels; each classifier alone and averaged with the
softmax is scored on the noisy holdout, read as clean Macro F1 with `noise_rate.clean_scores`, and on val.

    .venv/bin/python benchmarks/c1_knn.py --run c1_e6_h1_f76_1204
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
from c1_run import load_with_features  # noqa: E402
from noise_rate import ETA, clean_scores  # noqa: E402
from results import add_line  # noqa: E402


def knn_probs(f_query, f_ref, y_ref, k, n_classes, temp=0.07):
    """Vote of the k nearest references by cosine similarity s, weighted exp(s / temp) as in
    instance-discrimination kNN monitors; one column per class, zero for a class with no reference."""
    from sklearn.neighbors import KNeighborsClassifier
    knn = KNeighborsClassifier(n_neighbors=k, metric="cosine", weights=lambda d: np.exp((1 - d) / temp)).fit(f_ref, y_ref)
    out = np.zeros((len(f_query), n_classes))
    out[:, knn.classes_] = knn.predict_proba(f_query)
    return out


def proto_probs(f_query, f_ref, y_ref, n_classes, temp=0.05):
    """Softmax over the cosine similarity to each class's mean reference feature."""
    means = np.zeros((n_classes, f_ref.shape[1]))
    np.add.at(means, y_ref, f_ref)
    means /= np.linalg.norm(means, axis=1, keepdims=True) + 1e-9
    return torch.softmax(torch.as_tensor(f_query @ means.T / temp), 1).numpy()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--run", required=True, help="a finished Category 1 run in --out (with sample_scores.npz)")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "out"))
    a = ap.parse_args()
    r = load_with_features(a.out, a.run, pretrained_features=False)
    ss = np.load(Path(a.out) / "runs" / a.run / "sample_scores.npz")
    files = np.asarray(r.data["train"]["df"].filename)
    if not np.array_equal(files[r.fit], ss["fit_files"]):
        raise SystemExit(f"{a.run}: the rebuilt fit set is not the run's (sample_scores.npz fit_files)")
    keep = ss["clean_keep"].astype(bool)
    t0 = time.time()
    feats = {}
    for split, x in (("train", r.x), ("val", r.data["val"]["x"])):
        f, p = utils.embed(r.tuned["net"], x, r.tuned, r.dev, r.amp, with_probs=True)
        feats[split] = (torch.nn.functional.normalize(f.float(), dim=1).numpy(), p.float().numpy())
    print(f"fine-tuned features in {time.time() - t0:.0f} s", flush=True)
    (f_tr, p_tr), (f_val, p_val) = feats["train"], feats["val"]
    y = r.data["train"]["y"]
    f_hold, p_hold = f_tr[r.hold], p_tr[r.hold]

    def text(name, ph, pv):
        c = clean_scores(r.y_hold, ph.argmax(1), ETA)
        return f"{name}: clean F1 {c['macro_f1']:.3f} acc {c['acc']:.3f}, val acc {(pv.argmax(1) == r.y_val).mean():.2f}"

    parts = [text(f"the fine-tune's softmax ({r.run['summary']['topk'][0]['file']}, center)", p_hold, p_val)]
    for ref_name, ref in (("kept", r.fit[keep]), ("all fit", r.fit)):
        classifiers = {"class means": lambda fq: proto_probs(fq, f_tr[ref], y[ref], r.K)}
        for k in (5, 10, 20):
            classifiers[f"kNN k={k}"] = lambda fq, k=k: knn_probs(fq, f_tr[ref], y[ref], k, r.K)
        for name, clf in classifiers.items():
            ph, pv = clf(f_hold), clf(f_val)
            parts.append(text(f"{name} ({ref_name})", ph, pv))
            for w in (0.3, 0.5):
                parts.append(text(f"softmax + {w:g} x {name} ({ref_name})", (1 - w) * p_hold + w * ph, (1 - w) * p_val + w * pv))
    for p in parts:
        print(p, flush=True)
    add_line(f"- c1_knn ({time.strftime('%Y-%m-%d')}, `benchmarks/c1_knn.py --run {a.run}`; the run's best checkpoint's "
             f"penultimate features, L2-normalised; references its {len(r.fit)} fit images, {int(keep.sum())} of them kept "
             f"by its cleaning; clean est. at eta {ETA}) " + "; ".join(parts))


if __name__ == "__main__":
    main()
