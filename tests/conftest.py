"""Test-wide settings (offline, quiet, CPU, small) and the shared tiny pipeline fixtures."""

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")

# A student small enough to train in seconds on 64 px images.
TINY_STUDENT = [
    "--model.student.encoder=resnet18",
    "--model.student.extra={encoder_depth: 3, decoder_channels: [16, 8, 4]}",
]


@pytest.fixture(scope="session")
def tiny_data_and_cache(tmp_path_factory):
    """12 synthetic 64 px images (merged format) and their Frangi teacher cache."""
    from distill import cache_teacher
    from distill.synth import make_dataset

    root = tmp_path_factory.mktemp("tiny")
    data = make_dataset(root / "data", count=12, size=64, style="fundus", seed=0)
    cache = root / "cache"
    args = [
        "--config",
        "configs/teacher/frangi_synthetic.yaml",
        "--data-root",
        str(data),
        "--out",
        str(cache),
    ]
    assert cache_teacher.main([*args, "--views", "identity"]) == 0
    return data, cache


def tiny_fit_args(data, cache, runs_dir, *extra: str) -> list[str]:
    """`distill.fit` arguments for a fast CPU run of the demo config on the tiny data."""
    return [
        "--config=configs/fit/demo.yaml",
        f"--data.data_root={data}",
        f"--data.cache_dir={cache}",
        f"--runs_dir={runs_dir}",
        "--data.crop_size=null",
        "--data.batch_size=4",
        "--trainer.enable_progress_bar=false",
        *TINY_STUDENT,
        *extra,
    ]


@pytest.fixture(scope="session")
def tiny_run(tiny_data_and_cache, tmp_path_factory):
    """A finished one-epoch KD run directory (checkpoints, metrics_*.json, config.yaml)."""
    from distill.fit import main

    data, cache = tiny_data_and_cache
    runs = tmp_path_factory.mktemp("runs")
    main(tiny_fit_args(data, cache, runs, "--run_name=tiny", "--trainer.max_epochs=1"))
    return runs / "tiny"


@pytest.fixture(scope="session")
def tiny_views_run(tiny_data_and_cache, tmp_path_factory):
    """A finished two-epoch KD run scored over the 8 D4 views, with an EMA of weights, in bf16."""
    from distill.fit import main

    data, cache = tiny_data_and_cache
    runs = tmp_path_factory.mktemp("runs")
    options = ["--model.test_views=d4", "--model.ema_decay=0.9", "--trainer.precision=bf16-mixed"]
    main(tiny_fit_args(data, cache, runs, "--run_name=views", "--trainer.max_epochs=2", *options))
    return runs / "views"
