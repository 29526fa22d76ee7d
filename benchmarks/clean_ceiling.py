"""What would the Category 2 defaults reach on correct labels? Issue 6 asks for at least 0.90 of that, and
nobody here has the correct labels. This writes a copy of the data set (images linked, not copied) whose
fit images carry a proxy for them: the given label where Category 1's prototype cleaning keeps it (~98%
right), elsewhere the class a cross-fitted Category 1 probe predicts (prototype cleaning and the
class-balanced logistic probe on the pretrained Lite0's features, as `c1_run.cleaned_probe`; each image
scored by a probe that never saw it). The images its noisy-label twin held out keep their given
labels. A run on the copy holds out other images (the split is stratified on the labels, and the copy's
differ), some of them relabelled: `--judge` scores it against the given labels of the images it held out,
and takes each draw's offset out (as `holdout_judge.py` measures it) of both runs before they are compared.
The proxy is not the truth: ~8% of it is wrong (the line this appends estimates the share), on look-alike
classes rather than at random, so a run on it reads low. Its score is a lower bound on the correct-label
level, and the noisy run's share of it an upper bound on issue 6's ratio. Read the accuracy: the clean
Macro F1 estimate breaks on a holdout stratified on other labels (0-1 given labels in a class; RESULTS.md). For measurement only: the proxy
labels come from pretrained weights, so a model trained on them is not Category 2.

    .venv/bin/python benchmarks/clean_ceiling.py --holdout-seed 1 --out /tmp/proxy_h1      # ~1-3 min
    nohup .venv/bin/python benchmarks/run.py --category 2 --name c2_proxy_h1 --data-dir /tmp/proxy_h1 --no-export \\
        -p epochs 80 -p holdout_seed 1 -p holdout_frac 0.12 -p checkpoint_at "((80,'ema'),(75,'ema'),(70,'ema'))" \\
        > benchmarks/out/c2_proxy_h1.log 2>&1 &                                              # ~40 min
    .venv/bin/python benchmarks/clean_ceiling.py --judge c2_proxy_h1 --holdout-seed 1      # ~2 min; twin c2_e80_h1_fixed_1204
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
import utils  # noqa: E402
from c1_run import cleaned_probe, lite0_features  # noqa: E402
from noise_rate import ETA, clean_from, clean_scores, cleaning_split  # noqa: E402
from results import add_line  # noqa: E402

DATA = REPO.parent / "shared" / "data" / "cusehacks-track1"
OUT = REPO / "benchmarks" / "out"


def cross_fitted_labels(f, y, folds=8, seed=0) -> np.ndarray:
    """Each image's class as predicted by a cleaned probe fitted on the other folds."""
    from sklearn.model_selection import StratifiedKFold
    pred = np.empty(len(y), dtype=int)
    for tr, te in StratifiedKFold(folds, shuffle=True, random_state=seed).split(f, y):
        pred[te] = cleaned_probe(f[tr], y[tr], seed=seed)[0].predict(f[te])
    return pred


def relabelled_csv(df: pd.DataFrame, filenames, labels) -> pd.DataFrame:
    """`df` (train.csv) with the rows of `filenames` relabelled to `labels`; every other row as given."""
    new = dict(zip(filenames, labels))
    out = df.copy()
    out["label"] = [new.get(fn, lab) for fn, lab in zip(df.filename, df.label)]
    return out


def judge(run: str, twin_seed: int, holdout_frac: float, image_size: int = 192) -> str:
    """Score a finished run on the copy against the given labels of the images it held out. Its holdout is
    not its twin's: the split is stratified on the labels, and the copy's differ. So each draw's offset is
    measured as `holdout_judge.py` does (a cross-fitted cleaned probe read on the draw against all images),
    and both runs are compared after taking it out."""
    import torch
    torch.set_num_threads(utils.load_predict_module().cpu_threads())
    sets = utils.evaluation_sets(OUT, [run])
    given = pd.read_csv(DATA / "train.csv").set_index("filename").label
    to_idx = {v: i for i, v in enumerate(sets["label_values"])}
    y_copy = sets["y_hold"]
    sets["y_hold"] = np.array([to_idx[int(given[f])] for f in sets["hold_files"]])
    ev = utils.evaluate_candidates(OUT, [run], views=("zoom", "center"), sets=sets, ci=False)
    n = len(sets["y_hold"])
    pairs = [(c, v) for c in ev["candidates"] for v in ("zoom", "center")]
    decide = utils.load_predict_module().decide
    pred = decide(sum(ev["probs"][p] for p in pairs), ev["log_prior"], ev["prior_tau"])[:n]
    shipped = clean_scores(sets["y_hold"], pred, ETA)
    # the draws' offsets, by the probe holdout_judge.py uses (raw features at 192 px, 8 folds)
    data = utils.prepare_data(DATA, OUT, image_size, holdout_frac, twin_seed)
    f = lite0_features(data, image_size, torch.device("cpu"), utils.amp_dtype_for(torch.device("cpu")))[0].numpy()
    y = data["train"]["y"]
    oof = cross_fitted_labels(f, y)
    whole = clean_scores(y, oof, ETA)["macro_f1"]
    files = data["train"]["df"].filename.to_numpy()
    here = np.isin(files, sets["hold_files"])
    off_run = clean_scores(y[here], oof[here], ETA)["macro_f1"] - whole
    off_twin = clean_scores(y[data["hold_idx"]], oof[data["hold_idx"]], ETA)["macro_f1"] - whole
    overlap = len(set(files[data["hold_idx"]]) & set(sets["hold_files"]))
    return (f"{run} held out {n} images ({overlap} of them also in its twin's seed-{twin_seed} holdout; "
            f"{int((y_copy != sets['y_hold']).sum())} carry a changed label in the copy, scored here at the given one): "
            f"the shipped plan (zoom + center x {len(ev['candidates'])} checkpoints, prior tau {ev['prior_tau']:g}) "
            f"clean est. Macro F1 {shipped['macro_f1']:.3f}, acc {shipped['acc']:.3f} at eta {ETA} "
            f"(noisy acc {(pred == sets['y_hold']).mean():.3f}); draw offsets by the cross-fitted probe "
            f"(all images {whole:.3f}): this holdout {off_run:+.3f}, the twin's {off_twin:+.3f}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--judge", metavar="RUN", help="score a finished run on the copy (after training) instead")
    ap.add_argument("--holdout-seed", type=int, default=1, help="the holdout of the noisy-label twin run")
    ap.add_argument("--holdout-frac", type=float, default=0.12)
    ap.add_argument("--image-size", type=int, default=224, help="the probe's image size")
    ap.add_argument("--out", help="where the data set copy goes (outside the project)")
    a = ap.parse_args()
    t0 = time.time()
    if a.judge:
        line = judge(a.judge, a.holdout_seed, a.holdout_frac)
        add_line(f"- clean_ceiling ({time.strftime('%Y-%m-%d')}, `benchmarks/clean_ceiling.py --judge {a.judge} "
                 f"--holdout-seed {a.holdout_seed}`, {time.time() - t0:.0f} s) {line}")
        print(line)
        return
    if not a.out:
        ap.error("--out: where the data set copy goes (outside the project)")
    import torch
    torch.set_num_threads(utils.load_predict_module().cpu_threads())
    data = utils.prepare_data(DATA, OUT, a.image_size, a.holdout_frac, a.holdout_seed)
    dev = torch.device("cpu")
    ft, fv = (torch.nn.functional.normalize(f, dim=1).numpy()
              for f in lite0_features(data, a.image_size, dev, utils.amp_dtype_for(dev)))
    y, yv, fit = data["train"]["y"], data["val"]["y"], data["fit_idx"]
    pred = cross_fitted_labels(ft, y)
    probe, keep = cleaned_probe(ft, y)
    proxy = np.where(keep, y, pred)
    val_acc = float((probe.predict(fv) == yv).mean())
    probe_acc = clean_from(float((pred == y).mean()), ETA)  # the probe's right share, from its agreement
    kept_right, _, _, precision = cleaning_split(int(keep.sum()), len(y), 5, ETA)
    right = (kept_right + probe_acc * (~keep).sum()) / len(y)  # the relabelled at the probe's average rate

    dst = Path(a.out)
    for split in ("train", "val"):
        (dst / split).mkdir(parents=True, exist_ok=True)
        link = dst / split / "images"
        if not link.exists():
            os.symlink((DATA / split / "images").resolve(), link)
    for name in ("label_list.txt", "val.csv"):
        utils.atomic_write_text(dst / name, (DATA / name).read_text())
    df = pd.read_csv(DATA / "train.csv")
    lv = np.asarray(data["label_values"])
    new = relabelled_csv(df, data["train"]["df"].filename.to_numpy()[fit], lv[proxy[fit]])
    utils.atomic_write_text(dst / "train.csv", new.to_csv(index=False))
    changed = int((new.label.astype(str) != df.label.astype(str)).sum())
    add_line(f"- clean_ceiling ({time.strftime('%Y-%m-%d')}, `benchmarks/clean_ceiling.py --holdout-seed {a.holdout_seed} "
             f"--out {a.out}`; the data set copy for a run on proxy-correct labels) the given label on the {int(keep.sum())} "
             f"of {len(y)} images the prototype cleaning keeps (~{precision:.3f} right at eta {ETA}), elsewhere a "
             f"cross-fitted cleaned probe's class (Lite0 {a.image_size}px, 8 folds; ~{probe_acc:.3f} right over all images, "
             f"val acc {val_acc:.2f}): ~{right:.2f} right; {changed} of {len(fit)} fit labels changed, the "
             f"{len(y) - len(fit)} holdout labels kept ({time.time() - t0:.0f} s)")
    print(f"wrote {dst}: {changed} fit labels changed; proxy ~{right:.3f} right")


if __name__ == "__main__":
    main()
