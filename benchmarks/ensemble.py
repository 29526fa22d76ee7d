"""A seed ensemble on the real data: train one member per seed (all holding out the same images),
then select and export through notebook 03's functions, time predict.py on 4,045 images, and
append one row per member alone and one for the ensemble to RESULTS.md.

    nohup .venv/bin/python benchmarks/ensemble.py --category 1 --name c1_ens --seeds 1 2 \\
        -p time_budget_min 14 > benchmarks/out/c1_ens.log 2>&1 &

Every row comes from the same greedy selection (checkpoints x TTA views, on the shared holdout +
val), so a member alone and the ensemble differ only in what they may choose from. `--reference`
adds a finished run with the same holdout (e.g. a single run at the full budget) to the table, not
to the ensemble. A member that has finished is not trained again; an interrupted one resumes.
"""
from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))
import utils  # noqa: E402
from results import add_row, commit_label, keep_history  # noqa: E402
from run import DATA, literal  # noqa: E402


def only_runs(ev, runs):
    """`ev` cut down to the candidates of `runs` (same images, same probabilities)."""
    keep = {c for c, info in ev["candidates"].items() if info["run"] in runs}
    return {**ev, "candidates": {c: ev["candidates"][c] for c in keep},
            "probs": {k: p for k, p in ev["probs"].items() if k[0] in keep},
            "table": ev["table"][ev["table"].candidate.isin(keep)].reset_index(drop=True), "runs": list(runs)}


def fixed_pick(ev, info, runs, view="center"):
    """Holdout and val scores of each run's own best checkpoint at one view, averaged over `runs`. Only
    the run's checkpoint choice saw the holdout, not the greedy search over views and checkpoints, so
    this carries less of the selection's optimism."""
    ids = [f"{r}/{info[r]['summary']['topk'][0]['file']}" for r in runs]
    p = sum(ev["probs"][(i, view)] for i in ids).argmax(1)
    n = len(ev["y_hold"])
    return {**utils.score_fast(ev["y_hold"], p[:n], "holdout_", ci=False),
            **utils.score_fast(ev["y_val"], p[n:], "val_", ci=False)}


def fixed_text(f):
    return f"holdout F1 {f['holdout_f1']:.3f} acc {f['holdout_acc']:.3f}, val F1 {f['val_f1']:.3f} acc {f['val_acc']:.3f}"


def cells(last):
    return (f"{last.holdout_f1:.3f} [{last.holdout_f1_lo:.3f}, {last.holdout_f1_hi:.3f}] | {last.holdout_acc:.3f} | "
            f"{last.val_f1:.3f} [{last.val_f1_lo:.3f}, {last.val_f1_hi:.3f}] | {last.val_acc:.3f}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--category", type=int, default=1)
    ap.add_argument("--name", required=True)
    ap.add_argument("--seeds", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--holdout-seed", type=int, default=0, help="every member holds out the images of this seed")
    ap.add_argument("--reference", nargs="*", default=[], help="finished runs to score beside the members")
    ap.add_argument("--ensemble-k", type=int, default=3)
    ap.add_argument("-p", nargs=2, action="append", default=[], metavar=("NAME", "VALUE"))
    ap.add_argument("--note", default="")
    a = ap.parse_args()
    over = {k: literal(v) for k, v in a.p}
    out = REPO / "benchmarks" / "out"
    commit = commit_label()
    members, minutes, rows = [], {}, []
    for s in a.seeds:
        name = f"{a.name}_s{s}"
        cfg = utils.TrainConfig(data_dir=str(DATA), output_dir=str(out), run_name=name, category=a.category,
                                seed=s, holdout_seed=a.holdout_seed, **over)
        if not (out / "runs" / name / "summary.json").is_file():
            t = time.time()
            utils.train(cfg)
            minutes[name] = (time.time() - t) / 60
        keep_history(out / "runs" / name)
        members.append(name)
    info = {r: utils.read_run(out, r) for r in members + a.reference}
    for r in a.reference:
        got = utils.split_seed(info[r]["config"])
        if got != a.holdout_seed:
            raise SystemExit(f"--reference {r} holds out the images of seed {got}, the members those of {a.holdout_seed}")

    ev = utils.evaluate_candidates(out, members + a.reference, data_dir=str(DATA))
    print(f"scored on {len(ev['y_hold'])} holdout + {len(ev['y_val'])} val images")
    conf = " ".join(f"{k}={v}" for k, v in over.items())
    day = time.strftime("%Y-%m-%d")
    for r in members + a.reference:
        sel = utils.select_ensemble(only_runs(ev, [r]), ensemble_k=a.ensemble_k)
        last = sel["trace"].iloc[-1]
        mins = f"{minutes[r]:.1f}" if r in minutes else ""
        what = (f"member seed={r.rsplit('_s', 1)[-1]} {conf}" if r in members else
                f"reference seed={info[r]['config']['seed']}, its own settings")
        rows.append(f"| {day} | {commit} | {r} | {a.category} | {what} | {mins} | "
                    f"{info[r]['summary']['epochs']} | | | {cells(last)} | | "
                    f"{' + '.join(sel['trace'].added)} | alone, through notebook 03's selection. {a.note} |\n")

    fixed = {r: fixed_pick(ev, info, [r]) for r in members + a.reference}
    fixed["ensemble"] = fixed_pick(ev, info, members)
    fixed_line = "; ".join(f"{r}: {fixed_text(f)}" for r, f in fixed.items())
    print("best checkpoint of each run, center view, no selection:", fixed_line)
    sel = utils.select_ensemble(only_runs(ev, members), ensemble_k=a.ensemble_k)
    pkg = utils.export_submission(out, only_runs(ev, members), sel, team=a.name, category=a.category, run_check=False)
    check = utils.self_check(Path(pkg["dir"]), data_dir=str(DATA), repeat_to=4045)
    last = sel["trace"].iloc[-1]
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    pred = f"{check['seconds']:.0f}" + ("" if check["ok"] else f" PROBLEMS: {check['problems']}")
    plan = (check["plan_lines"] or [""])[-1].replace("|", "/")[:160]
    rows.append(f"| {day} | {commit} | {a.name} | {a.category} | ensemble of {', '.join(members)} {conf} | "
                f"{sum(minutes.values()):.1f} | | | {rss:.2f} | {cells(last)} | {pred} | {plan} | "
                f"{' + '.join(sel['trace'].added)}. Best checkpoint of each, center view only: {fixed_line}. {a.note} |\n")
    for line in rows:
        add_row(line)
        print(line)
    (out / f"{a.name}_ensemble.json").write_text(json.dumps({"members": members, "reference": a.reference,
                                                            "fixed": fixed, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
