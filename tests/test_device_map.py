"""Device map for Sa2VA-8B over 24 GB cards: the parts SAM2's `.cuda()` needs share the first GPU."""

import pytest
import torch
from torch import nn

from distill.errors import ConfigError
from distill.teachers.device_map import (
    GiB,
    build_device_map,
    device_summary,
    empty_module_sizes,
    module_sizes,
    parse_memory,
    part_of,
    quantized_sizes,
)

N_LAYERS = 32
MUST_SHARE_FIRST = [
    "vision_model",
    "mlp1",
    "grounding_encoder",
    "text_hidden_fcs",
    "language_model.model.tok_embeddings",
    "language_model.model.norm",
    "language_model.output",
    f"language_model.model.layers.{N_LAYERS - 1}",
]


def sa2va_8b_sizes() -> dict[str, int]:
    """bf16 bytes of Sa2VA-8B's parts: InternLM2.5-7B (hidden 4096, ffn 14336, GQA 32/8 heads, vocab 92544),
    InternViT-300M, the MLP projector, SAM2 Hiera-L and the [SEG] projection."""
    hidden, ffn, vocab, kv = 4096, 14336, 92544, 1024
    layer = (hidden * (hidden + 2 * kv) + hidden * hidden + 3 * hidden * ffn + 2 * hidden) * 2
    sizes = {
        "vision_model": 304_000_000 * 2,
        "mlp1": 25_000_000 * 2,
        "grounding_encoder": 224_000_000 * 2,
        "text_hidden_fcs": (4096 * 4096 + 4096 * 256) * 2,
        "language_model.model.tok_embeddings": vocab * hidden * 2,
        "language_model.model.norm": hidden * 2,
        "language_model.output": vocab * hidden * 2,
    }
    sizes.update({f"language_model.model.layers.{i}": layer for i in range(N_LAYERS)})
    return sizes


def check_map(device_map, sizes, devices, cap_bytes):
    assert set(device_map) == set(sizes), "every part is placed"
    for part in MUST_SHARE_FIRST:
        assert device_map[part] == devices[0], part
    placed = device_summary(device_map, sizes)
    for d in devices:
        assert placed.get(d, {"bytes": 0})["bytes"] <= cap_bytes, f"cuda:{d} over its cap"
    # Layers in order: each GPU holds one contiguous range, GPUs in group order, last layer pinned first.
    owners = [device_map[f"language_model.model.layers.{i}"] for i in range(N_LAYERS - 1)]
    runs = [d for i, d in enumerate(owners) if i == 0 or owners[i - 1] != d]
    assert runs == [d for d in devices if d in owners]
    return placed


def test_sa2va_8b_sizes_are_realistic():
    sizes = sa2va_8b_sizes()
    assert 16.0e9 < sum(sizes.values()) < 17.2e9  # SA2VA.md: ~16.6 GB in bf16
    assert 0.43e9 < sizes["language_model.model.layers.0"] < 0.45e9
    assert 0.75e9 < sizes["language_model.output"] < 0.77e9


@pytest.mark.parametrize("devices", [[0, 1], [2, 3], [0, 1, 2, 3], [3, 1, 0, 2]])
def test_fits_on_2_and_4_gpus_capped_at_22gib(devices):
    sizes = sa2va_8b_sizes()
    cap = parse_memory("22GiB")
    device_map = build_device_map(sizes, devices, {d: cap for d in devices})
    placed = check_map(device_map, sizes, devices, cap)
    assert all(len(placed[d]["layers"]) > 0 for d in devices), "every GPU of the group takes layers"
    # The first GPU carries everything else, so it gets fewer layers than the others (share 0.5).
    assert len(placed[devices[0]]["layers"]) < len(placed[devices[1]]["layers"])


def test_one_gpu_of_22gib_cannot_hold_bf16_8b():
    with pytest.raises(ConfigError) as err:
        build_device_map(sa2va_8b_sizes(), [0], {0: parse_memory("22GiB")})
    message = str(err.value)
    assert "15.5 GiB of weights" in message and "22.0 GiB" in message
    assert "--gpus-per-model" in message and "--quantize 4bit" in message and "--max-memory" in message


def test_one_gpu_without_cap_or_quantized_4bit_fits():
    sizes = sa2va_8b_sizes()
    device_map = build_device_map(sizes, [0], None)
    assert set(device_map.values()) == {0}
    small = quantized_sizes(sizes, "4bit")
    assert (
        small["vision_model"] == sizes["vision_model"]
        and small["language_model.output"] == sizes["language_model.output"]
    )
    assert small["language_model.model.layers.3"] < sizes["language_model.model.layers.3"] / 3
    cap = parse_memory("22GiB")
    check_map(build_device_map(small, [0], {0: cap}), small, [0], cap)


def test_caps_shift_layers_off_a_small_gpu():
    sizes = sa2va_8b_sizes()
    caps = {0: parse_memory("22GiB"), 1: parse_memory("10GiB"), 2: parse_memory("22GiB")}
    device_map = build_device_map(sizes, [0, 1, 2], caps)
    placed = device_summary(device_map, sizes)
    assert placed[1]["bytes"] + GiB <= caps[1]
    assert sum(len(p["layers"]) for p in placed.values()) == N_LAYERS


def test_bad_settings_are_config_errors():
    sizes = sa2va_8b_sizes()
    with pytest.raises(ConfigError, match="no cap for GPU"):
        build_device_map(sizes, [0, 1], {0: 10**11})
    with pytest.raises(ConfigError, match="at least one"):
        build_device_map(sizes, [], None)
    with pytest.raises(ConfigError, match="layers"):
        build_device_map({"vision_model": 10}, [0], None)


def test_parse_memory_units():
    assert parse_memory("22GiB") == 22 * 2**30
    assert parse_memory("22GB") == 22 * 10**9
    assert parse_memory("22000MB") == 22 * 10**9
    assert parse_memory("1.5 gib") == int(1.5 * 2**30)
    with pytest.raises(ConfigError, match="max-memory"):
        parse_memory("lots")


def test_part_names_follow_sa2va_and_qwen_layouts():
    assert part_of("language_model.model.layers.12.attention.wqkv.weight") == "language_model.model.layers.12"
    assert part_of("language_model.model.embed_tokens.weight") == "language_model.model.embed_tokens"
    assert part_of("language_model.lm_head.weight") == "language_model.lm_head"
    assert part_of("grounding_encoder.sam2_model.image_encoder.trunk.x") == "grounding_encoder"


class _TinyLM(nn.Module):
    def __init__(self):
        super().__init__()
        self.model = nn.Module()
        self.model.embed_tokens = nn.Embedding(10, 4)
        self.model.layers = nn.ModuleList(nn.Linear(4, 4) for _ in range(3))
        self.model.norm = nn.LayerNorm(4)
        self.lm_head = nn.Linear(4, 10, bias=False)


class _TinySa2VA(nn.Module):
    def __init__(self):
        super().__init__()
        # InternViT / SAM2 read their drop-path schedule like this while constructing
        self.drop_path = [x.item() for x in torch.linspace(0, 0.1, 3)]
        self.vision_model = nn.Conv2d(3, 4, 3)
        self.mlp1 = nn.Linear(4, 4)
        self.language_model = _TinyLM()
        self.register_buffer("step", torch.zeros(2, dtype=torch.long))


def test_sizes_measured_with_empty_weights_match_a_real_model():
    """Constructors that compute with tensors (.item()) run; the old torch.device("meta") build failed here."""
    with pytest.raises(RuntimeError, match="meta"), torch.device("meta"):
        _TinySa2VA()
    measured = empty_module_sizes(_TinySa2VA, torch.bfloat16)
    assert measured == module_sizes(_TinySa2VA(), torch.bfloat16)
    assert measured["language_model.model.layers.1"] == (16 + 4) * 2
    assert measured["step"] == 2 * 8  # integer buffers keep their own size
    device_map = build_device_map(measured, [0, 1])
    assert device_map["language_model.model.layers.2"] == 0 and device_map["language_model.lm_head"] == 0
