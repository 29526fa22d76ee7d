"""The notebooks executed headless through papermill (and run_all.py) on generated tiny data."""
import json
import shutil
from pathlib import Path

import pandas as pd
import papermill as pm
import pytest

import run_all

NB = Path(__file__).resolve().parents[1] / "notebooks"
TINY_01 = dict(image_size=32, batch_size=16, seed=7, epochs=2)


def execute(name, out_dir, **params):
    return pm.execute_notebook(str(NB / name), str(out_dir / f"executed_{name}"), parameters=params,
                               cwd=str(NB), kernel_name="python3", progress_bar=False)


def test_00_writes_stats_and_figures(tiny_data, tmp_path):
    execute("00_data_inspection.ipynb", tmp_path, data_dir=str(tiny_data), output_dir=str(tmp_path), image_size=32)
    stats = json.loads((tmp_path / "data" / "stats.json").read_text())
    assert len(stats["mean"]) == 3 and all(0 < s < 1 for s in stats["std"]) and stats["source"] == "training images only"
    for f in ("00_class_counts.png", "00_image_sizes.png", "00_sample_grid.png"):
        assert (tmp_path / "figures" / f).stat().st_size > 10_000
    assert (tmp_path / "data" / "duplicates.csv").is_file()


def test_00_fails_on_a_near_miss_layout_naming_both(tiny_data, tmp_path):
    data = Path(shutil.copytree(tiny_data, tmp_path / "d"))
    (data / "val" / "images").rename(data / "val_images")
    with pytest.raises(pm.PapermillExecutionError) as e:
        execute("00_data_inspection.ipynb", tmp_path, data_dir=str(data), output_dir=str(tmp_path / "o"))
    assert "found val_images/ but expected val/images/" in str(e.value)


def test_01_twice_gives_identical_history(tiny_data, tmp_path):
    for out in ("a", "b"):
        execute("01_train.ipynb", tmp_path, data_dir=str(tiny_data), output_dir=str(tmp_path / out), run_name="r", **TINY_01)
    a, b = (pd.read_csv(tmp_path / o / "runs" / "r" / "history.csv").drop(columns=["epoch_s", "images_per_s"])
            for o in ("a", "b"))
    pd.testing.assert_frame_equal(a, b)
    assert (tmp_path / "a" / "runs" / "r" / "training_curves.png").is_file()


def test_01_category_2_with_pretrained_fails_clearly(tiny_data, tmp_path):
    with pytest.raises(pm.PapermillExecutionError, match="Category 2 trains every weight from scratch"):
        execute("01_train.ipynb", tmp_path, data_dir=str(tiny_data), output_dir=str(tmp_path), category=2,
                pretrained="ResNet18_Weights.IMAGENET1K_V1", **TINY_01)


def test_run_all_forwards_parameters_and_stops_at_the_first_failure(tiny_data, tmp_path, capsys):
    with pytest.raises(SystemExit, match=r"01_train.ipynb failed in cell \d+: ValueError: Category 2"):
        run_all.main(["-p", "data_dir", str(tiny_data), "-p", "output_dir", str(tmp_path), "-p", "image_size", "32",
                      "-p", "pretrained", "ResNet18_Weights.IMAGENET1K_V1", "--only", "00", "01"])
    assert (tmp_path / "executed" / "00_data_inspection.ipynb").is_file()
    assert json.loads((tmp_path / "data" / "stats.json").read_text())["resolution"] == 37  # image_size reached 00


def test_run_all_makes_paths_absolute_before_the_notebooks_run_in_their_own_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    here = Path.cwd()
    (here / "w.pth").write_bytes(b"")
    got = run_all.absolute_paths({"data_dir": "d", "class_names": "names.csv", "pretrained": "w.pth",
                                  "output_dir": "o", "epochs": 2})
    assert got == {"data_dir": str(here / "d"), "class_names": str(here / "names.csv"),
                   "pretrained": str(here / "w.pth"), "output_dir": str(here / "o"), "epochs": 2}
    assert run_all.absolute_paths({"pretrained": "efficientnet-lite0"})["pretrained"] == "efficientnet-lite0"
    both = run_all.absolute_paths({"pretrained": ["efficientnet-lite0", "w.pth"]})["pretrained"]  # one per arch
    assert both == ["efficientnet-lite0", str(here / "w.pth")]
    assert run_all.absolute_paths({})["output_dir"] == str(run_all.REPO / "outputs")


def test_notebooks_are_clean_and_parameterised():
    for nb in sorted(NB.glob("[0-9][0-9]_*.ipynb")):
        cells = json.loads(nb.read_text())["cells"]
        assert any("parameters" in c.get("metadata", {}).get("tags", []) for c in cells), nb.name
        assert not any(c.get("outputs") or c.get("execution_count") for c in cells if c["cell_type"] == "code"), nb.name
        params = pm.inspect_notebook(str(nb))
        src = next(c for c in cells if "parameters" in c.get("metadata", {}).get("tags", []))["source"]
        lines = [ln for ln in "".join(src).splitlines() if ln and not ln.startswith("#")]
        assert len(lines) == len(params) and all("#" in ln for ln in lines), f"{nb.name}: one comment per parameter"


def test_notebook_01_declares_every_training_parameter():
    import dataclasses

    import utils
    declared = set(pm.inspect_notebook(str(NB / "01_train.ipynb")))
    assert declared == {f.name for f in dataclasses.fields(utils.TrainConfig)}


def test_run_all_end_to_end_with_the_category_2_defaults_ships_the_last_snapshots(tiny_data, tmp_path):
    """No holdout (the Category 2 default): 02 analyses val and the training images, 03 ships the kept
    snapshots under the fixed views without choosing on val (min_epochs 0: 6 epochs count as enough, where
    the default's 56 would ship the last snapshot alone). plan_ms None: notebook 03 times the plan on this
    machine and cuts it under its cap, so on a loaded machine the plan would depend on the load (the cut has
    its own test in test_export.py)."""
    import zipfile
    run_all.main(["-p", "data_dir", str(tiny_data), "-p", "output_dir", str(tmp_path), "-p", "epochs", "6",
                  "-p", "image_size", "32", "-p", "batch_size", "16", "-p", "team", "demo", "-p", "min_epochs", "0",
                  "-p", "plan_ms", "None"])
    cfg = json.loads(zipfile.ZipFile(tmp_path / "submission" / "demo_track1_cat2.zip").read("model/config.json"))
    assert [(m["source"]["epoch"], m["source"]["kind"]) for m in cfg["members"]] == [(6, "ema"), (5, "ema")]
    assert cfg["selection"]["n_holdout"] == 0 and cfg["plan"] == [[0, "zoom"], [0, "center"], [1, "zoom"], [1, "center"]]
    analysis = tmp_path / "runs" / "run" / "analysis"
    assert (analysis / "per_class_f1.csv").is_file() and (analysis / "label_issues.csv").is_file()
    assert len(list((tmp_path / "figures" / "talk").glob("*.png"))) >= 5


def test_run_all_end_to_end_ends_with_a_zip(tiny_data, tmp_path):
    """With a holdout and refit: 02 analyses the holdout run, 03 selects on it and ships its refit's weights."""
    import zipfile
    run_all.main(["-p", "data_dir", str(tiny_data), "-p", "output_dir", str(tmp_path), "-p", "epochs", "2",
                  "-p", "image_size", "32", "-p", "batch_size", "16", "-p", "team", "demo", "-p", "refit", "True",
                  "-p", "holdout_frac", "0.12"])
    assert sorted(p.name for p in (tmp_path / "executed").glob("*.ipynb")) == sorted(p.name for p in run_all.notebooks())
    zpath = tmp_path / "submission" / "demo_track1_cat2.zip"
    cfg = json.loads(zipfile.ZipFile(zpath).read("model/config.json"))
    assert {m["source"]["run"] for m in cfg["members"]} == {"run"}
    assert {m["source"]["refit"]["run"] for m in cfg["members"]} == {"run_refit"}
    assert (tmp_path / "runs" / "run" / "analysis" / "per_class_f1.csv").is_file()
    assert not (tmp_path / "runs" / "run_refit" / "analysis").exists()
    assert len(list((tmp_path / "figures" / "talk").glob("*.png"))) >= 5
