"""Cached tensors vs a PIL-per-epoch DataLoader: same model (resnet18), same size, same augmentation
family, one epoch each on the real training images. Three epochs: `plain` is what a team writes first
(PIL loader, fp32, NCHW), `pil` the same loader with the suite's bf16 autocast and channels_last, and
`cached` the suite's pipeline (decode once, bf16, channels_last). Prints epoch seconds, images/s and
peak RSS, and appends a line to RESULTS.md.

    .venv/bin/python benchmarks/loader_speed.py [--image-size 96] [--workers 0]
"""
from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from torchvision.transforms import v2

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
import utils  # noqa: E402
from results import add_line  # noqa: E402

DATA = REPO.parent / "shared" / "data" / "cusehacks-track1"


class PILDataset:
    def __init__(self, paths, labels, tf):
        self.paths, self.labels, self.tf = list(paths), list(labels), tf

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        from PIL import Image
        return self.tf(Image.open(self.paths[i]).convert("RGB")), self.labels[i]


def epoch(model, loader, opt, amp, channels_last=True):
    model.train()
    model.to(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    t, n = time.time(), 0
    for x, y in loader:
        x = x.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
        with utils.autocast(torch.device("cpu"), amp):
            loss = torch.nn.functional.cross_entropy(model(x).float(), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        n += len(x)
    return time.time() - t, n


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--image-size", type=int, default=96)
    ap.add_argument("--workers", type=int, default=0)
    ap.add_argument("--batch-size", type=int, default=128)
    a = ap.parse_args()
    torch.set_num_threads(2)
    torch.manual_seed(0)
    s = a.image_size
    _, splits = utils.load_splits(DATA)
    df = splits["train"]
    y = [int(v) - 1 for v in df.label]
    amp = utils.amp_dtype_for(torch.device("cpu"))
    mean, std = [0.5] * 3, [0.25] * 3
    crop = [v2.RandomResizedCrop(s, scale=(0.35, 1), antialias=True), v2.RandomHorizontalFlip()]
    to_float = [v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)]
    aug = crop + to_float
    pil_tf = v2.Compose(crop + [v2.ToImage()] + to_float)  # crop the PIL image first, as a team would
    model = utils.load_predict_module().build_network("resnet18", 102).to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    res = {}
    loader = DataLoader(PILDataset(df.path, y, pil_tf), batch_size=a.batch_size, shuffle=True, num_workers=a.workers)
    res["plain"] = epoch(model, loader, opt, None, channels_last=False)
    res["pil"] = epoch(model, loader, opt, amp)
    t = time.time()
    dec = utils.decode_images(df.path, utils.cache_size_for(s), REPO / "benchmarks" / "out" / "cache", "train")
    decode_s = time.time() - t
    ds = utils.CachedDataset(dec["tensor"], [y[i] for i in range(len(y)) if dec["ok"][i]], v2.Compose(aug))
    loader = DataLoader(ds, batch_size=a.batch_size, shuffle=True, num_workers=a.workers,
                        collate_fn=lambda b: (torch.stack([r[0] for r in b]), torch.tensor([r[1] for r in b])))
    res["cached"] = epoch(model, loader, opt, amp)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    ips = {k: n / sec for k, (sec, n) in res.items()}
    line = (f"- loader_speed ({time.strftime('%Y-%m-%d')}, resnet18 {s}px, batch {a.batch_size}, workers {a.workers}): "
            f"plain (PIL, fp32, NCHW) {res['plain'][0]:.1f} s per epoch ({ips['plain']:.0f} img/s); PIL with "
            f"{amp or 'fp32'} + channels_last {res['pil'][0]:.1f} s ({ips['pil']:.0f} img/s); cached {res['cached'][0]:.1f} s "
            f"({ips['cached']:.0f} img/s) after a one-off decode of {decode_s:.1f} s: {ips['cached'] / ips['plain']:.2f}x the "
            f"plain loader, {ips['cached'] / ips['pil']:.2f}x the PIL loader at equal precision; peak RSS {rss:.2f} GiB\n")
    print(line)
    add_line(line)


if __name__ == "__main__":
    main()
