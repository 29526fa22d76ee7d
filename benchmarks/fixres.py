"""Train-test resolution discrepancy (Touvron et al. 2019, "FixRes"): a network trained on
RandomResizedCrop sees objects larger than a centre crop at the same size shows them, so scoring
at a larger input than the training size often helps. No training here: the best checkpoint of an
existing run is scored through predict.py's own `run_pair` at several test sizes, on the noisy
holdout and the clean val. Appends one line per run to RESULTS.md.

    .venv/bin/python benchmarks/fixres.py --run c2_55min --scales 1 1.17 1.33
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

OUT = REPO / "benchmarks" / "out"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--run", required=True, help="a run under benchmarks/out/runs/")
    ap.add_argument("--scales", type=float, nargs="+", default=[1.0, 1.17, 1.33])
    ap.add_argument("--view", default="center")
    a = ap.parse_args()
    P = utils.load_predict_module()
    torch.set_num_threads(P.cpu_threads())
    run = utils.read_run(OUT, a.run)
    best = max(run["summary"]["topk"], key=lambda e: e["score"])
    member = utils.load_member(OUT / "runs" / a.run / best["file"], P)
    train_size = member["image_size"]
    sets = utils.evaluation_sets(OUT, [a.run])
    y_hold, y_val = sets["y_hold"], sets["y_val"]
    parts = []
    for s in a.scales:
        size = int(round(train_size * s / 8)) * 8
        cache = int(round(size / 0.875))
        m = dict(member, image_size=size, cache_size=cache)
        t = time.time()
        # re-read at the larger cache size, as predict.py would for a member with this image_size
        x = utils.read_square(sets["paths"]["hold"] + sets["paths"]["val"], cache, P)
        p, ms = utils._time_pair(P, m, x, a.view, P.BATCH_SIZE)
        pred = p.argmax(1)
        h = utils.score_fast(y_hold, pred[:len(y_hold)], "h_")
        v = utils.score_fast(y_val, pred[len(y_hold):], "v_", ci=False)
        parts.append(f"{size}px: holdout F1 {h['h_f1']:.3f} [{h['h_f1_lo']:.3f}, {h['h_f1_hi']:.3f}] acc {h['h_acc']:.3f}, "
                     f"val F1 {v['v_f1']:.3f} acc {v['v_acc']:.3f}, {ms:.1f} ms/img")
        print(parts[-1], f"({time.time() - t:.0f} s)", flush=True)
    line = (f"- fixres ({time.strftime('%Y-%m-%d')}, run {a.run}, {best['file']}, trained at {train_size}px, "
            f"view {a.view}) " + "; ".join(parts))
    add_line(line)
    print(line)


if __name__ == "__main__":
    main()
