"""One benchmark row on the real data: train with the suite's defaults for a category (plus any
overrides), evaluate, export the package, time predict.py on 4,045 images, append to RESULTS.md.

    nohup .venv/bin/python benchmarks/run.py --category 2 > benchmarks/out/c2.log 2>&1 &
    .venv/bin/python benchmarks/run.py --category 2 --name c2_ce -p loss ce -p filter_frac 0 --note "plain CE"

Run it alone on the machine: the time budget is wall-clock, so a second job halves the epochs.
"""
from __future__ import annotations

import argparse
import ast
import resource
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
import utils  # noqa: E402
from results import add_row, commit_label, keep_history  # noqa: E402

DATA = REPO.parent / "shared" / "data" / "cusehacks-track1"


def literal(v):
    try:
        return ast.literal_eval(v)
    except (ValueError, SyntaxError):
        return v


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--category", type=int, default=2)
    ap.add_argument("--name")
    ap.add_argument("--data-dir", default=str(DATA))
    ap.add_argument("-p", nargs=2, action="append", default=[], metavar=("NAME", "VALUE"))
    ap.add_argument("--note", default="")
    ap.add_argument("--no-export", action="store_true")
    a = ap.parse_args(argv)
    over = {k: literal(v) for k, v in a.p}
    name = a.name or f"c{a.category}_" + time.strftime("%m%d_%H%M")
    out = REPO / "benchmarks" / "out"
    cfg = utils.TrainConfig(data_dir=a.data_dir, output_dir=str(out), run_name=name, category=a.category, **over)
    commit = commit_label()
    t = time.time()
    summary = utils.train(cfg)
    train_min = (time.time() - t) / 60
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    pred_s, plan = "", ""
    if not a.no_export and hasattr(utils, "export_submission"):
        res = benchmark_package(out, name, a.category)
        print("\n".join(res["plan_lines"]), flush=True)  # the log keeps every cut the planner made
        plan = (res["plan_lines"] or [""])[-1].replace("|", "/")[:160]
        pred_s = f"{res['seconds']:.0f}" + ("" if res["ok"] else f" PROBLEMS: {res['problems']}")
    # a group (arch a list: one run per backbone) gets a row per run; the package's timing goes on the last
    runs = summary["group"]["runs"] if "group" in summary else {name: summary}
    opts = " ".join(f"{k}={v}" for k, v in over.items())
    for i, (run, s) in enumerate(runs.items()):
        last = i == len(runs) - 1
        note = a.note
        if len(runs) > 1:
            note = (f"run {i + 1} of group {name} ({' + '.join(runs)}; {train_min:.1f} min wall in all, the package is "
                    f"the group's ensemble). {a.note}")
        add_row(row_line(run, s, a.category, opts, s["train_minutes"] if len(runs) > 1 else train_min, rss,
                         pred_s if last else "", plan if last else "", commit, note))


def row_line(run, summary, category, opts, train_min, rss, pred_s, plan, commit, note) -> str:
    """One RESULTS.md row of a finished run: its best checkpoint's holdout (if any) and val scores."""
    run_dir = Path(summary["run_dir"])
    keep_history(run_dir)
    hist = utils.pd.read_csv(run_dir / "history.csv")
    cfg = utils.json.loads((run_dir / "config.json").read_text())
    best = summary["topk"][0]
    row = hist[hist.epoch == best["epoch"]].iloc[0]
    pre = "" if best["kind"] == "raw" else "ema_"
    line = (f"| {time.strftime('%Y-%m-%d')} | {commit} | {run} | {category} | {cfg['arch']} {cfg['image_size']}px "
            f"{cfg['loss']} {opts} | {train_min:.1f} | {summary['epochs']} | {hist.images_per_s.median():.0f} | {rss:.2f} | "
            + (f"{row[pre + 'holdout_f1']:.3f} [{row[pre + 'holdout_f1_lo']:.3f}, {row[pre + 'holdout_f1_hi']:.3f}] | "
               f"{row[pre + 'holdout_acc']:.3f} | " if pre + "holdout_f1" in row else "no holdout | | ")
            + f"{row[pre + 'val_f1']:.3f} [{row[pre + 'val_f1_lo']:.3f}, "
            f"{row[pre + 'val_f1_hi']:.3f}] | {row[pre + 'val_acc']:.3f} | {pred_s} | {plan} | "
            f"{'best' if pre + 'holdout_f1' in row else 'last'} {best['kind']} e{best['epoch']}. {note} |\n")
    print(line)
    return line


def benchmark_package(out, name, category):
    """Export with notebook 03's functions, then run predict.py as the organizers do on 4,045 images."""
    nb = REPO / "notebooks" / "03_ensemble_tta_inference.ipynb"
    import papermill as pm
    pm.execute_notebook(str(nb), str(out / f"executed_03_{name}.ipynb"), cwd=str(REPO / "notebooks"),
                        parameters=dict(output_dir=str(out), run_name=name, team=name, category=category,
                                        self_check=False), kernel_name="python3", progress_bar=False)
    pkg = out / "submission" / f"{name}_track1_cat{category}"
    return utils.self_check(pkg, data_dir=str(DATA), repeat_to=4045)


if __name__ == "__main__":
    main()
