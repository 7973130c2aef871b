"""Exact-value tests of the training losses (float64 references computed by hand)."""

import math
import re

import pytest
import torch

from distill.errors import ConfigError
from distill.losses import (
    SMOOTH,
    DistillLoss,
    FiniteCheck,
    LossTerm,
    loss_terms,
    register_loss_term,
    resolve_loss_config,
    skeleton_recall,
    soft_cldice,
    soft_dice,
    soft_skeleton,
    soft_tversky,
    stack_terms,
)
from tests._loss_term_plugin import MeanProbability


def _batch(seed=0, shape=(2, 1, 8, 8)):
    g = torch.Generator().manual_seed(seed)
    student = (torch.randn(shape, generator=g) * 3).requires_grad_()
    teacher = (torch.randn(shape, generator=g) * 3).half()
    mask = (torch.rand(shape, generator=g) > 0.6).to(torch.uint8)
    roi = (torch.rand(shape, generator=g) > 0.2).to(torch.uint8)
    return student, teacher, mask, roi


def _kd_only(temperature=2.0, **settings):
    return DistillLoss({"kd_alpha": 1.0, "kd_bce": {"temperature": temperature}, **settings})


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0, 4.0, 10.0])
def test_kd_gradient_is_zero_when_student_equals_teacher(temperature):
    _, teacher, mask, roi = _batch()
    student = teacher.float().clone().requires_grad_()
    total, terms = _kd_only(temperature=temperature)(student, mask, roi, teacher)
    total.backward()
    assert torch.allclose(student.grad, torch.zeros_like(student.grad), atol=1e-7)
    assert terms["kd_bce"] > 0  # the teacher's entropy: a constant, not zero


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
    assert terms["kd_bce"].item() == pytest.approx(expected.item(), rel=1e-5)


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
        {"kd_alpha": 0.5, "kd_dice": {"weight": 1.0}, "kd_confidence_weighting": True},
        {"kd_alpha": 0.3, "kd_trust_gt": True, "gt_dice": {"weight": None}, "gt_tversky": {"weight": 1.0}},
        {"kd_alpha": 0.2, "cldice": {"weight": 1.0, "iterations": 3}},
        {"kd_alpha": 0.2, "skeleton_recall": {"weight": 1.0}},
    ],
)
def test_pixels_outside_roi_change_nothing(config):
    student, teacher, mask, roi = _batch(seed=4)
    skeleton = mask.clone()
    loss = DistillLoss(config)
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
    loss = DistillLoss({"kd_alpha": 0.0, "gt_bce": {"pos_weight": 2.0}, "gt_dice": {"weight": 0.5}})
    total, terms = loss(logits, mask, roi)

    sig = [1 / (1 + math.exp(-x)) for x in (0.0, 2.0, -1.0)]  # the three roi pixels, targets 1, 0, 0
    bce = (-2.0 * math.log(sig[0]) - math.log(1 - sig[1]) - math.log(1 - sig[2])) / 3
    tp, fp, fn = sig[0], sig[1] + sig[2], 1 - sig[0]
    dice = 1 - (2 * tp + 2 * SMOOTH) / (2 * tp + fp + fn + 2 * SMOOTH)
    assert terms["gt_bce"].item() == pytest.approx(bce, rel=1e-6)
    assert terms["gt_dice"].item() == pytest.approx(dice, rel=1e-6)
    assert total.item() == pytest.approx(bce + 0.5 * dice, rel=1e-6)
    assert set(terms) == {"gt_bce", "gt_dice", "total"}


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
    total, terms = _kd_only(temperature, kd_trust_gt=True)(student, mask, None, teacher)
    total.backward()
    q = torch.sigmoid(teacher / temperature)
    target = torch.tensor([q[0, 0, 0, 0], q[0, 0, 0, 1], 0.0, 1.0])
    # student logit 0: per-pixel BCE = -log(0.5) whatever the target; gradient T (0.5 - target) / N
    assert terms["kd_bce"].item() == pytest.approx(temperature**2 * math.log(2), rel=1e-6)
    assert torch.allclose(student.grad.flatten(), temperature * (0.5 - target) / 4, atol=1e-7)

    student.grad = None
    _kd_only(temperature, kd_trust_gt=False)(student, mask, None, teacher)[0].backward()
    assert (
        student.grad.flatten()[2] < 0 and student.grad.flatten()[3] > 0
    )  # descent follows the wrong teacher


def test_confidence_weighting_is_a_normalised_weighted_mean():
    student, teacher, mask, _ = _batch(seed=6)
    _, terms = _kd_only(2.0, kd_confidence_weighting=True)(student, mask, None, teacher)
    s, t = student.detach().double(), teacher.double()
    q = torch.sigmoid(t / 2)
    bce = -(q * torch.log(torch.sigmoid(s / 2)) + (1 - q) * torch.log(1 - torch.sigmoid(s / 2)))
    weight = (2 * torch.sigmoid(t) - 1).abs()
    expected = 4 * (bce * weight).sum() / weight.sum()
    assert terms["kd_bce"].item() == pytest.approx(expected.item(), rel=1e-5)


def test_total_combines_parts_with_alpha_and_thin_weight():
    student, teacher, mask, roi = _batch(seed=7)
    loss = DistillLoss(
        {
            "kd_alpha": 0.4,
            "gt_dice": {"weight": 0.7},
            "kd_dice": {"weight": 0.5},
            "skeleton_recall": {"weight": 0.3},
        }
    )
    total, terms = loss(student, mask, roi, teacher, mask)
    gt = terms["gt_bce"] + 0.7 * terms["gt_dice"]
    kd = terms["kd_bce"] + 0.5 * terms["kd_dice"]
    expected = 0.6 * gt + 0.4 * kd + 0.3 * terms["skeleton_recall"]
    assert total.item() == pytest.approx(expected.item(), rel=1e-6)
    assert terms["total"].item() == total.item()
    assert not terms["total"].requires_grad and total.requires_grad


def test_alpha_zero_gives_no_kd_gradient_but_logs_kd():
    student, teacher, mask, roi = _batch(seed=8)
    loss = DistillLoss({"kd_alpha": 0.0, "kd_dice": {"weight": 1.0}})
    total, terms = loss(student, mask, roi, teacher)
    total.backward()
    with_teacher = student.grad.clone()
    student.grad = None
    total_without, _ = loss(student, mask, roi, None)
    total_without.backward()
    assert "kd_bce" in terms and "kd_dice" in terms
    assert torch.equal(with_teacher, student.grad)
    assert total.item() == total_without.item()


def test_missing_teacher_with_alpha_raises():
    student, _, mask, roi = _batch()
    with pytest.raises(ValueError, match=r"loss.kd_bce \(scale 0.5\) needs teacher_logits.*kd_alpha=0"):
        DistillLoss()(student, mask, roi, None)


def test_missing_skeleton_and_wrong_shape_raise():
    student, teacher, mask, roi = _batch()
    with pytest.raises(ValueError, match="skeletons=true"):
        DistillLoss({"skeleton_recall": {"weight": 1.0}})(student, mask, roi, teacher)
    with pytest.raises(ValueError, match="teacher_logits has shape"):
        DistillLoss()(student, mask, roi, teacher[..., :4, :4])


@pytest.mark.parametrize(
    ("config", "field"),
    [
        ({"kd_alpha": 1.5}, "loss.kd_alpha=1.5"),
        ({"kd_bce": {"temperature": 0}}, "loss.kd_bce: temperature=0"),
        ({"kd_dice": {"weight": -1}}, "loss.kd_dice.weight=-1"),
        ({"gt_focal": {"weight": 1}}, "loss.gt_focal: no such loss setting or term"),
        ({"gt_bce": {"pos_weight": 0}}, "loss.gt_bce: pos_weight=0"),
        ({"gt_tversky": {"weight": 1, "alpha": 0, "beta": 0}}, "loss.gt_tversky: alpha + beta=0"),
        ({"gt_dice": {"kind": "x"}}, "loss.gt_dice.kind: gt_dice has no such option"),
        ({"cldice": {"weight": 1, "iterations": 0}}, "loss.cldice: iterations=0"),
        ({"cldice": 1.0}, "loss.cldice: must be a mapping"),
        (
            {"kd_alpha": 0.0, "gt_bce": {"weight": 0}, "gt_dice": {"weight": None}},
            "no term with a positive weight",
        ),
    ],
)
def test_config_validation_names_the_setting(config, field):
    with pytest.raises(ConfigError, match=re.escape(field)):
        DistillLoss(config)


def test_losses_are_float32_under_bf16_autocast():
    student, teacher, mask, roi = _batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        total, terms = DistillLoss({"cldice": {"weight": 0.1}})(student.bfloat16(), mask, roi, teacher)
    assert total.dtype == torch.float32
    assert all(term.dtype == torch.float32 for term in terms.values())


def test_first_nonfinite_names_the_term():
    terms = {
        "gt_bce": torch.tensor(0.3),
        "kd_bce": torch.tensor(float("nan")),
        "total": torch.tensor(math.inf),
    }
    assert FiniteCheck(*stack_terms(terms)).first_nonfinite() == "kd_bce"
    assert FiniteCheck(*stack_terms({"gt_bce": torch.tensor(0.3)})).first_nonfinite() is None


@pytest.mark.parametrize(
    "kd", [{}, {"kd_confidence_weighting": True, "kd_dice": {"weight": 1.0}}, {"kd_trust_gt": True}]
)
def test_an_image_without_teacher_map_gets_the_ground_truth_as_kd_target(kd):
    student, teacher, mask, roi = _batch(seed=7, shape=(3, 1, 8, 8))
    loss = DistillLoss({"kd_alpha": 0.5, **kd})
    valid = torch.tensor([1, 0, 1], dtype=torch.uint8)
    _, terms = loss(student, mask, roi, teacher, teacher_valid=valid)
    certain = teacher.clone()
    certain[1] = 100 * (2 * mask[1].half() - 1)  # a teacher that says exactly the ground truth
    _, expected = loss(student, mask, roi, certain)
    _, unchanged = loss(student, mask, roi, teacher)
    for name, value in terms.items():
        assert value.item() == pytest.approx(expected[name].item(), rel=1e-5), name
    assert terms["kd_bce"].item() != pytest.approx(unchanged["kd_bce"].item(), rel=1e-3)  # so it can fail


def test_images_without_teacher_maps_still_train_at_alpha_1():
    student, teacher, mask, roi = _batch(seed=8)
    total, terms = _kd_only()(student, mask, roi, teacher, teacher_valid=torch.zeros(2, dtype=torch.uint8))
    assert torch.isfinite(total) and terms["kd_bce"].item() > 0
    total.backward()
    assert student.grad.abs().max().item() > 0


def test_a_registered_term_is_configured_composed_and_returned_by_name():
    student, teacher, mask, roi = _batch(seed=9)
    config = {"kd_alpha": 0.5, "test_mean_probability": {"weight": 0.25, "power": 2.0}}
    total, terms = DistillLoss(config)(student, mask, roi, teacher)
    probs, r = torch.sigmoid(student.detach().double()), roi.double()
    assert terms["test_mean_probability"].item() == pytest.approx(
        ((probs**2 * r).sum() / r.sum()).item(), rel=1e-6
    )
    base = 0.5 * (terms["gt_bce"] + terms["gt_dice"]) + 0.5 * terms["kd_bce"]
    assert total.item() == pytest.approx((base + 0.25 * terms["test_mean_probability"]).item(), rel=1e-6)
    off = DistillLoss({"kd_alpha": 0.5})
    assert "test_mean_probability" not in off(student, mask, roi, teacher)[1]  # weight null by default
    assert resolve_loss_config()["test_mean_probability"] == {"weight": None, "power": 1.0}


def test_an_unknown_term_that_is_off_is_ignored_and_one_that_is_on_is_refused():
    """A checkpoint lists every term registered where it was trained; one that was off must not stop
    it from loading where that term's module is not imported."""
    assert "gone" not in DistillLoss({"gone": {"weight": None, "x": 1}}).config
    with pytest.raises(ConfigError, match="loss.gone: no such loss setting or term"):
        DistillLoss({"gone": {"weight": 0.0}})


def test_registering_a_term_checks_its_name_and_options():
    with pytest.raises(ValueError, match="registered twice"):
        register_loss_term("kd_bce")(MeanProbability)
    with pytest.raises(ValueError, match="identifier other than"):
        register_loss_term("kd_alpha")(MeanProbability)

    class NoDefault(LossTerm):
        def __init__(self, scale: float):
            super().__init__()

    with pytest.raises(TypeError, match="option 'scale' needs a default"):
        register_loss_term("test_no_default")(NoDefault)
    assert "test_no_default" not in loss_terms()
