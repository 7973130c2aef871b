"""Place one Sa2VA model over a group of GPUs (the users' 24 GB problem).

Plain `device_map="auto"` breaks Sa2VA: its SAM2 code calls `.cuda()` itself, i.e. the *current*
CUDA device, and accelerate's hooks only wrap `forward`. So, as Sa2VA's own `demo.py::split_model`
does, everything that is not an LLM decoder layer (vision encoder, projector, SAM2, the [SEG]
projection, embeddings, final norm, output head) plus the last LLM layer sits on the group's first
GPU, which must be the current device; the other layers are spread in order over the group, the
first GPU counting as a fraction of one. Everything here is pure (sizes in, map out) and testable
without GPUs; `empty_module_sizes` measures the sizes from a model built with empty weights.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable

import torch
from torch import nn

from distill.errors import ConfigError

GiB = 1024**3
# Room left free above the weights for activations and the CUDA context. The users measured Sa2VA-8B
# needing ~23.5 GB on one GPU with 16.6 GB of bf16 weights: ~7 GB goes to SAM2 at 1024x1024, eager
# attention over up to 3328 image tokens and the hidden states `generate` keeps, most of it on the
# first GPU (SAM2, vision, embeddings). Conservative on purpose: an OOM mid-run is the users' pain;
# the GPU benchmark reports real peaks to tune it (`first_gpu_reserve` option).
DEFAULT_FIRST_GPU_RESERVE = 7 * GiB
DEFAULT_OTHER_GPU_RESERVE = 1 * GiB

_LAYER = re.compile(r"^(language_model\.model\.layers\.(\d+))(\.|$)")
# Parts kept whole; a parameter's part is the longest of these prefixes, else its top-level child.
_LLM_PARTS = (
    "language_model.model.tok_embeddings",
    "language_model.model.embed_tokens",
    "language_model.model.norm",
    "language_model.model.rotary_emb",
    "language_model.output",
    "language_model.lm_head",
)
_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30}
_QUANT_BYTES_PER_BF16_BYTE = {"none": 1.0, "8bit": 0.5 * 1.02, "4bit": 0.25 * 1.1}


def parse_memory(value: str | int) -> int:
    """'22GiB' / '22GB' / '22000MB' / '22 gib' / 23622320128 -> bytes."""
    if isinstance(value, int):
        return value
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(value))
    if not match or match.group(2).lower() not in _UNITS:
        raise ConfigError(f"--max-memory {value!r}: expected a size like '22GiB', '22GB' or '22000MB'")
    return int(float(match.group(1)) * _UNITS[match.group(2).lower()])


def part_of(name: str) -> str:
    """The device-map key a parameter/buffer belongs to: one LLM layer, an LLM end part, or a child."""
    layer = _LAYER.match(name)
    if layer:
        return layer.group(1)
    for part in _LLM_PARTS:
        if name == part or name.startswith(part + "."):
            return part
    return name.split(".", 1)[0]


def group_sizes(named_bytes: Iterable[tuple[str, int]]) -> dict[str, int]:
    """Sum (parameter name, bytes) pairs into device-map parts, in first-seen order."""
    sizes: dict[str, int] = {}
    for name, nbytes in named_bytes:
        key = part_of(name)
        sizes[key] = sizes.get(key, 0) + nbytes
    return sizes


def module_sizes(model: nn.Module, dtype: torch.dtype = torch.bfloat16) -> dict[str, int]:
    """Bytes per device-map part once floating tensors are cast to `dtype` (works on meta models)."""

    def nbytes(t: torch.Tensor) -> int:
        size = torch.empty((), dtype=dtype).element_size() if t.is_floating_point() else t.element_size()
        return t.numel() * size

    tensors = list(model.named_parameters()) + list(model.named_buffers())
    return group_sizes((name, nbytes(t)) for name, t in tensors)


def empty_module_sizes(build: Callable[[], nn.Module], dtype: torch.dtype = torch.bfloat16) -> dict[str, int]:
    """Call `build()` (e.g. `lambda: ModelClass(config)`) with empty weights and measure the result.

    accelerate's `init_empty_weights` puts parameters on the meta device as they are registered and lets
    every other tensor be real, so constructors that compute with tensors (InternViT's and SAM2's
    drop-path schedules call `.item()` on a `torch.linspace`) run as they do when loading. Building under
    `torch.device("meta")` instead fails there ("Tensor.item() cannot be called on meta tensors").
    No weight is allocated or read: an 8B model is measured in seconds.

    Raises ConfigError when accelerate is missing (it is in the `sa2va` extra).
    """
    try:
        from accelerate import init_empty_weights
    except ImportError as err:
        raise ConfigError(
            "placing Sa2VA on GPUs needs accelerate: pip install -e '.[sa2va]' (or pip install accelerate)"
        ) from err
    with init_empty_weights():
        model = build()
    return module_sizes(model, dtype)


def quantized_sizes(sizes: dict[str, int], quantize: str) -> dict[str, int]:
    """Estimated sizes after bitsandbytes quantization of the LLM decoder layers.

    Embeddings, output head, vision encoder, projector and SAM2 stay in bf16 (`llm_int8_skip_modules`
    and transformers' own rule keep the output head unquantized); the layers' linear weights shrink
    to 1 byte (8bit) or ~0.5 byte + block scales (4bit NF4) per parameter.
    """
    if quantize not in _QUANT_BYTES_PER_BF16_BYTE:
        raise ConfigError(f"--quantize {quantize!r}: choose none, 8bit or 4bit")
    factor = _QUANT_BYTES_PER_BF16_BYTE[quantize]
    return {k: int(v * factor) if _LAYER.match(k) else v for k, v in sizes.items()}


def _layer_counts(n_layers: int, weights: list[float], max_counts: list[int]) -> list[int] | None:
    """Split n layers over GPUs in proportion to `weights`, never above `max_counts` (None: cannot)."""
    counts = [0] * len(weights)
    open_ = [i for i, w in enumerate(weights) if w > 0 and max_counts[i] > 0]
    remaining = n_layers
    while open_:  # water-filling: GPUs whose share exceeds their room are capped, the rest re-split
        total = sum(weights[i] for i in open_)
        ideal = {i: remaining * weights[i] / total for i in open_}
        capped = [i for i in open_ if ideal[i] > max_counts[i]]
        if not capped:
            break
        for i in capped:
            counts[i] = max_counts[i]
            remaining -= max_counts[i]
            open_.remove(i)
    if not open_:
        return counts if remaining == 0 else None
    floors = {i: math.floor(ideal[i]) for i in open_}
    for i in open_:
        counts[i] = floors[i]
    left = remaining - sum(floors.values())
    # Largest remainders first; ties go to the later GPUs (the first one carries everything else).
    for i in sorted(open_, key=lambda i: (ideal[i] - floors[i], i), reverse=True):
        if left == 0:
            break
        if counts[i] < max_counts[i]:
            counts[i] += 1
            left -= 1
    return counts if left == 0 else None


def build_device_map(
    module_sizes: dict[str, int],
    devices: list[int],
    max_memory: dict[int, int] | None = None,
    first_gpu_share: float = 0.5,
    first_gpu_reserve: int = DEFAULT_FIRST_GPU_RESERVE,
    other_gpu_reserve: int = DEFAULT_OTHER_GPU_RESERVE,
) -> dict[str, int]:
    """Part name -> CUDA index for one model over `devices` (devices[0] = the current device).

    `module_sizes` maps parts (see `part_of`) to bytes. The LLM layers other than the last are split
    in order (contiguous ranges) with devices[0] weighted `first_gpu_share`, the others 1, capped by
    `max_memory[d]` minus a reserve for activations (`first_gpu_reserve` / `other_gpu_reserve`).
    Without `max_memory` there is no cap (and no reserve). Raises ConfigError when it cannot fit.
    """
    if not devices:
        raise ConfigError("devices: need at least one CUDA device index for a device map")
    if len(set(devices)) != len(devices):
        raise ConfigError(f"devices {devices}: each GPU may appear only once")
    layers = sorted((k for k in module_sizes if _LAYER.match(k)), key=lambda k: int(_LAYER.match(k).group(2)))
    if not layers:
        raise ConfigError("module sizes name no 'language_model.model.layers.N': is this a Sa2VA model?")
    first = devices[0]
    pinned = [k for k in module_sizes if k not in layers] + [layers[-1]]
    spread = layers[:-1]
    device_map = {k: first for k in pinned}
    used = {d: 0 for d in devices}
    used[first] = sum(module_sizes[k] for k in pinned)

    if max_memory is None:
        room = {d: math.inf for d in devices}
    else:
        missing = [d for d in devices if d not in max_memory]
        if missing:
            raise ConfigError(f"max_memory has no cap for GPU(s) {missing}")
        room = {
            d: max_memory[d] - (first_gpu_reserve if d == first else other_gpu_reserve) - used[d]
            for d in devices
        }
    layer_bytes = max((module_sizes[k] for k in spread), default=0)
    max_counts = [
        len(spread) if room[d] == math.inf or layer_bytes == 0 else max(0, int(room[d] // layer_bytes))
        for d in devices
    ]
    weights = [first_gpu_share if d == first else 1.0 for d in devices]
    counts = _layer_counts(len(spread), weights, max_counts) if room[first] >= 0 else None
    if counts is None:
        _raise_does_not_fit(module_sizes, devices, max_memory, first_gpu_reserve, other_gpu_reserve, pinned)

    start = 0
    for d, count in zip(devices, counts, strict=True):
        for k in spread[start : start + count]:
            device_map[k] = d
            used[d] += module_sizes[k]
        start += count
    for d in devices:  # exact check with the real sizes (layers of equal size make this a formality)
        if (
            max_memory is not None
            and used[d] + (first_gpu_reserve if d == first else other_gpu_reserve) > max_memory[d]
        ):
            _raise_does_not_fit(
                module_sizes, devices, max_memory, first_gpu_reserve, other_gpu_reserve, pinned
            )
    return device_map


def _raise_does_not_fit(sizes, devices, max_memory, first_reserve, other_reserve, pinned) -> None:
    total = sum(sizes.values())
    reserve = first_reserve + other_reserve * (len(devices) - 1)
    available = sum(max_memory[d] for d in devices)
    pinned_bytes = sum(sizes[k] for k in pinned)
    caps = ", ".join(f"cuda:{d} {max_memory[d] / GiB:.1f} GiB" for d in devices)
    raise ConfigError(
        f"the model does not fit on {len(devices)} GPU(s) ({caps}): it needs {total / GiB:.1f} GiB of weights "
        f"plus {reserve / GiB:.1f} GiB reserved for activations = {(total + reserve) / GiB:.1f} GiB, "
        f"{available / GiB:.1f} GiB available; the parts that must share the first GPU alone take "
        f"{pinned_bytes / GiB:.1f} GiB + {first_reserve / GiB:.1f} GiB reserve. Use more GPUs per model "
        "(--gpus-per-model), --quantize 4bit (or 8bit), or a higher --max-memory."
    )


def device_summary(device_map: dict[str, int], sizes: dict[str, int]) -> dict[int, dict]:
    """Per GPU: bytes of weights placed and the LLM layer indices it holds (for logs and reports)."""
    summary: dict[int, dict] = {}
    for k, d in device_map.items():
        entry = summary.setdefault(d, {"bytes": 0, "layers": []})
        entry["bytes"] += sizes.get(k, 0)
        layer = _LAYER.match(k)
        if layer:
            entry["layers"].append(int(layer.group(2)))
    for entry in summary.values():
        entry["layers"].sort()
    return summary
