"""Training losses by name: terms registered with `@register_loss_term("name")`, composed by `DistillLoss`.

    total = (1 - kd_alpha) * sum(weight * GT term) + kd_alpha * sum(weight * KD term) + sum(weight * other term)

Each term is an `nn.Module` whose keyword options (with defaults) and `weight` come from the config's
`loss` section, e.g. `--loss.kd_bce.temperature=4`. A weight of null switches a term off (not
computed); 0 computes and logs it without gradient; > 0 puts it in the total. Registered here:

    gt_bce           GT   BCE with logits (pos_weight > 1 trades precision for recall)
    gt_dice          GT   soft Dice
    gt_tversky       GT   1 - Tversky index (beta > alpha favours recall); off by default
    kd_bce           KD   T^2 * BCE(student/T, sigmoid(teacher/T)): the Bernoulli KL plus a constant
    kd_dice          KD   soft Dice between student and teacher probabilities (at T = 1)
    skeleton_recall  -    recall of the ground-truth skeleton (needs data.skeletons=true); off by default
    cldice           -    clDice on soft skeletons; off by default

Every term is computed in float32 (autocast is switched off inside), only pixels with roi = 1 count,
and `DistillLoss.forward` returns the total plus each term (detached) by name, so that every one is
logged on its own. Soft Dice, Tversky and clDice add `SMOOTH` (one pixel) to numerator and
denominator: negligible next to thousands of vessel pixels, and it keeps vessel-free crops sane.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from distill.errors import ConfigError
from distill.registry import Registry

SMOOTH = 1.0

_REGISTRY = Registry("loss term")


@dataclass
class LossSettings:
    """How the terms mix, and the KD target that every KD term shares.

    Args:
        kd_alpha: Share of KD in the total: GT terms are scaled by (1 - kd_alpha), KD terms by kd_alpha. 0 = ground truth only (no cache needed).
        kd_trust_gt: Where teacher (prob > 0.5) and ground truth disagree, the KD target there is the ground truth.
        kd_confidence_weighting: Weight each pixel's KD by the teacher's confidence |2 sigmoid(teacher) - 1| (a weighted mean).
    """

    kd_alpha: float = 0.5
    kd_trust_gt: bool = False
    kd_confidence_weighting: bool = False

    def __post_init__(self) -> None:
        if not 0.0 <= self.kd_alpha <= 1.0:
            raise ConfigError(f"loss.kd_alpha={self.kd_alpha!r}: must be in [0, 1]")


SETTINGS = tuple(f.name for f in fields(LossSettings))


@dataclass
class LossInputs:
    """What every loss term reads: float32 maps [B,1,H,W] (None where not given).

    `kd_gt` marks pixels whose KD target is the ground truth instead of the teacher (images the
    teacher gave no map for, and with kd_trust_gt the pixels where it is wrong); `kd_roi` is the
    pixel weight of KD terms (roi, times the teacher's confidence with kd_confidence_weighting).
    """

    logits: Tensor
    target: Tensor
    roi: Tensor
    teacher_logits: Tensor | None = None
    skeleton: Tensor | None = None
    kd_gt: Tensor | None = None
    kd_roi: Tensor | None = None

    @property
    def probs(self) -> Tensor:
        """sigmoid(logits), computed on each use so that it follows the caller's grad mode."""
        return torch.sigmoid(self.logits)

    def teacher_target(self, temperature: float = 1.0) -> Tensor:
        """sigmoid(teacher / T), the ground truth where `kd_gt` says so."""
        soft = torch.sigmoid(self.teacher_logits / temperature)
        return soft if self.kd_gt is None else torch.where(self.kd_gt, self.target, soft)


class LossTerm(nn.Module):
    """One named term of the training loss: `forward(inputs: LossInputs) -> scalar float32 tensor`.

    Subclass it, give `__init__` keyword options with defaults (they become `loss.<name>.<option>`)
    and register it with `@register_loss_term("name")`. Class attributes:

        mix             "gt": scaled by (1 - kd_alpha); "kd": by kd_alpha; None: by its weight alone
        needs           LossInputs fields the term reads besides logits, target and roi
                        ("teacher_logits", "skeleton"); without them it is skipped, or refused
                        when its weight counts
        default_weight  its weight when the config does not give one (None = off)
    """

    mix: ClassVar[Literal["gt", "kd"] | None] = None
    needs: ClassVar[tuple[str, ...]] = ()
    default_weight: ClassVar[float | None] = None


# What to do when a term's input is missing, by LossInputs field.
_MISSING_INPUT_FIX = {
    "teacher_logits": "attach a teacher cache (data.cache_dir), or set loss.kd_alpha=0 for ground truth only",
    "skeleton": "set data.skeletons=true",
}


def register_loss_term(name: str) -> Callable[[type[LossTerm]], type[LossTerm]]:
    """Decorator: a `LossTerm` subclass becomes the term `name`, configured as `loss.<name>`."""

    def check(term: type[LossTerm]) -> type[LossTerm]:
        if not name.isidentifier() or name in SETTINGS:
            raise ValueError(f"loss term name {name!r}: must be an identifier other than {SETTINGS}")
        if not (isinstance(term, type) and issubclass(term, LossTerm)):
            raise TypeError(f"loss term {name!r}: {term!r} is not a LossTerm subclass")
        for param in _options(term):
            if param.name == "weight" or param.default is inspect.Parameter.empty:
                raise TypeError(
                    f"loss term {name!r}: option {param.name!r} needs a default and must not be called weight"
                )
        unknown = set(term.needs) - set(_MISSING_INPUT_FIX)
        if unknown:
            raise ValueError(
                f"loss term {name!r}: needs {sorted(unknown)}; known inputs: {sorted(_MISSING_INPUT_FIX)}"
            )
        return _REGISTRY.register(name)(term)

    return check


def loss_terms() -> dict[str, type[LossTerm]]:
    """Every registered term by name, in registration order."""
    return dict(_REGISTRY)


def _options(term: type[LossTerm]) -> list[inspect.Parameter]:
    params = list(inspect.signature(term.__init__).parameters.values())[1:]  # drop self
    return [p for p in params if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]


def _unknown_and_off(key: str, value: Any) -> bool:
    off = isinstance(value, Mapping) and "weight" in value and value["weight"] is None
    return off and key not in SETTINGS and key not in _REGISTRY


def resolve_loss_config(config: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The whole loss config, plain types: every setting and every registered term's weight and
    options, the given values over the defaults.

    Raises ConfigError naming `loss.<key>` for a key that is neither a setting nor a registered term
    (unless its weight is null: off), an option a term does not take, or a term given as something
    other than a mapping.
    """
    # A term switched off may be unknown here: a checkpoint lists every term registered where it was trained.
    config = {key: value for key, value in (config or {}).items() if not _unknown_and_off(key, value)}
    unknown = [key for key in config if key not in SETTINGS and key not in _REGISTRY]
    if unknown:
        raise ConfigError(
            f"loss.{unknown[0]}: no such loss setting or term (settings: {', '.join(SETTINGS)}; terms: "
            f"{', '.join(_REGISTRY)}); a term of your own must be registered with @register_loss_term "
            "before the config is read"
        )
    resolved: dict[str, Any] = asdict(LossSettings(**{k: config[k] for k in SETTINGS if k in config}))
    for name, term in _REGISTRY.items():
        given = config.get(name) or {}
        if not isinstance(given, Mapping):
            raise ConfigError(f"loss.{name}: must be a mapping such as {{weight: 1.0}}, got {given!r}")
        defaults = {"weight": term.default_weight, **{p.name: p.default for p in _options(term)}}
        bad = sorted(set(given) - set(defaults))
        if bad:
            raise ConfigError(
                f"loss.{name}.{bad[0]}: {name} has no such option (it takes {', '.join(defaults)})"
            )
        resolved[name] = {**defaults, **given}
    return resolved


def _require(ok: bool, option: str, value: object, rule: str) -> None:
    if not ok:
        raise ValueError(f"{option}={value!r}: {rule}")


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


def stack_terms(terms: dict[str, Tensor]) -> tuple[tuple[str, ...], Tensor]:
    """(names, values [len(names)] float32): a step's loss terms as one new tensor, for bookkeeping
    (finiteness checks, epoch sums, logged values).

    A new tensor, not detached aliases of the terms: inside a compiled step those aliases made inductor
    drop the total's gradient when a lone term at scale 1 was the total (see DistillModule.student_loss).
    """
    return tuple(terms), torch.stack([value.detach().float().reshape(()) for value in terms.values()])


class FiniteCheck:
    """A step's loss terms, copied to the host without stalling the GPU's queue: their values, and
    whether they are finite.

    `bool(tensor)` on a GPU waits for everything queued so far, so checking every step would leave
    the GPU idle while the host prepares the next step. Here the terms are copied to pinned memory
    asynchronously and `host_values()` waits only for the step they belong to: called one step later,
    that step is long done. No reference to the device tensor is kept (a CUDA graph's next replay
    overwrites its outputs).
    """

    def __init__(self, names: tuple[str, ...], values: Tensor, buffer: Tensor | None = None):
        """`values` [len(names)]: the step's loss terms, in the order of `names`. `buffer`: host memory
        of their shape and dtype to copy them into (an earlier check's, once read), else new pinned memory."""
        self.names = names
        values = values.detach()
        self.ready: torch.cuda.Event | None = None
        if values.is_cuda:
            fits = buffer is not None and buffer.shape == values.shape and buffer.dtype == values.dtype
            self.host = buffer if fits else torch.empty(values.shape, dtype=values.dtype, pin_memory=True)
            self.host.copy_(values, non_blocking=True)
            self.ready = torch.cuda.Event()
            self.ready.record()
        else:
            self.host = values.clone()

    def host_values(self) -> Tensor:
        """The terms [len(names)] on the host (waits for their step's copy only)."""
        if self.ready is not None:
            self.ready.synchronize()
            self.ready = None
        return self.host

    def first_nonfinite(self) -> str | None:
        """Name of the first term that is NaN or infinite, else None."""
        finite = self.host_values().isfinite()
        if bool(finite.all()):
            return None
        return self.names[int((~finite).nonzero()[0])]

    def value(self, name: str) -> float:
        """The term's value."""
        return float(self.host_values()[self.names.index(name)])


def _check_shape(name: str, tensor: Tensor | None, shape: torch.Size) -> None:
    if tensor is not None and tensor.shape != shape:
        raise ValueError(
            f"{name} has shape {tuple(tensor.shape)} but student_logits has {tuple(shape)}: "
            "upsample logits to the mask's resolution before the loss"
        )


@register_loss_term("gt_bce")
class GroundTruthBCE(LossTerm):
    """BCE with logits against the ground truth, mean over ROI pixels.

    Args:
        pos_weight: BCE weight of vessel pixels; > 1 trades precision for recall.
    """

    mix = "gt"
    default_weight = 1.0

    def __init__(self, pos_weight: float = 1.0):
        super().__init__()
        _require(pos_weight > 0, "pos_weight", pos_weight, "must be > 0")
        self.pos_weight = pos_weight
        # A buffer, not a tensor made per step: a CUDA tensor from a Python number is a host sync.
        self.register_buffer("pos_weight_tensor", torch.tensor(float(pos_weight)), persistent=False)

    def forward(self, inputs: LossInputs) -> Tensor:
        bce = F.binary_cross_entropy_with_logits(
            inputs.logits, inputs.target, pos_weight=self.pos_weight_tensor, reduction="none"
        )
        return weighted_mean(bce, inputs.roi)


@register_loss_term("gt_dice")
class GroundTruthDice(LossTerm):
    """1 - soft Dice against the ground truth, pooled over the batch."""

    mix = "gt"
    default_weight = 1.0

    def forward(self, inputs: LossInputs) -> Tensor:
        return soft_dice(inputs.probs, inputs.target, inputs.roi)


@register_loss_term("gt_tversky")
class GroundTruthTversky(LossTerm):
    """1 - Tversky index against the ground truth (recall-leaning with beta > alpha).

    Args:
        alpha: Weight of false positives.
        beta: Weight of false negatives; beta > alpha favours recall. alpha = beta = 0.5 is soft Dice.
    """

    mix = "gt"

    def __init__(self, alpha: float = 0.3, beta: float = 0.7):
        super().__init__()
        _require(alpha >= 0, "alpha", alpha, "must be >= 0")
        _require(beta >= 0, "beta", beta, "must be >= 0")
        _require(alpha + beta > 0, "alpha + beta", alpha + beta, "must be > 0")
        self.alpha, self.beta = alpha, beta

    def forward(self, inputs: LossInputs) -> Tensor:
        return soft_tversky(inputs.probs, inputs.target, inputs.roi, self.alpha, self.beta)


@register_loss_term("kd_bce")
class DistillBCE(LossTerm):
    """T^2 * BCE(student/T, sigmoid(teacher/T)), weighted mean over KD pixels (see `kd_bce`).

    Where the ground truth replaces the teacher (LossInputs.kd_gt) the per-pixel term is
    T^2 * BCE(student/T, mask), whose gradient grows with T (~T/2 at logit 0): those pixels (often
    thin vessels the teacher missed) are exactly where the student should beat it.

    Args:
        temperature: T: both logits are divided by T; the BCE is multiplied by T^2 so gradients keep their scale.
    """

    mix = "kd"
    needs = ("teacher_logits",)
    default_weight = 1.0

    def __init__(self, temperature: float = 2.0):
        super().__init__()
        _require(temperature > 0, "temperature", temperature, "must be > 0")
        self.temperature = temperature

    def forward(self, inputs: LossInputs) -> Tensor:
        soft_target = inputs.teacher_target(self.temperature)
        return weighted_mean(kd_bce(inputs.logits, soft_target, self.temperature), inputs.kd_roi)


@register_loss_term("kd_dice")
class DistillDice(LossTerm):
    """1 - soft Dice between student and teacher probabilities (T = 1), over KD pixels."""

    mix = "kd"
    needs = ("teacher_logits",)
    default_weight = 0.0

    def forward(self, inputs: LossInputs) -> Tensor:
        return soft_dice(inputs.probs, inputs.teacher_target(), inputs.kd_roi)


@register_loss_term("skeleton_recall")
class SkeletonRecall(LossTerm):
    """1 - soft recall of the ground-truth skeleton, for one-pixel vessels (needs data.skeletons=true)."""

    needs = ("skeleton",)

    def forward(self, inputs: LossInputs) -> Tensor:
        return skeleton_recall(inputs.probs, inputs.skeleton, inputs.roi)


@register_loss_term("cldice")
class CenterlineDice(LossTerm):
    """1 - clDice on soft skeletons of prediction and ground truth.

    Args:
        iterations: Soft-skeleton iterations: at least half the widest vessel's width in pixels.
    """

    def __init__(self, iterations: int = 10):
        super().__init__()
        _require(iterations >= 1, "iterations", iterations, "must be >= 1")
        self.iterations = iterations

    def forward(self, inputs: LossInputs) -> Tensor:
        return soft_cldice(inputs.probs, inputs.target, inputs.roi, self.iterations)


class DistillLoss(nn.Module):
    """The registered terms a config switches on, mixed by kd_alpha and weighted; each returned by name.

    `forward` returns (total, terms): `terms` holds every computed term (detached) by its registered
    name plus "total". A term whose scale (weight, times kd_alpha or 1 - kd_alpha) is 0 is computed
    for logging when its inputs are there, but under no_grad, so it cannot reach the gradient (e.g.
    kd_alpha = 0 with a cache attached); without its inputs it is skipped.
    """

    def __init__(self, config: Mapping[str, Any] | None = None):
        super().__init__()
        self.config = resolve_loss_config(config)
        self.settings = LossSettings(**{k: self.config[k] for k in SETTINGS})
        share = {"gt": 1 - self.settings.kd_alpha, "kd": self.settings.kd_alpha, None: 1.0}
        self.terms = nn.ModuleDict()
        self.scales: dict[str, float] = {}
        for name, term in _REGISTRY.items():
            options = dict(self.config[name])
            weight = options.pop("weight")
            if weight is None:
                continue
            if not (isinstance(weight, (int, float)) and weight >= 0):
                raise ConfigError(
                    f"loss.{name}.weight={weight!r}: must be >= 0, or null to switch {name} off"
                )
            try:
                self.terms[name] = term(**options)
            except (TypeError, ValueError) as err:
                raise ConfigError(f"loss.{name}: {err}") from None
            self.scales[name] = float(weight) * share[term.mix]
        if not any(scale > 0 for scale in self.scales.values()):
            raise ConfigError(
                f"the loss has no term with a positive weight (scales {self.scales}, kd_alpha "
                f"{self.settings.kd_alpha}): give a term a weight > 0"
            )

    def terms_needing(self, field: str) -> list[str]:
        """The terms that count (scale > 0) and read this LossInputs field ("teacher_logits", "skeleton")."""
        return [name for name, scale in self.scales.items() if scale > 0 and field in self.terms[name].needs]

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
        KD target, as `kd_trust_gt` does for pixels where the teacher is wrong, so they train on
        ground truth alone and at full weight, whatever kd_alpha is.
        """
        shape = student_logits.shape
        for name, tensor in (
            ("mask", mask),
            ("roi", roi),
            ("teacher_logits", teacher_logits),
            ("skeleton", skeleton),
        ):
            _check_shape(name, tensor, shape)
        with torch.autocast(device_type=student_logits.device.type, enabled=False):
            inputs = self._inputs(student_logits, mask, roi, teacher_logits, skeleton, teacher_valid)
            total: Tensor | float = 0.0
            terms: dict[str, Tensor] = {}
            for name, term in self.terms.items():
                scale = self.scales[name]
                missing = [field for field in term.needs if getattr(inputs, field) is None]
                if missing and scale > 0:
                    raise ValueError(
                        f"loss.{name} (scale {scale:g}) needs {missing[0]} but none were given: "
                        f"{_MISSING_INPUT_FIX[missing[0]]}"
                    )
                if missing:
                    continue
                with torch.set_grad_enabled(torch.is_grad_enabled() and scale > 0):
                    value = term(inputs)
                terms[name] = value.detach()
                if scale > 0:
                    total = total + scale * value
            terms["total"] = total.detach()
        return total, terms

    def _inputs(
        self,
        student_logits: Tensor,
        mask: Tensor,
        roi: Tensor | None,
        teacher_logits: Tensor | None,
        skeleton: Tensor | None,
        teacher_valid: Tensor | None,
    ) -> LossInputs:
        """float32 inputs, and the KD target's substitutions and pixel weights shared by every KD term.

        Confidence weights come from the teacher at T = 1 (its real prediction) and are 1 at pixels
        where the ground truth replaced it; KD terms are weighted means, so their scale does not change.
        """
        logits, target = student_logits.float(), mask.float()
        roi = torch.ones_like(logits) if roi is None else roi.float()
        inputs = LossInputs(logits, target, roi, skeleton=None if skeleton is None else skeleton.float())
        if teacher_logits is None:
            return inputs
        inputs.teacher_logits = teacher_logits.float()
        inputs.kd_roi = roi
        teacher_probs = torch.sigmoid(inputs.teacher_logits)
        if teacher_valid is not None:
            inputs.kd_gt = teacher_valid.view(-1, 1, 1, 1) == 0  # images without a map
        if self.settings.kd_trust_gt:
            wrong = (teacher_probs > 0.5) != (target > 0.5)
            inputs.kd_gt = wrong if inputs.kd_gt is None else inputs.kd_gt | wrong
        if self.settings.kd_confidence_weighting:
            inputs.kd_roi = roi * (2 * inputs.teacher_target() - 1).abs()
        return inputs
