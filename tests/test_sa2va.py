"""The sa2va teacher against a tiny stand-in checkpoint loaded through transformers' remote-code path."""

import json
import shutil

import numpy as np
import pytest
import torch
import transformers.dynamic_module_utils as dynamic

from distill.errors import ConfigError, DistillError
from distill.teachers import create_teacher
from distill.teachers.sa2va import (
    DEFAULT_PROMPT,
    build_prompt,
    model_dir_identity,
    quantization_kwargs,
)
from tests.sa2va_standin import write_standin


@pytest.fixture(scope="module")
def standin(tmp_path_factory):
    return write_standin(tmp_path_factory.mktemp("sa2va") / "standin")


@pytest.fixture(scope="module")
def teacher(standin):
    return create_teacher("sa2va", model_path=str(standin), trust_remote_code=True, max_dynamic_patch=2)


def vessel_image(h=70, w=90, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def sa2va_masks(teacher, image, prompt):
    """What Sa2VA itself returns for this image (its binary masks), bypassing the adapter."""
    from PIL import Image

    with torch.inference_mode():
        out = teacher.model.predict_forward(
            image=Image.fromarray(image), text=prompt, tokenizer=teacher.tokenizer, prediction_only=False
        )
    return out["prediction_masks"]


def test_logits_at_image_size_reproduce_sa2va_masks(teacher):
    image = vessel_image(70, 90)
    (logits,) = teacher.predict_logits([image])
    assert logits.shape == (70, 90) and logits.dtype == np.float32
    assert np.isfinite(logits).all()
    (mask,) = sa2va_masks(teacher, image, DEFAULT_PROMPT)
    assert mask.shape == (1, 70, 90) and mask.dtype == bool
    assert 0.05 < mask.mean() < 0.95, "the stand-in's mask has both classes, so the check can fail"
    np.testing.assert_array_equal(logits > 0, mask[0])  # sigmoid(x) > 0.5  <=>  x > 0
    stats = teacher.stats()
    assert stats["agreement"] == 1.0 and stats["pixels_checked"] >= 70 * 90
    assert stats["transformers"].startswith("5.") and stats["post_init_shim"] is False


def test_capture_is_on_the_instance_and_tiles_option_sticks(teacher):
    assert "language_embd_inference" in vars(teacher.model.grounding_encoder)
    assert teacher.model.max_dynamic_patch == 2
    assert dynamic.get_imports.__module__ == "transformers.dynamic_module_utils", "import patch restored"


def test_no_seg_gives_none_and_is_counted(teacher):
    before = teacher.stats()["no_mask"]
    black = np.zeros((64, 80, 3), np.uint8)
    assert teacher.predict_logits([black, vessel_image()])[0] is None
    assert teacher.stats()["no_mask"] == before + 1


def test_dataset_text_prompts_and_several_segs_take_the_union(standin):
    teacher = create_teacher("sa2va", model_path=str(standin), trust_remote_code=True, use_dataset_text=True)
    image = vessel_image(48, 64, seed=3)
    union, single, nothing = teacher.predict_logits([image] * 3, ["every vessel", "the arteries", "nothing"])
    masks = sa2va_masks(teacher, image, "<image>Please segment every vessel in this image.")
    assert len(masks) == 2
    np.testing.assert_array_equal(union > 0, masks[0][0] | masks[1][0])
    assert single is not None and nothing is None
    assert teacher.stats()["multi_seg"] == 1
    with pytest.raises(ConfigError, match="no dataset text"):
        teacher.predict_logits([image], [None])


def test_sabotaged_masks_fail_the_self_check(tmp_path):
    path = write_standin(tmp_path / "sabotaged", sabotage=True)
    teacher = create_teacher("sa2va", model_path=str(path), trust_remote_code=True)
    with pytest.raises(DistillError, match=r"self-check failed: .* pixels .*% > tolerance 0.100%"):
        teacher.predict_logits([vessel_image()])


def test_missing_post_init_is_shimmed(tmp_path):
    path = write_standin(tmp_path / "no_post_init", call_post_init=False)
    teacher = create_teacher("sa2va", model_path=str(path), trust_remote_code=True)
    assert teacher.stats()["post_init_shim"] is True
    assert teacher.predict_logits([vessel_image(40, 52)])[0].shape == (40, 52)


def test_version_breakage_names_transformers_and_sa2va_pins(tmp_path):
    path = write_standin(
        tmp_path / "old_code", init_error="'InternLM2ForCausalLM' object has no attribute 'generate'"
    )
    with pytest.raises(DistillError, match=r"transformers 5\.17.*predates transformers 4\.50.*4\.57.*4\.49"):
        create_teacher("sa2va", model_path=str(path), trust_remote_code=True)


def test_refuses_without_opt_in_or_a_local_directory(standin, tmp_path):
    with pytest.raises(DistillError, match="--trust-remote-code"):
        create_teacher("sa2va", model_path=str(standin))
    with pytest.raises(ConfigError, match="Hub id"):
        create_teacher("sa2va", model_path="ByteDance/Sa2VA-8B", trust_remote_code=True)
    with pytest.raises(ConfigError, match="no config.json"):
        create_teacher("sa2va", model_path=str(tmp_path), trust_remote_code=True)
    with pytest.raises(ConfigError, match="<image>"):
        create_teacher("sa2va", model_path=str(standin), trust_remote_code=True, prompt="segment vessels")
    with pytest.raises(ConfigError, match="pip install bitsandbytes"):
        create_teacher("sa2va", model_path=str(standin), trust_remote_code=True, quantize="4bit")


def test_fingerprint_follows_prompt_and_weights(teacher, standin, tmp_path):
    base = teacher.fingerprint()
    assert json.loads(json.dumps(base)) == base
    assert base["prompt"] == DEFAULT_PROMPT and base["dtype"] == "bfloat16" and base["max_dynamic_patch"] == 2
    other = create_teacher(
        "sa2va",
        model_path=str(standin),
        trust_remote_code=True,
        max_dynamic_patch=2,
        prompt="<image>Find vessels.",
    )
    assert other.fingerprint()["prompt"] != base["prompt"]
    assert other.fingerprint()["model"] == base["model"]
    copy = shutil.copytree(standin, tmp_path / "copy")
    assert model_dir_identity(copy)["weights_sampled_sha256"] == base["model"]["weights_sampled_sha256"]
    retrained = write_standin(tmp_path / "retrained", seed=1)
    assert model_dir_identity(retrained)["weights_sampled_sha256"] != base["model"]["weights_sampled_sha256"]


def test_prompt_and_quantization_config_are_pure():
    assert build_prompt(DEFAULT_PROMPT, False, "ignored") == DEFAULT_PROMPT
    assert build_prompt("", True, "retinal vessels") == "<image>Please segment retinal vessels in this image."
    assert build_prompt("", True, "<image>\nWhere are the vessels?") == "<image>\nWhere are the vessels?"
    assert quantization_kwargs("none") == {}
    four = quantization_kwargs("4bit", torch.bfloat16)
    assert four["load_in_4bit"] and four["bnb_4bit_quant_type"] == "nf4"
    assert four["bnb_4bit_compute_dtype"] is torch.bfloat16
    skip = ["grounding_encoder", "text_hidden_fcs", "vision_model", "mlp1"]
    assert four["llm_int8_skip_modules"] == skip
    assert quantization_kwargs("8bit") == {"load_in_8bit": True, "llm_int8_skip_modules": skip}
    with pytest.raises(ConfigError, match="--quantize"):
        quantization_kwargs("2bit")


def test_benchmark_builder_makes_a_loadable_standin_at_toy_size(tmp_path):
    """The GPU benchmark's model (same code at toy size): loads through the adapter, self-check passes."""
    import importlib.util
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "scripts" / "bench_sa2va_standin.py"
    spec = importlib.util.spec_from_file_location("bench_sa2va_standin", script)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    path = bench.write_sized_standin(tmp_path / "bench_toy", "toy", device="cpu")
    teacher = create_teacher("sa2va", model_path=str(path), trust_remote_code=True, dtype="float32")
    (logits,) = teacher.predict_logits(bench.synthetic_images(1, 64))
    assert logits.shape == (64, 64)
    assert teacher.stats()["agreement"] == 1.0
    assert any(k.startswith("language_model.model.layers.2.") for k in teacher.model.state_dict())
