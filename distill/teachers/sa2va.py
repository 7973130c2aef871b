"""Sa2VA as a teacher: soft logits from before its only threshold, checked against its own masks.

Sa2VA's `predict_forward` returns binary masks. The logits live one step earlier: its SAM2 wrapper's
`language_embd_inference` returns float32 `[T, 1, 1024, 1024]` logits per generated `[SEG]`, which
`predict_forward` resizes bilinearly (align_corners=False) to the image size, takes channel 0 of and
thresholds at `sigmoid > 0.5`. We wrap that method on the *instance* (it is not a `forward`, so hooks
would not fire), keep a copy of its output, resize it the same way and check that our threshold
reproduces Sa2VA's masks. The facts about Sa2VA's code relied on here are in docs/sa2va.md.

Two paths (option `path`):
- `generate` (default): Sa2VA's own `predict_forward`, one image per call, the answer generated token by
  token; every image is self-checked.
- `teacher_forced`: one batched LLM forward over prompt + the expected answer (`sa2va_forced.py`), the
  hidden state at `[SEG]`, then the same SAM2 decoding. Checked from the same forward pass (the greedy
  argmax at each answer position must be the answer, else that image falls back to `generate` and is
  counted) and against `predict_forward` on a sample of images (first `check_first`, then every
  `check_every`-th): the run stops when a sampled image's masks agree on fewer than `check_agreement` of
  its pixels. With `sam2_views=True` the LLM runs once per image and SAM2 decodes each requested view with
  the same `[SEG]` embedding.

The model loads on first use, so a run with nothing to do never loads it, and the fingerprint (what made a
cache) is known before loading. Options: see `Sa2VATeacher`.
"""

from __future__ import annotations

import hashlib
import importlib.util
import inspect
import time
import traceback
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch

from distill.errors import ConfigError, DistillError
from distill.teachers.base import Teacher, register_teacher
from distill.teachers.device_map import (
    DEFAULT_FIRST_GPU_RESERVE,
    build_device_map,
    device_summary,
    empty_module_sizes,
    parse_memory,
    quantized_sizes,
)
from distill.teachers.sa2va_forced import TeacherForcing, logits_at_image_size

ADAPTER_VERSION = "2"
DEFAULT_PROMPT = "<image>Please segment the blood vessels in this image."
DATASET_PROMPT_TEMPLATE = "<image>Please segment {text} in this image."
SA2VA_TRANSFORMERS_PINS = "4.57 (Sa2VA 'latest', with peft 0.17) or 4.49 (Sa2VA 'legacy', with peft 0.11)"
QUANT_SKIP_MODULES = ["grounding_encoder", "text_hidden_fcs", "vision_model", "mlp1"]
PATHS = ("generate", "teacher_forced")
_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
_SAMPLES_PER_FILE, _SAMPLE_BYTES = 16, 64 * 1024
# Load errors that do come from the transformers version (the only ones that mention the pins).
_VERSION_ERRORS = (
    "has no attribute 'generate'",
    "GenerationMixin",
    "all_tied_weights_keys",
    "from 'transformers'",
)


# ---------------------------------------------------------------- pure helpers (tested without a model)


def quantization_kwargs(quantize: str, dtype: torch.dtype = torch.bfloat16) -> dict[str, Any]:
    """Keyword arguments of transformers' BitsAndBytesConfig for `quantize` ({} for "none").

    SAM2, the [SEG] projection, the vision encoder and its projector stay unquantized: 4-bit Sa2VA only
    works that way (docs/sa2va.md).
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
    """The text given to Sa2VA for one image; always contains "<image>"."""
    if use_dataset_text:
        if not text or not text.strip():
            raise ConfigError(
                "use_dataset_text: an image has no dataset text; give the dataset texts or set a --prompt instead"
            )
        text = text.strip()
        return text if "<image>" in text else DATASET_PROMPT_TEMPLATE.format(text=text)
    return prompt


def mask_mismatch(logits: torch.Tensor, masks: np.ndarray) -> int:
    """Pixels where Sa2VA's own threshold applied to our logits differs from its returned mask."""
    ours = (logits.sigmoid() > 0.5).cpu().numpy()
    if ours.shape != masks.shape:
        raise DistillError(f"self-check: captured logits {ours.shape} vs Sa2VA mask {masks.shape}")
    return int(np.count_nonzero(ours != masks.astype(bool)))


def model_dir_identity(path: Path) -> dict[str, Any]:
    """Content identity of a checkpoint directory, independent of where it lies.

    Hashes of `config.json`, of every other small file (remote code `.py`, tokenizer files, weight index:
    names and bytes) and a sampled hash of every weight file (names, sizes and 16 evenly spaced 64 KiB
    samples: tells two fine-tunes of one architecture apart without reading 16+ GB). No path and no file
    times, so the same model copied to another node fingerprints the same.
    """
    weights = hashlib.sha256()
    files = sorted(p for p in path.iterdir() if p.is_file())
    weight_files = [p for p in files if p.name.endswith(_WEIGHT_SUFFIXES)]
    for file in weight_files:
        size = file.stat().st_size
        weights.update(f"{file.name}:{size}\n".encode())
        with open(file, "rb") as handle:
            for i in range(_SAMPLES_PER_FILE):
                handle.seek(max(0, size - _SAMPLE_BYTES) * i // max(1, _SAMPLES_PER_FILE - 1))
                weights.update(handle.read(_SAMPLE_BYTES))
    other = hashlib.sha256()
    for file in files:
        if file not in weight_files and file.name != "config.json" and file.stat().st_size < 64 * 2**20:
            other.update(f"{file.name}:{file.stat().st_size}\n".encode() + file.read_bytes())
    return {
        "config_sha256": hashlib.sha256((path / "config.json").read_bytes()).hexdigest(),
        "code_and_tokenizer_sha256": other.hexdigest(),
        "weight_files": len(weight_files),
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
def post_init_shim(model_class: type) -> Iterator[dict[str, bool]]:
    """transformers 5 needs `post_init()` at the end of `__init__`; Sa2VA's shipped class never calls it.

    While active, `__init__` calls it only when the original did not (transformers 5's `post_init` sets
    `all_tied_weights_keys`), so a model is built and its weights read once either way. Yields a dict
    whose "used" says whether the shim had to call it.
    """
    original = model_class.__init__
    state = {"used": False}

    def __init__(self, *args, **kwargs):
        original(self, *args, **kwargs)
        if not hasattr(self, "all_tied_weights_keys"):
            self.post_init()
            state["used"] = True

    model_class.__init__ = __init__
    try:
        yield state
    finally:
        model_class.__init__ = original


def load_failure(path: Path, version: str, err: BaseException) -> str:
    """The message for a failed load: the real cause and where it was raised; version pins only for
    errors that come from the transformers version."""
    frames = traceback.extract_tb(err.__traceback__)
    where = f" (raised at {Path(frames[-1].filename).name}:{frames[-1].lineno})" if frames else ""
    message = (
        f"{path}: loading Sa2VA failed under transformers {version}: {type(err).__name__}: {err}{where}."
    )
    text = str(err)
    if "has no attribute 'generate'" in text or "GenerationMixin" in text:
        message += (
            " This checkpoint's code predates transformers 4.50 (its LLM class no longer inherits generate());"
            " take the current .py files from Sa2VA's repository or install a pinned transformers."
        )
    if any(marker in text for marker in _VERSION_ERRORS):
        message += f" Sa2VA's code is pinned to transformers {SA2VA_TRANSFORMERS_PINS}."
    return message


# ---------------------------------------------------------------- the teacher


@register_teacher("sa2va")
class Sa2VATeacher(Teacher):
    """A local Sa2VA checkpoint: its own `predict_forward` (path=generate) or a batched teacher-forced pass.

    Args:
        model_path: local Sa2VA checkpoint directory (config.json with auto_map + remote code). Hub ids are
            refused: what runs must be what is on disk.
        trust_remote_code: must be True (`--trust-remote-code`); loading Sa2VA runs the checkpoint's code.
        prompt: must contain "<image>".
        use_dataset_text: use each image's dataset text as "<image>Please segment {text} in this image.".
        dtype: bfloat16 | float16 | float32 for weights and inputs (passed to Sa2VA's
            `preparing_for_generation`, which would otherwise cast inputs to bf16).
        devices: CUDA indices of this worker's GPU group, first = current device holding SAM2, vision,
            projector, embeddings, head; None/[] = CPU, which only the stand-in supports (the real code
            calls `.cuda()`).
        max_memory: per-GPU cap like "22GiB"; None = each GPU's total memory.
        quantize: "none" | "8bit" | "4bit" LLM weights via bitsandbytes; SAM2, vision and projectors stay.
        max_dynamic_patch: Sa2VA's LLM tile limit (1-12 tiles of 448², 256 tokens each); None keeps 12.
        self_check_tolerance: largest fraction of an image's pixels where `sigmoid(logits) > 0.5` may differ
            from Sa2VA's own mask (generate path) before the run stops.
        first_gpu_reserve: memory left free on the first GPU for activations when planning the device map.
        path: "generate" or "teacher_forced" (see the module docstring).
        answer: teacher_forced: the exact expected answer including its end token, e.g.
            "It is [SEG].<|im_end|>"; None = the answer the model generates on the first image with a [SEG].
        check_first, check_every: teacher_forced: the first `check_first` forced images and every
            `check_every`-th (0: none) also run through `predict_forward` and are compared.
        check_agreement: teacher_forced: least pixel agreement with `predict_forward` on a sampled image.
        sam2_views: teacher_forced: run the LLM once per image and only SAM2 on each view.
    """

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
        path: str = "generate",
        answer: str | None = None,
        check_first: int = 8,
        check_every: int = 100,
        check_agreement: float = 0.98,
        sam2_views: bool = False,
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
            raise ConfigError(
                f"--teacher-option max_dynamic_patch={max_dynamic_patch}: Sa2VA takes 1 to 12 tiles"
            )
        if not 0.0 <= self_check_tolerance < 1.0:
            raise ConfigError(
                f"--teacher-option self_check_tolerance={self_check_tolerance}: a fraction in [0, 1)"
            )
        if path not in PATHS:
            raise ConfigError(f"--teacher-option path={path!r}: choose one of {list(PATHS)}")
        if path != "teacher_forced" and (answer is not None or sam2_views):
            raise ConfigError("--teacher-option answer / sam2_views need path=teacher_forced")
        if answer is not None and "[SEG]" not in answer:
            raise ConfigError(
                f"--teacher-option answer={answer!r}: the teacher-forced path needs an answer with a [SEG] token "
                "(its hidden state is the mask prompt), e.g. 'It is [SEG].<|im_end|>'"
            )
        if not 0.0 < check_agreement <= 1.0 or check_first < 0 or check_every < 0:
            raise ConfigError(
                f"check_agreement={check_agreement} must be in (0, 1], check_first={check_first} and "
                f"check_every={check_every} >= 0"
            )
        quantization_kwargs(quantize)  # validates the name
        if quantize != "none" and importlib.util.find_spec("bitsandbytes") is None:
            raise ConfigError(
                f"--quantize {quantize} needs bitsandbytes: pip install -e '.[sa2va]' (or --quantize none)"
            )
        if quantize != "none" and not devices:
            raise ConfigError(f"--quantize {quantize}: bitsandbytes needs GPUs (devices)")
        self.prompt = prompt
        self.use_dataset_text = use_dataset_text
        self.dtype_name = dtype
        self.devices = [int(d) for d in devices or []]
        self.max_memory = max_memory
        self.quantize = quantize
        self.max_dynamic_patch = None if max_dynamic_patch is None else int(max_dynamic_patch)
        self.self_check_tolerance = float(self_check_tolerance)
        self.first_gpu_reserve = parse_memory(first_gpu_reserve)
        self.path = path
        self.answer = answer
        self.check_first, self.check_every, self.check_agreement = check_first, check_every, check_agreement
        self.sam2_views = bool(sam2_views)
        self._identity = model_dir_identity(self.model_path)
        self.transformers_version = _transformers_version()
        self.model: Any = None
        self.load_seconds: float | None = None
        self.used_post_init_shim = False
        self.device_map: dict[str, int] | None = None
        self._module_sizes: dict[str, int] = {}
        self._forcing: TeacherForcing | None = None
        self._captured: list[torch.Tensor] = []
        self._generated: list[list[int]] = []
        self._stats = {"images": 0, "no_mask": 0, "multi_seg": 0, "pixels_checked": 0, "pixels_mismatched": 0}
        self._worst_mismatch = 0.0

    # -- loading (on first use)

    def load(self) -> None:
        """Load the model now (idempotent); `predict_logits` calls it."""
        if self.model is not None:
            return
        from transformers import AutoConfig, AutoTokenizer
        from transformers.dynamic_module_utils import get_class_from_dynamic_module

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
                with post_init_shim(model_class) as shim:
                    model = model_class.from_pretrained(path, **kwargs)
                self.used_post_init_shim = shim["used"]
                tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=True, use_fast=False)
            except DistillError:
                raise
            except Exception as err:
                raise DistillError(load_failure(self.model_path, self.transformers_version, err)) from err
        if self.devices and self.device_map is None:
            model.to(f"cuda:{self.devices[0]}")
        model.eval()
        self.model, self.tokenizer = model, tokenizer
        self._prepare_generation(dtype)
        self._install_capture()
        if self.path == "teacher_forced":
            self._forcing = TeacherForcing(
                model, tokenizer, self._generate_one, lambda: self._generated[-1], self.answer,
                self.check_first, self.check_every, self.check_agreement, on_multi_seg=self._count_multi_seg,
            )  # fmt: skip
        self.load_seconds = time.perf_counter() - start

    def _load_kwargs(self, model_class: type, config, dtype: torch.dtype) -> dict[str, Any]:
        major = int(self.transformers_version.split(".")[0])
        kwargs: dict[str, Any] = {
            ("dtype" if major >= 5 else "torch_dtype"): dtype,
            "low_cpu_mem_usage": True,
            "use_flash_attn": False,
        }
        if self.quantize != "none":
            from transformers import BitsAndBytesConfig

            kwargs["quantization_config"] = BitsAndBytesConfig(**quantization_kwargs(self.quantize, dtype))
        if not self.devices:
            return kwargs
        with post_init_shim(model_class):
            sizes = empty_module_sizes(lambda: model_class(config, use_flash_attn=False), dtype)
        self._module_sizes = quantized_sizes(sizes, self.quantize)
        if self.max_memory is not None:
            caps = {d: parse_memory(self.max_memory) for d in self.devices}
        else:
            caps = {d: torch.cuda.get_device_properties(d).total_memory for d in self.devices}
        self.device_map = build_device_map(
            self._module_sizes, self.devices, caps, first_gpu_reserve=self.first_gpu_reserve
        )
        kwargs["device_map"] = self.device_map
        return kwargs

    def _prepare_generation(self, dtype: torch.dtype) -> None:
        """Run Sa2VA's one-time setup now, with our dtype, so that `max_dynamic_patch` set afterwards sticks."""
        model = self.model
        if hasattr(model, "preparing_for_generation") and not getattr(model, "init_prediction_config", False):
            kwargs = {}
            if "torch_dtype" in inspect.signature(model.preparing_for_generation).parameters:
                kwargs["torch_dtype"] = dtype  # else Sa2VA casts every input to bf16
            try:
                model.preparing_for_generation(tokenizer=self.tokenizer, **kwargs)
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
        """Keep a copy of the SAM2 logits and of the generated token ids, on the instance only."""
        encoder = self.model.grounding_encoder
        capture_logits = encoder.language_embd_inference
        generate = self.model.generate

        def language_embd_inference(*args, **kwargs):
            pred_masks = capture_logits(*args, **kwargs)
            self._captured.append(pred_masks.detach().clone())
            return pred_masks

        def generate_and_keep_ids(*args, **kwargs):
            output = generate(*args, **kwargs)
            self._generated.append(output.sequences[0].tolist())
            return output

        encoder.language_embd_inference = language_embd_inference
        self.model.generate = generate_and_keep_ids

    # -- inference

    def predict_logits(
        self, images: Sequence[np.ndarray], texts: Sequence[str | None] | None = None
    ) -> list[np.ndarray | None]:
        return self._predict(list(images), self._prompts(images, texts))

    @property
    def views_in_one_pass(self) -> bool:
        return self.sam2_views

    def predict_views(
        self,
        images: Sequence[np.ndarray],
        views: Sequence[Sequence[str]],
        texts: Sequence[str | None] | None = None,
    ) -> list[list[np.ndarray | None]]:
        if not self.sam2_views:
            return super().predict_views(images, views, texts)
        prompts = self._prompts(images, texts)  # loads the model, and with it self._forcing
        return self._forcing.predict_views(list(images), views, prompts)

    def _prompts(self, images: Sequence[np.ndarray], texts: Sequence[str | None] | None) -> list[str]:
        """Check the inputs, load the model if needed, and build each image's prompt."""
        if texts is not None and len(texts) != len(images):
            raise ConfigError(f"predict_logits: {len(images)} images but {len(texts)} texts")
        for image in images:
            if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
                raise ConfigError(f"sa2va: expected HxWx3 uint8 RGB images, got {image.shape} {image.dtype}")
        self.load()
        return [build_prompt(self.prompt, self.use_dataset_text, None if texts is None else texts[i])
                for i in range(len(images))]  # fmt: skip

    def _predict(self, images: list[np.ndarray], prompts: list[str]) -> list[np.ndarray | None]:
        if self.path == "generate":
            return [self._generate_one(image, prompt) for image, prompt in zip(images, prompts, strict=True)]
        return [
            maps[0] for maps in self._forcing.predict_views(images, [["identity"]] * len(images), prompts)
        ]

    @torch.inference_mode()
    def _generate_one(self, image: np.ndarray, prompt: str) -> np.ndarray | None:
        """Sa2VA's own predict_forward with the self-check; None when it generated no [SEG]."""
        from PIL import Image

        height, width = image.shape[:2]
        self._captured.clear()
        self._generated.clear()
        result = self.model.predict_forward(
            image=Image.fromarray(image), text=prompt, tokenizer=self.tokenizer, **self._predict_kwargs
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
        per_seg = [logits_at_image_size(pred, height, width) for pred in self._captured]
        mismatched = sum(
            mask_mismatch(logits, np.asarray(mask)) for logits, mask in zip(per_seg, masks, strict=True)
        )
        checked = len(masks) * height * width
        self._stats["pixels_checked"] += checked
        self._stats["pixels_mismatched"] += mismatched
        self._worst_mismatch = max(self._worst_mismatch, mismatched / checked)
        if mismatched / checked > self.self_check_tolerance:
            raise DistillError(
                f"self-check failed: sigmoid(captured logits) > 0.5 differs from Sa2VA's mask on {mismatched} of "
                f"{checked} pixels ({100 * mismatched / checked:.3f}% > tolerance "
                f"{100 * self.self_check_tolerance:.3f}%); this Sa2VA version's mask path differs from docs/sa2va.md"
            )
        # Several [SEG]: the max of their logits, whose threshold is the union of their masks.
        return torch.cat(per_seg).amax(0).float().cpu().numpy()

    def _count_multi_seg(self) -> None:
        self._stats["multi_seg"] += 1

    # -- identity and reporting

    def fingerprint(self) -> dict[str, Any]:
        prompt = f"dataset text: {DATASET_PROMPT_TEMPLATE}" if self.use_dataset_text else self.prompt
        fingerprint = {
            "teacher": "sa2va",
            "adapter_version": ADAPTER_VERSION,
            "model": self._identity,
            "prompt": prompt,
            "dtype": self.dtype_name,
            "quantize": self.quantize,
            "max_dynamic_patch": self.max_dynamic_patch,
            "transformers": self.transformers_version,
            "path": self.path,
        }
        if self.path == "teacher_forced":
            fingerprint["answer"] = self.answer if self.answer is not None else "generated on the first image"
            fingerprint["sam2_views"] = self.sam2_views
        return fingerprint

    def stats(self) -> dict[str, Any]:
        """Running summary for the end-of-run report: counts, self-check agreement, load, memory.

        `agreement` is None when no pixel was checked (every image no_mask, or nothing run)."""
        checked = self._stats["pixels_checked"]
        summary: dict[str, Any] = dict(self._stats)
        summary["agreement"] = 1.0 - self._stats["pixels_mismatched"] / checked if checked else None
        summary["worst_image_mismatch"] = self._worst_mismatch
        summary["transformers"] = self.transformers_version
        summary["post_init_shim"] = self.used_post_init_shim
        summary["load_seconds"] = self.load_seconds
        summary["path"] = self.path
        if self._forcing is not None:
            summary["teacher_forced"] = self._forcing.stats()
        if self.device_map is not None:
            placed = device_summary(self.device_map, self._module_sizes)
            summary["device_map"] = {
                f"cuda:{d}": {"weights_gib": round(v["bytes"] / 2**30, 2), "layers": v["layers"]}
                for d, v in placed.items()
            }
        if self.devices and self.model is not None:
            summary["peak_memory_gib"] = {
                f"cuda:{d}": round(torch.cuda.max_memory_allocated(d) / 2**30, 2) for d in self.devices
            }
        return summary

    def close(self) -> None:
        if self.model is None:
            return
        self.model.grounding_encoder.__dict__.pop("language_embd_inference", None)
        self.model.__dict__.pop("generate", None)
        self.model = None
        self._captured.clear()
        if self.devices:
            torch.cuda.empty_cache()


def _transformers_version() -> str:
    import transformers

    return transformers.__version__


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
