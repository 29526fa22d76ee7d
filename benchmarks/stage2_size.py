"""Would a larger image size in stage 2 pay (FixRes: fine-tune at the size you test at)? A proxy that
needs no new training code: a finished holdout run's last state (raw weights, EMA, optimizer, the small-
loss filter's keep mask) trains `--epochs` more with the stage-2 recipe (no mixing, no erasing, the
run's final learning rate), once at each `--sizes`, from the same start and seed; the EMA and the raw
weights are scored after every epoch at the size they train at (views zoom + center, the prior shift),
clean Macro F1 estimated from the noisy holdout as `noise_rate.py --runs` does. The arms differ only in
pixels. The EMA (decay 0.998) still holds ~26% of the start after 12 epochs: read the raw weights too.
Appends one line to RESULTS.md.

    .venv/bin/python benchmarks/stage2_size.py --run c2_e80_h3_fixed_1204 --sizes 96 128 --epochs 12
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
import utils  # noqa: E402
from noise_rate import ETA, clean_scores  # noqa: E402
from results import add_line  # noqa: E402

OUT = REPO / "benchmarks" / "out"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--run", required=True, help="a finished holdout run under benchmarks/out/runs/")
    ap.add_argument("--sizes", type=int, nargs="+", default=[96, 128])
    ap.add_argument("--epochs", type=int, default=12, help="12: the length of stage 2 in an 80-epoch run")
    ap.add_argument("--eta", type=float, default=ETA, help="label noise rate for the clean estimate (noise_rate.py)")
    a = ap.parse_args()
    P = utils.load_predict_module()
    torch.set_num_threads(P.cpu_threads())
    run = utils.read_run(OUT, a.run)
    cfg = utils.TrainConfig.from_namespace(run["config"])
    norm = run["config"]["norm"]
    last = torch.load(OUT / "runs" / a.run / "last.pt", map_location="cpu", weights_only=False)
    st = last["state"]
    sets = utils.evaluation_sets(OUT, [a.run])
    n = len(sets["y_hold"])
    device, amp = torch.device("cpu"), utils.amp_dtype_for(torch.device("cpu"), cfg.precision)
    K = len(run["config"]["label_values"])
    steps = st["step"]  # the rate of the run's last step: stage 2's multiplier on the cosine's stopping point
    f_last = utils.lr_factor(steps - 1, steps, 1, 0, cfg.stage2_lr_mult, stop_frac=cfg.cosine_stop_frac)
    parts = []
    for size in a.sizes:
        cache = utils.cache_size_for(size)
        data = utils.prepare_data(run["config"]["data_dir"], OUT, size, cfg.holdout_frac, utils.split_seed(cfg), cfg.fit_frac)
        x_fit, y_fit = data["train"]["x"][data["fit_idx"]], data["train"]["y"][data["fit_idx"]]
        assert len(y_fit) == len(st["keep"]), "the fit set differs from the run's"
        x_eval = utils.read_square(sets["paths"]["hold"] + sets["paths"]["val"], cache, P)
        model, _ = utils.build_model(cfg.arch, K, None, head_dropout=cfg.dropout)
        model.load_state_dict(last["model"])
        model.to(memory_format=torch.channels_last)
        ema = utils.make_ema(model, cfg.ema_decay)
        ema.load_state_dict(last["ema"])
        optimizer, base_lr = utils.make_optimizer(model, cfg)
        optimizer.load_state_dict(last["optimizer"])
        lr = base_lr * f_last
        for g in optimizer.param_groups:
            g["lr"] = lr
        loss_fn = utils.make_loss(cfg.loss, cfg.label_smoothing, cfg.sce_alpha, cfg.sce_beta, cfg.gce_q)
        utils.set_dropout(model, cfg.stage2_dropout)
        tf = utils.train_transform(size, norm["mean"], norm["std"], cfg.crop_scale, cfg.hflip, cfg.rotation,
                                   cfg.color_jitter, cfg.blur_p, 0.0)
        member = {"cache_size": cache, "image_size": size, "mean": norm["mean"], "std": norm["std"],
                  "label_values": run["config"]["label_values"]}
        scores = []

        def score(net):
            m = dict(member, net=net.eval())  # the next epoch sets model.train() again
            p = sum(utils._time_pair(P, m, x_eval, v, 64)[0] for v in ("zoom", "center"))
            pred = P.decide(p, sets["log_prior"], sets["prior_tau"])
            return (clean_scores(sets["y_hold"], pred[:n], a.eta, K)["macro_f1"],
                    utils.macro_f1_fast(sets["y_val"], pred[n:], K))

        t0 = time.time()
        for epoch in range(a.epochs):
            utils.seed_everything(cfg.seed * 1000 + 500 + epoch)  # the same draws at every size
            gen = torch.Generator().manual_seed(cfg.seed * 1000 + 500 + epoch)
            sampler = utils.make_sampler(y_fit, st["keep"].astype(float), cfg.balanced_sampling, generator=gen,
                                         power=cfg.balance_power)
            loader = DataLoader(utils.CachedDataset(x_fit, y_fit, tf), batch_size=cfg.batch_size, sampler=sampler,
                                collate_fn=utils.MixCollate(K, enabled=False), generator=gen, drop_last=True)
            model.train()
            for x, t, _, _ in loader:
                x = x.contiguous(memory_format=torch.channels_last)
                with utils.autocast(device, amp):
                    logits = model(x)
                loss = loss_fn(logits.float(), t).mean()
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                ema.update_parameters(model)
            scores.append((score(ema.module), score(model)))
            print(f"{size}px epoch +{epoch + 1}: EMA clean est. {scores[-1][0][0]:.3f} val {scores[-1][0][1]:.3f}, "
                  f"raw {scores[-1][1][0]:.3f} val {scores[-1][1][1]:.3f} ({time.time() - t0:.0f} s)", flush=True)
        parts.append(f"{size}px: clean est. after +1..+{a.epochs} epochs, EMA "
                     + " / ".join(f"{e[0]:.3f}" for e, _ in scores) + ", raw " + " / ".join(f"{r[0]:.3f}" for _, r in scores)
                     + f"; val EMA {scores[-1][0][1]:.3f}, raw {scores[-1][1][1]:.3f}; {(time.time() - t0) / 60:.1f} min")
    line = (f"- stage2_size ({time.strftime('%Y-%m-%d')}, `benchmarks/stage2_size.py --run {a.run} --sizes "
            f"{' '.join(map(str, a.sizes))} --epochs {a.epochs}`; from the run's last state, stage-2 recipe at lr {lr:.4f}, "
            f"clean est. at eta {a.eta:g}) " + "; ".join(parts))
    add_line(line)
    print(line)


if __name__ == "__main__":
    main()
