"""How wrong are the training labels, and what clean accuracy does a holdout accuracy stand for?

Under symmetric noise at rate eta over K classes, a model of clean accuracy a agrees with a noisy label
with probability h = a (1 - eta) + (1 - a) eta / (K - 1). Every benchmark row measures h on the noisy
holdout and a on the clean val, so pooling the rows of a category gives eta; the formula turned around
gives the clean accuracy a holdout accuracy stands for. Val is 50 images in 37 classes, so each row's a
is +-0.09: the pooled estimate is a guide, not a measurement. `--confident` reads eta without val: how
often the given label disagrees with a cross-fitted probe where the probe is surest (`eta_confident`).

    .venv/bin/python benchmarks/noise_rate.py                 # eta per category from RESULTS.md
    .venv/bin/python benchmarks/noise_rate.py --holdout-acc 0.600 0.398 --eta 0.35
    .venv/bin/python benchmarks/noise_rate.py --eta 0.35 --cleaning 2244 3602 5   # what the cleaning kept
    .venv/bin/python benchmarks/noise_rate.py --eta 0.35 --runs c2_e90_1203   # clean Macro F1 of a run's checkpoints
    .venv/bin/python benchmarks/noise_rate.py --confident c1_e6_h1_f76_1204   # eta where a probe (and a run) is surest
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
K = 102
# The noise rate the benchmark scripts read clean estimates at. 0.32 until 12-05 (val against the holdout,
# pooled over the rows); since then 0.35: the disagreement where a cross-fitted probe is surest
# (`--confident`, 0.34-0.36) and issue 6's own "~35%".
ETA = 0.35


def eta_from(a: float, h: float, k: int = K) -> float:
    """The noise rate at which clean accuracy a shows as holdout accuracy h."""
    return (a - h) / (a - (1 - a) / (k - 1))


def clean_from(h: float, eta: float, k: int = K) -> float:
    """The clean accuracy that shows as holdout accuracy h under symmetric noise eta."""
    return (h - eta / (k - 1)) / (1 - eta - eta / (k - 1))


def clean_scores(y_noisy, pred, eta: float, k: int = K) -> dict:
    """Accuracy and Macro F1 against the clean labels, estimated from predictions scored on noisy ones.

    The targets are Macro F1 on a clean test set, and the holdout's labels are noisy; accuracy converts
    with `clean_from`, Macro F1 needs the clean confusion matrix. Under symmetric noise the counts N[p, l]
    (predicted p, noisy label l) are in expectation C T, with C the clean counts and T = a I + e 1 1^T the
    noise (e = eta / (k - 1), a = 1 - eta - e, a + k e = 1), so C = N T^-1 has the closed form
    C[p, y] = (N[p, y] - e n_p) / a, n_p the images predicted p. Then per class TP = C[y, y], predicted =
    n_y, true = the column sum of C, and F1 = 2 TP / (predicted + true). With a few holdout images a class
    each class's estimate is noisy (it can leave [0, 1]); their mean, Macro F1, is what to read.
    No library inverts a noise model for a confusion matrix, hence these lines."""
    c = clean_by_class(y_noisy, pred, eta, k)
    return {"acc": float(c["tp"].sum() / len(np.asarray(pred))), "macro_f1": float(np.nanmean(c["f1"]))}


def clean_by_class(y_noisy, pred, eta: float, k: int = K) -> dict:
    """Per class, the clean counts `clean_scores` averages: tp, n_pred, n_true and f1 (NaN for a class
    neither among the labels nor the predictions)."""
    y_noisy, pred = np.asarray(y_noisy), np.asarray(pred)
    e = eta / (k - 1)
    a = 1 - eta - e
    N = np.zeros((k, k))
    np.add.at(N, (pred, y_noisy), 1)
    n_pred = N.sum(1)
    tp = (np.diag(N) - e * n_pred) / a
    n_true = (N.sum(0) - e * len(pred)) / a
    present = (N.sum(0) > 0) | (n_pred > 0)  # as scikit-learn: the classes among the labels or predictions
    f1 = np.full(k, np.nan)
    f1[present] = 2 * tp[present] / (n_pred[present] + n_true[present])
    return {"tp": tp, "n_pred": n_pred, "n_true": n_true, "f1": f1}


def size_quarters(counts) -> list:
    """The class indices in four groups of equal count, from the smallest given class size up."""
    return np.array_split(np.argsort(np.asarray(counts), kind="stable"), 4)


def clean_class_counts(counts, eta: float) -> np.ndarray:
    """The number of images truly of each class, under symmetric noise: a class of T true
    images shows n = (1 - eta) T + eta (N - T) / (K - 1) labels, so every class receives about the same
    number of wrong ones and the true sizes are more unequal than the given ones. Floored at 1."""
    counts = np.asarray(counts, dtype=np.float64)
    n, k = counts.sum(), len(counts)
    return np.maximum((counts - eta * n / (k - 1)) / (1 - eta - eta / (k - 1)), 1.0)


def given_counts(ev) -> np.ndarray:
    """train.csv's count of each class of an `utils.evaluate_candidates` result, in its label order."""
    import pandas as pd
    counts = pd.read_csv(Path(ev["data_dir"]) / "train.csv").label.value_counts()
    return np.array([counts.get(int(v), 0) for v in ev["label_values"]])


def cleaning_split(kept: int, total: int, rank: int, eta: float, k: int = K):
    """Right and wrong labels among the `kept` of `total` that prototype cleaning keeps (the given label
    among an image's `rank` nearest class means), under symmetric noise eta. An image's true class is among
    its `rank` nearest with some probability r, whatever its label; a right label is kept with probability
    r, and a wrong one, a random class of the k - 1 others, lands in the remaining slots with probability
    (rank - r) / (k - 1). kept / total = r (1 - eta) + eta (rank - r) / (k - 1) gives r.
    Returns (right kept, wrong kept, recall of the right labels, precision of the kept ones)."""
    r = (kept / total - eta * rank / (k - 1)) / (1 - eta - eta / (k - 1))
    right = r * (1 - eta) * total
    return right, kept - right, r, right / kept


def probe_oof(features, y, folds: int = 8, C: float = 10.0, seed: int = 0) -> np.ndarray:
    """Out-of-fold class probabilities of a logistic probe on L2-normalised features and the given labels
    (no cleaning, so the estimate does not lean on the suite's own): every image is scored by a probe that
    never saw its label. C 10 on normalised features read the noisy labels best of nine probes tried (12-05)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_predict
    from sklearn.preprocessing import normalize
    X, y = normalize(np.asarray(features, dtype=np.float64)), np.asarray(y)
    P = np.zeros((len(y), int(y.max()) + 1))  # columns by class index, so argmax is the class
    P[:, np.unique(y)] = cross_val_predict(LogisticRegression(C=C, max_iter=1000), X, y, method="predict_proba",
                                           cv=StratifiedKFold(folds, shuffle=True, random_state=seed))
    return P


def confident_report(image_size: int, runs, tops=(0.5, 0.3, 0.2, 0.1)) -> str:
    """`eta_confident` for a cross-fitted probe on the pretrained Lite0's features of every training image,
    with the clean val's accuracy on its own most confident images as a check that the probe is nearly always
    right there, and for the held-out probabilities of finished runs (their sample_scores.npz)."""
    import time
    import torch
    repo = Path(__file__).resolve().parents[1]
    sys.path.insert(0, str(repo))
    import utils
    from c1_run import backbone_features
    t0 = time.time()
    torch.set_num_threads(utils.load_predict_module().cpu_threads())
    data = utils.prepare_data(repo.parent / "shared" / "data" / "cusehacks-track1", repo / "benchmarks" / "out", image_size)
    dev = torch.device("cpu")
    ft, fv = (f.numpy() for f in backbone_features(data, image_size, dev, utils.amp_dtype_for(dev)))
    y, yv = data["train"]["y"], data["val"]["y"]
    P = probe_oof(ft, y)
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import normalize
    pv = LogisticRegression(C=10.0, max_iter=1000).fit(normalize(ft), y).predict_proba(normalize(fv))
    parts = [f"cross-fitted probe (Lite0 {image_size}px, 8 folds, {len(y)} images; noisy acc {(P.argmax(1) == y).mean():.3f}, "
             f"{time.time() - t0:.0f} s)"]
    for t in tops:
        d, lo, hi, n = utils.noise_where_surest(y, P, t)
        sure_v = pv.max(1) >= np.quantile(P.max(1), 1 - t)  # the same confidence threshold on val
        parts.append(f"top {t:.0%}: {d:.3f} [{lo:.3f}, {hi:.3f}] of {n}, val acc there {(pv[sure_v].argmax(1) == yv[sure_v]).mean():.2f} "
                     f"of {sure_v.sum()}")
    for run in runs:
        with np.load(repo / "benchmarks" / "out" / "runs" / run / "sample_scores.npz") as z:
            d, lo, hi, n = utils.noise_where_surest(z["hold_labels"], z["hold_probs"], 0.5)
        parts.append(f"{run} holdout, top 50%: {d:.3f} [{lo:.3f}, {hi:.3f}] of {n}")
    return "confident disagreement: " + "; ".join(parts)


def rows(path: Path = RESULTS):
    """(category, holdout acc, val acc, name) of every table row that has both accuracies."""
    for line in path.read_text().splitlines():
        c = [x.strip() for x in line.split("|")[1:-1]]
        if len(c) < 13 or not c[0].startswith("20"):  # table rows start with their date
            continue
        try:
            yield int(c[3]), float(c[10]), float(c[12]), c[2]
        except ValueError:
            continue


def bootstrap_clean(y_noisy, pred, eta: float, k: int = K, n_boot: int = 1000, seed: int = 0):
    """95% interval of the clean Macro F1 estimate over resamplings of the holdout images within each
    noisy label, as the holdout was drawn (stratified by label): a plain resampling also resamples the
    class sizes, and a class a resample leaves with ~1 image blows its F1 estimate up."""
    rng = np.random.default_rng(seed)
    y_noisy, pred = np.asarray(y_noisy), np.asarray(pred)
    strata = [np.flatnonzero(y_noisy == c) for c in np.unique(y_noisy)]
    f = []
    for _ in range(n_boot):
        i = np.concatenate([rng.choice(s, len(s)) for s in strata])
        f.append(clean_scores(y_noisy[i], pred[i], eta, k)["macro_f1"])
    return tuple(float(q) for q in np.percentile(f, [2.5, 97.5]))


def run_clean_scores(run: str, etas) -> str:
    """A run's top-k checkpoints on the noisy holdout through predict.py (all TTA views, the run's prior
    shift), each checkpoint's center view and their all-view mean (close to what an export ships), in
    noisy and estimated clean Macro F1 and accuracy."""
    repo = Path(__file__).resolve().parents[1]
    sys.path.insert(0, str(repo))
    import utils
    ev = utils.evaluate_candidates(repo / "benchmarks" / "out", runs=[run], ci=False)
    y, k, n = ev["y_hold"], len(ev["label_values"]), len(ev["y_hold"])
    decide = utils.load_predict_module().decide

    def pred_of(p):
        return decide(p, ev["log_prior"], ev["prior_tau"])[:n]

    sets = {f"{c.split('/')[-1].removesuffix('.pt')} center": pred_of(p)
            for (c, v), p in ev["probs"].items() if v == "center"}
    mean_pred = pred_of(np.mean(list(ev["probs"].values()), axis=0))
    sets[f"mean of {len(ev['probs'])} checkpoint x view"] = mean_pred
    parts = []
    for name, pred in sets.items():
        noisy_f1, noisy_acc = utils.macro_f1_fast(y, pred, k), float((pred == y).mean())
        est = []
        for e in etas:
            sc, (lo, hi) = clean_scores(y, pred, e, k), bootstrap_clean(y, pred, e, k)
            est.append(f"eta {e:.2f}: F1 {sc['macro_f1']:.3f} [{lo:.3f}, {hi:.3f}] acc {sc['acc']:.3f}")
        parts.append(f"{name}: noisy F1 {noisy_f1:.3f} acc {noisy_acc:.3f} -> clean est. {'; '.join(est)}")
    # where the all-view mean loses its Macro F1: by quarter of class size in train.csv, at the middle eta
    eta_mid = etas[len(etas) // 2]
    c = clean_by_class(y, mean_pred, eta_mid, k)
    size = given_counts(ev)
    right = (1 - eta_mid) * clean_class_counts(size, eta_mid) / np.maximum(size, 1)  # share of each class's labels
    quarters = []
    for q in size_quarters(size):
        given = np.isin(y, q)  # holdout images whose given label is one of these classes
        quarters.append(f"classes of {size[q].min():.0f}-{size[q].max():.0f}: F1 {np.nanmean(c['f1'][q]):.3f}, "
                        f"recall {c['tp'][q].sum() / c['n_true'][q].sum():.2f}, precision "
                        f"{c['tp'][q].sum() / c['n_pred'][q].sum():.2f}, predicted {c['n_pred'][q].sum():.0f} "
                        f"for ~{c['n_true'][q].sum():.0f} true; prediction = given label on "
                        f"{(mean_pred[given] == y[given]).mean():.2f} of its {given.sum()} holdout images, whose "
                        f"labels are ~{np.average(right[q], weights=size[q]):.2f} right under symmetric noise")
    parts.append("all-view mean by class size: " + "; ".join(quarters))
    return f"{run} (prior tau {ev['prior_tau']:g}, {n} holdout images): " + " | ".join(parts)


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--holdout-acc", type=float, nargs="*", default=[])
    ap.add_argument("--eta", type=float, nargs="*", default=[0.32, ETA, 0.38])
    ap.add_argument("--cleaning", type=int, nargs=3, action="append", default=[], metavar=("KEPT", "TOTAL", "RANK"),
                    help="what prototype cleaning to the RANK nearest class means kept: right and wrong labels")
    ap.add_argument("--runs", nargs="*", default=[], help="runs under benchmarks/out/runs/: clean Macro F1 of their checkpoints")
    ap.add_argument("--confident", nargs="*", default=None, metavar="RUN",
                    help="eta where a cross-fitted probe is surest (~3 minutes), and on these runs' holdouts")
    ap.add_argument("--image-size", type=int, default=224, help="the probe's image size for --confident")
    a = ap.parse_args(argv)
    for cat in (1, 2):
        r = [x for x in rows() if x[0] == cat]
        if r:
            h, v = sum(x[1] for x in r) / len(r), sum(x[2] for x in r) / len(r)
            print(f"category {cat}: {len(r)} rows, mean holdout acc {h:.3f}, mean val acc {v:.3f} -> eta {eta_from(v, h):.3f}")
    for h in a.holdout_acc:
        print(f"holdout acc {h:.3f} -> clean acc " + ", ".join(f"{clean_from(h, e):.3f} at eta {e:.2f}" for e in a.eta))
    for kept, total, rank in a.cleaning:
        for e in a.eta:
            right, wrong, recall, precision = cleaning_split(kept, total, rank, e)
            print(f"top {rank} kept {kept} of {total} at eta {e:.2f}: ~{right:.0f} right ({recall:.2f} of the right labels) "
                  f"and ~{wrong:.0f} wrong (precision {precision:.3f})")
    if a.confident is not None:
        print(confident_report(a.image_size, a.confident), flush=True)
    for run in a.runs:
        print(run_clean_scores(run, a.eta), flush=True)


if __name__ == "__main__":
    main()
