"""Pooled segmentation metrics at a grid of thresholds, and choosing one threshold on validation.

A pixel is predicted positive at threshold t when prob >= t (compared in float32). Only pixels with
roi = 1 count. Counts are pooled over every image of a split (and over DDP ranks), so big images and
images with many vessel pixels weigh more than in a per-image mean; `per_image_dice` gives the
per-image view at the chosen threshold.

Conventions for empty denominators ("nothing to get wrong" scores 1): precision = 1 when nothing is
predicted positive, recall = 1 when there is no vessel pixel, Dice = IoU = 1 when both are empty.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from torchmetrics import Metric

DEFAULT_THRESHOLDS: tuple[float, ...] = tuple(round(0.05 * k, 2) for k in range(1, 20))
CURVE_NAMES = ("dice", "recall", "precision", "iou")


def _ratio(numerator: Tensor, denominator: Tensor) -> Tensor:
    """numerator / denominator, and 1 where the denominator is 0 (see the module docstring)."""
    return torch.where(denominator > 0, numerator / denominator.clamp_min(1), torch.ones_like(numerator))


def _scores(tp: Tensor, fp: Tensor, fn: Tensor) -> dict[str, Tensor]:
    tp, fp, fn = tp.double(), fp.double(), fn.double()
    return {
        "dice": _ratio(2 * tp, 2 * tp + fp + fn),
        "recall": _ratio(tp, tp + fn),
        "precision": _ratio(tp, tp + fp),
        "iou": _ratio(tp, tp + fp + fn),
    }


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


class ThresholdCurves(Metric):
    """tp/fp/fn at every threshold as summed int64 counts: O(pixels + thresholds) per update, no pixel storage.

    Each pixel is bucketed once (how many thresholds it reaches), one bincount gives a histogram per
    class, and reversed cumulative sums turn it into counts at every threshold. The states are sums,
    so DDP ranks are merged exactly (dist_reduce_fx="sum").
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(
        self, thresholds: Sequence[float] = DEFAULT_THRESHOLDS, validate_args: bool = True, **kwargs
    ):
        super().__init__(**kwargs)
        thresholds = tuple(float(t) for t in thresholds)
        if not thresholds or any(not 0 <= t <= 1 for t in thresholds):
            raise ValueError(f"thresholds={thresholds}: need at least one, each in [0, 1]")
        if list(thresholds) != sorted(set(thresholds)):
            raise ValueError(f"thresholds={thresholds}: must be strictly increasing")
        self.thresholds = thresholds
        self.validate_args = validate_args
        self.register_buffer("_boundaries", torch.tensor(thresholds, dtype=torch.float32), persistent=False)
        for name in ("tp", "fp", "fn"):
            self.add_state(
                name, default=torch.zeros(len(thresholds), dtype=torch.int64), dist_reduce_fx="sum"
            )

    def update(self, probs: Tensor, target: Tensor, roi: Tensor | None = None) -> None:
        """probs in [0, 1] and target 0/1, any one shape (e.g. [B,1,H,W]); roi 0/1 of the same shape or None."""
        if self.validate_args:
            _check_inputs(probs, target, roi)
        n = len(self.thresholds)
        # reached[i] = number of thresholds <= prob: the pixel is positive at thresholds[:reached].
        reached = torch.bucketize(probs.float(), self._boundaries, right=True)
        code = reached + (n + 1) * (target > 0.5).long()
        if roi is not None:
            code = torch.where(roi > 0, code, 2 * (n + 1))  # one bin for ignored pixels
        histogram = torch.bincount(code.flatten(), minlength=2 * (n + 1) + 1)
        negatives, positives = histogram[: n + 1], histogram[n + 1 : 2 * (n + 1)]
        # at_least[k] = pixels that reach more than k thresholds = predicted positive at thresholds[k].
        tp = positives.flip(0).cumsum(0).flip(0)[1:]
        fp = negatives.flip(0).cumsum(0).flip(0)[1:]
        self.tp += tp
        self.fp += fp
        self.fn += positives.sum() - tp

    def compute(self) -> dict[str, Tensor]:
        """{"thresholds", "dice", "recall", "precision", "iou"}: float64 1-D tensors, one value per threshold."""
        thresholds = torch.tensor(self.thresholds, dtype=torch.float64, device=self.tp.device)
        return {"thresholds": thresholds, **_scores(self.tp, self.fp, self.fn)}


class ThresholdChoice(tuple):
    """(index, threshold): unpacks like the pair it is, and also carries the rule and whether it fell back."""

    def __new__(cls, index: int, threshold: float, rule: str, fell_back: bool = False):
        choice = super().__new__(cls, (index, threshold))
        choice.rule = rule
        choice.fell_back = fell_back
        return choice

    def __getnewargs__(self):
        return (*self, self.rule, self.fell_back)

    @property
    def index(self) -> int:
        return self[0]

    @property
    def threshold(self) -> float:
        return self[1]


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


def per_image_dice(
    probs: Tensor, target: Tensor, roi: Tensor | None = None, threshold: float = 0.5
) -> Tensor:
    """Dice of each image [B,...] at `threshold` (prob >= threshold), inside roi; 1 when both are empty."""
    _check_inputs(probs, target, roi)
    predicted = probs.float() >= threshold
    truth = target > 0.5
    if roi is not None:
        predicted, truth = predicted & (roi > 0), truth & (roi > 0)
    dims = tuple(range(1, probs.dim()))
    tp = (predicted & truth).sum(dims)
    errors = (predicted ^ truth).sum(dims)
    return _ratio(2 * tp.double(), 2 * tp.double() + errors.double()).float()


def curves_to_json(curves: dict[str, Tensor]) -> dict[str, list[float]]:
    """Plain lists rounded to 6 decimals, for metrics.json (lists aligned with "thresholds")."""
    return {name: [round(float(v), 6) for v in values.tolist()] for name, values in curves.items()}
