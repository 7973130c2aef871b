"""Students: every registered one maps raw RGB of any size to logits of that size; checkpoints round-trip."""

import warnings
from pathlib import Path

import pytest
import torch
import yaml

from distill.errors import ConfigError
from distill.students import _REGISTRY as STUDENT_FACTORIES
from distill.students import (
    StudentConfig,
    count_parameters,
    create_student,
    list_students,
    load_encoder_weights,
    load_student,
)

SMALL = {
    "unet": {"encoder": "resnet18", "encoder_depth": 3, "decoder_channels": [32, 16, 8]},
    "unetpp": {"encoder": "resnet18", "encoder_depth": 3, "decoder_channels": [32, 16, 8]},
    "segformer": {"encoder": "mit_b0"},
    "hf_segformer": {"encoder": "b0"},
}


def test_every_student_is_covered():
    assert set(SMALL) == set(list_students())


@pytest.mark.parametrize("name", sorted(SMALL))
def test_forward_at_odd_size_returns_input_size_logits(name):
    torch.manual_seed(0)
    student = create_student(name, **SMALL[name]).eval()
    images = torch.randint(0, 256, (2, 3, 70, 90), dtype=torch.uint8)
    with torch.no_grad():
        logits = student(images)
        logits_float = student(images.float() / 255)
    assert logits.shape == (2, 1, 70, 90)
    assert torch.isfinite(logits).all()
    torch.testing.assert_close(logits, logits_float)  # uint8 and [0,1] float are the same image


def test_timm_encoder_and_config_kwargs():
    config = StudentConfig(
        name="unet",
        encoder="tu-mobilenetv3_small_050",
        extra={"encoder_depth": 3, "decoder_channels": [16, 8, 4]},
    )
    student = create_student(**config.kwargs())
    assert student(torch.zeros(1, 3, 40, 40, dtype=torch.uint8)).shape == (1, 1, 40, 40)
    assert count_parameters(student) > 0


def test_a_misspelt_extra_key_is_refused_not_dropped():
    """smp passes unknown keys to the encoder, and only timm encoders read them: a typo built the default model."""
    with pytest.raises(
        ConfigError, match=r"\['decoder_chanels', 'encoder_dpth'\] is not an option.*encoder_depth"
    ):
        create_student("unet", "resnet18", encoder_dpth=3, decoder_chanels=[8, 8, 8])
    with pytest.raises(ConfigError, match="foo_bar"):  # timm encoders refuse them themselves
        create_student("unet", "tu-mobilenetv3_large_100", foo_bar=1)
    assert (
        create_student("unet", "resnet18", encoder_depth=3, decoder_channels=[8, 8, 8]).config[
            "encoder_depth"
        ]
        == 3
    )


def test_unknown_student_is_a_config_error():
    with pytest.raises(ConfigError, match="choose from"):
        create_student("nope")


def test_local_encoder_weights_load_and_missing_keys_refused(tmp_path):
    source = create_student("unet", **SMALL["unet"])
    path = tmp_path / "enc.pth"
    torch.save({f"encoder.{k}": v for k, v in source.net.encoder.state_dict().items()}, path)
    target = create_student("unet", **SMALL["unet"], encoder_weights=str(path))
    for key, value in source.net.encoder.state_dict().items():
        torch.testing.assert_close(target.net.encoder.state_dict()[key], value)
    partial = dict(list(source.net.encoder.state_dict().items())[:3])
    torch.save(partial, path)
    with pytest.raises(ConfigError, match="missing"):
        load_encoder_weights(create_student("unet", **SMALL["unet"]).net, path)


def test_load_student_round_trip_and_foreign_checkpoint(tmp_path):
    student = create_student("unet", **SMALL["unet"]).eval()
    ckpt = tmp_path / "s.ckpt"
    torch.save(
        {
            "state_dict": {f"student.{k}": v for k, v in student.state_dict().items()},
            "distill": {
                "format_version": 1,
                "student": student.config,
                "chosen_threshold": 0.35,
                "threshold_rule": "max_dice",
            },
        },
        ckpt,
    )
    loaded, info = load_student(ckpt)
    assert info["chosen_threshold"] == 0.35 and info["params"] == count_parameters(student)
    images = torch.randint(0, 256, (1, 3, 64, 64), dtype=torch.uint8)
    with torch.no_grad():
        torch.testing.assert_close(loaded(images), student(images))
    foreign = tmp_path / "foreign.ckpt"
    torch.save({"state_dict": {"net.weight": torch.zeros(1)}}, foreign)
    with pytest.raises(ConfigError, match="not a vessel-distill"):
        load_student(foreign)
    older = tmp_path / "older.ckpt"
    checkpoint = torch.load(ckpt, weights_only=True)
    torch.save({**checkpoint, "distill": {**checkpoint["distill"], "format_version": 0}}, older)
    with pytest.raises(ConfigError, match="format 0, this version reads 1.*train the student again"):
        load_student(older)
    torch.save({"state_dict": checkpoint["state_dict"]}, older)  # student weights only
    with pytest.raises(
        ConfigError, match=r"student weights without checkpoint\['distill'\].*train the student again"
    ):
        load_student(older)


@pytest.mark.parametrize("config", sorted(Path("configs/fit").glob("*.yaml")), ids=lambda p: p.stem)
def test_every_parameter_of_each_shipped_student_gets_a_gradient(config):
    """What DDP requires (without find_unused_parameters): one backward reaches every parameter."""
    student = create_student(
        **StudentConfig(**yaml.safe_load(config.read_text())["model"]["student"]).kwargs()
    )
    student.train()(torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8)).sum().backward()
    assert [name for name, p in student.named_parameters() if p.grad is None] == []


@pytest.mark.parametrize(
    ("name", "encoder", "depth"),
    [
        ("unet", "resnet18", 4),  # torchvision-style smp encoder: layer4 was built, never run
        ("unet", "tu-mobilenetv3_large_100", 4),  # timm features_only: later blocks run, output unused
        ("unet", "mit_b0", 4),  # smp's Mix Transformer: the last stage
        ("segformer", "mit_b0", 4),
    ],
)
def test_stages_beyond_encoder_depth_are_dropped_and_the_logits_are_unchanged(name, encoder, depth):
    extra = {"encoder_depth": depth} | ({} if name == "segformer" else {"decoder_channels": [32, 16, 8, 4]})
    torch.manual_seed(0)
    full, _ = STUDENT_FACTORIES[name](encoder, **extra)  # what smp builds
    full.eval()(torch.rand(1, 3, 64, 64)).sum().backward()
    used = sum(p.numel() for p in full.parameters() if p.grad is not None)
    student = create_student(name, encoder, **extra).eval()
    assert count_parameters(student) == used < count_parameters(full)
    # A state dict that still holds the dropped stages (a checkpoint from before) loads, same logits.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        student.load_state_dict({f"net.{k}": v for k, v in full.state_dict().items()})
    images = torch.rand(2, 3, 64, 96)
    with torch.no_grad():
        torch.testing.assert_close(student.net(images), full(images), rtol=0, atol=0)


def test_a_full_encoder_file_loads_into_a_shallower_student_without_warnings(tmp_path):
    """An ImageNet-style file holds every stage; the ones encoder_depth drops are skipped quietly."""
    full, _ = STUDENT_FACTORIES["unet"]("resnet18")  # encoder_depth 5: layer1 .. layer4
    path = tmp_path / "resnet18.pth"
    torch.save(full.encoder.state_dict(), path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        student = create_student("unet", **SMALL["unet"], encoder_weights=str(path))
    torch.testing.assert_close(
        student.net.encoder.layer2[0].conv1.weight, full.encoder.layer2[0].conv1.weight
    )


def test_a_student_is_built_the_same_under_torch_no_grad():
    """Finding the unused stages needs gradients; a caller's no_grad (inference code) must not break it."""
    torch.manual_seed(0)
    built = create_student("unet", "resnet18", encoder_depth=4, decoder_channels=[32, 16, 8, 4])
    torch.manual_seed(0)
    with torch.no_grad():
        under_no_grad = create_student("unet", "resnet18", encoder_depth=4, decoder_channels=[32, 16, 8, 4])
    assert count_parameters(under_no_grad) == count_parameters(built)
    assert all(p.requires_grad for p in under_no_grad.parameters())
