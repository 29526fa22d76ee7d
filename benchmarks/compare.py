"""Benchmark runs side by side, epoch for epoch: the evidence behind "ahead until epoch 20" or
"tracked the control" in RESULTS.md. A wall-clock budget gives runs different epoch counts when the
host's speed changes, so runs are aligned on the epoch column, not on the row.

    .venv/bin/python benchmarks/compare.py c2_ctrl1129_25 c2_elr7_25            # every epoch
    .venv/bin/python benchmarks/compare.py c2_ctrl1129_25 c2_elr7_25 --every 3  # the scored epochs
"""
from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd
from results import HISTORY as KEPT  # finished runs' histories, committed (results.keep_history)

RUNS = Path(__file__).resolve().parent / "out" / "runs"
COLUMNS = {"stage": "stage", "holdout_f1": "F1", "ema_holdout_f1": "ema F1", "train_fit_acc": "fit acc",
           "images_per_s": "img/s"}


def side_by_side(histories: dict, columns=COLUMNS) -> pd.DataFrame:
    """One row per epoch, a (run, column) pair per column; epochs a run did not reach are empty."""
    parts = {name: h.set_index("epoch")[[c for c in columns if c in h]].rename(columns=columns)
             for name, h in histories.items()}
    return pd.concat(parts, axis=1).sort_index()


def find_history(run: str, runs_dir: Path = RUNS, kept_dir: Path = KEPT):
    """The run's live history.csv (it grows while the run trains), else the copy kept when it finished."""
    for path in (Path(runs_dir) / run / "history.csv", Path(kept_dir) / f"{run}.csv"):
        if path.is_file():
            return path
    return None


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("runs", nargs="+", help="run names under benchmarks/out/runs or benchmarks/history")
    ap.add_argument("--every", type=int, default=1, help="show every n-th epoch (and the last)")
    ap.add_argument("--runs-dir", default=str(RUNS))
    ap.add_argument("--kept-dir", default=str(KEPT))
    a = ap.parse_args(argv)
    paths = {r: find_history(r, a.runs_dir, a.kept_dir) for r in a.runs}
    missing = [r for r, p in paths.items() if p is None]
    if missing:
        have = sorted({p.parent.name for p in Path(a.runs_dir).glob("*/history.csv")}
                      | {p.stem for p in Path(a.kept_dir).glob("*.csv")})
        raise SystemExit(f"no history for {missing} under {a.runs_dir} (a run writes it after its first epoch) "
                         f"or {a.kept_dir} (kept when a benchmark finishes); runs with one: {have}")
    table = side_by_side({r: pd.read_csv(p, dtype={"stage": str}) for r, p in paths.items()})
    keep = [e for e in table.index if e % a.every == 0 or e == table.index.max()]
    for col in [c for c in table.columns if c[1] == "img/s"]:  # whole numbers, not the table's 3 decimals
        table[col] = table[col].map(lambda v: "" if pd.isna(v) else f"{v:.0f}")
    with pd.option_context("display.max_rows", None, "display.width", 250, "display.precision", 3):
        print(table.loc[keep].to_string(na_rep=""))


if __name__ == "__main__":
    main()
