"""Which rule should notebook 03 use to build predict.py's plan? Read out of fold. (no training; ~3 min a run, cached)

`select_ensemble`'s greedy choice is scored on the same ~540 holdout + val images it chose on, so its
reading is biased up, while a fixed rule (c1_probe_members.py's "every fine-tune pair, each probe at half
weight") is not. To compare rules fairly, each is read out of fold: the holdout is split in `--folds` folds, a rule
chooses its plan on all folds but one plus val (as notebook 03 does on holdout + val) and predicts that fold;
the folds' predictions are scored together, clean Macro F1 estimated at eta ETA, averaged over
`--splits` random splits. A rule that chooses nothing reads the same in and out of fold.

Rules (each a list of ((candidate, view), weight); predict.py pools the softmax outputs with those weights,
as `--pooling` says, by default as notebook 03 would: `utils.default_pooling`):
  - greedy k3: notebook 03's `select_ensemble` at ensemble_k 3 (every pair weight 1);
  - greedy+repl k3 / k5: the same search with replacement (Caruana et al. 2004, "Ensemble selection from
    libraries of models"): a pair may be added again, which raises its weight; the best-scoring prefix of
    `--steps` additions is kept;
  - ft greedy + probes x w: the greedy choice among the fine-tune's pairs only, then each probe's centre
    view at w times the fine-tune's total weight;
  - ft all + probes x w: every fine-tune pair, probes as above (c1_probe_members.py's rule);
  - all-in: every pair at weight 1;
  - shipped: notebook 03's default, `utils.fixed_ensemble` (the newest snapshots x zoom, center, then each probe
    at w, fine-tune pairs left out from the end beyond `--max-ms`).
Each plan's forecast cost (ms an image, the pairs' medians timed by `evaluate_candidates`) is printed:
predict.py's planner cuts what does not fit in its budget from the end.

    .venv/bin/python benchmarks/plan_rules.py --runs c1_lite0_28_1206 c1_lite0_28_h2_1206 c1_lite0_e6_h1 c1_probes_1206
"""
from __future__ import annotations

import argparse
import pickle
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
import utils  # noqa: E402
from noise_rate import ETA, clean_scores  # noqa: E402
from results import add_line  # noqa: E402

OUT = REPO / "benchmarks" / "out"
P = utils.load_predict_module()
VIEWS = ("center", "flip", "full", "zoom")
KEEP = ("probs", "y_hold", "y_val", "table", "candidates", "label_values", "log_prior", "prior_tau", "views", "runs",
        "fallback_label", "seed")


def cached_ev(run, refresh=False):
    """`utils.evaluate_candidates` of one run, without the image tensor, pickled in out/cache."""
    path = OUT / "cache" / f"ev_{run}.pkl"
    if path.is_file() and not refresh:
        return pickle.loads(path.read_bytes())
    ev = utils.evaluate_candidates(OUT, [run], views=VIEWS, ci=False)
    ev = {key: ev[key] for key in KEEP}
    path.parent.mkdir(parents=True, exist_ok=True)
    utils._atomic(path, lambda f: f.write(pickle.dumps(ev)))
    return ev


def rows_of(ev, hold_rows):
    """`ev` with only the holdout rows `hold_rows` (all val rows kept): what a rule may choose on."""
    n = len(ev["y_hold"])
    idx = np.concatenate([hold_rows, n + np.arange(len(ev["y_val"]))])
    return {**ev, "y_hold": ev["y_hold"][hold_rows], "probs": {key: p[idx] for key, p in ev["probs"].items()}}


def average(ev, plan, pooling=None):
    """A plan's [((candidate, view), weight)] softmax pool over all rows of `ev`, as predict.py pools it
    (`pooling` None: what notebook 03 ships for these candidates, `utils.default_pooling`)."""
    return P.pool([ev["probs"][key] for key, _ in plan], [w for _, w in plan], pooling or utils.default_pooling(ev))


def greedy_replace(ev, ensemble_k=3, steps=15):
    """Forward selection with replacement: the best-scoring prefix of `steps` additions, weights = counts."""
    y = np.concatenate([ev["y_hold"], ev["y_val"]])
    k = len(ev["label_values"])
    decide = P.decide
    prior = (ev.get("log_prior"), ev.get("prior_tau", 0.0))
    keys = list(ev["probs"])
    acc, added, members, scores = 0.0, [], [], []
    for _ in range(steps):
        best = None
        for key in keys:
            if key[0] not in members and len(members) >= ensemble_k:
                continue
            f = utils.macro_f1_fast(y, decide(acc + ev["probs"][key], *prior), k)
            if best is None or f > best[0] + 1e-9:
                best = (f, key)
        f, key = best
        acc = acc + ev["probs"][key]
        added.append(key)
        if key[0] not in members:
            members.append(key[0])
        scores.append(f)
    stop = int(np.argmax(scores)) + 1  # first best: ties go to the shorter plan
    plan = {}
    for key in added[:stop]:
        plan[key] = plan.get(key, 0) + 1
    return list(plan.items())


def rules(ev, probe_weight, max_ms=80):
    probes = [c for c, info in ev["candidates"].items() if info["kind"] == "probe"]
    tuned = {**ev, "probs": {key: p for key, p in ev["probs"].items() if key[0] not in probes},
             "table": ev["table"][~ev["table"].candidate.isin(probes)]}

    def with_probes(ft_pairs):
        if not probes:
            return [(key, 1.0) for key in ft_pairs]
        w = probe_weight * len(ft_pairs)  # each probe at probe_weight x the fine-tune's total weight
        return [(key, 1.0) for key in ft_pairs] + [((c, "center"), w) for c in probes]

    return {
        "greedy k3": lambda e: [(key, 1.0) for key in utils.select_ensemble(e, ensemble_k=3, ci=False)["pairs"]],
        "greedy+repl k3": lambda e: greedy_replace(e, 3),
        "greedy+repl k5": lambda e: greedy_replace(e, 5),
        f"ft greedy + probes x{probe_weight:g}": lambda e: with_probes(
            utils.select_ensemble({**tuned, "y_hold": e["y_hold"], "probs": {key: e["probs"][key] for key in tuned["probs"]}},
                                  ensemble_k=3, ci=False)["pairs"]),
        f"ft all + probes x{probe_weight:g}": lambda e: with_probes(list(tuned["probs"])),
        f"ft zoom+center + probes x{probe_weight:g}": lambda e: with_probes(
            [key for key in tuned["probs"] if key[1] in ("zoom", "center")]),
        f"ft zoom+flip + probes x{probe_weight:g}": lambda e: with_probes(
            [key for key in tuned["probs"] if key[1] in ("zoom", "flip")]),
        f"ft zoom + probes x{probe_weight:g}": lambda e: with_probes([key for key in tuned["probs"] if key[1] == "zoom"]),
        "ft greedy k3 (no probes)": lambda e: [(key, 1.0) for key in utils.select_ensemble(
            {**tuned, "y_hold": e["y_hold"], "probs": {key: e["probs"][key] for key in tuned["probs"]}},
            ensemble_k=3, ci=False)["pairs"]],
        "ft zoom+center (no probes)": lambda e: [(key, 1.0) for key in tuned["probs"] if key[1] in ("zoom", "center")],
        "ft all (no probes)": lambda e: [(key, 1.0) for key in tuned["probs"]],
        "all-in": lambda e: [(key, 1.0) for key in e["probs"]],
        f"shipped: fixed_ensemble x{probe_weight:g}, max {max_ms:g} ms": lambda e: shipped(e, probe_weight, max_ms),
    }


def shipped(ev, probe_weight, max_ms):
    """Notebook 03's default plan (`utils.fixed_ensemble`) as [((candidate, view), weight)]."""
    sel = utils.fixed_ensemble(ev, probe_weight=probe_weight, max_ms=max_ms, ci=False)
    return list(zip(sel["pairs"], sel["weights"]))


def read_rules(ev, splits, probe_weight, eta, folds=2, max_ms=80, seed=0, pooling=None):
    n, k = len(ev["y_hold"]), len(ev["label_values"])
    decide = P.decide
    cost = ev["table"].groupby(["candidate", "view"]).ms_per_image.first().to_dict()
    out = {}
    for name, rule in rules(ev, probe_weight, max_ms).items():
        f_oof, f_in, ms, npairs = [], None, [], []
        for s in range(splits):
            parts = np.array_split(np.random.default_rng(seed + s).permutation(n), folds)
            pred = np.empty(n, dtype=np.int64)
            for i, b in enumerate(parts):
                plan = rule(rows_of(ev, np.concatenate(parts[:i] + parts[i + 1:])))
                pred[b] = decide(average(ev, plan, pooling), ev["log_prior"], ev["prior_tau"])[:n][b]
                ms.append(sum(cost[key] for key, _ in plan))
                npairs.append(len(plan))
            f_oof.append(clean_scores(ev["y_hold"], pred, eta, k)["macro_f1"])
        plan = rule(ev)  # chosen on every holdout row: what notebook 03 would ship, read in sample
        p = decide(average(ev, plan, pooling), ev["log_prior"], ev["prior_tau"])
        f_in = clean_scores(ev["y_hold"], p[:n], eta, k)["macro_f1"]
        out[name] = {"oof": float(np.mean(f_oof)), "oof_sd": float(np.std(f_oof)), "in": f_in,
                     "val": utils.macro_f1_fast(ev["y_val"], p[n:], k), "ms": float(np.mean(ms)),
                     "pairs": float(np.mean(npairs))}
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", nargs="+", required=True)
    ap.add_argument("--splits", type=int, default=3, help="random splits of the holdout into folds, averaged")
    ap.add_argument("--folds", type=int, default=5, help="a rule chooses on all folds but one and predicts that one")
    ap.add_argument("--probe-weight", type=float, default=0.5)
    ap.add_argument("--max-ms", type=float, default=80, help="the shipped rule's cost cap (notebook 03's plan_ms)")
    ap.add_argument("--eta", type=float, default=ETA)
    ap.add_argument("--refresh", action="store_true", help="re-run evaluate_candidates instead of the cache")
    ap.add_argument("--pooling", choices=P.POOLINGS, default=None,
                    help="how every rule's plan is pooled (default: what notebook 03 ships; lines before 12-07 are 'mean')")
    a = ap.parse_args()
    parts, table = [], {}
    for run in a.runs:
        t0 = time.time()
        res = read_rules(cached_ev(run, a.refresh), a.splits, a.probe_weight, a.eta, a.folds, a.max_ms, pooling=a.pooling)
        for name, r in res.items():
            table.setdefault(name, []).append(r["oof"])
        parts.append(f"{run}: " + "; ".join(
            f"{name} {r['oof']:.3f} out of fold (sd {r['oof_sd']:.3f}; in sample {r['in']:.3f}, val {r['val']:.3f}; "
            f"{r['pairs']:.1f} pairs, {r['ms']:.0f} ms/img)" for name, r in res.items()))
        print(parts[-1], f"[{time.time() - t0:.0f} s]", flush=True)
    means = "; ".join(f"{name} {np.mean(v):.3f}" for name, v in table.items())
    print("mean out of fold:", means)
    add_line(f"- plan_rules ({time.strftime('%Y-%m-%d')}, `benchmarks/plan_rules.py --runs {' '.join(a.runs)} --splits "
             f"{a.splits} --folds {a.folds} --probe-weight {a.probe_weight:g} --max-ms {a.max_ms:g}{' --pooling ' + a.pooling if a.pooling else ''}`; ensemble rules chosen on {a.folds - 1} "
             f"folds of {a.folds} of the holdout + val and read on the other fold, clean Macro F1 est. at eta {a.eta:g}) mean out of fold: {means} | " + " | ".join(parts))


if __name__ == "__main__":
    main()
