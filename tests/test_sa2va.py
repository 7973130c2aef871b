"""The sa2va teacher against a tiny stand-in checkpoint loaded through transformers' remote-code path.

The stand-in (tests/sa2va_standin.py) behaves like Sa2VA's real code where the adapter relies on it;
`scripts/check_sa2va_real.py` runs the same adapter on Sa2VA's real code on GPUs.
"""

import json
import shutil

import numpy as np
import pytest
import torch
import transformers
import transformers.dynamic_module_utils as dynamic

import distill.teachers.sa2va_forced as forced_module
from distill.cache_teacher import main as cache_teacher
from distill.errors import ConfigError, DistillError
from distill.synth import make_dataset
from distill.teachers import create_teacher
from distill.teachers.device_map import empty_module_sizes
from distill.teachers.sa2va import (
    DEFAULT_PROMPT,
    Sa2VATeacher,
    build_prompt,
    flash_attn_optional,
    model_dir_identity,
    quantization_kwargs,
)
from distill.teachers.sa2va_forced import mask_agreement, seg_hidden_positions
from tests.sa2va_standin import write_standin

SORRY = "Sorry.<|im_end|>"


@pytest.fixture(scope="module")
def standin(tmp_path_factory):
    return write_standin(tmp_path_factory.mktemp("sa2va") / "standin")


@pytest.fixture(scope="module")
def teacher(standin):
    return create_teacher("sa2va", model_path=str(standin), trust_remote_code=True, max_dynamic_patch=2)


def vessel_image(h=70, w=90, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def images(sizes=((70, 90), (48, 64), (70, 90), (120, 40), (70, 90))):
    return [vessel_image(h, w, seed=i) for i, (h, w) in enumerate(sizes)]


def sa2va_masks(teacher, image, prompt):
    """What Sa2VA itself returns for this image (its binary masks), bypassing the adapter."""
    from PIL import Image

    with torch.inference_mode():
        out = teacher.model.predict_forward(
            image=Image.fromarray(image), text=prompt, tokenizer=teacher.tokenizer
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
    teacher.load()
    assert "language_embd_inference" in vars(teacher.model.grounding_encoder)
    assert "generate" in vars(teacher.model)
    assert teacher.model.max_dynamic_patch == 2
    assert dynamic.get_imports.__module__ == "transformers.dynamic_module_utils", "import patch restored"


def test_construction_is_cheap_and_the_fingerprint_needs_no_model(standin):
    lazy = create_teacher("sa2va", model_path=str(standin), trust_remote_code=True)
    assert lazy.model is None, "a run with nothing to do must not load the model"
    assert lazy.fingerprint()["teacher"] == "sa2va"
    assert lazy.stats()["agreement"] is None and lazy.stats()["load_seconds"] is None
    lazy.close()  # closing a teacher that never loaded is fine


def test_no_seg_gives_none_and_is_counted(tmp_path, capsys):
    sorry = write_standin(tmp_path / "sorry", answer=SORRY)
    teacher = create_teacher("sa2va", model_path=str(sorry), trust_remote_code=True)
    assert teacher.predict_logits([vessel_image(), vessel_image(40, 52)]) == [None, None]
    stats = teacher.stats()
    assert stats["no_mask"] == 2 and stats["agreement"] is None and stats["pixels_checked"] == 0
    # Through the CLI: an all-no_mask run used to crash at the summary (agreement None).
    data = make_dataset(tmp_path / "data", count=2, size=48, style="fundus", seed=1)
    code = cache_teacher(["--teacher", "sa2va", "--model-path", str(sorry), "--trust-remote-code", "--data-format",
                          "merged", "--data-root", str(data), "--out", str(tmp_path / "cache")])  # fmt: skip
    printed = capsys.readouterr().out
    assert code == 0 and "2 no_mask" in printed and "self-check: not checked (0 pixels)" in printed
    assert "warning: the teacher gave no mask for any image" in printed


def test_dataset_text_prompts(standin):
    teacher = create_teacher("sa2va", model_path=str(standin), trust_remote_code=True, use_dataset_text=True)
    image = vessel_image(48, 64, seed=3)
    (arteries,) = teacher.predict_logits([image], ["the arteries"])
    (mask,) = sa2va_masks(teacher, image, "<image>Please segment the arteries in this image.")
    np.testing.assert_array_equal(arteries > 0, mask[0])
    with pytest.raises(ConfigError, match="no dataset text"):
        teacher.predict_logits([image], [None])


def test_sabotaged_masks_fail_the_self_check(tmp_path):
    path = write_standin(tmp_path / "sabotaged", sabotage=True)
    teacher = create_teacher("sa2va", model_path=str(path), trust_remote_code=True)
    with pytest.raises(DistillError, match=r"self-check failed: .* pixels .*% > tolerance 0.100%"):
        teacher.predict_logits([vessel_image()])


def test_missing_post_init_is_shimmed_before_loading_so_weights_are_read_once(tmp_path, monkeypatch):
    """Sa2VA's class never calls post_init(); the old adapter loaded everything, failed, then loaded again."""
    path = write_standin(tmp_path / "no_post_init", call_post_init=False)
    loads = []
    original = transformers.PreTrainedModel.from_pretrained.__func__

    def counting(cls, *args, **kwargs):
        loads.append(cls.__name__)
        return original(cls, *args, **kwargs)

    monkeypatch.setattr(transformers.PreTrainedModel, "from_pretrained", classmethod(counting))
    teacher = create_teacher("sa2va", model_path=str(path), trust_remote_code=True)
    assert teacher.predict_logits([vessel_image(40, 52)])[0].shape == (40, 52)
    assert teacher.stats()["post_init_shim"] is True
    assert loads == ["Sa2VAChatModel"]


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
def test_every_documented_dtype_runs(standin, dtype):
    """Sa2VA casts inputs to the dtype given to preparing_for_generation (bf16 unless told): float16/float32
    failed on the first image with 'Input type (c10::BFloat16) and bias type (float) should be the same'."""
    teacher = create_teacher("sa2va", model_path=str(standin), trust_remote_code=True, dtype=dtype)
    (logits,) = teacher.predict_logits([vessel_image(40, 52)])
    assert logits.shape == (40, 52) and teacher.stats()["agreement"] == 1.0
    assert teacher.model.torch_dtype == getattr(torch, dtype)
    assert next(teacher.model.parameters()).dtype == getattr(torch, dtype)


def test_device_map_sizing_runs_constructors_that_call_item(standin):
    """InternViT/SAM2 constructors call .item() on a torch.linspace: building under torch.device("meta")
    failed before any weight was read (tests/test_device_map.py shows it); accelerate's empty weights keep
    other tensors real."""
    from transformers import AutoConfig
    from transformers.dynamic_module_utils import get_class_from_dynamic_module

    with flash_attn_optional():
        config = AutoConfig.from_pretrained(standin, trust_remote_code=True)
        model_class = get_class_from_dynamic_module(config.auto_map["AutoModel"], str(standin))
    sizes = empty_module_sizes(lambda: model_class(config), torch.bfloat16)
    assert sizes["grounding_encoder"] > 0 and "language_model.model.layers.1" in sizes
    # The adapter's own sizing path for one model over two GPUs (no GPU needed to plan the map).
    sharded = create_teacher(
        "sa2va", model_path=str(standin), trust_remote_code=True, devices=[0, 1], max_memory="2GiB",
        first_gpu_reserve="0GiB",
    )  # fmt: skip
    with flash_attn_optional():
        kwargs = sharded._load_kwargs(model_class, config, torch.bfloat16)
    placement = kwargs["device_map"]
    assert placement["grounding_encoder"] == 0 and placement["language_model.model.layers.1"] == 0
    assert placement["language_model.model.layers.0"] == 1, "the other layers go to the second GPU"


def test_load_failures_name_their_cause_and_mention_versions_only_when_they_are_the_cause(tmp_path):
    old = write_standin(
        tmp_path / "old_code", init_error="'InternLM2ForCausalLM' object has no attribute 'generate'"
    )
    with pytest.raises(DistillError, match=r"transformers 5\.17.*predates transformers 4\.50.*4\.57.*4\.49"):
        create_teacher("sa2va", model_path=str(old), trust_remote_code=True).load()
    broken = write_standin(tmp_path / "broken", init_error="config has no vision_config")
    with pytest.raises(DistillError) as caught:
        create_teacher("sa2va", model_path=str(broken), trust_remote_code=True).load()
    message = str(caught.value)
    assert "AttributeError: config has no vision_config" in message and "modeling_sa2va_chat.py:" in message
    assert "pinned" not in message and "4.57" not in message


def test_refuses_without_opt_in_or_a_local_directory(standin, tmp_path):
    with pytest.raises(DistillError, match="--trust-remote-code"):
        create_teacher("sa2va", model_path=str(standin))
    with pytest.raises(ConfigError, match="Hub id"):
        create_teacher("sa2va", model_path="ByteDance/Sa2VA-8B", trust_remote_code=True)
    with pytest.raises(ConfigError, match="no config.json"):
        create_teacher("sa2va", model_path=str(tmp_path), trust_remote_code=True)
    with pytest.raises(ConfigError, match="<image>"):
        create_teacher("sa2va", model_path=str(standin), trust_remote_code=True, prompt="segment vessels")
    with pytest.raises(ConfigError, match="needs GPUs"):
        create_teacher("sa2va", model_path=str(standin), trust_remote_code=True, quantize="4bit")
    with pytest.raises(ConfigError, match="path=teacher_forced"):
        create_teacher("sa2va", model_path=str(standin), trust_remote_code=True, sam2_views=True)
    with pytest.raises(ConfigError, match="choose one of"):
        create_teacher("sa2va", model_path=str(standin), trust_remote_code=True, path="beam")


def test_fingerprint_is_the_model_content_not_its_path(teacher, standin, tmp_path):
    base = teacher.fingerprint()
    assert json.loads(json.dumps(base)) == base
    assert base["prompt"] == DEFAULT_PROMPT and base["dtype"] == "bfloat16" and base["max_dynamic_patch"] == 2
    assert str(standin) not in json.dumps(base)
    other = create_teacher(
        "sa2va",
        model_path=str(standin),
        trust_remote_code=True,
        max_dynamic_patch=2,
        prompt="<image>Find it.",
    )
    assert other.fingerprint()["prompt"] != base["prompt"] and other.fingerprint()["model"] == base["model"]
    moved = shutil.copytree(standin, tmp_path / "elsewhere" / "copy")
    assert (
        create_teacher(
            "sa2va", model_path=str(moved), trust_remote_code=True, max_dynamic_patch=2
        ).fingerprint()
        == base
    )
    retrained = write_standin(tmp_path / "retrained", seed=1)
    assert model_dir_identity(retrained)["weights_sampled_sha256"] != base["model"]["weights_sampled_sha256"]
    (moved / "modeling_sa2va_chat.py").write_text(
        (moved / "modeling_sa2va_chat.py").read_text() + "\n# edited\n"
    )
    assert (
        model_dir_identity(moved)["code_and_tokenizer_sha256"] != base["model"]["code_and_tokenizer_sha256"]
    )
    forced = create_teacher("sa2va", model_path=str(standin), trust_remote_code=True, path="teacher_forced")
    assert forced.fingerprint()["path"] == "teacher_forced" and forced.fingerprint() != teacher.fingerprint()


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


# -- the teacher-forced path


def test_seg_positions_and_mask_agreement_are_pure():
    seg = 7
    assert seg_hidden_positions([1, 7, 2, 7, 3], seg) == [2, 4]
    assert seg_hidden_positions([1, 2, 7], seg) == [], "a [SEG] as the last token has no state (as in Sa2VA)"
    a = np.array([[1.0, -1.0], [2.0, -3.0]], np.float32)
    assert mask_agreement(a, a, (2, 2)) == 1.0 and mask_agreement(a, None, (2, 2)) == 0.5
    assert mask_agreement(None, None, (2, 2)) == 1.0


def test_teacher_forced_equals_generate_and_is_checked(standin, teacher):
    batch = images()  # two prompt lengths: 1 tile and 2+1 tiles, in mixed order
    expected = teacher.predict_logits(batch)
    forced = create_teacher(
        "sa2va", model_path=str(standin), trust_remote_code=True, max_dynamic_patch=2, path="teacher_forced",
        check_first=1, check_every=2,
    )  # fmt: skip
    got = forced.predict_logits(batch)
    for a, b in zip(got, expected, strict=True):
        np.testing.assert_array_equal(a, b)
    stats = forced.stats()["teacher_forced"]
    # image 0 ran through generate to find the answer; 4 forced, of which #0 and #2 were sampled
    assert stats == {
        "forced": 4,
        "fallback": 0,
        "sampled": 2,
        "sample_agreement": 1.0,
        "worst_sample_agreement": 1.0,
    }
    tokens = forced._forcing.answer_ids
    assert forced.tokenizer.decode(tokens) == "It is [SEG].<|im_end|>"


def test_a_wrong_answer_fails_the_greedy_check_and_falls_back_to_generate(standin, teacher):
    batch = images(((70, 90), (48, 64)))
    expected = teacher.predict_logits(batch)
    wrong = create_teacher(
        "sa2va", model_path=str(standin), trust_remote_code=True, max_dynamic_patch=2, path="teacher_forced",
        answer="They are [SEG].<|im_end|>",
    )  # fmt: skip
    got = wrong.predict_logits(batch)
    for a, b in zip(got, expected, strict=True):
        np.testing.assert_array_equal(a, b)
    assert wrong.stats()["teacher_forced"]["fallback"] == 2 and wrong.stats()["teacher_forced"]["forced"] == 0


def test_the_sample_check_stops_a_run_that_disagrees_with_predict_forward(standin, monkeypatch):
    decode = forced_module.decode_seg
    monkeypatch.setattr(forced_module, "decode_seg", lambda *args: -decode(*args))
    forced = create_teacher("sa2va", model_path=str(standin), trust_remote_code=True, path="teacher_forced")
    with pytest.raises(
        DistillError, match=r"teacher_forced check failed: .* agrees with Sa2VA's predict_forward"
    ):
        forced.predict_logits(images(((70, 90), (70, 90))))


def test_teacher_forced_on_a_model_that_never_says_seg(tmp_path):
    sorry = write_standin(tmp_path / "sorry", answer=SORRY)
    forced = create_teacher("sa2va", model_path=str(sorry), trust_remote_code=True, path="teacher_forced")
    assert forced.predict_logits(images(((40, 52), (40, 52)))) == [None, None]
    assert forced.stats()["no_mask"] == 2 and forced.stats()["teacher_forced"]["forced"] == 0


def test_sam2_views_share_the_llm_pass_and_stay_close_to_the_full_model_per_view(standin, teacher):
    views = ["identity", "hflip", "rot90", "transpose"]
    batch = images(((70, 90), (64, 64), (70, 90)))
    full = teacher.predict_views(batch, [views] * 3)
    shared = create_teacher(
        "sa2va", model_path=str(standin), trust_remote_code=True, max_dynamic_patch=2, path="teacher_forced",
        sam2_views=True,
    )  # fmt: skip
    assert shared.views_in_one_pass
    got = shared.predict_views(batch, [views] * 3)
    for image_maps, full_maps, image in zip(got, full, batch, strict=True):
        for view, a, b in zip(views, image_maps, full_maps, strict=True):
            assert a.shape == b.shape
            agreement = mask_agreement(a, b, a.shape)
            # The [SEG] embedding comes from the unviewed image, so views differ a little (measured: >= 99.8%).
            assert agreement >= (1.0 if view == "identity" else 0.99), (view, agreement)
        assert image_maps[0].shape == image.shape[:2]
    assert shared.stats()["teacher_forced"]["forced"] == 2  # the first image found the answer via generate


# -- through the caching CLI


def test_cache_teacher_reruns_without_loading_and_accepts_a_moved_model(
    standin, tmp_path, monkeypatch, capsys
):
    data = make_dataset(tmp_path / "data", count=4, size=48, style="fundus", seed=5)
    out = tmp_path / "cache"
    flags = ["--teacher", "sa2va", "--model-path", str(standin), "--trust-remote-code", "--data-format", "merged",
             "--data-root", str(data), "--out", str(out), "--teacher-option", "path=teacher_forced",
             "--teacher-option", "sam2_views=true", "--views", "identity,hflip"]  # fmt: skip
    assert cache_teacher(flags) == 0
    printed = capsys.readouterr().out
    assert "teacher-forced: 3 image(s) forced, 0 fell back" in printed, printed
    assert cache_teacher(["--verify", str(out)]) == 0

    def no_loading(self):
        raise AssertionError("the model was loaded although nothing was left to do")

    monkeypatch.setattr(Sa2VATeacher, "load", no_loading)
    moved = shutil.copytree(standin, tmp_path / "other_node" / "sa2va")
    flags[flags.index(str(standin))] = str(moved)
    assert cache_teacher(flags) == 0
    assert "nothing to do, all 4 id(s) already cached; the teacher was not run" in capsys.readouterr().out
