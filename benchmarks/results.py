"""RESULTS.md keeps three parts: the table of benchmark rows, the micro-benchmark lines, the conclusions.
New rows go after the last row of the table and new lines after the last line of their list, so the
file stays readable however many benchmarks append to it."""
from __future__ import annotations

import subprocess
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
# benchmarks/out/ is not committed, so a new checkout has no run folders; each finished run's per-epoch
# history (a few kB) is kept here, so that compare.py can still put it beside newer runs.
HISTORY = RESULTS.parent / "history"
HEADER = ("| date | commit | name | category | config | train min | epochs | img/s | peak RSS GiB | "
          "holdout F1 [95% CI] | holdout acc | val F1 [95% CI] | val acc | predict.py s (4,045 img) | plan | note |\n"
          "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n")


def commit_label(repo: Path = RESULTS.parents[1]) -> str:
    """HEAD's short hash, with '+' when tracked files differ from it (the row ran on uncommitted code)."""
    def git(*args):
        return subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True).stdout.strip()

    return git("rev-parse", "--short", "HEAD") + ("+" if git("status", "--porcelain", "--untracked-files=no") else "")


def keep_history(run_dir: Path, history_dir: Path = HISTORY) -> Path:
    """Copy a run's history.csv to history_dir/<run name>.csv, atomically as the suite writes its records."""
    from utils import atomic_write_text  # the callers have the repository on sys.path
    dst = Path(history_dir) / f"{Path(run_dir).name}.csv"
    return atomic_write_text(dst, (Path(run_dir) / "history.csv").read_text())


def _insert_after_last(lines, prefix, new, fallback):
    idx = [i for i, line in enumerate(lines) if line.startswith(prefix)]
    pos = idx[-1] + 1 if idx else fallback(lines)
    return lines[:pos] + [new] + lines[pos:]


def add_row(line: str, path: Path = RESULTS) -> None:
    """A table row ('| ... |'), after the table's last row (the header is created when missing)."""
    text = path.read_text() if path.is_file() else "# Benchmark results\n\n"
    if HEADER.splitlines()[0] not in text:
        text = text.rstrip("\n") + "\n\n" + HEADER
    lines = text.splitlines(keepends=True)
    path.write_text("".join(_insert_after_last(lines, "| ", line.rstrip("\n") + "\n", len)))


def add_line(line: str, path: Path = RESULTS) -> None:
    """A micro-benchmark line ('- ...'), after the last one, before any '## ' section that follows the table."""
    text = path.read_text() if path.is_file() else "# Benchmark results\n\n"
    lines = text.splitlines(keepends=True)

    def before_sections(ls):
        sec = [i for i, s in enumerate(ls) if s.startswith("## ")]
        return sec[0] if sec else len(ls)
    idx = [i for i, s in enumerate(lines) if s.startswith("- ") and not any(t.startswith("## ") for t in lines[:i])]
    pos = idx[-1] + 1 if idx else before_sections(lines)
    path.write_text("".join(lines[:pos] + [line.rstrip("\n") + "\n"] + lines[pos:]))


def add_study_line(tool: str, args: str, what: str, table: dict, parts: list, digits: int = 3,
                   path: Path = RESULTS) -> str:
    """A study's line: `- tool (date, `benchmarks/tool.py args`; what) mean: name m; ... | part | part`, where
    `table` maps each variant's name to its readings over the runs and `parts` are the per-run readings.
    Prints the means and returns them."""
    import time
    from statistics import fmean
    means = "; ".join(f"{name} {fmean(v):.{digits}f}" for name, v in table.items())
    print("mean:", means)
    add_line(f"- {tool} ({time.strftime('%Y-%m-%d')}, `benchmarks/{tool}.py {args}`; {what}) mean: {means} | "
             + " | ".join(parts), path)
    return means
