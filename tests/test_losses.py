"""Exact-value tests of the training losses (float64 references computed by hand)."""

import math

import pytest
import torch

from distill.losses import (
    SMOOTH,
    DistillLoss,
    FiniteCheck,
    GTLossConfig,
    KDConfig,
    ThinConfig,
    skeleton_recall,
    soft_cldice,
    soft_dice,
    soft_skeleton,
    soft_tversky,
)


def _batch(seed=0, shape=(2, 1, 8, 8)):
    g = torch.Generator().manual_seed(seed)
    student = (torch.randn(shape, generator=g) * 3).requires_grad_()
    teacher = (torch.randn(shape, generator=g) * 3).half()
    mask = (torch.rand(shape, generator=g) > 0.6).to(torch.uint8)
    roi = (torch.rand(shape, generator=g) > 0.2).to(torch.uint8)
    return student, teacher, mask, roi


def _kd_only(**kd):
    return DistillLoss(kd=KDConfig(alpha=1.0, **kd))


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0, 4.0, 10.0])
def test_kd_gradient_is_zero_when_student_equals_teacher(temperature):
    _, teacher, mask, roi = _batch()
    student = teacher.float().clone().requires_grad_()
    total, terms = _kd_only(temperature=temperature)(student, mask, roi, teacher)
    total.backward()
    assert torch.allclose(student.grad, torch.zeros_like(student.grad), atol=1e-7)
    assert terms["kd/bce"] > 0  # the teacher's entropy: a constant, not zero


@pytest.mark.parametrize("temperature", [1.0, 2.0, 5.0])
def test_kd_is_bernoulli_kl_plus_teacher_entropy_times_t_squared(temperature):
    student, teacher, mask, roi = _batch(seed=1)
    _, terms = _kd_only(temperature=temperature)(student, mask, roi, teacher)

    s, t, r = student.detach().double(), teacher.double(), roi.double()
    p = 1 / (1 + torch.exp(-s / temperature))
    q = 1 / (1 + torch.exp(-t / temperature))
    kl = q * torch.log(q / p) + (1 - q) * torch.log((1 - q) / (1 - p))
    entropy = -(q * torch.log(q) + (1 - q) * torch.log(1 - q))
    expected = temperature**2 * ((kl + entropy) * r).sum() / r.sum()
    assert terms["kd/bce"].item() == pytest.approx(expected.item(), rel=1e-5)


@pytest.mark.parametrize("temperature", [1.0, 3.0, 8.0])
def test_kd_gradient_is_t_times_probability_gap(temperature):
    """d/ds T^2 BCE(s/T, q) = T (sigmoid(s/T) - q): the T^2 factor keeps soft gradients at scale."""
    student, teacher, mask, _ = _batch(seed=2)
    total, _ = _kd_only(temperature=temperature)(student, mask, None, teacher)
    total.backward()
    s, t = student.detach().double(), teacher.double()
    expected = temperature * (torch.sigmoid(s / temperature) - torch.sigmoid(t / temperature)) / s.numel()
    assert torch.allclose(student.grad.double(), expected, rtol=1e-5, atol=1e-7)


def test_kd_gradient_tends_to_logit_gap_over_four_at_high_temperature():
    student, teacher, mask, _ = _batch(seed=3)
    grads = []
    for temperature in (50.0, 200.0):  # higher T: float32 sigmoids would lose the tiny differences
        student.grad = None
        _kd_only(temperature=temperature)(student, mask, None, teacher)[0].backward()
        grads.append(student.grad.clone())
    limit = (student.detach() - teacher.float()) / 4 / student.numel()
    assert torch.allclose(grads[0], limit, rtol=1e-2, atol=1e-7)
    assert torch.allclose(grads[1], limit, rtol=2e-3, atol=1e-7)
    assert (grads[1] - limit).abs().sum() < (grads[0] - limit).abs().sum()


@pytest.mark.parametrize(
    "config",
    [
        {"gt": GTLossConfig(), "kd": KDConfig(alpha=0.5, soft_dice_weight=1.0, confidence_weighting=True)},
        {"gt": GTLossConfig(kind="tversky"), "kd": KDConfig(alpha=0.3, trust_gt=True)},
        {"kd": KDConfig(alpha=0.2), "thin": ThinConfig(kind="cldice", weight=1.0, iterations=3)},
        {"kd": KDConfig(alpha=0.2), "thin": ThinConfig(kind="skeleton_recall", weight=1.0)},
    ],
)
def test_pixels_outside_roi_change_nothing(config):
    student, teacher, mask, roi = _batch(seed=4)
    skeleton = mask.clone()
    loss = DistillLoss(**config)
    total, terms = loss(student, mask, roi, teacher, skeleton)
    total.backward()
    grad = student.grad.clone()
    assert grad[roi == 0].abs().max() == 0

    outside = roi == 0
    g = torch.Generator().manual_seed(9)
    student2 = torch.where(
        outside, torch.randn(student.shape, generator=g) * 9, student.detach()
    ).requires_grad_()
    mask2 = torch.where(outside, 1 - mask, mask)
    teacher2 = torch.where(outside, -teacher, teacher)
    skeleton2 = torch.where(outside, 1 - skeleton, skeleton)
    total2, terms2 = loss(student2, mask2, roi, teacher2, skeleton2)
    total2.backward()
    assert total2.item() == pytest.approx(total.item(), rel=1e-6)
    assert terms2.keys() == terms.keys()
    assert torch.allclose(student2.grad, grad, atol=1e-8)


def test_bce_and_dice_on_a_hand_computed_example():
    logits = torch.tensor([[[[0.0, 2.0], [-1.0, 3.0]]]], requires_grad=True)
    mask = torch.tensor([[[[1, 0], [0, 1]]]], dtype=torch.uint8)
    roi = torch.tensor([[[[1, 1], [1, 0]]]], dtype=torch.uint8)
    loss = DistillLoss(gt=GTLossConfig(pos_weight=2.0, dice_weight=0.5), kd=KDConfig(alpha=0.0))
    total, terms = loss(logits, mask, roi)

    sig = [1 / (1 + math.exp(-x)) for x in (0.0, 2.0, -1.0)]  # the three roi pixels, targets 1, 0, 0
    bce = (-2.0 * math.log(sig[0]) - math.log(1 - sig[1]) - math.log(1 - sig[2])) / 3
    tp, fp, fn = sig[0], sig[1] + sig[2], 1 - sig[0]
    dice = 1 - (2 * tp + 2 * SMOOTH) / (2 * tp + fp + fn + 2 * SMOOTH)
    assert terms["gt/bce"].item() == pytest.approx(bce, rel=1e-6)
    assert terms["gt/dice"].item() == pytest.approx(dice, rel=1e-6)
    assert total.item() == pytest.approx(bce + 0.5 * dice, rel=1e-6)
    assert set(terms) == {"gt/bce", "gt/dice", "total"}


def test_tversky_matches_formula_and_equals_dice_at_one_half():
    g = torch.Generator().manual_seed(5)
    probs = torch.rand(2, 1, 6, 6, generator=g)
    target = (torch.rand(2, 1, 6, 6, generator=g) > 0.5).float()
    weight = torch.ones_like(probs)
    tp, fp, fn = (probs * target).sum(), (probs * (1 - target)).sum(), ((1 - probs) * target).sum()
    dice = 1 - (2 * tp + 2 * SMOOTH) / (probs.sum() + target.sum() + 2 * SMOOTH)
    assert soft_dice(probs, target, weight).item() == pytest.approx(dice.item(), rel=1e-6)
    assert soft_tversky(probs, target, weight, 0.5, 0.5).item() == pytest.approx(dice.item(), rel=1e-6)
    tversky = 1 - (tp + SMOOTH) / (tp + 0.3 * fp + 0.7 * fn + SMOOTH)
    assert soft_tversky(probs, target, weight, 0.3, 0.7).item() == pytest.approx(tversky.item(), rel=1e-6)


def test_tversky_with_beta_above_alpha_punishes_misses_more():
    target = torch.zeros(1, 1, 4, 4)
    target[..., :2, :] = 1
    misses = target.clone()
    misses[..., 0, :] = 0  # 4 false negatives
    extras = target.clone()
    extras[..., 2, :] = 1  # 4 false positives
    weight = torch.ones_like(target)
    assert soft_tversky(misses, target, weight, 0.3, 0.7) > soft_tversky(extras, target, weight, 0.3, 0.7)


def test_skeleton_recall_perfect_is_zero_and_empty_is_one():
    skeleton = torch.zeros(1, 1, 8, 8)
    skeleton[..., 4, 1:7] = 1
    roi = torch.ones_like(skeleton)
    assert skeleton_recall(skeleton.clone(), skeleton, roi).item() == 0.0
    empty = skeleton_recall(torch.zeros_like(skeleton), skeleton, roi).item()
    assert empty == pytest.approx(1 - SMOOTH / (6 + SMOOTH))
    assert skeleton_recall(torch.zeros_like(skeleton), torch.zeros_like(skeleton), roi).item() == 0.0


def test_soft_skeleton_of_a_bar_is_its_centre_line():
    bar = torch.zeros(1, 1, 15, 21)
    bar[..., 5:10, 2:19] = 1  # 5 rows thick
    skeleton = soft_skeleton(bar, iterations=5)
    assert skeleton[..., 7, 5:16].min() == 1  # the centre row, away from the ends
    assert skeleton[..., [5, 6, 8, 9], 5:16].max() == 0
    assert skeleton[bar == 0].max() == 0


def test_cldice_sanity():
    mask = torch.zeros(1, 1, 32, 32)
    mask[..., 15:18, 2:30] = 1  # a vessel
    mask[..., 2:30, 8] = 1  # a one-pixel branch
    roi = torch.ones_like(mask)
    perfect = soft_cldice(mask, mask, roi, iterations=5)
    missing_branch = mask.clone()
    missing_branch[..., 2:15, 8] = 0
    missing_branch[..., 18:30, 8] = 0
    assert perfect.item() == pytest.approx(0.0, abs=1e-6)
    assert soft_cldice(missing_branch, mask, roi, 5) > 0.05
    assert soft_cldice(torch.zeros_like(mask), mask, roi, 5).item() == pytest.approx(1.0, abs=0.05)


def test_trust_gt_replaces_the_teacher_where_it_disagrees_with_ground_truth():
    student = torch.zeros(1, 1, 1, 4, requires_grad=True)
    teacher = torch.tensor([[[[3.0, -3.0, 3.0, -3.0]]]])
    mask = torch.tensor([[[[1, 0, 0, 1]]]], dtype=torch.uint8)  # the teacher is wrong on the last two
    temperature = 2.0
    total, terms = _kd_only(temperature=temperature, trust_gt=True)(student, mask, None, teacher)
    total.backward()
    q = torch.sigmoid(teacher / temperature)
    target = torch.tensor([q[0, 0, 0, 0], q[0, 0, 0, 1], 0.0, 1.0])
    # student logit 0: per-pixel BCE = -log(0.5) whatever the target; gradient T (0.5 - target) / N
    assert terms["kd/bce"].item() == pytest.approx(temperature**2 * math.log(2), rel=1e-6)
    assert torch.allclose(student.grad.flatten(), temperature * (0.5 - target) / 4, atol=1e-7)

    student.grad = None
    _kd_only(temperature=temperature, trust_gt=False)(student, mask, None, teacher)[0].backward()
    assert (
        student.grad.flatten()[2] < 0 and student.grad.flatten()[3] > 0
    )  # descent follows the wrong teacher


def test_confidence_weighting_is_a_normalised_weighted_mean():
    student, teacher, mask, _ = _batch(seed=6)
    _, terms = _kd_only(temperature=2.0, confidence_weighting=True)(student, mask, None, teacher)
    s, t = student.detach().double(), teacher.double()
    q = torch.sigmoid(t / 2)
    bce = -(q * torch.log(torch.sigmoid(s / 2)) + (1 - q) * torch.log(1 - torch.sigmoid(s / 2)))
    weight = (2 * torch.sigmoid(t) - 1).abs()
    expected = 4 * (bce * weight).sum() / weight.sum()
    assert terms["kd/bce"].item() == pytest.approx(expected.item(), rel=1e-5)


def test_total_combines_parts_with_alpha_and_thin_weight():
    student, teacher, mask, roi = _batch(seed=7)
    loss = DistillLoss(
        gt=GTLossConfig(dice_weight=0.7),
        kd=KDConfig(alpha=0.4, soft_dice_weight=0.5),
        thin=ThinConfig(kind="skeleton_recall", weight=0.3),
    )
    total, terms = loss(student, mask, roi, teacher, mask)
    gt = terms["gt/bce"] + 0.7 * terms["gt/dice"]
    kd = terms["kd/bce"] + 0.5 * terms["kd/dice"]
    expected = 0.6 * gt + 0.4 * kd + 0.3 * terms["thin/skeleton_recall"]
    assert total.item() == pytest.approx(expected.item(), rel=1e-6)
    assert terms["total"].item() == total.item()
    assert not terms["total"].requires_grad and total.requires_grad


def test_alpha_zero_gives_no_kd_gradient_but_logs_kd():
    student, teacher, mask, roi = _batch(seed=8)
    loss = DistillLoss(kd=KDConfig(alpha=0.0, soft_dice_weight=1.0))
    total, terms = loss(student, mask, roi, teacher)
    total.backward()
    with_teacher = student.grad.clone()
    student.grad = None
    total_without, _ = loss(student, mask, roi, None)
    total_without.backward()
    assert "kd/bce" in terms and "kd/dice" in terms
    assert torch.equal(with_teacher, student.grad)
    assert total.item() == total_without.item()


def test_missing_teacher_with_alpha_raises():
    student, _, mask, roi = _batch()
    with pytest.raises(ValueError, match=r"kd.alpha=0.5 needs teacher logits"):
        DistillLoss()(student, mask, roi, None)


def test_missing_skeleton_and_wrong_shape_raise():
    student, teacher, mask, roi = _batch()
    with pytest.raises(ValueError, match="skeletons"):
        DistillLoss(thin=ThinConfig(kind="skeleton_recall", weight=1.0))(student, mask, roi, teacher)
    with pytest.raises(ValueError, match="teacher_logits has shape"):
        DistillLoss()(student, mask, roi, teacher[..., :4, :4])


@pytest.mark.parametrize(
    ("make", "field"),
    [
        (lambda: KDConfig(alpha=1.5), "kd.alpha"),
        (lambda: KDConfig(temperature=0), "kd.temperature"),
        (lambda: KDConfig(soft_dice_weight=-1), "kd.soft_dice_weight"),
        (lambda: GTLossConfig(kind="focal"), "gt.kind"),
        (lambda: GTLossConfig(pos_weight=0), "gt.pos_weight"),
        (lambda: GTLossConfig(tversky_alpha=0, tversky_beta=0), "gt.tversky_alpha"),
        (lambda: ThinConfig(kind="none", weight=1.0), "thin.weight"),
        (lambda: ThinConfig(kind="skeleton"), "thin.kind"),
        (lambda: ThinConfig(kind="cldice", iterations=0), "thin.iterations"),
    ],
)
def test_config_validation_names_the_field(make, field):
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        make()


def test_losses_are_float32_under_bf16_autocast():
    student, teacher, mask, roi = _batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        total, terms = DistillLoss(thin=ThinConfig(kind="cldice", weight=0.1))(
            student.bfloat16(), mask, roi, teacher
        )
    assert total.dtype == torch.float32
    assert all(term.dtype == torch.float32 for term in terms.values())


def test_first_nonfinite_names_the_term():
    terms = {
        "gt/bce": torch.tensor(0.3),
        "kd/bce": torch.tensor(float("nan")),
        "total": torch.tensor(math.inf),
    }
    assert FiniteCheck(terms).first_nonfinite() == "kd/bce"
    assert FiniteCheck({"gt/bce": torch.tensor(0.3)}).first_nonfinite() is None


@pytest.mark.parametrize(
    "kd", [{}, {"confidence_weighting": True, "soft_dice_weight": 1.0}, {"trust_gt": True}]
)
def test_an_image_without_teacher_map_gets_the_ground_truth_as_kd_target(kd):
    student, teacher, mask, roi = _batch(seed=7, shape=(3, 1, 8, 8))
    loss = DistillLoss(kd=KDConfig(alpha=0.5, **kd))
    valid = torch.tensor([1, 0, 1], dtype=torch.uint8)
    _, terms = loss(student, mask, roi, teacher, teacher_valid=valid)
    certain = teacher.clone()
    certain[1] = 100 * (2 * mask[1].half() - 1)  # a teacher that says exactly the ground truth
    _, expected = loss(student, mask, roi, certain)
    _, unchanged = loss(student, mask, roi, teacher)
    for name, value in terms.items():
        assert value.item() == pytest.approx(expected[name].item(), rel=1e-5), name
    assert terms["kd/bce"].item() != pytest.approx(unchanged["kd/bce"].item(), rel=1e-3)  # so it can fail


def test_images_without_teacher_maps_still_train_at_alpha_1():
    student, teacher, mask, roi = _batch(seed=8)
    total, terms = _kd_only()(student, mask, roi, teacher, teacher_valid=torch.zeros(2, dtype=torch.uint8))
    assert torch.isfinite(total) and terms["kd/bce"].item() > 0
    total.backward()
    assert student.grad.abs().max().item() > 0
