"""Training images/s of a network on this machine by input size and frozen share of the backbone
(`freeze_depth`): a few optimiser steps on random tensors, bf16 autocast and channels_last as in
training. Appends one line to RESULTS.md. Run it alone on the machine.

    .venv/bin/python benchmarks/finetune_speed.py --arch efficientnet-lite0 --sizes 160 192 224 --depths 0 0.3 0.5
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
from results import add_line  # noqa: E402


def images_per_s(arch, pretrained, size, depth, batch, steps, amp):
    torch.manual_seed(0)
    model, _ = utils.build_model(arch, 102, pretrained)
    model.train().to(memory_format=torch.channels_last)
    frozen = utils.frozen_prefix(model, depth)
    for n, p in model.named_parameters():
        p.requires_grad_(n not in frozen)
    utils.set_bn_eval(model, only=frozen)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    x = torch.randn(batch, 3, size, size).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 102, (batch,))
    times = []
    for i in range(steps + 1):  # the first step warms up and is not counted
        t = time.time()
        with utils.autocast(torch.device("cpu"), amp):
            loss = torch.nn.functional.cross_entropy(model(x).float(), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if i:
            times.append(time.time() - t)
    return batch / (sum(times) / len(times))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--arch", default="efficientnet-lite0")
    ap.add_argument("--pretrained", default="efficientnet-lite0")
    ap.add_argument("--sizes", type=int, nargs="+", default=[160, 192, 224])
    ap.add_argument("--depths", type=float, nargs="+", default=[0.0, 0.3, 0.5])
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--steps", type=int, default=3)
    a = ap.parse_args()
    torch.set_num_threads(utils.load_predict_module().cpu_threads())
    amp = utils.amp_dtype_for(torch.device("cpu"))
    cells = []
    for size in a.sizes:
        for depth in a.depths:
            r = images_per_s(a.arch, a.pretrained, size, depth, a.batch, a.steps, amp)
            print(f"{a.arch} {size}px freeze_depth {depth}: {r:.1f} img/s", flush=True)
            cells.append(f"{size}px/{depth:g}: {r:.0f}")
    line = (f"- finetune_speed ({time.strftime('%Y-%m-%d')}, {a.arch}, batch {a.batch}, {amp or 'fp32'}, "
            f"training img/s by size/freeze_depth): " + ", ".join(cells) + "\n")
    add_line(line)


if __name__ == "__main__":
    main()
