"""Segmentation metrics at a grid of thresholds, pooled and per image, and choosing one threshold on validation.

A pixel is predicted positive at threshold t when prob >= t (compared in float32). Only pixels with
roi = 1 count. `ThresholdCurves` pools counts over every image of a split (and over DDP ranks), so
big images and images with many vessel pixels weigh more than in a per-image mean; `PerImageDice`
gives each image's Dice. Both bin every pixel once by the number of thresholds it reaches
(`_counts_at_thresholds`), so they cannot disagree.

Conventions for empty denominators ("nothing to get wrong" scores 1): precision = 1 when nothing is
predicted positive, recall = 1 when there is no vessel pixel, Dice = IoU = 1 when both are empty.
An image without vessel pixels inside its ROI therefore has Dice 1 when nothing is predicted there
and 0 otherwise; `per_image_means` leaves such images out of the headline per-image mean, so that
it cannot be raised by predicting nothing, and reports the mean over every image beside it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

DEFAULT_THRESHOLDS: tuple[float, ...] = tuple(round(0.05 * k, 2) for k in range(1, 20))
CURVE_NAMES = ("dice", "recall", "precision", "iou")


def _ratio(numerator: Tensor, denominator: Tensor) -> Tensor:
    """numerator / denominator, and 1 where the denominator is 0 (see the module docstring)."""
    return torch.where(denominator > 0, numerator / denominator.clamp_min(1), torch.ones_like(numerator))


def _scores(tp: Tensor, fp: Tensor, fn: Tensor) -> dict[str, Tensor]:
    tp, fp, fn = tp.double(), fp.double(), fn.double()
    return {
        "dice": _dice(tp, fp, fn),
        "recall": _ratio(tp, tp + fn),
        "precision": _ratio(tp, tp + fp),
        "iou": _ratio(tp, tp + fp + fn),
    }


def _dice(tp: Tensor, fp: Tensor, fn: Tensor) -> Tensor:
    tp, fp, fn = tp.double(), fp.double(), fn.double()
    return _ratio(2 * tp, 2 * tp + fp + fn)


def _counts_at_thresholds(
    probs: Tensor, target: Tensor, roi: Tensor | None, boundaries: Tensor, per_image: bool
) -> tuple[Tensor, Tensor, Tensor]:
    """int64 (tp, fp, fn) at every threshold: [n_thresholds] pooled, or [B, n_thresholds] per image (dim 0).

    Each pixel is bucketed once (how many thresholds it reaches), one bincount gives a histogram per
    class (and image), and reversed cumulative sums turn it into counts at every threshold:
    O(pixels + thresholds), no pixel storage.
    """
    n = len(boundaries)
    bins = 2 * (n + 1) + 1  # negatives by thresholds reached, positives likewise, one bin for ignored
    # reached = number of thresholds <= prob: the pixel is positive at thresholds[:reached].
    code = torch.bucketize(probs.float(), boundaries, right=True) + (n + 1) * (target > 0.5).long()
    if roi is not None:
        code = torch.where(roi > 0, code, bins - 1)
    groups = probs.shape[0] if per_image else 1
    if per_image:
        code = code + bins * torch.arange(groups, device=code.device).view(-1, *([1] * (code.dim() - 1)))
    histogram = torch.bincount(code.flatten(), minlength=groups * bins).view(groups, bins)
    negatives, positives = histogram[:, : n + 1], histogram[:, n + 1 : 2 * (n + 1)]
    # at_least[k] = pixels that reach more than k thresholds = predicted positive at thresholds[k].
    tp = positives.flip(1).cumsum(1).flip(1)[:, 1:]
    fp = negatives.flip(1).cumsum(1).flip(1)[:, 1:]
    fn = positives.sum(1, keepdim=True) - tp
    return (tp, fp, fn) if per_image else (tp[0], fp[0], fn[0])


def _check_thresholds(thresholds: Sequence[float]) -> tuple[float, ...]:
    thresholds = tuple(float(t) for t in thresholds)
    if not thresholds or any(not 0 <= t <= 1 for t in thresholds):
        raise ValueError(f"thresholds={thresholds}: need at least one, each in [0, 1]")
    if list(thresholds) != sorted(set(thresholds)):
        raise ValueError(f"thresholds={thresholds}: must be strictly increasing")
    return thresholds


def _check_inputs(probs: Tensor, target: Tensor, roi: Tensor | None) -> None:
    if target.shape != probs.shape or (roi is not None and roi.shape != probs.shape):
        roi_shape = None if roi is None else tuple(roi.shape)
        raise ValueError(
            f"probs {tuple(probs.shape)}, target {tuple(target.shape)} and roi {roi_shape} must have one shape"
        )
    probs = probs.float()
    bad_probs = ((probs < 0) | (probs > 1) | probs.isnan()).any()
    bad_target = ((target != 0) & (target != 1)).any()
    if bool(bad_probs | bad_target):  # one device sync for both checks
        if bool(bad_probs):
            raise ValueError(
                f"probs must be probabilities in [0, 1] (got min {probs.min().item()}, max {probs.max().item()}): "
                "apply sigmoid to logits first"
            )
        raise ValueError(f"target must be 0/1 (got values {target.unique()[:8].tolist()})")


class _ThresholdGridMetric(Metric):
    """A metric over a grid of thresholds (strictly increasing, in [0, 1]), kept as bucket boundaries."""

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(
        self, thresholds: Sequence[float] = DEFAULT_THRESHOLDS, validate_args: bool = True, **kwargs
    ):
        super().__init__(**kwargs)
        self.thresholds = _check_thresholds(thresholds)
        self.validate_args = validate_args  # False where the caller has checked the same inputs
        self.register_buffer(
            "_boundaries", torch.tensor(self.thresholds, dtype=torch.float32), persistent=False
        )


class ThresholdCurves(_ThresholdGridMetric):
    """tp/fp/fn at every threshold as summed int64 counts, pooled over all images.

    The states are sums, so DDP ranks are merged exactly (dist_reduce_fx="sum").
    """

    def __init__(
        self, thresholds: Sequence[float] = DEFAULT_THRESHOLDS, validate_args: bool = True, **kwargs
    ):
        super().__init__(thresholds, validate_args, **kwargs)
        for name in ("tp", "fp", "fn"):
            self.add_state(
                name, default=torch.zeros(len(self.thresholds), dtype=torch.int64), dist_reduce_fx="sum"
            )

    def update(self, probs: Tensor, target: Tensor, roi: Tensor | None = None) -> None:
        """probs in [0, 1] and target 0/1, any one shape (e.g. [B,1,H,W]); roi 0/1 of the same shape or None."""
        if self.validate_args:
            _check_inputs(probs, target, roi)
        tp, fp, fn = _counts_at_thresholds(probs, target, roi, self._boundaries, per_image=False)
        self.tp += tp
        self.fp += fp
        self.fn += fn

    def compute(self) -> dict[str, Tensor]:
        """{"thresholds", "dice", "recall", "precision", "iou"}: float64 1-D tensors, one value per threshold."""
        thresholds = torch.tensor(self.thresholds, dtype=torch.float64, device=self.tp.device)
        return {"thresholds": thresholds, **_scores(self.tp, self.fp, self.fn)}


class PerImageDice(_ThresholdGridMetric):
    """Dice of every image at every threshold ([N, n_thresholds]) in split order, gathered over DDP ranks.

    `index` is each image's position in its split (the batch's "index"): ranks see interleaved shares
    of a split, and compute() puts the gathered rows back in split order by it. Also records which
    images have vessel pixels inside their ROI (see the module docstring for images that have none).
    """

    def __init__(
        self, thresholds: Sequence[float] = DEFAULT_THRESHOLDS, validate_args: bool = True, **kwargs
    ):
        super().__init__(thresholds, validate_args, **kwargs)
        self.add_state("dice", default=[], dist_reduce_fx="cat")
        self.add_state("has_vessels", default=[], dist_reduce_fx="cat")
        self.add_state("index", default=[], dist_reduce_fx="cat")

    def update(
        self, probs: Tensor, target: Tensor, roi: Tensor | None = None, index: Tensor | None = None
    ) -> None:
        """probs, target, roi as in ThresholdCurves, dim 0 = image; index [B] positions in the split or None
        (arrival order)."""
        if self.validate_args:
            _check_inputs(probs, target, roi)
        if index is None:
            seen = sum(len(i) for i in self.index)
            index = torch.arange(seen, seen + probs.shape[0], device=probs.device)
        tp, fp, fn = _counts_at_thresholds(probs, target, roi, self._boundaries, per_image=True)
        self.dice.append(_dice(tp, fp, fn).float())
        self.has_vessels.append((tp[:, 0] + fn[:, 0]) > 0)
        self.index.append(index.to(device=probs.device, dtype=torch.int64).flatten())

    def compute(self) -> dict[str, Tensor]:
        """{"dice": float32 [N, n_thresholds], "has_vessels": bool [N]}, rows in split order."""
        if isinstance(self.dice, list) and not self.dice:  # after a DDP sync the state is one tensor
            device = self._boundaries.device
            return {
                "dice": torch.zeros(0, len(self.thresholds), device=device),
                "has_vessels": torch.zeros(0, dtype=torch.bool, device=device),
            }
        order = dim_zero_cat(self.index).argsort()
        dice = dim_zero_cat(self.dice).reshape(-1, len(self.thresholds))
        return {"dice": dice[order], "has_vessels": dim_zero_cat(self.has_vessels).reshape(-1)[order]}


def per_image_means(dice: Sequence[float], has_vessels: Sequence[bool]) -> dict[str, float | int | None]:
    """The per-image means reported for one side at one threshold.

    "with_vessels" (the headline `dice_per_image`) averages only images with vessel pixels inside
    their ROI, so predicting nothing scores 0 there; "all" averages every image, those without
    vessels counting 1 when nothing was predicted and 0 otherwise. None where there is no image.
    """
    if len(dice) != len(has_vessels):
        raise ValueError(f"{len(dice)} per-image Dice values for {len(has_vessels)} has_vessels flags")
    with_vessels = [d for d, vessels in zip(dice, has_vessels, strict=True) if vessels]
    return {
        "with_vessels": round(sum(with_vessels) / len(with_vessels), 6) if with_vessels else None,
        "all": round(sum(dice) / len(dice), 6) if len(dice) else None,
        "n_with_vessels": len(with_vessels),
    }


class ThresholdChoice(tuple):
    """(index, threshold): unpacks like the pair it is, and also carries the rule and whether it fell back."""

    def __new__(cls, index: int, threshold: float, rule: str, fell_back: bool = False):
        choice = super().__new__(cls, (index, threshold))
        choice.rule = rule
        choice.fell_back = fell_back
        return choice

    def __getnewargs__(self):
        return (*self, self.rule, self.fell_back)


def choose_threshold(
    curves: dict[str, Tensor], rule: str = "max_dice", recall_target: float = 0.85
) -> ThresholdChoice:
    """Pick one threshold from validation curves (thresholds ascending), to be frozen for test.

    - "max_dice": the threshold with the highest pooled Dice; on ties the lowest such threshold,
      which has the higher recall for the same Dice (recall is what this project is short of).
    - "recall_target": the *highest* threshold whose recall is still >= recall_target. Recall only
      falls as the threshold rises, so every lower threshold reaches the target too; the issue's
      "lowest threshold that reaches it" means lowering the threshold only as far as needed, and the
      highest qualifying one is that point, with the best precision at the target recall. If no
      threshold reaches the target, the threshold with the highest recall (the lowest among ties)
      is returned with `fell_back=True`, so the caller can say so.
    """
    if rule not in ("max_dice", "recall_target"):
        raise ValueError(f'threshold rule={rule!r}: must be "max_dice" or "recall_target"')
    if not 0 < recall_target <= 1:
        raise ValueError(f"recall_target={recall_target}: must be in (0, 1]")
    thresholds = curves["thresholds"].tolist()
    if rule == "max_dice":
        dice = curves["dice"]
        index = int((dice == dice.max()).nonzero()[0])
        return ThresholdChoice(index, thresholds[index], rule)
    recall = curves["recall"]
    reaching = (recall >= recall_target).nonzero()
    if len(reaching):
        index = int(reaching[-1])
        return ThresholdChoice(index, thresholds[index], rule)
    index = int((recall == recall.max()).nonzero()[0])
    return ThresholdChoice(index, thresholds[index], rule, fell_back=True)


def curves_at(curves: dict[str, Tensor], index: int) -> dict[str, float]:
    """{"dice", "recall", "precision", "iou"} at one threshold index, as floats (metrics.json "at_chosen")."""
    return {name: round(float(curves[name][index]), 6) for name in CURVE_NAMES}


def curves_to_json(curves: dict[str, Tensor]) -> dict[str, list[float]]:
    """Plain lists rounded to 6 decimals, for metrics.json (lists aligned with "thresholds")."""
    return {name: [round(float(v), 6) for v in values.tolist()] for name, values in curves.items()}
