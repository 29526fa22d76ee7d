"""The common start of the Category 1 studies (c1_second_round.py, c1_heads.py, data_curve.py,
holdout_judge.py): the pretrained Lite0's features of every train and val image, and for the studies of
a finished run, its cached images and splits, those features L2-normalised, and its best checkpoint."""
from __future__ import annotations

import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
import utils  # noqa: E402


def backbone_features(data: dict, image_size: int, dev, amp, arch: str = "efficientnet-lite0") -> tuple[torch.Tensor, torch.Tensor]:
    """The pretrained Lite0's (or another offline Lite's, `arch`) penultimate features (not normalised) of every
    train and val image of `utils.prepare_data`'s data, at `image_size`: what Category 1's cleaning and
    probe head see."""
    base, info = utils.build_model(arch, len(data["label_values"]), arch)
    member = {"net": base, "cache_size": data["cache_size"], "image_size": image_size, **info["expected_norm"]}
    return tuple(utils.embed(base, data[s]["x"], member, dev, amp).float() for s in ("train", "val"))


def cleaned_probe(f, y, seed=0):
    """Category 1's start in seconds: prototype cleaning (top 5, as the default) on features f, then the
    class-balanced logistic probe `utils.probe_head` fits (`utils.fit_probe`) on what it kept. Returns
    (probe, kept mask)."""
    keep = utils.prototype_keep(f, y, 5)
    return utils.fit_probe(f[keep], y[keep], seed=seed), keep


def cross_fitted(f, y, folds=8, seed=0, noisy=False):
    """(proba, noisy_pred): each image's class probabilities from the cleaned probe fitted on the other
    folds (stratified; a class missing from a fold's fit set gets 0), and with `noisy` the class a probe on
    all the other folds' noisy labels predicts (else None)."""
    from sklearn.model_selection import StratifiedKFold
    proba = np.zeros((len(y), int(y.max()) + 1))
    noisy_pred = np.full(len(y), -1) if noisy else None
    for tr, te in StratifiedKFold(folds, shuffle=True, random_state=seed).split(f, y):
        probe = cleaned_probe(f[tr], y[tr], seed=seed)[0]
        proba[np.ix_(te, probe.classes_)] = probe.predict_proba(f[te])
        if noisy:
            noisy_pred[te] = utils.fit_probe(f[tr], y[tr], seed=seed).predict(f[te])
    return proba, noisy_pred


def load_with_features(out: str, run_name: str, pretrained_features: bool = True) -> SimpleNamespace:
    """A finished run's data split, its best checkpoint and, unless `pretrained_features` is False (a study
    of the fine-tuned network alone), the pretrained Lite0's L2-normalised features (f_all, f_val)."""
    t0 = time.time()
    torch.set_num_threads(utils.load_predict_module().cpu_threads())
    run = utils.load_run(out, run_name)
    cfg = run["config"]
    data = utils.prepare_data(cfg["data_dir"], out, cfg["image_size"], cfg["holdout_frac"], utils.split_seed(cfg),
                              cfg.get("fit_frac", 1.0))
    dev = torch.device("cpu")
    amp = utils.amp_dtype_for(dev)
    K = len(data["label_values"])
    x, y = data["train"]["x"], data["train"]["y"]
    fit, hold = data["fit_idx"], data["hold_idx"]
    f_all = f_val = None
    if pretrained_features:
        f_all, f_val = (torch.nn.functional.normalize(f, dim=1).numpy()
                        for f in backbone_features(data, cfg["image_size"], dev, amp))
    net, tinfo = utils.checkpoint_net(run["run_dir"], run["summary"]["topk"][0], dev)
    print(f"run {run_name}: data{' and pretrained features' if pretrained_features else ''} in {time.time() - t0:.0f} s", flush=True)
    return SimpleNamespace(run=run, cfg=cfg, data=data, dev=dev, amp=amp, K=K, x=x, fit=fit, hold=hold,
                           y_fit=y[fit], y_hold=y[hold], y_val=data["val"]["y"], f_all=f_all, f_val=f_val,
                           tuned={"net": net, **tinfo})
