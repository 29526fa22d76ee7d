"""The common start of the Category 1 studies (c1_second_round.py, c1_heads.py): a finished run, its
cached images and splits, the pretrained Lite0's L2-normalised features of every train and val image,
and the run's best checkpoint."""
from __future__ import annotations

import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
import utils  # noqa: E402


def load_with_features(out: str, run_name: str) -> SimpleNamespace:
    t0 = time.time()
    torch.set_num_threads(utils.load_predict_module().cpu_threads())
    run = utils.load_run(out, run_name)
    cfg = run["config"]
    data = utils.prepare_data(cfg["data_dir"], out, cfg["image_size"], cfg["holdout_frac"], utils.split_seed(cfg))
    dev = torch.device("cpu")
    amp = utils.amp_dtype_for(dev)
    K = len(data["label_values"])
    x, y = data["train"]["x"], data["train"]["y"]
    fit, hold = data["fit_idx"], data["hold_idx"]
    base, info = utils.build_model("efficientnet-lite0", K, "efficientnet-lite0")
    member = {"net": base, "cache_size": data["cache_size"], "image_size": cfg["image_size"], **info["expected_norm"]}
    norm = torch.nn.functional.normalize
    f_all = norm(utils.embed(base, x, member, dev, amp).float(), dim=1).numpy()
    f_val = norm(utils.embed(base, data["val"]["x"], member, dev, amp).float(), dim=1).numpy()
    net, tinfo = utils.checkpoint_net(run["run_dir"], run["summary"]["topk"][0], dev)
    print(f"run {run_name}: data and pretrained features in {time.time() - t0:.0f} s", flush=True)
    return SimpleNamespace(run=run, cfg=cfg, data=data, dev=dev, amp=amp, K=K, x=x, fit=fit, hold=hold,
                           y_fit=y[fit], y_hold=y[hold], y_val=data["val"]["y"], f_all=f_all, f_val=f_val,
                           tuned={"net": net, **tinfo})
