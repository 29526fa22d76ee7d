"""Shared fixtures: a tiny generated dataset (seconds) and one short training run on it."""
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import utils  # noqa: E402

TINY = dict(n_classes=4, train_per_class=16, val_per_class=3, test_per_class=4, noise_rate=0.25, seed=0)
# With a holdout (Category 1's default; Category 2's is none): the shared runs test the selection path
TINY_TRAIN = dict(image_size=32, batch_size=16, epochs=3, seed=0, top_k=2, holdout_frac=0.12, progress=False)


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    """Organizers' layout, 4 classes, 25% known symmetric noise, the bad files included."""
    return utils.make_demo_dataset(tmp_path_factory.mktemp("data") / "tiny", **TINY)


@pytest.fixture(scope="session")
def tiny_run(tiny_data, tmp_path_factory) -> dict:
    """One finished 3-epoch run on the tiny data: outputs/runs/tiny/{config.json, history.csv, ckpt_*.pt, ...}."""
    out = tmp_path_factory.mktemp("outputs")
    kw = dict(TINY_TRAIN)
    progress = kw.pop("progress")
    cfg = utils.TrainConfig(data_dir=str(tiny_data), output_dir=str(out), run_name="tiny", **kw)
    summary = utils.train(cfg, progress=progress)
    return {"data_dir": tiny_data, "output_dir": out, "run_name": "tiny", "summary": summary}


SMALL = dict(n_classes=5, train_per_class=40, val_per_class=4, test_per_class=4, noise_rate=0.3, seed=1)


@pytest.fixture(scope="session")
def small_run(tmp_path_factory) -> dict:
    """A learnable run with known noise: 5 classes x 40 images, 30% flipped, 10 epochs at 40 px (~30 s)."""
    data = utils.make_demo_dataset(tmp_path_factory.mktemp("data") / "small", **SMALL)
    out = tmp_path_factory.mktemp("outputs")
    # every epoch's loss history (fit_score_every=1): the label-issue tests judge the ranking on a full
    # history; with the default cadence a 10-epoch run keeps only 5 scored epochs
    cfg = utils.TrainConfig(data_dir=str(data), output_dir=str(out), run_name="small", image_size=40,
                            batch_size=32, epochs=10, seed=0, fit_score_every=1, holdout_frac=0.12)
    summary = utils.train(cfg, progress=False)
    return {"data_dir": data, "output_dir": out, "run_name": "small", "summary": summary}


@pytest.fixture(scope="session")
def no_holdout_run(tiny_data, tmp_path_factory) -> dict:
    """The Category 2 default on the tiny data: no holdout, 6 epochs with no minimum asked (min_epochs 0), so
    it keeps the EMA of epochs 6 and 5."""
    out = tmp_path_factory.mktemp("outputs")
    cfg = utils.TrainConfig(data_dir=str(tiny_data), output_dir=str(out), run_name="nh", image_size=32, batch_size=16,
                            epochs=6, min_epochs=0, seed=0, top_k=3)
    summary = utils.train(cfg, progress=False)
    return {"data_dir": tiny_data, "output_dir": out, "run_name": "nh", "summary": summary, "config": cfg}
