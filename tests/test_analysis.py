"""Notebook 02: per-class numbers, confusion ordering, the notebook end to end, and label-issue
detection on demo data whose injected noise is known (train_clean.csv)."""
import json
from pathlib import Path

import nbformat
import numpy as np
import pandas as pd
import pytest

import utils

ROOT = Path(__file__).resolve().parents[1]
NB = ROOT / "notebooks" / "02_per_class_f1.ipynb"


def test_per_class_table_equals_classification_report():
    from sklearn.metrics import classification_report
    rng = np.random.default_rng(0)
    y_true = rng.integers(0, 6, 200)
    y_pred = np.where(rng.random(200) < 0.6, y_true, rng.integers(0, 8, 200))  # 6, 7: predicted, never true
    label_values = [10 * (i + 1) for i in range(9)]  # class 8 appears nowhere: no row, as in sklearn
    t = utils.per_class_table(y_true, y_pred, label_values, {10: "ten"})
    rep = classification_report(y_true, y_pred, output_dict=True, zero_division=0)
    classes = [k for k in rep if k.isdigit()]
    assert t.label.tolist() == [label_values[int(k)] for k in classes]
    for k, row in zip(classes, t.itertuples()):
        for col in ("precision", "recall", "f1-score", "support"):
            assert getattr(row, "f1" if col == "f1-score" else col) == pytest.approx(rep[k][col]), (k, col)
    assert t.f1.mean() == pytest.approx(utils.macro_f1(y_true, y_pred))
    assert t.name.iloc[0] == "ten" and t.name.iloc[1] == "20"


def test_class_names_from_a_missing_file_stop_with_the_path_instead_of_falling_back_to_labels(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.csv"):
        utils.class_name_map(str(tmp_path / "nope.csv"), None, [1, 2])
    (tmp_path / "names.csv").write_text("label,name\n1,rose\n")
    assert utils.class_name_map(str(tmp_path / "names.csv"), None, [1, 2]) == {1: "rose", 2: "2"}
    assert utils.class_name_map(None, tmp_path, [1, 2]) == {1: "1", 2: "2"}  # optional in the data folder
    (tmp_path / "class_names.csv").write_text("label,name\n2,tulip\n")
    assert utils.class_name_map(None, tmp_path, [1, 2]) == {1: "1", 2: "tulip"}


def test_confusion_order_puts_confused_classes_side_by_side():
    cm = np.eye(6) * 0.6
    for a, b in ((0, 3), (1, 4), (2, 5)):
        cm[a, b] = cm[b, a] = 0.4
    order = list(utils.confusion_order(cm))
    assert sorted(order) == list(range(6))
    for a, b in ((0, 3), (1, 4), (2, 5)):
        assert abs(order.index(a) - order.index(b)) == 1


def test_label_issues_on_synthetic_losses_and_a_relabelled_image():
    """Wrong labels keep a high loss: all of them are flagged, and the noise rate comes out right. An
    image the run relabelled (knn cleaning) has a low loss on its new label, so its given label is wrong."""
    rng = np.random.default_rng(0)
    n, k, epochs = 160, 4, 6
    given = np.arange(n) % k
    wrong = rng.random(n) < 0.3
    loss = rng.normal(0.5, 0.15, (epochs, n)) + 2.0 * wrong
    used = given.copy()
    used[0], wrong[0], loss[:, 0] = (given[0] + 1) % k, True, 0.4
    scores = {"fit_files": np.array([f"f{i}.jpg" for i in range(n)]), "fit_labels": given, "fit_labels_used": used,
              "loss_hist": loss, "hold_files": np.array([], str), "hold_labels": np.array([], int),
              "hold_probs": np.zeros((0, k)), "label_values": np.arange(1, k + 1)}
    history = pd.DataFrame({"holdout_acc": np.linspace(0.3, 0.9, epochs), "val_acc": np.nan})
    issues = utils.label_issues(scores, history)
    assert set(issues.file[issues.issue]) == set(scores["fit_files"][wrong])
    first = issues.set_index("file").loc["f0.jpg"]
    assert first.relabelled and first.p_issue > 0.9
    noise = utils.estimate_noise(issues, n_boot=20)
    assert noise["noise_rate"] == pytest.approx(wrong.mean(), abs=0.02)
    assert noise["lo"] <= wrong.mean() <= noise["hi"]


def test_notebook_is_clean_and_declares_its_parameters():
    nb = nbformat.read(NB, as_version=4)
    assert nb.cells[0].cell_type == "markdown"
    params = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(params) == 1
    for name in ("data_dir = None", "output_dir = None", "run_name = None", "class_names = None", "top_n = 8", "seed = 0"):
        assert name in params[0].source
    assert all(c.outputs == [] and c.execution_count is None for c in nb.cells if c.cell_type == "code")


def test_notebook_runs_on_the_tiny_run(tiny_run, tmp_path):
    import papermill as pm
    pm.execute_notebook(str(NB), str(tmp_path / "02.ipynb"), cwd=str(NB.parent), kernel_name="python3",
                        parameters={"output_dir": str(tiny_run["output_dir"]), "run_name": tiny_run["run_name"]},
                        progress_bar=False)
    run_dir = tiny_run["output_dir"] / "runs" / tiny_run["run_name"]
    table = pd.read_csv(run_dir / "analysis" / "per_class_f1.csv")
    assert list(table.columns) == ["label", "name", "precision", "recall", "f1", "support"]
    assert set(table.name) <= set(pd.read_csv(tiny_run["data_dir"] / "class_names.csv").name)  # names found
    # re-predicting with the best checkpoint reproduces the Macro F1 it was selected by (holdout + val)
    assert table.f1.mean() == pytest.approx(tiny_run["summary"]["topk"][0]["score"], abs=1e-6)
    noise = json.loads((run_dir / "analysis" / "label_noise.json").read_text())
    assert 0 <= noise["lo"] <= noise["noise_rate"] <= noise["hi"] <= 1
    issues = pd.read_csv(run_dir / "analysis" / "label_issues.csv")
    assert len(issues) == noise["n_scored"] and issues.p_issue.is_monotonic_decreasing
    talk = tiny_run["output_dir"] / "figures" / "talk"
    figs = sorted(p.name for p in talk.glob("[0-9][0-9]_*.png"))
    assert len(figs) >= 5
    readme = (talk / "README.md").read_text()
    assert all(f"`{f}`" in readme for f in figs)


def test_label_issues_find_the_injected_noise(small_run):
    """5 classes x 40 images, 30% of labels flipped: the noise estimate is within 10 points of the
    truth and the top-k of the ranking (k = the wrong labels among the scored images) is >= 60% wrong."""
    run = utils.load_run(small_run["output_dir"], small_run["run_name"])
    pred = utils.predict_run(run)
    best = pred["models"]["best"]
    issues = utils.label_issues(run["scores"], run["history"], hold_probs=best["holdout"], fit_probs=best["fit"])
    clean = pd.read_csv(small_run["data_dir"] / "train_clean.csv").set_index("filename").label
    given = pd.read_csv(small_run["data_dir"] / "train.csv").set_index("filename").label
    wrong = given[issues.file].to_numpy() != clean[issues.file].to_numpy()
    assert (issues.given.to_numpy() == given[issues.file].to_numpy()).all()
    noise = utils.estimate_noise(issues, pred, n_boot=50)
    assert abs(noise["noise_rate"] - wrong.mean()) <= 0.10, (noise, wrong.mean())
    k = int(wrong.sum())
    assert wrong[:k].mean() >= 0.6, (wrong[:k].mean(), k)
    assert noise["lo"] <= noise["noise_rate"] <= noise["hi"]
    s = noise["surest_holdout"]  # the same reading as the function on the best checkpoint's holdout probabilities
    yh = pred["data"]["train"]["y"][pred["data"]["hold_idx"]]
    assert (s["noise_rate"], s["lo"], s["hi"], s["n"]) == utils.noise_where_surest(yh, best["holdout"])
    assert s["lo"] <= s["noise_rate"] <= s["hi"] and len(yh) / 2 <= s["n"] < len(yh)


def test_noise_rate_read_where_an_out_of_sample_model_is_surest_recovers_the_flip_rate():
    rng = np.random.default_rng(0)
    n, k, eta = 8000, 20, 0.35
    truth = rng.integers(0, k, n)
    given = np.where(rng.random(n) < eta, (truth + rng.integers(1, k, n)) % k, truth)  # symmetric flips

    def probs_of(right_rate_sure):
        # a model right on 80% of the images and surer where it is right; among its surest half it is
        # right on `right_rate_sure` of them
        sure = rng.random(n) < 0.5
        right = np.where(sure, rng.random(n) < right_rate_sure, rng.random(n) < 0.6)
        pred = np.where(right, truth, (truth + rng.integers(1, k, n)) % k)
        conf = np.where(sure, rng.uniform(0.7, 1.0, n), rng.uniform(0.1, 0.6, n))
        P = np.full((n, k), 0.0)
        P[np.arange(n), pred] = conf
        return P
    d, lo, hi, m = utils.noise_where_surest(given, probs_of(1.0), top=0.5)
    assert m == n // 2 and lo < eta < hi and abs(d - eta) < 0.025 and hi - lo < 0.04
    everyone = utils.noise_where_surest(given, probs_of(1.0), top=1.0)[0]  # the unsure half's errors count too
    assert everyone > eta + 0.08
    # the model's own errors among its surest images push the reading up by (1 - a)(1 - eta k / (k - 1))
    d90 = utils.noise_where_surest(given, probs_of(0.9), top=0.5)[0]
    assert abs(d90 - (eta + 0.1 * (1 - eta * k / (k - 1)))) < 0.025
