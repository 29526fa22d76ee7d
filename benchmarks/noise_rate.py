"""How wrong are the training labels, and what clean accuracy does a holdout accuracy stand for?

Under symmetric noise at rate eta over K classes, a model of clean accuracy a agrees with a noisy label
with probability h = a (1 - eta) + (1 - a) eta / (K - 1). Every benchmark row measures h on the noisy
holdout and a on the clean val, so pooling the rows of a category gives eta; the formula turned around
gives the clean accuracy a holdout accuracy stands for. Val is 50 images in 37 classes, so each row's a
is +-0.09: the pooled estimate is a guide, not a measurement.

    .venv/bin/python benchmarks/noise_rate.py                 # eta per category from RESULTS.md
    .venv/bin/python benchmarks/noise_rate.py --holdout-acc 0.600 0.398 --eta 0.32
"""
from __future__ import annotations

import argparse
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
K = 102


def eta_from(a: float, h: float, k: int = K) -> float:
    """The noise rate at which clean accuracy a shows as holdout accuracy h."""
    return (a - h) / (a - (1 - a) / (k - 1))


def clean_from(h: float, eta: float, k: int = K) -> float:
    """The clean accuracy that shows as holdout accuracy h under symmetric noise eta."""
    return (h - eta / (k - 1)) / (1 - eta - eta / (k - 1))


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


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--holdout-acc", type=float, nargs="*", default=[])
    ap.add_argument("--eta", type=float, nargs="*", default=[0.30, 0.32, 0.35])
    a = ap.parse_args(argv)
    for cat in (1, 2):
        r = [x for x in rows() if x[0] == cat]
        if r:
            h, v = sum(x[1] for x in r) / len(r), sum(x[2] for x in r) / len(r)
            print(f"category {cat}: {len(r)} rows, mean holdout acc {h:.3f}, mean val acc {v:.3f} -> eta {eta_from(v, h):.3f}")
    for h in a.holdout_acc:
        print(f"holdout acc {h:.3f} -> clean acc " + ", ".join(f"{clean_from(h, e):.3f} at eta {e:.2f}" for e in a.eta))


if __name__ == "__main__":
    main()
