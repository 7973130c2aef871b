"""scripts/bench_fit.py on CPU at tiny sizes: every figure, profile and DDP code path runs and reports."""

import argparse
import importlib.util
import json
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest
import torch
from torch.autograd import DeviceType


@pytest.mark.slow
def test_bench_fit_runs_every_figure_profile_and_ddp_on_cpu(tmp_path):
    command = [
        sys.executable,
        "scripts/bench_fit.py",
        "--tiny",
        "--models", "unet_r34",
        "--regimes", "48x2",
        "--figures", "bare", "pure", "pipeline", "loop", "loader", "sample", "inference",
        "--augment-on", "device", "workers",
        "--devices", "1", "2",
        "--compile",
        "--profile",
        "--host-samples",
        "--out", str(tmp_path),
    ]  # fmt: skip
    subprocess.run(command, check=True, timeout=1500)
    (result,) = json.loads((tmp_path / "fit_cpu_tiny.json").read_text())["results"]
    for figure in ("bare", "pure", "pipeline_device", "pipeline_workers", "pipeline_device_2gpu", "loop"):
        assert result[figure]["img_s"] > 0, figure
        assert len(result[figure]["window_img_s"]) == 2 and min(result[figure]["window_img_s"]) > 0, figure
    for figure in ("bare", "pure", "pipeline_device", "pipeline_workers", "pipeline_device_2gpu"):
        profile = result[figure]["profile"]
        assert profile["wall_ms_per_step"] > 0 and profile["top_host_ops"], figure
        assert profile["gpu_busy_fraction"] is None and profile["host_syncs_per_step"] == 0  # no GPU here
    for figure in ("pipeline_device", "pipeline_workers", "loop"):
        assert result[figure]["host"]["samples"] > 0 and result[figure]["host"]["inclusive"], figure
    assert result["pipeline_device_2gpu"]["world_size"] == 2
    assert set(result["ratios"]) >= {"pipeline_device/bare", "pure/bare", "pipeline_device_2gpu/1gpu"}
    assert result["inference"]["latency_b1_ms"] > 0 and result["loader_device"]["img_s"] > 0
    assert result["sample"]["ms_per_sample"] > 0


def load_bench_fit():
    spec = importlib.util.spec_from_file_location("bench_fit", "scripts/bench_fit.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_fit"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_the_host_sampler_finds_the_function_the_main_thread_is_busy_in():
    bench_fit = load_bench_fit()

    def spin(seconds):
        end = time.perf_counter() + seconds
        while time.perf_counter() < end:
            pass

    with bench_fit.HostSampler(interval=0.001) as sampler:
        spin(0.4)
    summary = sampler.summary()
    shares = {row["where"]: row["share"] for row in summary["inclusive"]}
    (spun,) = [where for where in shares if where.endswith(".<locals>.spin")]
    assert summary["samples"] > 20 and shares[spun] > 0.8
    assert summary["self"][0]["where"] == spun


def test_the_profile_summary_counts_busy_time_once_launches_and_host_syncs():
    """On fake events: GPU busy is the union of device intervals; launches and syncs are host API calls."""
    bench_fit = load_bench_fit()

    def event(name, start, end, device=False, annotation=False):
        interval = SimpleNamespace(start=start, end=end, elapsed_us=lambda: end - start)
        return SimpleNamespace(
            name=name,
            time_range=interval,
            device_type=DeviceType.CUDA if device else DeviceType.CPU,
            is_user_annotation=annotation,
        )

    events = [
        # record_function ranges also land on the GPU timeline, spanning their kernels: not kernels
        event("Optimizer.step#AdamW.step", 0, 100, device=True, annotation=True),
        event("augment", 30, 44, device=True, annotation=True),
        event("augment", 25, 31, annotation=True),
        event("void conv_kernel", 0, 10, device=True),
        event("void add_kernel", 5, 20, device=True),  # overlaps the first (another stream)
        event("Memcpy HtoD (Pinned -> Device)", 30, 40, device=True),
        event("cudaLaunchKernel", 0, 1),
        event("cuLaunchKernelEx", 2, 3),
        event("cudaStreamSynchronize", 20, 29),
        event("cudaMemcpyAsync", 29, 30),
        event("aten::add", 0, 5),
    ]
    row = SimpleNamespace(key="aten::add", count=2, self_device_time_total=15.0, self_cpu_time_total=5.0)
    profile = SimpleNamespace(events=lambda: events, key_averages=lambda: [row])
    summary = bench_fit.profile_summary(profile, wall_s=100e-6, steps=2)
    assert summary["gpu_busy_ms_per_step"] == pytest.approx(30e-3 / 2)  # [0, 20] and [30, 40]
    assert summary["gpu_busy_fraction"] == pytest.approx(0.3)
    assert summary["kernel_ms_per_step"] == pytest.approx(25e-3 / 2) and summary["kernels_per_step"] == 1
    assert summary["launch_calls_per_step"] == 1 and summary["host_syncs_per_step"] == 0.5
    assert summary["host_sync_ms_per_step"] == pytest.approx(9e-3 / 2)
    assert summary["top_device_ops"] == [{"op": "aten::add", "calls": 2, "ms_per_step": 15e-3 / 2}]
    assert summary["ranges"] == {
        "augment": {
            "host_ms_per_step": pytest.approx(6e-3 / 2),
            "device_span_ms_per_step": pytest.approx(14e-3 / 2),
        }
    }


def test_bench_device_augment_times_the_batch_and_each_transform_on_cpu(tmp_path):
    command = [sys.executable, "scripts/bench_device_augment.py", "--tiny", "--out", str(tmp_path)]
    subprocess.run(command, check=True, timeout=600)
    (result,) = json.loads((tmp_path / "device_augment_cpu_tiny.json").read_text())["results"]
    assert result["batch_call"]["host_ms"] > 0 and result["batch_call"]["device_ms"] is None  # no GPU here
    assert {"RandomAffine", "RandomClahe", "ColorJiggle"} <= set(result["transforms_p1"])
    assert "batch_call_without_RandomClahe" in result and result["candidates_p1"]


def test_regimes_are_size_x_batch():
    bench_fit = load_bench_fit()
    assert bench_fit.Regime.parse("256x16") == bench_fit.Regime(256, 16)
    with pytest.raises(argparse.ArgumentTypeError, match="SIZExBATCH"):
        bench_fit.Regime.parse("256")


def test_bench_transport_times_both_paths_on_cpu(tmp_path):
    command = [
        sys.executable, "scripts/bench_transport.py",
        "--regimes", "32x2", "--num-workers", "1", "--warmup", "2", "--steps", "5", "--out", str(tmp_path),
    ]  # fmt: skip
    subprocess.run(command, check=True, capture_output=True, timeout=300)
    report = json.loads((tmp_path / "transport_cpu.json").read_text())
    assert [(r["regime"], r["path"]) for r in report["results"]] == [("32x2", "fresh"), ("32x2", "ring")]
    assert all(r["batches_s"] > 0 and r["main_cpu_ms_per_batch"] >= 0 for r in report["results"])


def test_bench_loop_variants_runs_each_variant_on_cpu(tmp_path):
    """scripts/bench_loop_variants.py --tiny: every variant trains and lands in the JSON, in order."""
    variants = ["pure", "as_is", "loss_only", "loss_only_noclip", "gpu_batch", "as_is"]
    command = [sys.executable, "scripts/bench_loop_variants.py", "--tiny", "--regime", "32x2",
               "--variants", *variants, "--out", str(tmp_path)]  # fmt: skip
    subprocess.run(command, check=True, timeout=600)
    report = json.loads((tmp_path / "loop_variants_cpu_unet_mnv3.json").read_text())
    assert list(report["img_s"]) == variants[:5] and len(report["img_s"]["as_is"]) == 2
    assert all(value > 0 for values in report["img_s"].values() for value in values)


def test_window_rates_are_each_windows_images_over_its_own_seconds():
    bench_fit = load_bench_fit()
    windows = bench_fit.Windows(steps=40)  # 4 windows of 10 steps
    for timed in range(1, 41):
        windows.step_ended(timed)
    assert len(windows.ends) == 4
    windows.ends = [1.0, 3.0, 3.5, 4.5]
    assert windows.rates(0.0, 4) == [40.0, 20.0, 80.0, 40.0]


def test_a_failing_sample_worker_is_an_error_not_a_hang(tmp_path, monkeypatch):
    bench_fit = load_bench_fit()
    args = bench_fit.parse_args(["--tiny", "--figures", "sample", "--work", str(tmp_path)])
    data, cache = bench_fit.make_data(tmp_path, 24, 4, 64)

    def broken_setup():
        raise ValueError("broken worker setup")

    monkeypatch.setattr(bench_fit, "init_worker", broken_setup)
    with pytest.raises(RuntimeError, match="sample figure's worker process failed"):
        bench_fit.bench_sample(bench_fit.Regime(32, 2), args, data, cache)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without a GPU")
def test_cuda_graph_figures_are_refused_without_a_gpu(capsys):
    with pytest.raises(SystemExit):
        load_bench_fit().parse_args(["--tiny", "--cuda-graph"])
    assert "--cuda-graph replays CUDA graphs: it needs a GPU" in capsys.readouterr().err
