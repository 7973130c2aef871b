"""Build a random-weight Sa2VA checkpoint from a local copy of Sa2VA's *real* Hugging Face model code.

Our CPU tests drive a small stand-in; this builds the real thing, so that the adapter is checked
against the code users load (`scripts/check_sa2va_real.py`, `scripts/bench_sa2va_teacher_forced.py`).
Nothing of Sa2VA's is in this repository: point CODE_DIR at `projects/sa2va/hf/models/` of a clone of
github.com/bytedance/Sa2VA (InternVL-based variants: `modeling_sa2va_chat.py`, `sam2.py`, ...). The
`.py` files are copied into the checkpoint directory, as in a real Sa2VA checkpoint, whose
`config.json` `auto_map` points at them.

The checkpoint: InternViT + a Qwen2 LLM (the layout of Sa2VA-4B, whose LLM is Qwen2.5-3B) + Sa2VA's
own SAM2 (Hiera-L, fixed size in their code) + `text_hidden_fcs`, `qwen_chat` template, and a
byte-level BPE tokenizer with Sa2VA's added tokens (`<img>`, `<IMG_CONTEXT>`, `[SEG]`, ...).
Sizes: `tiny` (a few LLM layers; SAM2 dominates, ~230M parameters) or `4b` (Sa2VA-4B's sizes: an
InternViT-300M-sized vision encoder and a Qwen2.5-3B-sized LLM with its 151,674-token vocabulary).

Random weights answer random tokens, so no `[SEG]` would ever be generated. `steer_answer` (shared with
the test stand-in) scales the LLM layers' residual writes down and fits the output head so that greedy
decoding answers "It is [SEG].<|im_end|>" like a fine-tune; the vision encoder, projector, SAM2 and
`text_hidden_fcs` stay random, and the [SEG] hidden state still depends on the image.

    from scripts.sa2va_real import build
    build("Sa2VA/projects/sa2va/hf/models", "/tmp/sa2va_tiny", size="tiny", device="cuda")
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from distill.teachers.sa2va import flash_attn_optional, post_init_shim  # noqa: E402
from tests.sa2va_standin import ANSWER, PROMPT, steer_answer, write_tokenizer  # noqa: E402

SIZES = {
    "tiny": {
        "vision": {"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 2, "num_hidden_layers": 2},
        "llm": {"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4, "num_key_value_heads": 2,
                "num_hidden_layers": 4, "vocab_size": None},
    },
    # Sa2VA-4B = InternViT-300M-448px + Qwen2.5-3B (hidden 2048, 36 layers, GQA 16/2, ffn 11008).
    "4b": {
        "vision": {"hidden_size": 1024, "intermediate_size": 4096, "num_attention_heads": 16,
                   "num_hidden_layers": 24},
        "llm": {"hidden_size": 2048, "intermediate_size": 11008, "num_attention_heads": 16,
                "num_key_value_heads": 2, "num_hidden_layers": 36, "vocab_size": 151674},
    },
}  # fmt: skip


def sa2va_config(size: str, vocab: int) -> dict:
    """config.json of a Sa2VA-4B-layout checkpoint (InternViT + Qwen2 LLM, qwen_chat template)."""
    spec = SIZES[size]
    vision = {"architectures": ["InternVisionModel"], "image_size": 448, "patch_size": 14, "norm_type": "layer_norm",
              "qk_normalization": False, "qkv_bias": True, "drop_path_rate": 0.1, "use_flash_attn": False,
              **spec["vision"]}  # fmt: skip
    llm = {"architectures": ["Qwen2ForCausalLM"], "max_position_embeddings": 32768, "rope_theta": 1e6,
           "rms_norm_eps": 1e-6, "tie_word_embeddings": False, **spec["llm"]}  # fmt: skip
    llm["vocab_size"] = llm["vocab_size"] or vocab
    auto_map = {
        "AutoConfig": "configuration_sa2va_chat.Sa2VAChatConfig",
        "AutoModel": "modeling_sa2va_chat.Sa2VAChatModel",
        "AutoModelForCausalLM": "modeling_sa2va_chat.Sa2VAChatModel",
    }
    return {"architectures": ["Sa2VAChatModel"], "auto_map": auto_map, "model_type": "sa2va_chat",
            "template": "qwen_chat", "downsample_ratio": 0.5, "select_layer": -1, "ps_version": "v2",
            "force_image_size": 448, "dynamic_image_size": True, "use_thumbnail": True, "max_dynamic_patch": 12,
            "vision_config": vision, "llm_config": llm}  # fmt: skip


def build(
    code_dir: str | Path, out: str | Path, size: str = "tiny", device: str = "cpu", seed: int = 0
) -> Path:
    """Write a random-weight Sa2VA checkpoint built from `code_dir`'s real code into `out`; return `out`."""
    from transformers import AutoConfig, AutoTokenizer
    from transformers.dynamic_module_utils import get_class_from_dynamic_module

    code_dir, out = Path(code_dir), Path(out)
    if not (code_dir / "modeling_sa2va_chat.py").is_file():
        raise SystemExit(
            f"{code_dir}: no modeling_sa2va_chat.py; pass Sa2VA's projects/sa2va/hf/models folder"
        )
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    for file in code_dir.glob("*.py"):
        shutil.copy(file, out / file.name)
    write_tokenizer(out, [PROMPT.replace("<image>", ""), ANSWER, "Sorry, I cannot find it."])
    tokenizer = AutoTokenizer.from_pretrained(out, trust_remote_code=True, use_fast=False)
    (out / "config.json").write_text(json.dumps(sa2va_config(size, len(tokenizer)), indent=2))
    torch.manual_seed(seed)
    with flash_attn_optional():
        config = AutoConfig.from_pretrained(out, trust_remote_code=True)
        model_class = get_class_from_dynamic_module(config.auto_map["AutoModel"], str(out))
        with post_init_shim(model_class), torch.device(device):
            model = model_class(config, use_flash_attn=False).to(torch.bfloat16)
    model.eval()
    model.preparing_for_generation(tokenizer=tokenizer, torch_dtype=torch.bfloat16)
    steer_answer(model, tokenizer, ANSWER)
    model.save_pretrained(out)
    return out


def count_parameters(checkpoint: str | Path) -> int:
    """Parameters stored in a checkpoint directory's safetensors files (read from their headers only)."""
    from safetensors import safe_open

    total = 0
    for file in Path(checkpoint).glob("*.safetensors"):
        with safe_open(str(file), framework="pt") as handle:
            for key in handle.keys():  # noqa: SIM118 (a safetensors handle is not iterable)
                shape = handle.get_slice(key).get_shape()
                total += int(np.prod(shape)) if shape else 1
    return total
