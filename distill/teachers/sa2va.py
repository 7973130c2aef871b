"""Sa2VA as a teacher: soft logits from before its only threshold, checked against its own masks.

Sa2VA's `predict_forward` returns binary masks. The logits live one step earlier: its SAM2 wrapper's
`language_embd_inference` returns float32 `[T, 1, 1024, 1024]` logits per generated `[SEG]`, which
`predict_forward` resizes bilinearly (align_corners=False) to the image size, takes channel 0 of
and thresholds at `sigmoid > 0.5`. We wrap that method on the *instance* (it is not a `forward`, so
hooks would not fire), keep a copy of its output, resize it the same way and check that our
threshold reproduces Sa2VA's masks. The facts relied on: docs/DESIGN.md, "Sa2VA".

Options (all keywords of `create_teacher("sa2va", ...)`):
- model_path: local Sa2VA checkpoint directory (config.json with auto_map + remote code). Hub ids
  are refused: what runs must be what is on disk.
- trust_remote_code (False): must be True (`--trust-remote-code`); Sa2VA's model is Python code
  shipped inside the checkpoint, and loading it executes that code.
- prompt ("<image>Please segment the blood vessels in this image."): must contain "<image>".
- use_dataset_text (False): use each image's dataset text as "<image>Please segment {text} in this image.".
- dtype ("bfloat16"): weight dtype (checkpoints are fp32 on disk; bf16 halves memory).
- devices (None): CUDA indices of this worker's GPU group, first = current device holding SAM2,
  vision, projector, embeddings, head; None/[] = CPU, which only the stand-in supports (the real
  `predict_forward` calls `.cuda()`).
- max_memory (None): per-GPU cap like "22GiB"; None = each GPU's total memory.
- quantize ("none"): "8bit" / "4bit" LLM weights via bitsandbytes; SAM2, vision and projectors stay bf16.
- max_dynamic_patch (None): Sa2VA's LLM tile limit (1-12 tiles of 448², 256 tokens each); None keeps 12.
- self_check_tolerance (0.001): largest fraction of pixels where `sigmoid(logits) > 0.5` may differ
  from Sa2VA's mask before the run stops.
- first_gpu_reserve ("7GiB"): memory left free on the first GPU for activations (SAM2 at 1024²,
  attention over image tokens, generate's hidden states) when planning the device map.
"""

from __future__ import annotations

import hashlib
import importlib.util
import inspect
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from distill.errors import ConfigError, DistillError
from distill.teachers.base import Teacher, register_teacher
from distill.teachers.device_map import (
    DEFAULT_FIRST_GPU_RESERVE,
    build_device_map,
    device_summary,
    meta_module_sizes,
    parse_memory,
    quantized_sizes,
)

ADAPTER_VERSION = "1"
DEFAULT_PROMPT = "<image>Please segment the blood vessels in this image."
DATASET_PROMPT_TEMPLATE = "<image>Please segment {text} in this image."
SA2VA_TRANSFORMERS_PINS = "4.57 (Sa2VA 'latest', with peft 0.17) or 4.49 (Sa2VA 'legacy', with peft 0.11)"
QUANT_SKIP_MODULES = ["grounding_encoder", "text_hidden_fcs", "vision_model", "mlp1"]
_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
_SAMPLES_PER_FILE, _SAMPLE_BYTES = 16, 64 * 1024


# ---------------------------------------------------------------- pure helpers (tested without a model)


def quantization_kwargs(quantize: str, dtype: torch.dtype = torch.bfloat16) -> dict[str, Any]:
    """Keyword arguments of transformers' BitsAndBytesConfig for `quantize` ({} for "none").

    SAM2, the [SEG] projection, the vision encoder and its projector stay unquantized: SA2VA.md
    records that 4-bit works only that way.
    """
    if quantize == "none":
        return {}
    if quantize == "8bit":
        return {"load_in_8bit": True, "llm_int8_skip_modules": list(QUANT_SKIP_MODULES)}
    if quantize == "4bit":
        return {
            "load_in_4bit": True,
            "bnb_4bit_quant_type": "nf4",
            "bnb_4bit_compute_dtype": dtype,
            "bnb_4bit_use_double_quant": True,
            "llm_int8_skip_modules": list(QUANT_SKIP_MODULES),
        }
    raise ConfigError(f"--quantize {quantize!r}: choose none, 8bit or 4bit")


def build_prompt(prompt: str, use_dataset_text: bool, text: str | None) -> str:
    """The text given to `predict_forward` for one image; always contains "<image>"."""
    if use_dataset_text:
        if not text or not text.strip():
            raise ConfigError(
                "use_dataset_text: an image has no dataset text; give the dataset texts or set a --prompt instead"
            )
        text = text.strip()
        return text if "<image>" in text else DATASET_PROMPT_TEMPLATE.format(text=text)
    return prompt


def logits_at_image_size(pred_masks: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """[T, 1, h, w] SAM2 logits -> [T, H, W], resized exactly as Sa2VA's predict_forward does."""
    return F.interpolate(pred_masks, size=(height, width), mode="bilinear", align_corners=False)[:, 0]


def mask_mismatch(logits: torch.Tensor, masks: np.ndarray) -> int:
    """Pixels where Sa2VA's own threshold applied to our logits differs from its returned mask."""
    ours = (logits.sigmoid() > 0.5).cpu().numpy()
    if ours.shape != masks.shape:
        raise DistillError(f"self-check: captured logits {ours.shape} vs Sa2VA mask {masks.shape}")
    return int(np.count_nonzero(ours != masks.astype(bool)))


def model_dir_identity(path: Path) -> dict[str, Any]:
    """Cheap identity of a checkpoint directory: config hash plus a sampled hash of every weight file.

    Reading ~1 MiB per weight file (names, sizes, and 16 evenly spaced 64 KiB samples) tells apart two
    fine-tunes of the same architecture, whose file sizes are equal, without hashing 16+ GB. File
    times are left out so copies on other nodes fingerprint the same.
    """
    weights = hashlib.sha256()
    files = sorted(p for p in path.iterdir() if p.is_file() and p.name.endswith(_WEIGHT_SUFFIXES))
    for file in files:
        size = file.stat().st_size
        weights.update(f"{file.name}:{size}\n".encode())
        with open(file, "rb") as handle:
            for i in range(_SAMPLES_PER_FILE):
                handle.seek(max(0, size - _SAMPLE_BYTES) * i // max(1, _SAMPLES_PER_FILE - 1))
                weights.update(handle.read(_SAMPLE_BYTES))
    code = hashlib.sha256(b"".join(p.read_bytes() for p in sorted(path.glob("*.py"))))
    return {
        "path": str(path),
        "config_sha256": hashlib.sha256((path / "config.json").read_bytes()).hexdigest(),
        "code_sha256": code.hexdigest(),
        "weight_files": len(files),
        "weights_sampled_sha256": weights.hexdigest(),
    }


@contextmanager
def flash_attn_optional() -> Iterator[None]:
    """Let transformers import Sa2VA's remote code on machines without flash-attn.

    Its files import `flash_attn` where transformers' import check sees it, though the model falls
    back to eager attention when `use_flash_attn=False`. The known workaround drops it from
    `get_imports`; scoped here and restored afterwards.
    """
    import transformers.dynamic_module_utils as dynamic

    original = dynamic.get_imports

    def get_imports(filename):
        return [name for name in original(filename) if name != "flash_attn"]

    dynamic.get_imports = get_imports
    try:
        yield
    finally:
        dynamic.get_imports = original


@contextmanager
def post_init_shim(model_class: type) -> Iterator[None]:
    """transformers 5 needs `post_init()` at the end of `__init__`; Sa2VA's shipped class never calls it."""
    original = model_class.__init__

    def __init__(self, *args, **kwargs):
        original(self, *args, **kwargs)
        self.post_init()

    model_class.__init__ = __init__
    try:
        yield
    finally:
        model_class.__init__ = original


# ---------------------------------------------------------------- the teacher


@register_teacher("sa2va")
class Sa2VATeacher(Teacher):
    """A local Sa2VA checkpoint driven through its own `predict_forward`, one image per call."""

    name = "sa2va"

    def __init__(
        self,
        model_path: str | Path,
        trust_remote_code: bool = False,
        prompt: str = DEFAULT_PROMPT,
        use_dataset_text: bool = False,
        dtype: str = "bfloat16",
        devices: Sequence[int] | None = None,
        max_memory: str | int | None = None,
        quantize: str = "none",
        max_dynamic_patch: int | None = None,
        self_check_tolerance: float = 0.001,
        first_gpu_reserve: str | int = DEFAULT_FIRST_GPU_RESERVE,
    ):
        self.model_path = _local_checkpoint(model_path)
        if not trust_remote_code:
            raise DistillError(
                f"{self.model_path}: Sa2VA's model is Python code shipped inside the checkpoint (config.json "
                "auto_map -> modeling_*.py), so loading it runs that code. Read the .py files, then opt in with "
                "--trust-remote-code (trust_remote_code: true in the teacher config)."
            )
        if "<image>" not in prompt:
            raise ConfigError(
                f"--prompt {prompt!r}: Sa2VA needs '<image>' in the prompt, e.g. {DEFAULT_PROMPT!r}"
            )
        if dtype not in _DTYPES:
            raise ConfigError(f"--dtype {dtype!r}: choose one of {sorted(_DTYPES)}")
        if max_dynamic_patch is not None and not 1 <= int(max_dynamic_patch) <= 12:
            raise ConfigError(f"--max-dynamic-patch {max_dynamic_patch}: Sa2VA takes 1 to 12 tiles")
        if not 0.0 <= self_check_tolerance < 1.0:
            raise ConfigError(f"--self-check-tolerance {self_check_tolerance}: a fraction in [0, 1)")
        quantization_kwargs(quantize)  # validates the name
        self.prompt = prompt
        self.use_dataset_text = use_dataset_text
        self.dtype_name = dtype
        self.devices = [int(d) for d in devices or []]
        self.max_memory = max_memory
        self.quantize = quantize
        self.max_dynamic_patch = None if max_dynamic_patch is None else int(max_dynamic_patch)
        self.self_check_tolerance = float(self_check_tolerance)
        self.first_gpu_reserve = parse_memory(first_gpu_reserve)
        self._identity = model_dir_identity(self.model_path)
        self._captured: list[torch.Tensor] = []
        self._stats = {"images": 0, "no_mask": 0, "multi_seg": 0, "pixels_checked": 0, "pixels_mismatched": 0}
        self._worst_mismatch = 0.0
        self._load()

    # -- loading

    def _load(self) -> None:
        import transformers
        from transformers import AutoConfig, AutoModel, AutoTokenizer
        from transformers.dynamic_module_utils import get_class_from_dynamic_module

        self.transformers_version = transformers.__version__
        self.used_post_init_shim = False
        self.device_map: dict[str, int] | None = None
        self._module_sizes: dict[str, int] = {}
        dtype = _DTYPES[self.dtype_name]
        start = time.perf_counter()
        if self.devices:
            if not torch.cuda.is_available():
                raise ConfigError(
                    f"devices {self.devices}: no CUDA device visible; use devices=[] only for CPU stand-ins"
                )
            torch.cuda.set_device(self.devices[0])  # SAM2's .cuda() calls land on the group's first GPU
        path = str(self.model_path)
        with flash_attn_optional():
            try:
                config = AutoConfig.from_pretrained(path, trust_remote_code=True)
                model_ref = (getattr(config, "auto_map", None) or {}).get("AutoModel")
                if not model_ref:
                    raise DistillError(
                        f"{path}/config.json: no auto_map.AutoModel; is this a Sa2VA checkpoint?"
                    )
                model_class = get_class_from_dynamic_module(model_ref, path)
                kwargs = self._load_kwargs(model_class, config, dtype)
                try:
                    model = AutoModel.from_pretrained(path, **kwargs)
                except AttributeError as err:
                    if "all_tied_weights_keys" not in str(err):
                        raise
                    with post_init_shim(model_class):
                        model = model_class.from_pretrained(path, **kwargs)
                    self.used_post_init_shim = True
                tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=True, use_fast=False)
            except DistillError:
                raise
            except Exception as err:
                raise DistillError(self._load_failure(err)) from err
        if self.devices and self.device_map is None:
            model.to(f"cuda:{self.devices[0]}")
        model.eval()
        self.model, self.tokenizer = model, tokenizer
        self._prepare_generation()
        self._install_capture()
        self.load_seconds = time.perf_counter() - start

    def _load_kwargs(self, model_class: type, config, dtype: torch.dtype) -> dict[str, Any]:
        major = int(self.transformers_version.split(".")[0])
        kwargs: dict[str, Any] = {
            ("dtype" if major >= 5 else "torch_dtype"): dtype,
            "low_cpu_mem_usage": True,
            "use_flash_attn": False,
            "trust_remote_code": True,
        }
        if self.quantize != "none":
            if importlib.util.find_spec("bitsandbytes") is None:
                raise ConfigError(
                    f"--quantize {self.quantize} needs bitsandbytes: `pip install bitsandbytes` (or --quantize none)"
                )
            if not self.devices:
                raise ConfigError(f"--quantize {self.quantize}: bitsandbytes needs GPUs (devices)")
            from transformers import BitsAndBytesConfig

            kwargs["quantization_config"] = BitsAndBytesConfig(**quantization_kwargs(self.quantize, dtype))
        if not self.devices:
            return kwargs
        sizes = meta_module_sizes(lambda: model_class(config, use_flash_attn=False), dtype)
        self._module_sizes = quantized_sizes(sizes, self.quantize)
        if self.max_memory is not None:
            caps = {d: parse_memory(self.max_memory) for d in self.devices}
        else:
            caps = {d: torch.cuda.get_device_properties(d).total_memory for d in self.devices}
        device_map = build_device_map(
            self._module_sizes, self.devices, caps, first_gpu_reserve=self.first_gpu_reserve
        )
        if importlib.util.find_spec("accelerate") is None:
            if len(self.devices) > 1 or self.quantize != "none":
                raise ConfigError(
                    f"devices {self.devices} / --quantize {self.quantize}: placing Sa2VA over several GPUs or "
                    "quantizing needs accelerate: `pip install accelerate`"
                )
            return kwargs  # one GPU: load on CPU, then move the whole model (checked to fit above)
        self.device_map = device_map
        kwargs["device_map"] = device_map
        return kwargs

    def _load_failure(self, err: Exception) -> str:
        message = f"{self.model_path}: loading Sa2VA failed under transformers {self.transformers_version}: {err!r}."
        text = str(err)
        if "has no attribute 'generate'" in text or "GenerationMixin" in text:
            message += (
                " This checkpoint's code predates transformers 4.50 (its LLM class no longer inherits generate());"
                " take the current .py files from Sa2VA's repository or install a pinned transformers."
            )
        return message + f" Sa2VA's code is pinned to transformers {SA2VA_TRANSFORMERS_PINS}."

    def _prepare_generation(self) -> None:
        """Run Sa2VA's one-time setup now, so that `max_dynamic_patch` set afterwards sticks."""
        model = self.model
        if hasattr(model, "preparing_for_generation") and not getattr(model, "init_prediction_config", False):
            try:
                model.preparing_for_generation(tokenizer=self.tokenizer)
            except ValueError as err:
                hint = " (older Sa2VA code calls self.to(dtype), which fails with 4/8-bit models: update its .py files)"
                raise DistillError(
                    f"{self.model_path}: preparing_for_generation failed: {err}{hint}"
                ) from err
        if self.max_dynamic_patch is not None:
            model.max_dynamic_patch = self.max_dynamic_patch
        self._predict_kwargs = {}
        if "prediction_only" in inspect.signature(model.predict_forward).parameters:
            self._predict_kwargs["prediction_only"] = False  # some versions return no masks by default

    def _install_capture(self) -> None:
        encoder = self.model.grounding_encoder
        original = encoder.language_embd_inference

        def language_embd_inference(*args, **kwargs):
            pred_masks = original(*args, **kwargs)
            self._captured.append(pred_masks.detach().clone())
            return pred_masks

        encoder.language_embd_inference = language_embd_inference  # on the instance only

    # -- inference

    def predict_logits(
        self, images: Sequence[np.ndarray], texts: Sequence[str | None] | None = None
    ) -> list[np.ndarray | None]:
        if texts is not None and len(texts) != len(images):
            raise ConfigError(f"predict_logits: {len(images)} images but {len(texts)} texts")
        return [
            self._predict_one(image, None if texts is None else texts[i]) for i, image in enumerate(images)
        ]

    @torch.inference_mode()
    def _predict_one(self, image: np.ndarray, text: str | None) -> np.ndarray | None:
        from PIL import Image

        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ConfigError(f"sa2va: expected an HxWx3 uint8 RGB image, got {image.shape} {image.dtype}")
        height, width = image.shape[:2]
        self._captured.clear()
        result = self.model.predict_forward(
            image=Image.fromarray(image),
            text=build_prompt(self.prompt, self.use_dataset_text, text),
            tokenizer=self.tokenizer,
            **self._predict_kwargs,
        )
        masks = result.get("prediction_masks")
        if masks is None:
            raise DistillError(
                f"{self.model_path}: predict_forward returned no 'prediction_masks' (got {sorted(result)})"
            )
        self._stats["images"] += 1
        if len(masks) == 0:  # the model generated no [SEG]: recorded as no_mask, never as an empty map
            self._stats["no_mask"] += 1
            return None
        if len(self._captured) != len(masks):
            raise DistillError(
                f"self-check: {len(masks)} [SEG] masks but language_embd_inference ran {len(self._captured)} times"
            )
        self._stats["multi_seg"] += len(masks) > 1
        per_seg = []
        mismatched = 0
        for pred_masks, mask in zip(self._captured, masks, strict=True):
            logits = logits_at_image_size(pred_masks, height, width)
            mismatched += mask_mismatch(logits, np.asarray(mask))
            per_seg.append(logits[0].float())  # one frame for an image
        checked = len(masks) * height * width
        self._stats["pixels_checked"] += checked
        self._stats["pixels_mismatched"] += mismatched
        self._worst_mismatch = max(self._worst_mismatch, mismatched / checked)
        if mismatched / checked > self.self_check_tolerance:
            raise DistillError(
                f"self-check failed: sigmoid(captured logits) > 0.5 differs from Sa2VA's mask on {mismatched} of "
                f"{checked} pixels ({100 * mismatched / checked:.3f}% > tolerance "
                f"{100 * self.self_check_tolerance:.3f}%); this Sa2VA version's mask path differs from SA2VA.md"
            )
        # Several [SEG]: the max of their logits, whose threshold is the union of their masks.
        return torch.stack(per_seg).amax(0).cpu().numpy().astype(np.float32)

    # -- identity and reporting

    def fingerprint(self) -> dict[str, Any]:
        prompt = f"dataset text: {DATASET_PROMPT_TEMPLATE}" if self.use_dataset_text else self.prompt
        return {
            "teacher": "sa2va",
            "adapter_version": ADAPTER_VERSION,
            "model": self._identity,
            "prompt": prompt,
            "dtype": self.dtype_name,
            "quantize": self.quantize,
            "max_dynamic_patch": self.max_dynamic_patch,
            "transformers": self.transformers_version,
        }

    def stats(self) -> dict[str, Any]:
        """Running summary for the end-of-run report: counts, self-check agreement, load, memory."""
        checked = self._stats["pixels_checked"]
        summary: dict[str, Any] = dict(self._stats)
        summary["agreement"] = 1.0 - self._stats["pixels_mismatched"] / checked if checked else None
        summary["worst_image_mismatch"] = self._worst_mismatch
        summary["transformers"] = self.transformers_version
        summary["post_init_shim"] = self.used_post_init_shim
        summary["load_seconds"] = self.load_seconds
        if self.device_map is not None:
            placed = device_summary(self.device_map, self._module_sizes)
            summary["device_map"] = {
                f"cuda:{d}": {"weights_gib": round(v["bytes"] / 2**30, 2), "layers": v["layers"]}
                for d, v in placed.items()
            }
        if self.devices:
            summary["peak_memory_gib"] = {
                f"cuda:{d}": round(torch.cuda.max_memory_allocated(d) / 2**30, 2) for d in self.devices
            }
        return summary

    def close(self) -> None:
        encoder = self.model.grounding_encoder
        encoder.__dict__.pop("language_embd_inference", None)
        del self.model
        self._captured.clear()
        if self.devices:
            torch.cuda.empty_cache()


def _local_checkpoint(model_path: str | Path) -> Path:
    path = Path(model_path).expanduser()
    if not path.is_dir():
        looks_like_hub_id = isinstance(model_path, str) and model_path.count("/") == 1 and not path.exists()
        hint = (
            " It looks like a Hugging Face Hub id: download the checkpoint yourself (e.g. `hf download "
            f"{model_path} --local-dir models/sa2va`) and pass that directory."
            if looks_like_hub_id
            else ""
        )
        raise ConfigError(f"sa2va model_path {str(model_path)!r}: not a local directory.{hint}")
    if not (path / "config.json").is_file():
        raise ConfigError(
            f"sa2va model_path {path}: no config.json; expected a Hugging Face Sa2VA checkpoint directory"
        )
    return path.resolve()
