"""How many torch threads should a process under a CPU quota use? (a minute, no data)

predict.py's `cpu_threads` caps the thread count by the cgroup CPU quota, rounded to the nearest core.
This times Category 2's training step (resnet18, 96 px, batch 64, the autocast training uses) and
predict.py's inference (resnet18, 96 px, batch 32, fp32) at 1 and at 2 threads, twice each, in whatever
quota this process runs under. To run it under a quota of 1.25 cores on a cgroup v1 host (root):

    mkdir /sys/fs/cgroup/cpu/q
    echo 10000 > /sys/fs/cgroup/cpu/q/cpu.cfs_period_us
    echo 12500 > /sys/fs/cgroup/cpu/q/cpu.cfs_quota_us
    sh -c 'echo $$ > /sys/fs/cgroup/cpu/q/cgroup.procs; exec .venv/bin/python benchmarks/quota_threads.py --quota 1.25'

Appends one line to RESULTS.md.
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


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quota", required=True, help="the quota this process runs under, for the record ('none' without)")
    a = ap.parse_args()
    P = utils.load_predict_module()
    cfg = utils.resolve_config(utils.TrainConfig(category=2))
    dev = torch.device("cpu")
    amp = utils.amp_dtype_for(dev, "auto")
    net = P.build_network("resnet18", 102).eval()
    x = torch.randn(32, 3, 96, 96)
    ms = {1: {"train": [], "infer": []}, 2: {"train": [], "infer": []}}
    for threads in (2, 1, 2, 1):
        torch.set_num_threads(threads)
        ms[threads]["train"].append(1000 * utils.time_train_steps(cfg, 96, dev, amp, steps=6))
        with torch.inference_mode():
            net(x)
            t = time.time()
            for _ in range(8):
                net(x)
        ms[threads]["infer"].append(1000 * (time.time() - t) / (8 * len(x)))
        print(f"{threads} thread(s): train {ms[threads]['train'][-1]:.2f} ms/image, "
              f"inference {ms[threads]['infer'][-1]:.2f} ms/image", flush=True)
    parts = [f"{t} thread(s): train {' / '.join(f'{v:.2f}' for v in ms[t]['train'])} ms an image, inference "
             f"{' / '.join(f'{v:.2f}' for v in ms[t]['infer'])}" for t in (2, 1)]
    add_line(f"- quota_threads ({time.strftime('%Y-%m-%d')}, `benchmarks/quota_threads.py --quota {a.quota}`; "
             f"cpu_threads() {P.cpu_threads()}, training autocast {amp or 'fp32'}, inference fp32) " + "; ".join(parts))


if __name__ == "__main__":
    main()
