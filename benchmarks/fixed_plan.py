"""Which test-time views should a run without a holdout ship? No training: a holdout run's kept
checkpoints are scored under every view through predict.py's own code (`evaluate_candidates`), then
fixed plans (the latest checkpoint or all of them, x a set of views, softmax averaged) are set beside
the greedy choice, which is made and scored on the same holdout and so flattered. When the run also kept raw
weights (`-p checkpoint_at` with 'raw' entries), the EMA plans read the EMA snapshots alone, and the raw
weights are read against them: the newest raw snapshot alone and with the newest EMA one. Each plan's clean
Macro F1 is estimated from the noisy holdout as `noise_rate.py --runs` does (`--eta`). Several runs that
hold out the same images (`-p holdout_seed`) are read as one ensemble: "latest" is then each run's latest
checkpoint, "all" every run's; notebook 03's plan is read too (three snapshots a run, cut to a package of
`PACKAGE_WEIGHTS_LIMIT_MB`: a pair of runs ships each one's two newest). Appends one line to RESULTS.md.

    .venv/bin/python benchmarks/fixed_plan.py --runs c2_e80_h1_f76_1204
    .venv/bin/python benchmarks/fixed_plan.py --runs c2_e80_h3_s0_1207 c2_e80_h3_s1_1207   # a seed ensemble
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
import utils  # noqa: E402
from noise_rate import ETA, clean_scores  # noqa: E402
from results import add_line  # noqa: E402

OUT = REPO / "benchmarks" / "out"
PLANS = [("center",), ("zoom",), ("zoom", "center"), ("center", "flip"), ("zoom", "center", "flip", "zoom_flip"),
         ("center", "flip", "full", "zoom")]


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", nargs="+", required=True, help="holdout runs under benchmarks/out/runs/")
    ap.add_argument("--eta", type=float, default=ETA, help="label noise rate for the clean estimate (noise_rate.py)")
    a = ap.parse_args(argv)
    views = tuple(dict.fromkeys(v for plan in PLANS for v in plan))
    ev = utils.evaluate_candidates(OUT, a.runs, views=views)
    decide = utils.load_predict_module().decide
    n, k = len(ev["y_hold"]), len(ev["label_values"])
    info = ev["candidates"]
    newest_first = sorted(info, key=lambda c: -info[c]["epoch"])
    raw = [c for c in newest_first if info[c]["kind"] == "raw"]
    cands = [c for c in newest_first if info[c]["kind"] != "raw"] if raw and len(raw) < len(info) else newest_first

    def latest(cs):
        return [c for i, c in enumerate(cs) if all(info[d]["run"] != info[c]["run"] for d in cs[:i])]

    def f1s(pairs):
        pred = decide(sum(ev["probs"][p] for p in pairs), ev["log_prior"], ev["prior_tau"])
        return (utils.macro_f1_fast(ev["y_hold"], pred[:n], k), utils.macro_f1_fast(ev["y_val"], pred[n:], k),
                clean_scores(ev["y_hold"], pred[:n], a.eta, k)["macro_f1"])

    parts = []
    for plan in PLANS:
        for cs, what in ((latest(cands), "latest"), (cands, f"all {len(cands)}")):
            h, v, clean = f1s([(c, view) for c in cs for view in plan])
            parts.append(f"{'+'.join(plan)} x {what}: holdout F1 {h:.3f} (clean est. {clean:.3f}) val {v:.3f}")
            print(parts[-1], flush=True)
    if cands is not newest_first:  # read at the views the no-holdout default ships (zoom + center)
        for cs, what in ((latest(raw), "raw latest"), (latest(raw) + latest(cands), "raw + EMA latest")):
            h, v, clean = f1s([(c, view) for c in cs for view in ("zoom", "center")])
            parts.append(f"zoom+center x {what}: holdout F1 {h:.3f} (clean est. {clean:.3f}) val {v:.3f}")
            print(parts[-1], flush=True)
    else:  # what notebook 03 ships: three snapshots a run, cut to a package of plan_mb MiB
        shipped = utils.fixed_ensemble(ev, ci=False, max_mb=utils.PACKAGE_WEIGHTS_LIMIT_MB)
        h, v, clean = f1s(shipped["pairs"])
        parts.append(f"notebook 03's plan ({', '.join(utils._short(c) for c in shipped['members'])} x zoom+center, "
                     f"{utils.package_mb(ev, shipped['members']):.0f} MiB): holdout F1 {h:.3f} (clean est. {clean:.3f}) val {v:.3f}")
        print(parts[-1], flush=True)
    sel = utils.select_ensemble(ev, ci=False)
    h, v, clean = f1s(sel["pairs"])
    parts.append(f"greedy ({', '.join(utils._short(c) + '/' + view for c, view in sel['pairs'])}; chosen on this holdout): "
                 f"holdout F1 {h:.3f} (clean est. {clean:.3f}) val {v:.3f}")
    add_line(f"- fixed_plan (`benchmarks/fixed_plan.py --runs {' '.join(a.runs)}`, checkpoints "
             f"{', '.join(utils._short(c) for c in newest_first)}, prior tau {ev['prior_tau']:g}, clean est. at eta {a.eta:g}) "
             + "; ".join(parts))
    print(parts[-1])


if __name__ == "__main__":
    main()
