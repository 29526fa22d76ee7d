"""How wrong are the training labels, and what clean accuracy does a holdout accuracy stand for?

Under symmetric noise at rate eta over K classes, a model of clean accuracy a agrees with a noisy label
with probability h = a (1 - eta) + (1 - a) eta / (K - 1). Every benchmark row measures h on the noisy
holdout and a on the clean val, so pooling the rows of a category gives eta; the formula turned around
gives the clean accuracy a holdout accuracy stands for. Val is 50 images in 37 classes, so each row's a
is +-0.09: the pooled estimate is a guide, not a measurement.

    .venv/bin/python benchmarks/noise_rate.py                 # eta per category from RESULTS.md
    .venv/bin/python benchmarks/noise_rate.py --holdout-acc 0.600 0.398 --eta 0.32
    .venv/bin/python benchmarks/noise_rate.py --eta 0.32 --cleaning 2244 3602 5   # what the cleaning kept
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
    ap.add_argument("--cleaning", type=int, nargs=3, action="append", default=[], metavar=("KEPT", "TOTAL", "RANK"),
                    help="what prototype cleaning to the RANK nearest class means kept: right and wrong labels")
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


if __name__ == "__main__":
    main()
