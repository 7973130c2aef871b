import pytest

from distill.data.augment import PRESETS, register_preset
from distill.registry import Registry
from distill.students import register_student


def test_registry_registers_by_name_and_refuses_a_second_registration():
    registry = Registry("widget")

    @registry.register("a")
    def make_a():
        return "a"

    assert registry["a"] is make_a and sorted(registry) == ["a"]
    with pytest.raises(ValueError, match="widget 'a' is registered twice"):
        registry.register("a")(make_a)


def test_project_registries_share_the_refusal():
    with pytest.raises(ValueError, match="student 'unet' is registered twice"):
        register_student("unet")(lambda encoder: None)
    with pytest.raises(ValueError, match="augmentation preset 'default' is registered twice"):
        register_preset("default")(PRESETS["default"])
