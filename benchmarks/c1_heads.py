"""Category 1: how far does a head on the frozen pretrained Lite0 features get on the noisy labels, with a
noise-robust loss or without, and does it add anything to a finished fine-tune? Minutes, no fine-tuning.

Every head trains on the fit images at their given labels and is scored on the noisy holdout and the
clean val. The robust losses are the suite's own (`utils.sce_loss`, `utils.gce_loss`): GCE and SCE are
noise-tolerant under symmetric noise in theory, and a linear head on fixed features has no capacity to
memorise beyond what its weight decay allows. Then each head's probabilities are averaged with the
fine-tuned run's best checkpoint (center view), to see whether the frozen view corrects the fine-tune.

    .venv/bin/python benchmarks/c1_heads.py --run c1_e6_prior_1202
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
from c1_run import load_with_features  # noqa: E402
from noise_rate import ETA, clean_from  # noqa: E402
from results import add_line  # noqa: E402


def linear_head(f_fit, y_fit, K, loss, weight_decay, steps=600, lr=1e-2, seed=0):
    """A full-batch linear head (Adam) on standardised features: sklearn has no GCE or SCE."""
    torch.manual_seed(seed)
    X = torch.as_tensor(f_fit, dtype=torch.float32)
    mu, sd = X.mean(0), X.std(0) + 1e-6
    lin = torch.nn.Linear(X.shape[1], K)
    opt = torch.optim.Adam(lin.parameters(), lr=lr)
    t = torch.as_tensor(y_fit)
    for _ in range(steps):
        obj = loss(lin((X - mu) / sd), t).mean() + weight_decay * (lin.weight ** 2).sum()
        opt.zero_grad()
        obj.backward()
        opt.step()

    def probs(f):
        with torch.no_grad():
            return torch.softmax(lin((torch.as_tensor(f, dtype=torch.float32) - mu) / sd), 1).numpy()
    return probs


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--run", required=True, help="a finished Category 1 run in --out")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "out"))
    a = ap.parse_args()
    r = load_with_features(a.out, a.run)
    run, cfg, K, fit, hold, f_all, f_val = r.run, r.cfg, r.K, r.fit, r.hold, r.f_all, r.f_val
    y_fit, y_hold, y_val = r.y_fit, r.y_hold, r.y_val
    ph_ft = utils.predict_cached(r.tuned["net"], r.x[hold], r.tuned, r.dev, r.amp).float().numpy()
    pv_ft = utils.predict_cached(r.tuned["net"], r.data["val"]["x"], r.tuned, r.dev, r.amp).float().numpy()

    def text(name, ph, pv):
        h, v = utils.score(y_hold, ph.argmax(1), ci=False), utils.score(y_val, pv.argmax(1), ci=False)
        return (f"{name}: holdout acc {h['acc']:.3f} (clean est. {clean_from(h['acc'], ETA):.2f}) "
                f"F1 {h['f1']:.3f}, val acc {v['acc']:.2f}")

    parts = [text(f"the fine-tune ({run['summary']['topk'][0]['file']}, center)", ph_ft, pv_ft)]
    from sklearn.linear_model import LogisticRegression
    for C in (1.0, 3.0):
        m = LogisticRegression(C=C, max_iter=2000, random_state=0).fit(f_all[fit], y_fit)
        parts.append(text(f"logistic regression C={C:g}", m.predict_proba(f_all[hold]), m.predict_proba(f_val)))
    losses = {"CE": lambda lo, t: utils.ce_loss(lo, t),
              "SCE": lambda lo, t: utils.sce_loss(lo, t, alpha=1.0, beta=1.0),  # the recipe's weights
              "GCE q=0.7": lambda lo, t: utils.gce_loss(lo, t, q=0.7),
              "GCE q=0.4": lambda lo, t: utils.gce_loss(lo, t, q=0.4)}
    heads = {}
    for name, loss in losses.items():
        for wd in (1e-3, 1e-2):
            head = linear_head(f_all[fit], y_fit, K, loss, wd)
            heads[(name, wd)] = (head(f_all[hold]), head(f_val))
            parts.append(text(f"linear head {name} wd={wd:g}", *heads[(name, wd)]))
    best = max(heads, key=lambda k: (heads[k][0].argmax(1) == y_hold).mean())
    for w in (0.2, 0.35, 0.5):
        ph, pv = heads[best]
        parts.append(text(f"fine-tune + {w:g} x head {best[0]} wd={best[1]:g}", (1 - w) * ph_ft + w * ph,
                          (1 - w) * pv_ft + w * pv))
    for p in parts:
        print(p, flush=True)
    add_line(f"- c1_heads ({time.strftime('%Y-%m-%d')}, `benchmarks/c1_heads.py`, heads on frozen Lite0 "
             f"{cfg['image_size']}px features, L2-normalised, trained on the {len(fit)} fit images at their given labels; "
             f"clean est. at eta {ETA}) " + "; ".join(parts))


if __name__ == "__main__":
    main()
