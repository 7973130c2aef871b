"""GPU benchmark of the sa2va teacher on a random-weight stand-in of Sa2VA-8B's *size*.

The real checkpoint cannot be downloaded on our machines, so this builds one with the same loading
path (a local directory, remote code via `auto_map`, loaded by the real adapter with
trust_remote_code) and the same work per image: an InternViT-300M-sized ViT on 448² tiles, a pixel-
shuffle MLP projector, a 7.7B Llama-shaped LLM (InternLM2.5-7B's sizes: hidden 4096, 32 layers,
ffn 14336, GQA 32/8, vocab 92544) that prefills 256 tokens per tile plus the prompt and decodes the
answer "It is [SEG]." token by token with a KV cache, the [SEG] hidden state projected by
`text_hidden_fcs`, and a SAM2-sized (~230M) ViT image encoder + prompt decoder at 1024² returning
float32 [1, 1, 1024, 1024] logits from `grounding_encoder.language_embd_inference`. Then it runs the
adapter over synthetic images on one GPU without a cap and, when two GPUs exist, over two GPUs
capped at 22 GiB each, and writes load time, images/s, per-GPU peak memory and the adapter's stats.

Weights are created directly on the GPU in bf16 and saved in bf16 (real checkpoints are fp32 on disk).

    python scripts/bench_sa2va_standin.py --out bench_sa2va.json            # ~5-8 min on an H100
    python scripts/bench_sa2va_standin.py --scale toy --images 4 --out x.json  # seconds, CPU
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from distill.teachers import create_teacher  # noqa: E402
from distill.teachers.sa2va import flash_attn_optional  # noqa: E402

SCALES = {
    # InternLM2.5-7B-sized LLM, InternViT-300M-sized ViT, SAM2 Hiera-L-sized (~230M) encoder at 1024².
    "8b": {
        "llm": {"hidden_size": 4096, "num_hidden_layers": 32, "intermediate_size": 14336,
                "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 92544},
        "vit_dim": 1024, "vit_layers": 24, "vit_heads": 16,
        "sam_dim": 896, "sam_layers": 24, "sam_heads": 14,
    },
    "toy": {
        "llm": {"hidden_size": 32, "num_hidden_layers": 3, "intermediate_size": 64,
                "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 300},
        "vit_dim": 16, "vit_layers": 1, "vit_heads": 2,
        "sam_dim": 16, "sam_layers": 1, "sam_heads": 2,
    },
}  # fmt: skip

CONFIG_PY = """
from transformers import PretrainedConfig


class Sa2VAChatConfig(PretrainedConfig):
    model_type = "sa2va_bench_chat"

    def __init__(self, llm_config=None, vit_dim=16, vit_layers=1, vit_heads=2, sam_dim=16, sam_layers=1,
                 sam_heads=2, **kwargs):
        self.llm_config = llm_config or {}
        self.vit_dim, self.vit_layers, self.vit_heads = vit_dim, vit_layers, vit_heads
        self.sam_dim, self.sam_layers, self.sam_heads = sam_dim, sam_layers, sam_heads
        super().__init__(**kwargs)
"""

MODELING_PY = '''
import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedModel

from .configuration_sa2va_chat import Sa2VAChatConfig

MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
SEG_ID, IMG_ID = 3, 4
ANSWER = [40, 41, 42, SEG_ID, 43, 2]  # "It is [SEG] ." </s>


def current_device():
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")  # like Sa2VA's .cuda()


class ViT(nn.Module):
    def __init__(self, dim, layers, heads, patch):
        super().__init__()
        self.patch_embed = nn.Conv2d(3, dim, patch, patch)
        layer = nn.TransformerEncoderLayer(dim, heads, 4 * dim, batch_first=True, norm_first=True, activation="gelu")
        self.blocks = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)

    def forward(self, x):
        x = self.patch_embed(x)
        b, c, h, w = x.shape
        return self.blocks(x.flatten(2).transpose(1, 2)).transpose(1, 2).reshape(b, c, h, w)


class SAM2Standin(nn.Module):
    """Image encoder at 1024² (64x64 tokens) + a decoder: prompt embedding -> 256² -> 1024² logits."""

    def __init__(self, config):
        super().__init__()
        self.image_encoder = ViT(config.sam_dim, config.sam_layers, config.sam_heads, 16)
        self.neck = nn.Conv2d(config.sam_dim, 256, 1)
        self.mask_decoder = nn.Sequential(nn.Linear(256, 256), nn.GELU(), nn.Linear(256, 256))

    def preprocess_image(self, image_uint8):
        return (image_uint8.float() / 255.0 - MEAN.to(image_uint8.device)) / STD.to(image_uint8.device)

    def get_sam2_embeddings(self, g_pixel_values):
        return self.neck(self.image_encoder(g_pixel_values))

    def language_embd_inference(self, sam_states, language_embeds):
        prompts = torch.cat([self.mask_decoder(e) for e in language_embeds])  # [T, 256]
        low = torch.einsum("tchw,tc->thw", sam_states.float(), prompts.float()) / math.sqrt(256)
        low = F.interpolate(low[:, None], size=(256, 256), mode="bilinear", align_corners=False)
        return F.interpolate(low, size=(1024, 1024), mode="bilinear", align_corners=False)


class Sa2VAChatModel(PreTrainedModel):
    config_class = Sa2VAChatConfig
    base_model_prefix = "sa2va_bench"
    _no_split_modules = ["SAM2Standin", "ViT", "LlamaDecoderLayer"]

    def __init__(self, config, use_flash_attn=True):
        super().__init__(config)
        llm = LlamaConfig(**config.llm_config, tie_word_embeddings=False)
        hidden = llm.hidden_size
        self.vision_model = ViT(config.vit_dim, config.vit_layers, config.vit_heads, 14)
        self.mlp1 = nn.Sequential(
            nn.LayerNorm(4 * config.vit_dim), nn.Linear(4 * config.vit_dim, hidden), nn.GELU(), nn.Linear(hidden, hidden)
        )
        self.language_model = LlamaForCausalLM(llm)
        self.text_hidden_fcs = nn.Sequential(nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, 256))
        self.grounding_encoder = SAM2Standin(config)
        self.init_prediction_config = False
        self.post_init()

    def preparing_for_generation(self, tokenizer, max_new_tokens=2048, torch_dtype=torch.bfloat16):
        self.tokenizer = tokenizer
        self.torch_dtype = torch_dtype
        self.max_dynamic_patch = 12
        self.init_prediction_config = True

    def image_tokens(self, image):
        w, h = image.size
        grid = (max(1, round(w / 448)), max(1, round(h / 448)))
        while grid[0] * grid[1] > self.max_dynamic_patch:
            grid = (max(1, grid[0] - 1), max(1, grid[1] - 1))
        tiles = np.array(image.resize((448 * grid[0], 448 * grid[1])))
        tiles = [tiles[r * 448:(r + 1) * 448, c * 448:(c + 1) * 448] for r in range(grid[1]) for c in range(grid[0])]
        if len(tiles) > 1:
            tiles.append(np.asarray(image.resize((448, 448))))  # thumbnail
        x = torch.from_numpy(np.stack(tiles)).permute(0, 3, 1, 2).to(current_device())
        x = self.grounding_encoder.preprocess_image(x).to(self.vision_model.patch_embed.weight.dtype)
        feats = self.vision_model(x)  # [n, C, 32, 32]
        feats = F.pixel_unshuffle(feats, 2).flatten(2).transpose(1, 2)  # [n, 256, 4C]: 256 tokens a tile
        return self.mlp1(feats).flatten(0, 1)

    @torch.no_grad()
    def predict_forward(self, image=None, text=None, tokenizer=None, **kwargs):
        if not self.init_prediction_config:
            self.preparing_for_generation(tokenizer=tokenizer)
        assert "<image>" in text
        lm = self.language_model
        embed = lm.get_input_embeddings()
        ids = torch.tensor(self.tokenizer.encode(text.replace("<image>", ""))).to(current_device())
        prompt = torch.cat([self.image_tokens(image).to(embed.weight.device), embed(ids)])[None]
        out = lm(inputs_embeds=prompt, use_cache=True, output_hidden_states=True)
        seg_hidden = []
        for token in ANSWER:  # greedy decoding of the fine-tuned answer, one token at a time
            step = torch.tensor([[token]], device=embed.weight.device)
            out = lm(input_ids=step, past_key_values=out.past_key_values, use_cache=True, output_hidden_states=True)
            if token == SEG_ID:
                seg_hidden.append(out.hidden_states[-1][0, -1])
        all_seg_hidden_states = self.text_hidden_fcs(torch.stack(seg_hidden).to(self.text_hidden_fcs[0].weight.device))
        w, h = image.size
        g = torch.from_numpy(np.array(image.resize((1024, 1024)))).permute(2, 0, 1)[None].to(current_device())
        g_pixel_values = self.grounding_encoder.preprocess_image(g).to(self.vision_model.patch_embed.weight.dtype)
        ret_masks = []
        for seg_hidden_states in all_seg_hidden_states:
            sam_states = self.grounding_encoder.get_sam2_embeddings(g_pixel_values)
            pred_masks = self.grounding_encoder.language_embd_inference(sam_states, [seg_hidden_states[None]])
            masks = F.interpolate(pred_masks, size=(h, w), mode="bilinear", align_corners=False)
            masks = masks[:, 0].sigmoid() > 0.5
            ret_masks.append(masks.cpu().numpy())
        return {"prediction": "It is [SEG].", "prediction_masks": ret_masks}
'''


def write_sized_standin(root: Path, scale: str = "8b", device: str | None = None) -> Path:
    """Write a random-weight stand-in of the given scale; weights made on `device` in bf16, saved in bf16."""
    from transformers import AutoConfig, AutoModel

    root.mkdir(parents=True, exist_ok=True)
    (root / "configuration_sa2va_chat.py").write_text(CONFIG_PY)
    (root / "modeling_sa2va_chat.py").write_text(MODELING_PY)
    # The tokenizer is the CPU stand-in's (bytes + Sa2VA's special tokens).
    from tests.sa2va_standin import TOKENIZER_PY

    (root / "tokenization_standin.py").write_text(TOKENIZER_PY)
    (root / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "StandinTokenizer",
                "auto_map": {"AutoTokenizer": ["tokenization_standin.StandinTokenizer", None]},
            }
        )
    )
    shape = SCALES[scale]
    config = {
        "model_type": "sa2va_bench_chat",
        "architectures": ["Sa2VAChatModel"],
        "auto_map": {
            "AutoConfig": "configuration_sa2va_chat.Sa2VAChatConfig",
            "AutoModel": "modeling_sa2va_chat.Sa2VAChatModel",
        },
        "llm_config": shape["llm"],
        **{k: v for k, v in shape.items() if k != "llm"},
    }
    (root / "config.json").write_text(json.dumps(config, indent=2))
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    previous = torch.get_default_dtype()
    torch.manual_seed(0)
    with flash_attn_optional():
        model_config = AutoConfig.from_pretrained(root, trust_remote_code=True)
        try:
            torch.set_default_dtype(torch.bfloat16)  # parameters are born bf16: no fp32 copy of 7.7B
            with torch.device(device):
                model = AutoModel.from_config(model_config, trust_remote_code=True)
        finally:
            torch.set_default_dtype(previous)
    model.save_pretrained(root, max_shard_size="5GB")
    n_params = sum(p.numel() for p in model.parameters())
    del model
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    (root / "bench_params.json").write_text(json.dumps({"parameters": n_params, "scale": scale}))
    return root


def synthetic_images(count: int, size: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for _ in range(count)]


def run_config(model_dir: Path, images: list[np.ndarray], devices: list[int], max_memory: str | None) -> dict:
    """Load the adapter on `devices`, predict every image once; return load time, images/s, memory."""
    from tqdm import tqdm

    for d in devices:
        torch.cuda.reset_peak_memory_stats(d)
    start = time.perf_counter()
    teacher = create_teacher(
        "sa2va", model_path=str(model_dir), trust_remote_code=True, devices=devices, max_memory=max_memory
    )
    load_s = time.perf_counter() - start
    after_load = {f"cuda:{d}": round(torch.cuda.memory_allocated(d) / 2**30, 2) for d in devices}
    teacher.predict_logits(images[:1])  # warm-up (first call, allocator)
    if devices:
        torch.cuda.synchronize()
    start = time.perf_counter()
    for image in tqdm(images, desc=f"sa2va on {devices or 'cpu'}"):
        (logits,) = teacher.predict_logits([image])
        assert logits is not None and logits.shape == image.shape[:2]
    if devices:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    result = {
        "devices": devices,
        "max_memory": max_memory,
        "load_seconds": round(load_s, 2),
        "images": len(images),
        "images_per_second": round(len(images) / seconds, 3),
        "weights_gib_after_load": after_load,
        "peak_reserved_gib": {
            f"cuda:{d}": round(torch.cuda.max_memory_reserved(d) / 2**30, 2) for d in devices
        },
        "teacher_stats": teacher.stats(),
    }
    teacher.close()
    del teacher
    gc.collect()
    if devices:
        torch.cuda.empty_cache()
    return result


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="JSON file for the results")
    parser.add_argument("--model-dir", type=Path, default=Path("/tmp/sa2va_standin_8b"))
    parser.add_argument("--scale", choices=sorted(SCALES), default="8b")
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--max-memory", default="22GiB", help="per-GPU cap of the 2-GPU run")
    args = parser.parse_args(argv)

    report: dict = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "command": " ".join(sys.argv),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "gpus": [torch.cuda.get_device_name(d) for d in range(torch.cuda.device_count())],
        "scale": args.scale,
    }
    if not (args.model_dir / "config.json").exists():
        start = time.perf_counter()
        write_sized_standin(args.model_dir, args.scale)
        report["build_seconds"] = round(time.perf_counter() - start, 1)
    report["parameters"] = json.loads((args.model_dir / "bench_params.json").read_text())["parameters"]
    images = synthetic_images(args.images, args.size)
    runs = []
    n_gpus = torch.cuda.device_count()
    configs = [([0], None)] if n_gpus else [([], None)]
    if n_gpus >= 2:
        configs.append(([0, 1], args.max_memory))
    for devices, cap in configs:
        try:
            runs.append(run_config(args.model_dir, images, devices, cap))
        except Exception as err:  # report every configuration, also the one that failed
            runs.append({"devices": devices, "max_memory": cap, "error": f"{type(err).__name__}: {err}"})
        print(json.dumps(runs[-1], indent=1), flush=True)
    report["runs"] = runs
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
