"""
Track 1 – predict.py
=====================
Implement load_model() and predict() only.
DO NOT modify anything below the marked line.

Self-evaluate on val set:
    INPUT_CSV  = "val.csv"
    IMAGE_DIR  = "val/images/"

Final submission (paths must be set to test before submitting):
    INPUT_CSV  = "test.csv"
    IMAGE_DIR  = "test/images/"
"""

import time

_T0 = time.time()  # the time budget counts from here: image loading and model loading included

import os
import pandas as pd
from PIL import Image

# ==============================================================================
# CHANGE THESE PATHS IF NEEDED
# ==============================================================================

INPUT_CSV   = "test.csv"
IMAGE_DIR   = "test/images/"
OUTPUT_PATH = "predictions.csv"
MODEL_PATH  = "model/"

# Time the whole run may take, from start-up (image loading included), before it stops adding
# ensemble members and TTA views. The organizers' limit is 600 s; 480 s leaves a margin for a
# slower machine than the one the plan was timed on.
TIME_BUDGET_S = 480
# Images per forward pass. Small on purpose: on a CPU, EfficientNet-Lite0 at 192 px runs 2.2x faster
# per image at 8 than at 64 (its wide activations fall out of the cache; benchmarks/batch_speed.py).
BATCH_SIZE    = 8

# ==============================================================================
# YOUR CODE — IMPLEMENT THESE TWO FUNCTIONS
# ==============================================================================
# This file stands alone: the organizers copy only predict.py, model/ and requirements.txt.
# model/config.json lists the ensemble members (architecture, input size, normalisation,
# weights file), `plan`: (member, view) pairs, most valuable first, as notebook 03 measured
# them, and `weights` (optional, one a pair; default 1): the pairs' softmax outputs are pooled with those
# weights, as `pooling` says (optional; "mean" by default, or "geometric", see `pool`).
# predict() times each pair on the first batches and keeps the longest prefix that fits.
# `log_prior` and `prior_tau` (optional) shift the pooled softmax toward the training set's class
# shares before the argmax (`decide`).

import json
import sys
import warnings

import numpy as np
import torch
import torch.nn.functional as F
from PIL import ImageOps

VIEWS = ("center", "flip", "full", "full_flip", "zoom", "zoom_flip")


def build_network(arch, num_classes, head_dropout=None):
    """A network by name with a fresh `num_classes` head (no weights loaded). Shared with
    training (utils.py imports it), so the trained and the shipped architecture cannot drift."""
    if arch.startswith("efficientnet-lite"):
        from efficientnet_lite_pytorch import EfficientNet
        net = EfficientNet.from_name(arch, num_classes=num_classes)
    else:
        import torchvision
        net = torchvision.models.get_model(arch, weights=None, num_classes=num_classes)
    if head_dropout is not None and isinstance(getattr(net, "fc", None), torch.nn.Linear):
        # ResNets have no dropout before their head; two-stage training wants one to turn down.
        net.fc = torch.nn.Sequential(torch.nn.Dropout(head_dropout), net.fc)
    return net


class Ensemble:
    """The loaded members, their preprocessing, the value-ordered (member, view) plan with each pair's
    weight in the pool and how the pool is taken (`pooling`), and the class prior shift the predictions
    get (`decide`)."""

    def __init__(self, members, plan, labels, fallback_label, log_prior=None, prior_tau=0.0, weights=None,
                 pooling="mean"):
        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}; got {pooling!r}")
        self.members, self.plan, self.labels, self.fallback_label = members, plan, labels, fallback_label
        self.log_prior, self.prior_tau, self.pooling = log_prior, prior_tau, pooling
        self.weights = dict(zip(plan, weights)) if weights is not None else {pair: 1.0 for pair in plan}


POOLINGS = ("mean", "geometric")


def pool_term(probs, pooling="mean"):
    """One pair's softmax [N, K] as a term of the weighted sum that `pooled` turns into probabilities."""
    probs = np.asarray(probs, dtype=np.float64)
    return np.log(np.clip(probs, 1e-12, None)) if pooling == "geometric" else probs


def pooled(acc, total_weight, pooling="mean"):
    """Probabilities from `acc`, the weighted sum of the pairs' `pool_term`s: their weighted mean ("mean"),
    or the normalised weighted geometric mean ("geometric", a product of experts: a class that one member
    all but rules out stays out, where the arithmetic mean lets another member's confidence carry it)."""
    x = np.asarray(acc, dtype=np.float64) / total_weight
    if pooling != "geometric":
        return x
    x = np.exp(x - x.max(axis=1, keepdims=True))
    return x / x.sum(axis=1, keepdims=True)


def pool(probs, weights, pooling="mean"):
    """The weighted pool of several pairs' softmax outputs (a list of [N, K])."""
    return pooled(sum(w * pool_term(p, pooling) for p, w in zip(probs, weights)), float(sum(weights)), pooling)


def decide(probs, log_prior=None, tau=0.0):
    """Class index per row: argmax of log p + tau x log(class share of the training labels).
    A class-balanced sampler trains the network as if every class were equally common; tau 1 puts
    the training set's shares back (Menon et al. 2021, logit adjustment), which the test set shares."""
    if log_prior is None or not tau:
        return probs.argmax(1)
    return (np.log(np.clip(probs, 1e-12, None)) + tau * np.asarray(log_prior)).argmax(1)


def load_ensemble(model_path=MODEL_PATH, device="cpu"):
    cfg = json.loads(open(os.path.join(model_path, "config.json")).read())
    members = []
    for m in cfg["members"]:
        net = build_network(m["arch"], len(cfg["labels"]), m.get("head_dropout"))
        state = torch.load(os.path.join(model_path, m["weights"]), map_location="cpu", weights_only=True)
        net.load_state_dict(state)
        net.eval().to(device, memory_format=torch.channels_last)
        members.append(dict(m, net=net))
    plan = [tuple(p) for p in cfg.get("plan") or [(0, "center")]]
    weights = [float(w) for w in cfg.get("weights") or [1.0] * len(plan)]
    if len(weights) != len(plan) or len(set(plan)) != len(plan) or min(weights) <= 0:
        raise ValueError(f"{model_path}/config.json: `plan` needs distinct (member, view) pairs and `weights` one "
                         f"positive number a pair; got {len(plan)} pair(s), weights {weights}")
    return Ensemble(members, plan, [int(v) for v in cfg["labels"]], int(cfg.get("fallback_label", cfg["labels"][0])),
                    cfg.get("log_prior"), float(cfg.get("prior_tau", 0.0)), weights, cfg.get("pooling", "mean"))


def to_square(im, size):
    """Shorter side to `size`, then the central square, as uint8 CHW (the training cache's geometry).
    EXIF orientation is applied first, as the training cache did (a no-op on an upright image)."""
    im = ImageOps.exif_transpose(im)
    w, h = im.size
    s = size / min(w, h)
    nw, nh = max(size, round(w * s)), max(size, round(h * s))
    im = im.resize((nw, nh), Image.BILINEAR, reducing_gap=None)
    left, top = (nw - size) // 2, (nh - size) // 2
    arr = np.asarray(im.crop((left, top, left + size, top + size)).convert("RGB"), dtype=np.uint8)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1)


def make_view(base, view, image_size):
    """One TTA view of a float batch [B, 3, C, C] cached at C = image_size / 0.875."""
    c = base.shape[-1]
    if view.startswith("full"):
        x = F.interpolate(base, size=(image_size, image_size), mode="bilinear", antialias=True, align_corners=False)
    else:
        crop = image_size if view.startswith("center") or view == "flip" else max(8, int(round(image_size * 0.85)))
        o = (c - crop) // 2
        x = base[..., o:o + crop, o:o + crop]
        if crop != image_size:
            x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", antialias=True, align_corners=False)
    return torch.flip(x, dims=[-1]) if view.endswith("flip") else x


@torch.inference_mode()
def run_pair(member, base_uint8, view):
    """Softmax of one member on one view of a uint8 batch cached at the member's cache size."""
    x = base_uint8.float().div_(255)
    if x.shape[-1] != member["cache_size"]:
        x = F.interpolate(x, size=(member["cache_size"],) * 2, mode="bilinear", antialias=True, align_corners=False)
    x = make_view(x, view, member["image_size"])
    mean = torch.tensor(member["mean"], device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(member["std"], device=x.device).view(1, 3, 1, 1)
    x = ((x - mean) / std).contiguous(memory_format=torch.channels_last)
    return torch.softmax(member["net"](x).float(), dim=1)


# Batches whose median per-image cost forecasts the rest (8 images a batch): 200 images, ~15 s of a 5-pair plan on
# 2 cores. A virtual machine slows down for a few seconds now and then (on 12-07, 2-3x for 3+ batches mid-run:
# a median of 5 cut a 5-pair plan to 1 pair for good, and the run ended at 112 s of 480); a lasting slowdown
# still shows within 13 batches, ~10-20 s, well inside the forecast's 15% margin.
TIMING_WINDOW = 25


def predict_proba(model, images, budget_s=None, t0=None, batch_size=BATCH_SIZE, verbose=True):
    """The weighted pool (`model.pooling`) of the softmax of the planned (member, view) pairs that fit in the time budget.

    Every pair and the preprocessing are timed on the first batch (after one untimed warm-up call
    per pair on that batch, so one-off start-up costs do not count as per-image cost) and re-timed on every later
    full batch; the forecast uses the median of the last TIMING_WINDOW timings, so a machine that slows
    down is noticed within a few batches while one slow batch (a hiccup of 8 images) cuts nothing.
    After each batch the plan is cut to the longest prefix whose forecast for the images left still
    fits (never below one pair, and a cut pair never comes back). Images with no time left still get
    the first pair.
    The first batches can still run slow after the warm-up (on 12-06 the first ran 2.4-3.5x a later one, and
    on 12-07 the first two ran the probes ~3x slow: each time two of five pairs were cut from a run that then
    took ~180-240 s of 480). So until TIMING_WINDOW batches are timed nothing is cut as long as one more batch
    of the whole plan, then the first pair alone for every image after it, still fits at the slowest timings
    seen; the cut then reads the median of those batches.
    Returns (probs [N, K] numpy, the plan used at the end, missing-image mask).
    """
    t0 = _T0 if t0 is None else t0
    base_size = max(m["cache_size"] for m in model.members)
    n, k = len(images), len(model.labels)
    missing = np.array([im is None for im in images], dtype=bool)
    probs = np.zeros((n, k), dtype=np.float64)
    plan = list(model.plan)
    timings = {}  # seconds per image of the preprocessing and of each pair: the first batch, then each later full batch
    for start in range(0, n, batch_size):
        t = time.time()
        batch = images[start:start + batch_size]
        base = torch.stack([to_square(im, base_size) if im is not None
                            else torch.zeros(3, base_size, base_size, dtype=torch.uint8) for im in batch])
        timed = start == 0 or len(batch) == batch_size
        if timed:
            timings.setdefault("prep", []).append((time.time() - t) / len(batch))
        if start == 0:
            for pair in plan:  # warm-up: first calls pay for kernel selection and allocation (at the batch's shape)
                run_pair(model.members[pair[0]], base, pair[1])
        acc = np.zeros((len(batch), k))
        for pair in plan:
            t = time.time()
            acc += model.weights[pair] * pool_term(run_pair(model.members[pair[0]], base, pair[1]).numpy(), model.pooling)
            if timed:
                timings.setdefault(pair, []).append((time.time() - t) / len(batch))
        probs[start:start + len(batch)] = pooled(acc, sum(model.weights[pair] for pair in plan), model.pooling)
        left = n - start - len(batch)
        if budget_s is None or left == 0:
            continue
        remaining = budget_s - (time.time() - t0)
        costs = {key: float(np.median(v[-TIMING_WINDOW:])) for key, v in timings.items()}

        def forecast(pairs, images_left, c=costs):
            return (c["prep"] + sum(c[p] for p in pairs)) * images_left * 1.15

        nxt = min(batch_size, left)
        if len(timings["prep"]) < TIMING_WINDOW:  # too few timings to cut on: wait one more batch if that is safe
            slowest = {key: max(v) for key, v in timings.items()}
            if forecast(plan, nxt, slowest) + forecast(plan[:1], left - nxt, slowest) <= remaining:
                continue
        keep = len(plan)
        while keep > 1 and forecast(plan[:keep], left) > remaining:
            keep -= 1
        if verbose and (len(timings["prep"]) == TIMING_WINDOW or keep < len(plan)):
            ms = ", ".join(f"{m}/{v} {costs[(m, v)] * 1e3:.1f}" for m, v in plan)
            print(f"predict.py plan for the {left} images left: {plan[:keep]} (ms/image: prep "
                  f"{costs['prep'] * 1e3:.1f}, {ms}; {remaining:.0f} s of the {budget_s} s budget left)"
                  + (f"; dropped {plan[keep:]}" if keep < len(plan) else ""), flush=True)
        plan = plan[:keep]
    return probs, plan, missing


def cpu_threads(cgroup_root="/sys/fs/cgroup", self_cgroup="/proc/self/cgroup"):
    """Cores this process may really use: the CPU affinity mask, capped by a cgroup CPU quota
    (a container limited with --cpus reports every host core in os.cpu_count()): cgroup v2's cpu.max,
    or on a v1 host cpu.cfs_quota_us over cpu.cfs_period_us, each read in the mount a container sees as
    its own and in this process's group as /proc/self/cgroup names it."""
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        n = os.cpu_count() or 1
    v2, v1 = [cgroup_root], [os.path.join(cgroup_root, "cpu")]
    try:
        with open(self_cgroup) as f:
            for line in f:  # "0::/path" on v2, "N:cpu,cpuacct:/path" on v1
                parts = line.strip().split(":", 2)
                if len(parts) < 3:
                    continue
                if parts[0] == "0" and not parts[1]:
                    v2.append(os.path.join(cgroup_root, parts[2].lstrip("/")))
                elif "cpu" in parts[1].split(","):
                    v1.append(os.path.join(cgroup_root, "cpu", parts[2].lstrip("/")))
    except OSError:
        pass
    quotas = []
    for d in v2:
        try:
            with open(os.path.join(d, "cpu.max")) as f:
                quota, period = f.read().split()[:2]
            if quota != "max":
                quotas.append(int(quota) / int(period))
        except (OSError, ValueError):
            pass
    for d in v1:
        try:
            with open(os.path.join(d, "cpu.cfs_quota_us")) as q, open(os.path.join(d, "cpu.cfs_period_us")) as p:
                quota, period = int(q.read()), int(p.read())
            if quota > 0:
                quotas.append(quota / period)
        except (OSError, ValueError):
            pass
    if quotas:
        n = min(n, max(1, int(min(quotas) + 0.5)))
    return max(1, n)


def load_model():
    torch.set_num_threads(cpu_threads())
    torch.manual_seed(0)  # nothing here is random; fixed anyway so that any future sampling repeats
    return load_ensemble(MODEL_PATH)


def predict(model, images: list) -> list[int]:
    missing = sum(im is None for im in images)
    if missing:
        warnings.warn(f"{missing} image(s) are None (not found by the harness): they get the fallback "
                      f"label {model.fallback_label}.", stacklevel=2)
    probs, used, missing_mask = predict_proba(model, images, budget_s=TIME_BUDGET_S)
    preds = [model.labels[int(i)] for i in decide(probs, model.log_prior, model.prior_tau)]
    preds = [model.fallback_label if miss else p for p, miss in zip(preds, missing_mask)]
    print(f"predict.py: {len(images)} images, {len(model.members)} member(s), final plan {used}, "
          f"{time.time() - _T0:.1f} s since start", file=sys.stderr, flush=True)
    return preds

# ==============================================================================
# DO NOT MODIFY ANYTHING BELOW THIS LINE
# ==============================================================================

def _load_images(df):
    images, missing = [], []
    for _, row in df.iterrows():
        path = os.path.join(IMAGE_DIR, row["filename"])
        if os.path.exists(path):
            images.append(Image.open(path).convert("RGB"))
        else:
            missing.append(row["filename"])
            images.append(None)
    if missing:
        print(f"WARNING: {len(missing)} image(s) not found. First few: {missing[:5]}")
    return images

def main():
    df = pd.read_csv(INPUT_CSV, dtype=str)
    missing_cols = {"image_id", "filename"} - set(df.columns)
    if missing_cols:
        raise ValueError(f"Input CSV missing columns: {missing_cols}")
    print(f"Loaded {len(df):,} images from {INPUT_CSV}")

    images = _load_images(df)
    model  = load_model()
    preds  = predict(model, images)

    if len(preds) != len(df):
        raise ValueError(f"predict() returned {len(preds)} predictions for {len(df)} images.")

    out = df[["image_id"]].copy()
    out["label"] = [int(p) for p in preds]
    out.to_csv(OUTPUT_PATH, index=False)
    print(f"Predictions saved to {OUTPUT_PATH}")

if __name__ == "__main__":
    main()