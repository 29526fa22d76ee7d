"""Per-image cost and peak memory by batch size on this CPU, for the two default networks: inference
through predict.py's own `run_pair` (fp32, as predict.py runs, and bf16 autocast, as training scores
its sets), and a training step (bf16, Category 1's frozen first 30%). Each configuration runs in its own
process, so each peak RSS is its own. Appends one line to RESULTS.md.

    .venv/bin/python benchmarks/batch_speed.py
"""
from __future__ import annotations

import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
import utils  # noqa: E402
from results import add_line  # noqa: E402

NETS = {"efficientnet-lite0": (192, "efficientnet-lite0", 0.3), "resnet18": (96, None, 0.0)}


def child(mode, arch, bs, precision) -> dict:
    size, pretrained, freeze = NETS[arch]
    torch.set_num_threads(utils.load_predict_module().cpu_threads())
    torch.manual_seed(0)
    cpu = torch.device("cpu")
    amp = utils.amp_dtype_for(cpu, precision)
    model, _ = utils.build_model(arch, 102, pretrained, 0.2)
    model = model.to(memory_format=torch.channels_last)
    if mode == "infer":
        info = {"cache_size": size + size // 7, "image_size": size, "mean": [0.5] * 3, "std": [0.25] * 3}
        x = torch.randint(0, 256, (256, 3, info["cache_size"], info["cache_size"]), dtype=torch.uint8)
        utils.predict_cached(model, x[:bs], info, cpu, amp, batch_size=bs)  # warm-up
        t = time.time()
        utils.predict_cached(model, x, info, cpu, amp, batch_size=bs)
        ms = (time.time() - t) / len(x) * 1e3
    else:
        frozen = utils.frozen_prefix(model, freeze)
        for n, p in model.named_parameters():
            p.requires_grad_(n not in frozen)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
        x = torch.randn(bs, 3, size, size).contiguous(memory_format=torch.channels_last)
        y = torch.randint(0, 102, (bs,))
        model.train()
        steps, t = 0, None
        while steps < 4 or time.time() - t < 8:  # >= 8 s timed, after one warm-up step
            with utils.autocast(cpu, amp):
                loss = torch.nn.functional.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            if t is None:
                t = time.time()
            else:
                steps += 1
        ms = (time.time() - t) / (steps * bs) * 1e3
    return {"ms": ms, "rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


def run(mode, arch, bs, precision) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", mode, arch, str(bs), precision],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    if sys.argv[1:2] == ["--child"]:
        mode, arch, bs, precision = sys.argv[2:6]
        print(json.dumps(child(mode, arch, int(bs), precision)))
        return
    parts = []
    plan = [("infer", a, p, [4, 8, 16, 64, 256]) for a in NETS for p in ("fp32", "bf16")]
    plan += [("train", a, "bf16", [16, 32, 64, 128]) for a in NETS]
    for mode, arch, precision, sizes in plan:
        cells = []
        for bs in sizes:
            r = run(mode, arch, bs, precision)
            cells.append(f"{bs}: {r['ms']:.1f} ms {r['rss']:.2f} GiB")
            print(mode, arch, precision, cells[-1], flush=True)
        parts.append(f"{mode} {arch}@{NETS[arch][0]} {precision} [" + "; ".join(cells) + "]")
    add_line(f"- batch_speed ({time.strftime('%Y-%m-%d')}, ms per image and peak RSS by batch size, one process "
             f"each) " + " | ".join(parts))


if __name__ == "__main__":
    main()
