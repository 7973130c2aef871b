"""Training losses: ground truth, knowledge distillation on one sigmoid channel, and a thin-vessel term.

    total = (1 - kd.alpha) * GT + kd.alpha * KD + thin.weight * THIN

Every term is computed in float32 (autocast is switched off inside), only pixels with roi = 1 count,
and `DistillLoss.forward` returns the total plus each named term (detached) so that every one is
logged on its own. Soft Dice, Tversky and clDice add `SMOOTH` (one pixel) to numerator and
denominator: negligible next to thousands of vessel pixels, and it keeps vessel-free crops sane.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

SMOOTH = 1.0


def _require(ok: bool, field: str, value: object, rule: str) -> None:
    if not ok:
        raise ValueError(f"{field}={value!r}: {rule}")


@dataclass
class GTLossConfig:
    """Ground-truth loss: BCE plus a region term (soft Dice or Tversky).

    Args:
        kind: Region term next to BCE: "bce_dice" = soft Dice, "tversky" = Tversky (recall-leaning).
        pos_weight: BCE weight of vessel pixels; > 1 trades precision for recall.
        dice_weight: Weight of the region term (Dice or Tversky) relative to BCE.
        tversky_alpha: Tversky weight of false positives.
        tversky_beta: Tversky weight of false negatives; beta > alpha favours recall.
    """

    kind: Literal["bce_dice", "tversky"] = "bce_dice"
    pos_weight: float = 1.0
    dice_weight: float = 1.0
    tversky_alpha: float = 0.3
    tversky_beta: float = 0.7

    def __post_init__(self) -> None:
        _require(
            self.kind in ("bce_dice", "tversky"), "gt.kind", self.kind, 'must be "bce_dice" or "tversky"'
        )
        _require(self.pos_weight > 0, "gt.pos_weight", self.pos_weight, "must be > 0")
        _require(self.dice_weight >= 0, "gt.dice_weight", self.dice_weight, "must be >= 0")
        _require(self.tversky_alpha >= 0, "gt.tversky_alpha", self.tversky_alpha, "must be >= 0")
        _require(self.tversky_beta >= 0, "gt.tversky_beta", self.tversky_beta, "must be >= 0")
        _require(
            self.tversky_alpha + self.tversky_beta > 0,
            "gt.tversky_alpha + gt.tversky_beta",
            self.tversky_alpha + self.tversky_beta,
            "must be > 0",
        )


@dataclass
class KDConfig:
    """Knowledge distillation from cached teacher logits (one sigmoid channel).

    Args:
        alpha: Share of KD in the total: (1 - alpha) * GT + alpha * KD. 0 = ground truth only (no cache needed).
        temperature: T: both logits are divided by T; the BCE is multiplied by T^2 so gradients keep their scale.
        soft_dice_weight: Weight of a soft Dice between student and teacher probabilities (at T = 1) inside KD.
        confidence_weighting: Weight each pixel's KD by the teacher's confidence |2 sigmoid(teacher) - 1| (weighted mean).
        trust_gt: Where teacher (prob > 0.5) and ground truth disagree, the KD target there is the ground truth.
    """

    alpha: float = 0.5
    temperature: float = 2.0
    soft_dice_weight: float = 0.0
    confidence_weighting: bool = False
    trust_gt: bool = False

    def __post_init__(self) -> None:
        _require(0.0 <= self.alpha <= 1.0, "kd.alpha", self.alpha, "must be in [0, 1]")
        _require(self.temperature > 0, "kd.temperature", self.temperature, "must be > 0")
        _require(self.soft_dice_weight >= 0, "kd.soft_dice_weight", self.soft_dice_weight, "must be >= 0")


@dataclass
class ThinConfig:
    """Thin-vessel term aimed at recall of one-pixel vessels.

    Args:
        kind: "skeleton_recall" needs precomputed skeletons (datamodule skeletons=True); "cldice" does not.
        weight: Weight in the total. With a kind but weight 0 the term is still computed and logged.
        iterations: clDice soft-skeleton iterations: at least half the widest vessel's width in pixels.
    """

    kind: Literal["none", "skeleton_recall", "cldice"] = "none"
    weight: float = 0.0
    iterations: int = 10

    def __post_init__(self) -> None:
        kinds = ("none", "skeleton_recall", "cldice")
        _require(self.kind in kinds, "thin.kind", self.kind, f"must be one of {kinds}")
        _require(self.weight >= 0, "thin.weight", self.weight, "must be >= 0")
        _require(self.iterations >= 1, "thin.iterations", self.iterations, "must be >= 1")
        _require(
            self.kind != "none" or self.weight == 0,
            "thin.weight",
            self.weight,
            'is set but thin.kind is "none": choose "skeleton_recall" or "cldice"',
        )


def weighted_mean(values: Tensor, weight: Tensor) -> Tensor:
    """Mean of `values` under pixel weights; 0 (not NaN) when no pixel has weight."""
    return (values * weight).sum() / weight.sum().clamp_min(1e-12)


def soft_tversky(probs: Tensor, target: Tensor, weight: Tensor, alpha: float, beta: float) -> Tensor:
    """1 - Tversky index, pooled over the whole batch (a crop without vessels does not dominate).

    TI = (TP + s) / (TP + alpha FP + beta FN + s) with soft counts; alpha = beta = 0.5 is soft Dice.
    """
    tp = (weight * probs * target).sum()
    fp = (weight * probs * (1 - target)).sum()
    fn = (weight * (1 - probs) * target).sum()
    return 1 - (tp + SMOOTH) / (tp + alpha * fp + beta * fn + SMOOTH)


def soft_dice(probs: Tensor, target: Tensor, weight: Tensor) -> Tensor:
    """1 - soft Dice = 1 - (2 TP + 2s) / (sum p + sum g + 2s), pooled over the batch."""
    return soft_tversky(probs, target, weight, 0.5, 0.5)


def kd_bce(student_logits: Tensor, soft_target: Tensor, temperature: float) -> Tensor:
    """Per-pixel T^2 * BCE(sigmoid(student/T), soft_target), soft_target = sigmoid(teacher/T).

    Equals T^2 * (KL(teacher_T || student_T) + H(teacher_T)) for Bernoulli distributions; the entropy
    does not depend on the student, so the gradient is exactly the KL's (zero where student = teacher).
    A softmax over this single channel would be constant 1: never use it.
    """
    return temperature**2 * F.binary_cross_entropy_with_logits(
        student_logits / temperature, soft_target, reduction="none"
    )


def _soft_erode(x: Tensor) -> Tensor:
    # Min over a 3x3 cross: the minimum of a vertical and a horizontal 3-pixel min-pool.
    return torch.minimum(-F.max_pool2d(-x, (3, 1), 1, (1, 0)), -F.max_pool2d(-x, (1, 3), 1, (0, 1)))


def _soft_dilate(x: Tensor) -> Tensor:
    return F.max_pool2d(x, 3, 1, 1)


def soft_skeleton(x: Tensor, iterations: int) -> Tensor:
    """Differentiable skeleton of a probability map (Shit et al. 2021, clDice), via min/max pooling."""
    skeleton = F.relu(x - _soft_dilate(_soft_erode(x)))
    for _ in range(iterations):
        x = _soft_erode(x)
        delta = F.relu(x - _soft_dilate(_soft_erode(x)))
        skeleton = skeleton + F.relu(delta - skeleton * delta)
    return skeleton


def soft_cldice(probs: Tensor, target: Tensor, roi: Tensor, iterations: int) -> Tensor:
    """1 - clDice: harmonic mean of topology precision and sensitivity on soft skeletons.

    Both maps are multiplied by roi before skeletonising, so pixels outside roi get no gradient.
    """
    probs, target = probs * roi, target * roi
    skel_pred = soft_skeleton(probs, iterations)
    skel_true = soft_skeleton(target, iterations)
    precision = ((skel_pred * target).sum() + SMOOTH) / (skel_pred.sum() + SMOOTH)
    sensitivity = ((skel_true * probs).sum() + SMOOTH) / (skel_true.sum() + SMOOTH)
    return 1 - 2 * precision * sensitivity / (precision + sensitivity)


def skeleton_recall(probs: Tensor, skeleton: Tensor, roi: Tensor) -> Tensor:
    """1 - soft recall of the ground-truth skeleton (Kirchhoff et al. 2024): 1 - (sum p*skel + s)/(sum skel + s)."""
    skeleton = skeleton * roi
    return 1 - ((probs * skeleton).sum() + SMOOTH) / (skeleton.sum() + SMOOTH)


class FiniteCheck:
    """Whether a step's loss terms are finite, fetched to the host without stalling the GPU's queue.

    `bool(tensor)` on a GPU waits for everything queued so far, so checking every step would leave
    the GPU idle while the host prepares the next step. Here the flags are copied to pinned memory
    asynchronously and `first_nonfinite()` waits only for the step they belong to: called one step
    later, that step is long done.
    """

    def __init__(self, terms: dict[str, Tensor]):
        self.terms = {name: value.detach() for name, value in terms.items()}
        finite = torch.stack([value.float().reshape(()) for value in self.terms.values()]).isfinite()
        self.ready: torch.cuda.Event | None = None
        if finite.is_cuda:
            self.finite = torch.empty(finite.shape, dtype=torch.bool, pin_memory=True)
            self.finite.copy_(finite, non_blocking=True)
            self.ready = torch.cuda.Event()
            self.ready.record()
        else:
            self.finite = finite

    def first_nonfinite(self) -> str | None:
        """Name of the first term that is NaN or infinite, else None."""
        if self.ready is not None:
            self.ready.synchronize()
        if bool(self.finite.all()):
            return None
        return list(self.terms)[int((~self.finite).nonzero()[0])]


def _check_shape(name: str, tensor: Tensor | None, shape: torch.Size) -> None:
    if tensor is not None and tensor.shape != shape:
        raise ValueError(
            f"{name} has shape {tuple(tensor.shape)} but student_logits has {tuple(shape)}: "
            "upsample logits to the mask's resolution before the loss"
        )


class DistillLoss(nn.Module):
    """(1 - alpha) * GT + alpha * KD + thin.weight * THIN, each term returned by name.

    Terms: "gt/bce" and "gt/dice" | "gt/tversky"; "kd/bce" (already times T^2) and "kd/dice" whenever
    teacher logits are given; "thin/skeleton_recall" | "thin/cldice" unless thin.kind is "none";
    "total". GT = gt/bce + dice_weight * region term, KD = kd/bce + soft_dice_weight * kd/dice.
    A part whose weight is 0 is still computed for logging when its inputs are present, but under
    no_grad, so it cannot reach the gradient (e.g. kd.alpha = 0 with a cache attached).
    """

    def __init__(
        self, gt: GTLossConfig | None = None, kd: KDConfig | None = None, thin: ThinConfig | None = None
    ):
        super().__init__()
        self.gt = gt or GTLossConfig()
        self.kd = kd or KDConfig()
        self.thin = thin or ThinConfig()
        # A buffer, not a tensor made per step: a CUDA tensor from a Python number is a host sync.
        self.register_buffer("pos_weight", torch.tensor(self.gt.pos_weight), persistent=False)

    def forward(
        self,
        student_logits: Tensor,
        mask: Tensor,
        roi: Tensor | None = None,
        teacher_logits: Tensor | None = None,
        skeleton: Tensor | None = None,
        teacher_valid: Tensor | None = None,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Maps [B,1,H,W] (mask/roi/skeleton may be uint8, teacher float16). Returns (total, terms).

        `teacher_valid` [B] (0/1): images the teacher gave no map for get the ground truth as their
        KD target, as `trust_gt` does for pixels where the teacher is wrong, so they train on ground
        truth alone and at full weight, whatever alpha is.
        """
        shape = student_logits.shape
        for name, tensor in (
            ("mask", mask),
            ("roi", roi),
            ("teacher_logits", teacher_logits),
            ("skeleton", skeleton),
        ):
            _check_shape(name, tensor, shape)
        if teacher_logits is None and self.kd.alpha > 0:
            raise ValueError(
                f"kd.alpha={self.kd.alpha} needs teacher logits but none were given: attach a teacher "
                "cache (data.cache_dir) or set kd.alpha=0 for ground truth only"
            )
        if self.thin.kind == "skeleton_recall" and skeleton is None:
            raise ValueError(
                'thin.kind="skeleton_recall" needs ground-truth skeletons: set data.skeletons=true'
            )

        with torch.autocast(device_type=student_logits.device.type, enabled=False):
            logits = student_logits.float()
            target = mask.float()
            weight = torch.ones_like(logits) if roi is None else roi.float()
            parts: list[tuple[float, Tensor, dict[str, Tensor]]] = []
            with torch.set_grad_enabled(torch.is_grad_enabled() and self.kd.alpha < 1):
                parts.append((1 - self.kd.alpha, *self._ground_truth(logits, target, weight)))
            if teacher_logits is not None:
                with torch.set_grad_enabled(torch.is_grad_enabled() and self.kd.alpha > 0):
                    parts.append(
                        (
                            self.kd.alpha,
                            *self._distill(logits, target, weight, teacher_logits.float(), teacher_valid),
                        )
                    )
            if self.thin.kind != "none":
                with torch.set_grad_enabled(torch.is_grad_enabled() and self.thin.weight > 0):
                    parts.append((self.thin.weight, *self._thin(logits, target, weight, skeleton)))

            total = sum(part_weight * value for part_weight, value, _ in parts if part_weight > 0)
            terms = {name: term.detach() for _, _, part_terms in parts for name, term in part_terms.items()}
            terms["total"] = total.detach()
        return total, terms

    def _ground_truth(
        self, logits: Tensor, target: Tensor, weight: Tensor
    ) -> tuple[Tensor, dict[str, Tensor]]:
        bce = weighted_mean(
            F.binary_cross_entropy_with_logits(logits, target, pos_weight=self.pos_weight, reduction="none"),
            weight,
        )
        probs = torch.sigmoid(logits)
        if self.gt.kind == "tversky":
            region_name = "gt/tversky"
            region = soft_tversky(probs, target, weight, self.gt.tversky_alpha, self.gt.tversky_beta)
        else:
            region_name = "gt/dice"
            region = soft_dice(probs, target, weight)
        return bce + self.gt.dice_weight * region, {"gt/bce": bce, region_name: region}

    def _distill(
        self,
        logits: Tensor,
        target: Tensor,
        weight: Tensor,
        teacher_logits: Tensor,
        teacher_valid: Tensor | None = None,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """KD against the teacher; against the ground truth on images without a map (teacher_valid 0)
        and, with trust_gt, where the teacher is wrong.

        trust_gt replaces the target rather than dropping the pixel: the pixels where the teacher is
        wrong (often missed thin vessels) are exactly where the student should beat it. There the
        per-pixel term is T^2 * BCE(student/T, mask), whose gradient grows with T (~T/2 at logit 0).
        Confidence weights come from the teacher at T = 1 (its real prediction) and are 1 at pixels
        where trust_gt put the ground truth; KD is then a weighted mean, so its scale does not change.
        """
        temperature = self.kd.temperature
        teacher_probs = torch.sigmoid(teacher_logits)
        soft_target = torch.sigmoid(teacher_logits / temperature)
        use_gt = None if teacher_valid is None else teacher_valid.view(-1, 1, 1, 1) == 0  # no map
        if self.kd.trust_gt:
            wrong = (teacher_probs > 0.5) != (target > 0.5)
            use_gt = wrong if use_gt is None else use_gt | wrong
        if use_gt is not None:
            teacher_probs = torch.where(use_gt, target, teacher_probs)
            soft_target = torch.where(use_gt, target, soft_target)
        if self.kd.confidence_weighting:
            weight = weight * (2 * teacher_probs - 1).abs()
        bce = weighted_mean(kd_bce(logits, soft_target, temperature), weight)
        dice = soft_dice(torch.sigmoid(logits), teacher_probs, weight)
        return bce + self.kd.soft_dice_weight * dice, {"kd/bce": bce, "kd/dice": dice}

    def _thin(
        self, logits: Tensor, target: Tensor, weight: Tensor, skeleton: Tensor | None
    ) -> tuple[Tensor, dict[str, Tensor]]:
        probs = torch.sigmoid(logits)
        if self.thin.kind == "skeleton_recall":
            value = skeleton_recall(probs, skeleton.float(), weight)
        else:
            value = soft_cldice(probs, target, weight, self.thin.iterations)
        return value, {f"thin/{self.thin.kind}": value}
