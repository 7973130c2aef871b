"""`python -m distill.fit` end to end on tiny synthetic data with a real Frangi cache: files, contract, resume."""

import json
import subprocess
import sys

import pytest
import torch

from distill.errors import ConfigError
from distill.fit import main
from distill.students import load_student
from tests.conftest import tiny_fit_args


def test_fit_writes_contract_metrics_pictures_and_a_loadable_checkpoint(tiny_data_and_cache, tmp_path):
    data, cache = tiny_data_and_cache
    reports = main(
        tiny_fit_args(
            data, cache, tmp_path, "--run_name=e2e", "--trainer.max_epochs=1", "--model.kd.alpha=0.0"
        )
    )
    run = tmp_path / "e2e"
    for name in (
        "config.yaml",
        "curves_val.png",
        "overlays_val.png",
        "checkpoints/best.ckpt",
        "checkpoints/last.ckpt",
    ):
        assert (run / name).is_file(), name
    for split in ("val", "test"):
        metrics = json.loads((run / f"metrics_{split}.json").read_text())
        assert metrics == json.loads(
            json.dumps(reports[split] | {k: metrics[k] for k in ("student_params", "checkpoint")})
        )
        n = len(metrics["thresholds"])
        assert metrics["split"] == split and metrics["n_images"] >= 1
        for who in ("student", "teacher"):
            assert all(len(metrics[who][name]) == n for name in ("dice", "recall", "precision", "iou"))
            assert set(metrics["at_chosen"][who]) >= {"dice", "recall", "precision"}
            assert metrics["chosen_threshold"][who] in metrics["thresholds"]
        assert metrics["chosen_threshold"]["rule"] == "max_dice"
        assert metrics["student_params"] > 0 and metrics["checkpoint"].endswith("best.ckpt")
    val, test = (json.loads((run / f"metrics_{s}.json").read_text()) for s in ("val", "test"))
    assert test["chosen_threshold"] == val["chosen_threshold"]  # frozen on validation
    student, info = load_student(run / "checkpoints" / "best.ckpt")
    assert info["chosen_threshold"] == val["chosen_threshold"]["student"]
    assert student(torch.zeros(1, 3, 50, 70, dtype=torch.uint8)).shape == (1, 1, 50, 70)
    assert "kd:\n    alpha: 0.0" in (run / "config.yaml").read_text()


def test_resume_continues_from_the_checkpoint(tiny_data_and_cache, tmp_path):
    data, cache = tiny_data_and_cache
    main(tiny_fit_args(data, cache, tmp_path, "--run_name=first", "--trainer.max_epochs=1", "--wandb=false"))
    first = torch.load(tmp_path / "first/checkpoints/last.ckpt", weights_only=True)
    main(
        tiny_fit_args(data, cache, tmp_path, "--run_name=second", "--trainer.max_epochs=2", "--wandb=false")
        + [f"--ckpt_path={tmp_path / 'first/checkpoints/last.ckpt'}"]
    )
    second = torch.load(tmp_path / "second/checkpoints/last.ckpt", weights_only=True)
    assert second["epoch"] == first["epoch"] + 1
    assert second["global_step"] == 2 * first["global_step"]


def test_kd_without_a_cache_is_refused(tiny_data_and_cache, tmp_path):
    data, _ = tiny_data_and_cache
    args = tiny_fit_args(data, "null", tmp_path, "--trainer.max_epochs=1", "--wandb=false")
    with pytest.raises(ConfigError, match="kd.alpha"):
        main([a if not a.startswith("--data.cache_dir") else "--data.cache_dir=null" for a in args])


def test_ddp_fit_on_two_cpu_processes(tiny_data_and_cache, tmp_path):
    data, cache = tiny_data_and_cache
    args = tiny_fit_args(data, cache, tmp_path, "--run_name=ddp", "--trainer.max_epochs=1", "--wandb=false")
    args += ["--trainer.devices=2", "--trainer.strategy=ddp"]
    subprocess.run([sys.executable, "-m", "distill.fit", *args], check=True, timeout=300)
    metrics = json.loads((tmp_path / "ddp/metrics_val.json").read_text())
    assert len(metrics["teacher"]["dice"]) == len(metrics["thresholds"])
    assert metrics["n_images"] >= 1 and (tmp_path / "ddp/checkpoints/best.ckpt").is_file()
