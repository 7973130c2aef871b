"""The small-student recipe and its KD sweep run end to end on the tiny demo data (a few steps on CPU);
small_data.yaml's schedule itself (steps, validation every K steps) is tested in test_fit.py."""

import csv
import json

import torch

from distill.fit import main as fit_main
from distill.sweep.runner import main as sweep_main

# The GPU recipe on the 2-core CPU: the tiny merged-format data, 4 steps of 4 small crops.
ON_CPU = [
    "--data.data_format=merged",
    "--trainer.accelerator=cpu",
    "--model.cuda_graph=false",  # CUDA graphs need a GPU
    "--model.compile=false",
    "--trainer.precision=32-true",
    "--trainer.max_steps=4",
    "--trainer.val_check_interval=2",
    "--data.samples_per_epoch=8",
    "--data.batch_size=4",
    "--data.crop_size=32",
    "--data.num_workers=0",
    "--progress_every_s=0",
    "--wandb=false",
]


def test_small_student_recipe_trains_a_student_under_5m_parameters_scored_with_views(
    tiny_data_and_cache, tmp_path
):
    data, cache = tiny_data_and_cache
    fit_main(
        [
            "--config=configs/fit/small_student_kd.yaml",
            f"--data.data_root={data}",
            f"--data.cache_dir={cache}",
            f"--runs_dir={tmp_path}",
            "--run_name=small",
            *ON_CPU,
        ]
    )
    run = tmp_path / "small"
    metrics = json.loads((run / "metrics_val.json").read_text())
    assert metrics["student_params"] <= 5_000_000
    assert "student_views" in metrics and "kd_margin" in metrics  # scored with and without the D4 views
    assert torch.load(run / "checkpoints/last.ckpt", weights_only=True)["global_step"] == 4


def test_kd_margin_sweep_runs_a_trial_of_the_recipe(tiny_data_and_cache, tmp_path):
    data, cache = tiny_data_and_cache
    out = tmp_path / "sweep"
    data_args = [f"--data.data_root={data}", f"--data.cache_dir={cache}"]
    assert (
        sweep_main(
            ["configs/sweeps/kd_margin.yaml", "--trials", "1", "--out", str(out), "--", *data_args, *ON_CPU]
        )
        == 0
    )
    with open(out / "results.csv") as f:
        (trial,) = list(csv.DictReader(f))
    assert trial["state"] == "complete", (out / "trials").glob("*/log.txt").__next__().read_text()[-3000:]
    assert {"loss.kd_alpha", "loss.kd_bce.temperature", "loss.kd_dice.weight", "loss.kd_trust_gt"} <= set(
        trial
    )
