"""Student networks by name (the timm pattern): raw RGB in, one-channel vessel logits out.

Every student is wrapped in `Student`, which owns the ImageNet normalisation and the padding to the
encoder's stride, so that training, `predict` and an ONNX export all take raw uint8 RGB of any size
and return logits at exactly the input size.

smp and timm build every encoder stage whatever `encoder_depth` says (ResNet's layer4, timm's later
blocks, a Mix Transformer's last stage) and then never use the deeper ones. `create_student` drops
every submodule whose parameters get no gradient from the logits, so that parameter counts, ONNX files
and checkpoints hold only what runs, and DDP (which needs a gradient for every parameter) works.
"""

from __future__ import annotations

import inspect
import pickle
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from distill.errors import ConfigError
from distill.registry import Registry
from distill.views import same_views

CHECKPOINT_FORMAT_VERSION = 1
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

_REGISTRY = Registry("student")


@dataclass
class StudentConfig:
    """What `create_student` is called with; `extra` holds architecture-specific kwargs."""

    name: str = "unet"
    encoder: str = "resnet34"
    encoder_weights: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def kwargs(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "encoder": self.encoder,
            "encoder_weights": self.encoder_weights,
            **self.extra,
        }


class Student(nn.Module):
    """Normalise raw RGB, pad to the stride, run the network, resize logits back to the input size."""

    def __init__(self, net: nn.Module, stride: int, config: dict[str, Any], dropped: tuple[str, ...] = ()):
        super().__init__()
        self.net = net
        self.stride = stride
        self.config = dict(config)  # plain create_student kwargs: what a checkpoint needs to rebuild it
        self.dropped = tuple(dropped)  # submodules of `net` that drop_unused_modules replaced
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self.register_load_state_dict_pre_hook(_skip_dropped_weights)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
        x = (x - self.mean) / self.std
        # No shape-dependent Python branches: an ONNX trace then stays right at every input size.
        # Replicate padding works for any size (reflect needs pad < size); a zero pad and a
        # same-size bilinear resize (align_corners=False) are exact identities.
        h, w = x.shape[-2:]
        pad_h, pad_w = -h % self.stride, -w % self.stride
        x = F.pad(x, (0, pad_w, 0, pad_h), mode="replicate")
        logits = F.interpolate(self.net(x), size=x.shape[-2:], mode="bilinear", align_corners=False)
        return logits[..., :h, :w]


def _under(name: str, modules: Sequence[str]) -> bool:
    """Whether the parameter/module `name` lies inside one of `modules` (dotted names)."""
    return name.startswith(tuple(f"{module}." for module in modules))


def _skip_dropped_weights(student: Student, state_dict: dict[str, Any], prefix: str, *_: Any) -> None:
    """Checkpoints written before unused stages were dropped still load: their weights are left out."""
    dropped = [f"{prefix}net.{name}" for name in student.dropped]
    for key in [k for k in state_dict if _under(k, dropped)]:
        del state_dict[key]


class _Dropped(nn.Module):
    """Parameter-free stand-in for a submodule whose output never reaches the logits: passes its input on."""

    def forward(self, x: Any, *args: Any, **kwargs: Any) -> Any:
        return x


def drop_unused_modules(net: nn.Module, size: int) -> tuple[str, ...]:
    """Replace every submodule of `net` whose parameters get no gradient from its output; return their names.

    One forward of a `size` x `size` image (a multiple of the stride) finds them. The replacement is
    checked to give bit-identical logits. Parameters left unused outside such submodules are warned about.
    """
    was_training = net.training
    net.eval()  # no dropout, no drop-path, BatchNorm statistics untouched
    image = torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(0))  # global RNG untouched
    params = dict(net.named_parameters())
    with torch.enable_grad():  # also when the caller builds the student under torch.no_grad()
        logits = net(image)
        grads = torch.autograd.grad(logits.sum(), list(params.values()), allow_unused=True)
    unused = {name for name, grad in zip(params, grads, strict=True) if grad is None}
    dropped: list[str] = []
    for name, module in net.named_modules():  # parents before children: keep the outermost
        owned = [f"{name}.{n}" for n, _ in module.named_parameters()]
        if name and owned and unused.issuperset(owned) and not _under(name, dropped):
            dropped.append(name)
    for name in dropped:
        parent, _, child = name.rpartition(".")
        setattr(net.get_submodule(parent), child, _Dropped())
    with torch.no_grad():
        if dropped and not torch.equal(net(image), logits.detach()):
            raise RuntimeError(f"dropping the unused submodules {dropped} changed the logits")
    left = sorted(n for n in unused if not _under(n, dropped))
    if left:
        warnings.warn(
            f"{len(left)} parameters get no gradient, e.g. {left[:3]}; DDP then needs "
            "--trainer.strategy=ddp_find_unused_parameters_true",
            stacklevel=3,
        )
    net.train(was_training)
    return tuple(dropped)


def register_student(name: str) -> Callable:
    """Decorator: `factory(encoder, **kwargs) -> (network, stride)` becomes `create_student(name, ...)`."""

    return _REGISTRY.register(name)


def list_students() -> list[str]:
    return sorted(_REGISTRY)


def create_student(
    name: str = "unet", encoder: str = "resnet34", encoder_weights: str | None = None, **kwargs: Any
) -> Student:
    """Build a student; `encoder_weights` is None or a local .pth/.pt/.safetensors file (machines are offline)."""
    if name not in _REGISTRY:
        raise ConfigError(f"model.student.name={name!r} is not a student; choose from {list_students()}")
    try:
        net, stride = _REGISTRY[name](encoder, **kwargs)
    except (KeyError, ValueError, TypeError) as err:
        raise ConfigError(
            f"model.student: cannot build {name!r} with encoder={encoder!r}, extra={kwargs}: {err}"
        ) from err
    dropped = drop_unused_modules(net, size=stride * max(2, -(-64 // stride)))
    if encoder_weights is not None:
        load_encoder_weights(net, encoder_weights, dropped)
    config = {"name": name, "encoder": encoder, "encoder_weights": encoder_weights, **kwargs}
    return Student(net, stride, config, dropped)


def check_smp_options(model_class: type, encoder: str, options: dict[str, Any]) -> None:
    """ConfigError for `model.student.extra` keys the smp model does not take. smp passes unknown
    keys on to the encoder, but only timm (`tu-`) encoders read them (timm refuses what it does not
    know); for the others smp drops them silently, so a misspelt key would build the default model."""
    if encoder.startswith("tu-"):
        return
    parameters = inspect.signature(model_class.__init__).parameters
    known = [name for name, p in parameters.items() if p.kind is p.POSITIONAL_OR_KEYWORD and name != "self"]
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise ConfigError(
            f"model.student.extra: {unknown} is not an option of smp's {model_class.__name__} with encoder "
            f"{encoder!r}; it takes {sorted(set(known) - {'encoder_name', 'encoder_weights', 'classes'})}"
        )


def _smp_factory(arch: str) -> Callable[..., tuple[nn.Module, int]]:
    def factory(encoder: str, **kwargs: Any) -> tuple[nn.Module, int]:
        import segmentation_models_pytorch as smp

        model_class = getattr(smp, arch)
        check_smp_options(model_class, encoder, kwargs)
        kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in kwargs.items()}
        net = model_class(encoder_name=encoder, encoder_weights=None, classes=1, **kwargs)
        return net, net.encoder.output_stride

    return factory


register_student("unet")(_smp_factory("Unet"))
register_student("unetpp")(_smp_factory("UnetPlusPlus"))


@register_student("segformer")
def _smp_segformer(encoder: str = "mit_b0", **kwargs: Any) -> tuple[nn.Module, int]:
    if not encoder.startswith("mit_b"):
        raise ValueError("smp's Segformer student takes a Mix Transformer encoder, mit_b0 .. mit_b5")
    return _smp_factory("Segformer")(encoder, **kwargs)


# transformers' published SegFormer sizes (hidden sizes, depths, decoder width).
_HF_SEGFORMER_VARIANTS = {
    "b0": ([32, 64, 160, 256], [2, 2, 2, 2], 256),
    "b1": ([64, 128, 320, 512], [2, 2, 2, 2], 256),
    "b2": ([64, 128, 320, 512], [3, 4, 6, 3], 768),
}


class _HFSegformer(nn.Module):
    """transformers' SegformerForSemanticSegmentation returning a plain tensor of 1/4-resolution logits."""

    def __init__(self, variant: str, **config_overrides: Any):
        super().__init__()
        from transformers import SegformerConfig, SegformerForSemanticSegmentation

        hidden, depths, decoder = _HF_SEGFORMER_VARIANTS[variant]
        config = SegformerConfig(
            num_labels=1, hidden_sizes=hidden, depths=depths, decoder_hidden_size=decoder, **config_overrides
        )
        self.model = SegformerForSemanticSegmentation(config)
        self.encoder = self.model.segformer  # what a local weights file is loaded into

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=x).logits


@register_student("hf_segformer")
def _hf_segformer(encoder: str = "b0", **config_overrides: Any) -> tuple[nn.Module, int]:
    variant = encoder.removeprefix("mit_")
    if variant not in _HF_SEGFORMER_VARIANTS:
        raise ValueError(f"hf_segformer encoder must be one of {sorted(_HF_SEGFORMER_VARIANTS)}")
    return _HFSegformer(variant, **config_overrides), 32


def load_encoder_weights(net: nn.Module, path: str | Path, dropped: tuple[str, ...] = ()) -> None:
    """Load a local weights file into the network's encoder; missing keys are an error, extras a warning.

    The file may hold a bare encoder state dict or a full model's (keys prefixed `encoder.`, `model.`,
    `segformer.`, `state_dict`): the prefix that matches the encoder best is stripped. Weights of the
    `dropped` submodules of `net` (stages beyond encoder_depth) are skipped without a warning.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(
            f"model.student.encoder_weights={str(path)!r}: no such file (give a local .pth/.safetensors)"
        )
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
        state = state.get("state_dict", state) if isinstance(state, dict) else state
    targets = {"encoder.": net.encoder}
    if hasattr(net.encoder, "model"):
        targets["encoder.model."] = net.encoder.model
    best = None
    for target_name, target in targets.items():
        wanted = set(target.state_dict())
        for prefix in ("", "encoder.", "model.", "segformer.", "backbone.", "module."):
            stripped = {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)}
            overlap = len(wanted & set(stripped))
            if best is None or overlap > best[0]:
                best = (overlap, target_name, target, stripped)
    overlap, target_name, target, stripped = best
    if overlap == 0:
        raise ConfigError(
            f"{path}: none of its {len(state)} keys match the encoder; is it the right architecture?"
        )
    result = nn.Module.load_state_dict(target, stripped, strict=False)  # smp encoders override it
    if result.missing_keys:
        raise ConfigError(
            f"{path}: {len(result.missing_keys)} encoder weights are missing from the file, "
            f"e.g. {result.missing_keys[:5]} (wrong encoder for this file?)"
        )
    skipped = [d.removeprefix(target_name) for d in dropped if d.startswith(target_name)]
    unexpected = [k for k in result.unexpected_keys if not _under(k, skipped)]
    if unexpected:
        warnings.warn(
            f"{path}: ignored {len(unexpected)} keys not in the encoder, e.g. {unexpected[:5]}",
            stacklevel=2,
        )


def count_parameters(module: nn.Module) -> int:
    """Parameters of `module`; for a Student, all of them take part in the forward pass (see above)."""
    return sum(p.numel() for p in module.parameters())


def chosen_threshold(info: dict[str, Any], views: Sequence[str] = ()) -> float | None:
    """The threshold `fit` chose on validation for a checkpoint's student alone, or averaged over `views`.

    `info` is `load_student`'s. When the run chose none over these views (its model.test_views differ),
    this warns and gives the plain student's: `python -m distill.evaluate --views ... --split val`
    measures the right one.
    """
    if not views:
        return info.get("chosen_threshold")
    if same_views(views, info.get("test_views") or ()) and info.get("views_threshold") is not None:
        return info["views_threshold"]
    warnings.warn(
        f"the run chose no threshold over the views {list(views)} (its model.test_views: "
        f"{info.get('test_views') or 'none'}); using the student's own, {info.get('chosen_threshold')}",
        stacklevel=2,
    )
    return info.get("chosen_threshold")


def load_student(
    ckpt_path: str | Path, map_location: str | torch.device = "cpu"
) -> tuple[Student, dict[str, Any]]:
    """Rebuild a trained student from a `distill.fit` checkpoint (weights_only: no pickled code runs)."""
    ckpt_path = Path(ckpt_path)
    if not ckpt_path.is_file():
        raise ConfigError(f"{ckpt_path}: no such checkpoint")
    try:
        checkpoint = torch.load(ckpt_path, map_location=map_location, weights_only=True)
    except (pickle.UnpicklingError, EOFError, RuntimeError, OSError) as err:
        raise ConfigError(
            f"{ckpt_path}: not a PyTorch checkpoint (torch.load: {type(err).__name__}); "
            "give a checkpoint written by `python -m distill.fit`"
        ) from err
    info = checkpoint.get("distill") if isinstance(checkpoint, dict) else None
    state = checkpoint.get("state_dict") if isinstance(checkpoint, dict) else None
    if info is None and isinstance(state, dict) and any(str(k).startswith("student.") for k in state):
        raise ConfigError(
            f"{ckpt_path}: student weights without checkpoint['distill'] (the student's config and "
            "thresholds), so written by an older vessel-distill or by other code: evaluate it with what wrote "
            "it, or train the student again with this version (`python -m distill.fit`)"
        )
    if not isinstance(info, dict) or "student" not in info:
        raise ConfigError(
            f"{ckpt_path}: not a vessel-distill student checkpoint (no checkpoint['distill']); "
            "give a checkpoint written by `python -m distill.fit`"
        )
    if info.get("format_version") != CHECKPOINT_FORMAT_VERSION:
        raise ConfigError(
            f"{ckpt_path}: checkpoint format {info.get('format_version')}, this version reads "
            f"{CHECKPOINT_FORMAT_VERSION}: it was written by another vessel-distill version; evaluate it with "
            "that version, or train the student again with this one (`python -m distill.fit`)"
        )
    student = create_student(**{**info["student"], "encoder_weights": None})
    weights = {
        k.removeprefix("student."): v for k, v in checkpoint["state_dict"].items() if k.startswith("student.")
    }
    student.load_state_dict(weights)
    return student.eval(), {**info, "params": count_parameters(student)}
