"""RESULTS.md stays in order however many benchmarks append to it."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import results  # noqa: E402


def test_rows_go_into_the_table_and_lines_before_the_conclusions(tmp_path):
    path = tmp_path / "RESULTS.md"
    results.add_row("| r1 |", path)  # creates the header
    results.add_line("- speed 1", path)
    path.write_text(path.read_text() + "\n## Conclusions\n\n- a conclusion\n")
    results.add_row("| r2 |", path)
    results.add_line("- speed 2", path)
    lines = path.read_text().splitlines()
    assert lines.index("| r1 |") + 1 == lines.index("| r2 |")
    assert lines.index("| r2 |") < lines.index("- speed 1") < lines.index("- speed 2") < lines.index("## Conclusions")
    assert lines[-1] == "- a conclusion" and lines[0] == "# Benchmark results"
    assert sum(line.startswith("| date |") for line in lines) == 1


def test_a_study_line_gives_each_variant_its_mean_over_the_runs(tmp_path, capsys):
    path = tmp_path / "RESULTS.md"
    path.write_text("# Benchmark results\n\n- old line\n\n## Conclusions\n")
    means = results.add_study_line("plan_cuts", "--runs a b", "what it reads", {"whole": [0.9, 0.8], "cut": [0.5, 0.6]},
                                   ["a: whole 0.900", "b: whole 0.800"], path=path)
    assert means == "whole 0.850; cut 0.550" and "mean: whole 0.850; cut 0.550" in capsys.readouterr().out
    lines = path.read_text().splitlines()
    new = lines[lines.index("- old line") + 1]
    assert new.startswith("- plan_cuts (") and "`benchmarks/plan_cuts.py --runs a b`; what it reads) mean: whole 0.850" in new
    assert new.endswith("| a: whole 0.900 | b: whole 0.800")


def test_compare_aligns_runs_on_the_epoch_not_the_row():
    import compare
    import pandas as pd
    a = pd.DataFrame({"epoch": [1, 2, 3], "stage": ["1", "1", "2"], "holdout_f1": [0.1, 0.2, 0.3]})
    b = pd.DataFrame({"epoch": [2, 3, 4, 5], "stage": ["1", "1", "1", "2"], "holdout_f1": [0.25, 0.35, 0.4, 0.5]})
    t = compare.side_by_side({"a": a, "b": b})
    assert list(t.index) == [1, 2, 3, 4, 5]
    assert t.loc[3, ("a", "F1")] == 0.3 and t.loc[3, ("b", "F1")] == 0.35
    assert pd.isna(t.loc[1, ("b", "F1")]) and pd.isna(t.loc[5, ("a", "F1")])
    assert list(t.columns.get_level_values(0).unique()) == ["a", "b"]


def test_a_finished_runs_history_is_kept_and_compare_finds_it_after_the_run_folder_is_gone(tmp_path):
    import compare
    run_dir = tmp_path / "out" / "runs" / "c2_x"
    run_dir.mkdir(parents=True)
    (run_dir / "history.csv").write_text("epoch,holdout_f1\n1,0.1\n2,0.2\n")
    kept = results.keep_history(run_dir, tmp_path / "history")
    assert kept == tmp_path / "history" / "c2_x.csv" and kept.read_text() == "epoch,holdout_f1\n1,0.1\n2,0.2\n"
    assert not list((tmp_path / "history").glob("*.tmp"))
    # while the run folder exists its live history wins (it grows as the run trains)...
    (run_dir / "history.csv").write_text("epoch,holdout_f1\n1,0.1\n2,0.2\n3,0.3\n")
    assert compare.find_history("c2_x", tmp_path / "out" / "runs", tmp_path / "history") == run_dir / "history.csv"
    # ...and in a new checkout, without benchmarks/out, the kept copy is found
    (run_dir / "history.csv").unlink()
    assert compare.find_history("c2_x", tmp_path / "out" / "runs", tmp_path / "history") == kept
    assert compare.find_history("c2_y", tmp_path / "out" / "runs", tmp_path / "history") is None


def test_noise_rate_and_clean_accuracy_are_inverse_and_match_a_simulated_noisy_holdout():
    import noise_rate
    import numpy as np
    rng = np.random.default_rng(0)
    n, k, eta, a = 200_000, 102, 0.32, 0.88
    y = rng.integers(0, k, n)
    pred = np.where(rng.random(n) < a, y, (y + rng.integers(1, k, n)) % k)  # wrong: any other class
    noisy = np.where(rng.random(n) < eta, (y + rng.integers(1, k, n)) % k, y)
    h = float((pred == noisy).mean())
    assert abs(noise_rate.eta_from(a, h) - eta) < 0.01
    assert abs(noise_rate.clean_from(h, eta) - a) < 0.01
    assert abs(noise_rate.eta_from(noise_rate.clean_from(0.6, 0.3), 0.6) - 0.3) < 1e-12


def test_cleaning_split_recovers_the_right_and_wrong_labels_a_simulated_prototype_cleaning_kept():
    import noise_rate
    import numpy as np
    rng = np.random.default_rng(1)
    n, k, eta = 1_000_000, 102, 0.32
    # where each image's true class falls among its nearest class means: first for most, anywhere for some
    pos_true = np.where(rng.random(n) < 0.75, 0, rng.integers(0, k, n))
    wrong = rng.random(n) < eta
    u = rng.integers(0, k - 1, n)  # a wrong label: a random other class, so a random other position
    pos_label = np.where(wrong, u + (u >= pos_true), pos_true)
    for rank in (1, 5, 10):
        kept = pos_label < rank
        right, wrong_kept, recall, precision = noise_rate.cleaning_split(int(kept.sum()), n, rank, eta)
        true_wrong = (kept & wrong).sum()
        # within 2%; counting every wrong label at rank / (k - 1), the true class's slot included, is 8-300% off
        assert abs(wrong_kept - true_wrong) < 0.02 * true_wrong + 50
        assert abs(right - (kept & ~wrong).sum()) < 0.001 * n
        assert abs(recall - (kept & ~wrong).sum() / (~wrong).sum()) < 0.002
        assert abs(precision - (kept & ~wrong).sum() / kept.sum()) < 0.002
    # a cleaning that kept every image keeps every wrong label too
    right, wrong_kept, recall, precision = noise_rate.cleaning_split(n, n, k, eta)
    assert abs(recall - 1) < 1e-9 and abs(precision - (1 - eta)) < 1e-9


def test_clean_macro_f1_estimated_from_noisy_labels_matches_the_clean_score():
    import noise_rate
    import numpy as np
    from sklearn.metrics import f1_score
    rng = np.random.default_rng(2)
    n, k, eta = 400_000, 102, 0.32
    y = rng.choice(k, n, p=rng.dirichlet(np.full(k, 5.0)))  # classes of unequal size
    acc_by_class = rng.uniform(0.3, 0.95, k)  # and of unequal difficulty: Macro F1 is not accuracy
    sink = rng.integers(0, k, k)  # each class's errors go mostly to one other class: unequal precision
    wrong_to = np.where(rng.random(n) < 0.7, sink[y], rng.integers(0, k, n))
    pred = np.where(rng.random(n) < acc_by_class[y], y, wrong_to)
    noisy = np.where(rng.random(n) < eta, (y + rng.integers(1, k, n)) % k, y)
    clean_f1 = f1_score(y, pred, average="macro")
    est = noise_rate.clean_scores(noisy, pred, eta, k)
    assert abs(est["macro_f1"] - clean_f1) < 0.005
    assert abs(est["acc"] - (pred == y).mean()) < 0.005
    per_class = noise_rate.clean_by_class(noisy, pred, eta, k)  # the counts behind it, class by class
    assert np.allclose(per_class["n_true"], np.bincount(y, minlength=k), rtol=0, atol=400)  # ~4 sd of the noise
    assert np.allclose(per_class["tp"], np.bincount(y[pred == y], minlength=k), rtol=0, atol=400)
    assert f1_score(noisy, pred, average="macro") < clean_f1 - 0.15  # the noisy score is far below: the correction matters
    # without noise the estimate is scikit-learn's Macro F1 exactly
    small = rng.integers(0, 7, 300), rng.integers(0, 7, 300)
    assert abs(noise_rate.clean_scores(small[0], small[1], 0.0, 7)["macro_f1"]
               - f1_score(small[0], small[1], average="macro")) < 1e-12
    # the interval resamples within each noisy label, as the holdout is drawn: resampling the class sizes
    # too left some classes with ~1 image and gave [0.55, 1.00] on these 2,000 images
    lo, hi = noise_rate.bootstrap_clean(noisy[:2000], pred[:2000], eta, k, n_boot=200)
    assert lo < noise_rate.clean_scores(noisy[:2000], pred[:2000], eta, k)["macro_f1"] < hi and hi - lo < 0.12
    assert lo - 0.02 < clean_f1 < hi + 0.02


def test_true_class_sizes_recovered_from_symmetrically_noisy_counts():
    """Every class receives about eta x N / (K - 1) wrong labels whatever its size, so the given counts
    are flatter than the true ones; clean_class_counts undoes that."""
    import numpy as np
    from noise_rate import clean_class_counts
    rng = np.random.default_rng(0)
    k, eta = 50, 0.32
    true = np.repeat(np.arange(k), np.linspace(20, 200, k).astype(int))
    flip = rng.random(len(true)) < eta
    given = np.where(flip, (true + rng.integers(1, k, len(true))) % k, true)
    n_true, n_given = np.bincount(true, minlength=k), np.bincount(given, minlength=k)
    est = clean_class_counts(n_given, eta)
    assert n_given.max() / n_given.min() < 0.5 * n_true.max() / n_true.min()  # noise flattens the sizes
    small, large = n_true < np.quantile(n_true, 0.25), n_true > np.quantile(n_true, 0.75)
    assert (n_given - n_true)[small].mean() > 15 and (n_given - n_true)[large].mean() < -15  # biased, both ends
    assert abs((est - n_true)[small].mean()) < 5 and abs((est - n_true)[large].mean()) < 5  # unbiased
    assert abs(est.sum() - len(true)) < 1e-6 * len(true)


def test_data_curve_shares_are_nested_stratified_and_the_paired_interval_brackets_the_difference():
    import numpy as np
    from data_curve import nested_shares, paired_ci
    from noise_rate import size_quarters
    q = size_quarters([9, 1, 5, 3, 7, 2, 8, 4])  # the classes from the smallest given size up, in four groups
    assert [list(g) for g in q] == [[1, 5], [3, 7], [2, 4], [6, 0]]
    y = np.repeat(np.arange(4), [10, 20, 40, 80])
    m = nested_shares(y, [0.5, 0.75, 1.0], seed=3)
    assert m[1.0].all()
    assert (m[0.5] <= m[0.75]).all() and (m[0.75] <= m[1.0]).all()  # each share holds the smaller ones' images
    for s in (0.5, 0.75):
        assert list(np.bincount(y[m[s]], minlength=4)) == [int(s * n) for n in (10, 20, 40, 80)]
    assert not (nested_shares(y, [0.5], seed=4)[0.5] == m[0.5]).all()  # the seed draws the images
    rng = np.random.default_rng(0)
    y = rng.integers(0, 10, 600)
    worse = np.where(rng.random(600) < 0.5, y, rng.integers(0, 10, 600))
    same = paired_ci(y, worse, worse, eta=0.0, k=10, n_boot=50)
    assert np.allclose(same["acc"], 0) and np.allclose(same["macro_f1"], 0)
    better = paired_ci(y, worse, y, eta=0.0, k=10, n_boot=200)  # perfect minus ~55% right: ~+0.45
    assert 0.35 < better["acc"][0] < 0.45 < better["acc"][1] < 0.55
    assert better["macro_f1"][0] > 0.3


def test_holdout_judge_reads_stratified_draws_and_the_cleaned_probe_sees_through_wrong_labels():
    import numpy as np
    from c1_run import cleaned_probe
    from holdout_judge import draws_reading
    rng = np.random.default_rng(0)
    truth = np.repeat(np.arange(20), 30)
    f = np.eye(20)[truth] * 3 + rng.normal(0, 0.5, (600, 20)) + 5  # 20 clusters, off the origin
    wrong = rng.random(600) < 0.3
    given = np.where(wrong, (truth + rng.integers(1, 20, 600)) % 20, truth)
    probe, keep = cleaned_probe(f, given)
    # a wrong label is a random class: among an image's 5 nearest of 20 class means ~4/19 of the time
    assert keep[~wrong].mean() > 0.95 and keep[wrong].mean() < 0.3
    assert (given[keep] == truth[keep]).mean() > 0.9 > (given == truth).mean()
    assert (probe.predict(f) == truth).mean() > 0.95
    import utils
    lone = np.append(truth, 20)  # a class with one image cannot be split: it stays in the fit set
    fit, hold = utils.holdout_split(lone, 0.1, seed=1)
    assert 600 in fit and list(np.bincount(lone[hold], minlength=21)) == [3] * 20 + [0]
    assert np.array_equal(np.sort(np.concatenate([fit, hold])), np.arange(601))
    assert np.array_equal(hold, utils.holdout_split(lone, 0.1, seed=1)[1])
    assert not np.array_equal(hold, utils.holdout_split(lone, 0.1, seed=2)[1])
    perfect = draws_reading(truth, truth, n=5, eta=0.0, k=20)
    assert perfect.shape == (5,) and np.allclose(perfect, 1.0)
    half = np.where(np.arange(600) % 2 == 0, truth, (truth + 1) % 20)
    r = draws_reading(truth, half, n=20, eta=0.0, k=20)
    assert 0.3 < r.mean() < 0.7 and r.std() > 0  # different draws, each a 12% share of every class


def test_clean_ceiling_relabels_only_the_fit_rows_and_scores_each_image_out_of_sample():
    import clean_ceiling
    import numpy as np
    import pandas as pd
    from c1_run import cross_fitted
    df = pd.DataFrame({"image_id": ["a", "b", "c"], "filename": ["a.jpg", "b.jpg", "c.jpg"], "label": [1, 2, 3]})
    out = clean_ceiling.relabelled_csv(df, ["a.jpg", "c.jpg"], [7, 3])
    assert out.label.tolist() == [7, 2, 3] and df.label.tolist() == [1, 2, 3]  # b (a holdout row) as given
    assert list(out.columns) == list(df.columns)
    rng = np.random.default_rng(0)
    # clustered features: the probes vote the cluster's class, not the flipped label
    truth = rng.integers(0, 3, 240)
    f = np.eye(3)[truth] * 3 + rng.normal(size=(240, 3)) * 0.5
    noisy = np.where(rng.random(240) < 0.3, (truth + 1) % 3, truth)
    assert (noisy == truth).mean() < 0.75 and (cross_fitted(f, noisy)[0].argmax(1) == truth).mean() > 0.9
    proba, by_noisy = cross_fitted(f, noisy, noisy=True)  # a probe on the noisy labels still votes the cluster
    assert np.allclose(proba.sum(1), 1) and (by_noisy == truth).mean() > 0.9
    # features with no structure: a probe that had seen an image would fit its label; one that never did is at chance
    g = rng.normal(size=(240, 400))
    assert (cross_fitted(g, noisy)[0].argmax(1) == noisy).mean() < 0.55


def test_a_run_on_the_proxy_copy_holds_out_its_twins_images_and_their_given_labels(tiny_data, tmp_path, monkeypatch):
    import shutil

    import clean_ceiling
    import numpy as np
    import pandas as pd
    import utils
    monkeypatch.setattr(clean_ceiling, "DATA", tiny_data)
    monkeypatch.setattr(utils, "prepare_data", utils.prepare_data)  # twin_holdout's patch is undone after the test
    out = tmp_path / "out"
    twin = utils.prepare_data(tiny_data, out, 32, 0.25, 3)
    files = twin["train"]["df"].filename.to_numpy()
    copy = tmp_path / "copy"
    shutil.copytree(tiny_data, copy)
    df = pd.read_csv(tiny_data / "train.csv")
    values = sorted(df.label.unique())
    given = dict(zip(df.filename, df.label))
    fit_files = files[twin["fit_idx"]]
    moved = [values[(values.index(given[f]) + 1) % len(values)] for f in fit_files]  # every fit label changes
    clean_ceiling.relabelled_csv(df, fit_files, moved).to_csv(copy / "train.csv", index=False)
    hold = set(files[twin["hold_idx"]])

    own = utils.prepare_data(copy, out, 32, 0.25, 3)
    assert set(own["train"]["df"].filename.to_numpy()[own["hold_idx"]]) != hold  # split on the copy's labels: other images

    clean_ceiling.twin_holdout()
    clean_ceiling.twin_holdout()  # a second call does not wrap the patch again
    run = utils.prepare_data(copy, out, 32, 0.25, 3)
    run_files = run["train"]["df"].filename.to_numpy()
    assert set(run_files[run["hold_idx"]]) == hold
    assert np.array_equal(run["train"]["y"][run["hold_idx"]], twin["train"]["y"][twin["hold_idx"]])  # given labels
    lv = list(run["label_values"])
    assert [lv[i] for i in run["train"]["y"][run["fit_idx"]]] == [dict(zip(fit_files, moved))[f] for f in run_files[run["fit_idx"]]]


def test_cross_ensemble_reads_each_group_on_exactly_its_runs_checkpoints_and_views():
    from cross_ensemble import group_pairs
    cands = {"a/e6": {"run": "a"}, "a/e5": {"run": "a"}, "b/e6": {"run": "b"}, "ab/e6": {"run": "ab"}}
    assert group_pairs(cands, ("b",), ("center", "zoom")) == [("b/e6", "center"), ("b/e6", "zoom")]
    assert group_pairs(cands, ("a",), ("center",)) == [("a/e6", "center"), ("a/e5", "center")]  # not run "ab"
    both = group_pairs(cands, ("a", "b"), ("center",))
    assert sorted(both) == [("a/e5", "center"), ("a/e6", "center"), ("b/e6", "center")]
