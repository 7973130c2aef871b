"""How close does training get to what the GPU can do? Students trained three ways, per model and regime.

  bare      the closest practical ceiling: the student network (smp/timm model with its input
            normalisation) and a plain BCE, torch.compile'd in the mode of --compile (else the
            default mode), backward, fused AdamW, on one batch already on the GPU; no loss terms,
            clipping, module or Trainer.
  bare_graphed  bare's whole step (forward, backward, AdamW) captured as one CUDA graph and replayed:
            what the GPU does with no host in the way (the network compiled without CUDA graphs of
            its own inside it).
  pure      DistillModule's training step (DistillLoss with KD, clipping at 1.0, AdamW) on that batch.
  pipeline  the real `Trainer.fit` path: VesselDataModule (decoded records, teacher cache, the
            --augment preset made on the device or by DataLoader workers, see --augment-on), the
            module's step, logging; no validation. Timed over steps warmup..warmup+steps by a callback.
  loop, loader, sample, inference (on request): the Lightning loop on one pre-made batch (data
            free), the train loader alone, one worker's time per training crop (in this process),
            and inference latency/throughput.

With --cuda-graph, pure and pipeline capture their whole update as one CUDA graph too
(model.cuda_graph), compiling the student inside it without CUDA graphs of its own.

Ratios: pipeline/bare (the target is >= 0.8), pure/bare, pipeline/pure; with `--devices 1 2`, the
2-GPU pipeline (DDP) over the 1-GPU one. `--profile` runs torch.profiler over a few more steps of
`bare` and of each pipeline (under DDP, rank 0's) and records kernel time against wall time,
GPU-busy share, kernel launches, host syncs and the top operators. The script makes its own
synthetic 512x512 data and a cache of synthetic teacher logits. Results go to
<out>/fit_<gpu>[_<tag>].json, rewritten after every model and regime, so a run cut short keeps what
it measured.

    python scripts/bench_fit.py --compile --profile            # 3 models x 2 regimes on one GPU
    python scripts/bench_fit.py --compile reduce-overhead      # the step (and bare) as CUDA graphs
    python scripts/bench_fit.py --compile reduce-overhead --cuda-graph --figures bare bare_graphed pipeline
    python scripts/bench_fit.py --devices 1 2 --regimes 512x32  # DDP scaling on two GPUs
    python scripts/bench_fit.py --tiny                          # CPU smoke test: 64 px, a few steps
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import multiprocessing
import multiprocessing.queues
import os
import re
import resource
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import get_args

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import lightning.pytorch as pl  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from lightning.pytorch.strategies import DDPStrategy  # noqa: E402
from torch.autograd import DeviceType  # noqa: E402
from tqdm import tqdm  # noqa: E402

from distill.cache import CacheWriter, TeacherCache  # noqa: E402
from distill.data import open_dataset  # noqa: E402
from distill.data.augment import list_presets  # noqa: E402
from distill.data.datamodule import VesselDataModule, init_worker  # noqa: E402
from distill.data.sampling import Draw  # noqa: E402
from distill.data.writers import write_dataset  # noqa: E402
from distill.graphed_step import WARMUP_STEPS, GraphedStep  # noqa: E402
from distill.module import CompileMode, DistillModule  # noqa: E402
from distill.students import StudentConfig, count_parameters, create_student  # noqa: E402
from distill.synth import generate_sample  # noqa: E402

MODELS = {
    "unet_r34": StudentConfig(name="unet", encoder="resnet34"),
    "segformer_b0": StudentConfig(name="segformer", encoder="mit_b0"),
    # The <= 5M student of the small-data recipe: 4.5M parameters.
    "unet_mnv3": StudentConfig(
        name="unet", encoder="tu-mobilenetv3_large_100", extra={"decoder_channels": [128, 64, 32, 16, 8]}
    ),
}
TINY_MODELS = {
    "unet_r34": StudentConfig(name="unet", encoder="resnet18", extra={"decoder_channels": [16, 8, 8, 4, 4]}),
    "segformer_b0": MODELS["segformer_b0"],
    "unet_mnv3": MODELS["unet_mnv3"],
}
GRADIENT_CLIP = 1.0  # as in configs/fit/*.yaml
FIGURES = ("bare", "bare_graphed", "pure", "pipeline", "loop", "loader", "sample", "inference")
# Inside a whole-step CUDA graph torch.compile must not record graphs of its own: the same mode without.
WITHOUT_CUDAGRAPHS = {"reduce-overhead": "default", "max-autotune": "max-autotune-no-cudagraphs"}
LAUNCH_CALLS = (
    "cudaLaunchKernel",
    "cuLaunchKernel",
    "cudaLaunchKernelExC",
    "cuLaunchKernelEx",
    "cudaGraphLaunch",
)
RANGES = ("augment",)  # distill's own record_function ranges (DeviceBatches: a batch made on the GPU)
SYNC_CALLS = (
    "cudaStreamSynchronize",
    "cudaDeviceSynchronize",
    "cudaEventSynchronize",
    "cuStreamSynchronize",
    "cuCtxSynchronize",
    "cudaMemcpy",  # the synchronous one (cudaMemcpyAsync is not a host sync)
)


@dataclasses.dataclass(frozen=True)
class Regime:
    """Training crops of `size` x `size` pixels, `batch` of them per step and GPU."""

    size: int
    batch: int

    @classmethod
    def parse(cls, text: str) -> Regime:
        match = re.fullmatch(r"(\d+)x(\d+)", text)
        if match is None:
            raise argparse.ArgumentTypeError(f"{text!r}: a regime is SIZExBATCH, e.g. 256x16")
        return cls(int(match[1]), int(match[2]))

    def __str__(self) -> str:
        return f"{self.size}x{self.batch}"


# -- data -------------------------------------------------------------------------------------------


def make_data(root: Path, n_images: int, n_unique: int, size: int) -> tuple[Path, Path]:
    """Synthetic merged dataset (n_unique generated images repeated under new ids) and a logit cache for it."""
    data, cache = root / "data", root / "cache"
    if (cache / "manifest.json").is_file() and not TeacherCache(cache).missing(
        open_dataset("merged", data).ids
    ):
        return data, cache  # made by an earlier run with the same --work
    unique = [
        generate_sample(seed, size, "fundus")
        for seed in tqdm(range(n_unique), desc="synthesising", unit="img")
    ]
    samples = (dataclasses.replace(unique[i % n_unique], id=f"bench_{i:05d}") for i in range(n_images))
    write_dataset(data, samples, format="merged")
    dataset = open_dataset("merged", data)
    manifest = {
        "teacher": {"name": "bench-synthetic-logits"},
        "dataset": dataset.fingerprint(),
        "views": ["identity"],
    }
    rng = np.random.default_rng(0)
    with CacheWriter(cache, "bench", manifest) as writer:
        for i in tqdm(dataset.ids, desc="caching logits", unit="img"):
            mask = dataset.get(i).mask.astype(np.float32)
            writer.write(i, "identity", 4 * mask - 2 + rng.normal(0, 1.5, mask.shape).astype(np.float32))
    return data, cache


def datamodule(
    args: argparse.Namespace, regime: Regime, augment_on: str, data: Path, cache: Path
) -> VesselDataModule:
    """The data path of the pipeline: the synthetic set, its cache, the --augment preset, crops of the regime."""
    return VesselDataModule(
        data_format="merged",
        data_root=str(data),
        cache_dir=str(cache),
        batch_size=regime.batch,
        num_workers=args.num_workers,
        crop_size=regime.size,
        augment=args.augment,
        augment_on=augment_on,
        samples_per_epoch=args.epoch_samples or None,
    )


def fake_batch(regime: Regime, device: torch.device) -> dict[str, torch.Tensor]:
    size, batch = regime.size, regime.batch
    mask = (torch.rand(batch, 1, size, size, device=device) > 0.85).to(torch.uint8)
    image = torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8, device=device)
    return {
        "image": image.contiguous(memory_format=torch.channels_last),
        "mask": mask,
        "roi": torch.ones_like(mask),
        "teacher": (4 * mask.float() - 2).half(),
    }


# -- timing and profiling ---------------------------------------------------------------------------


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def autocast(device: torch.device, precision: str):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision.startswith("bf16"))


def ranges(events: list, steps: int) -> dict[str, dict[str, float]]:
    """Per step, the host time and the GPU span (first to last kernel) of each RANGES record_function range."""
    spans: dict[str, dict[str, float]] = {}
    for e in events:
        if e.name in RANGES:
            key = "host_ms_per_step" if e.device_type == DeviceType.CPU else "device_span_ms_per_step"
            entry = spans.setdefault(e.name, {"host_ms_per_step": 0.0, "device_span_ms_per_step": 0.0})
            entry[key] += e.time_range.elapsed_us() / 1000 / steps
    return spans


def profile_summary(profiler: torch.profiler.profile, wall_s: float, steps: int) -> dict:
    """Per step: wall vs GPU-busy time, kernel time and count, launch calls, host syncs; the top operators.

    GPU busy = the union of the intervals in which any kernel or copy ran (overlapping streams
    counted once). On a CPU run the GPU figures are None.
    """
    events = profiler.events()
    # A record_function range (Lightning's "Optimizer.step#AdamW.step" wraps the whole training step)
    # also appears on the GPU timeline as one event spanning its kernels: not a kernel, not busy time.
    on_gpu = [e for e in events if e.device_type == DeviceType.CUDA and not e.is_user_annotation]
    device = sorted((e.time_range.start, e.time_range.end) for e in on_gpu)
    kernels = [e for e in on_gpu if not e.name.startswith(("Memcpy", "Memset"))]
    busy_us, reach = 0.0, float("-inf")
    for start, end in device:  # union of intervals
        if end > reach:
            busy_us += end - max(start, reach)
            reach = end
    syncs = [e for e in events if e.name in SYNC_CALLS]
    per_step = 1000 / steps  # seconds (or microseconds / 1000) per step, in ms
    table = profiler.key_averages()

    def top(key: str) -> list[dict]:
        rows = sorted(table, key=lambda row: getattr(row, key), reverse=True)[:12]
        return [
            {"op": row.key, "calls": row.count, "ms_per_step": getattr(row, key) / 1000 / steps}
            for row in rows
            if getattr(row, key) > 0
        ]

    has_gpu = bool(device)
    return {
        "steps": steps,
        "wall_ms_per_step": wall_s * per_step,
        "gpu_busy_ms_per_step": busy_us / 1000 / steps if has_gpu else None,
        "gpu_busy_fraction": busy_us / 1e6 / wall_s if has_gpu else None,
        "kernel_ms_per_step": sum(e.time_range.elapsed_us() for e in kernels) / 1000 / steps
        if has_gpu
        else None,
        "kernels_per_step": len(kernels) / steps if has_gpu else None,
        "launch_calls_per_step": sum(e.name.startswith(LAUNCH_CALLS) for e in events) / steps,
        "host_syncs_per_step": len(syncs) / steps,
        "host_sync_ms_per_step": sum(e.time_range.elapsed_us() for e in syncs) / 1000 / steps,
        "ranges": ranges(events, steps),
        "top_device_ops": top("self_device_time_total") if has_gpu else [],
        "top_host_ops": top("self_cpu_time_total"),
    }


class HostSampler:
    """Where the main thread's host time goes: its Python stack sampled every `interval` s from a side thread.

    torch.profiler sees operators, not the Python around them (Lightning's loop, the batch fetch, hooks),
    and cProfile slows that Python several-fold. `summary()`: shares of samples by function, as the
    innermost frame ("self") and anywhere on the stack ("inclusive"). Biased towards calls that
    release the GIL (backward, CUDA waits, queue reads): the sampler gets the GIL at once there, and
    waits for it while the main thread runs Python. It slows the main thread (a figure measured with
    it is not comparable with one without).
    """

    def __init__(self, interval: float = 0.001):
        self.interval, self.target = interval, threading.main_thread().ident
        self.own: Counter = Counter()  # by code object; named in summary()
        self.anywhere: Counter = Counter()
        self.samples = 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self.stop.wait(self.interval):
            frame = sys._current_frames().get(self.target)
            if frame is None:
                continue
            self.samples += 1
            self.own[frame.f_code] += 1
            codes = set()
            while frame is not None:
                codes.add(frame.f_code)
                frame = frame.f_back
            self.anywhere.update(codes)

    def __enter__(self) -> HostSampler:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join()

    def summary(self, top: int = 80) -> dict:
        def where(code) -> str:
            path = Path(code.co_filename)
            return f"{path.parent.name}/{path.name}:{getattr(code, 'co_qualname', code.co_name)}"

        def shares(counts: Counter) -> list[dict]:
            return [
                {"where": where(code), "share": round(n / self.samples, 4)}
                for code, n in counts.most_common(top)
            ]

        return {"samples": self.samples, "self": shares(self.own), "inclusive": shares(self.anywhere)}


def profiler(device: torch.device) -> torch.profiler.profile:
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    return torch.profiler.profile(activities=activities)


WINDOWS = 4  # the timed steps are also timed in this many equal windows (window_img_s)


class Windows:
    """The img/s of the timed steps in WINDOWS equal windows, to see the spread within a run. On the host's
    clock with no synchronize: a window's figure is the host's view, shifted by however far the GPU lags
    (the whole run's figure, synchronized at both ends, is not)."""

    def __init__(self, steps: int):
        self.per_window = max(1, steps // WINDOWS)
        self.ends: list[float] = []

    def step_ended(self, timed: int) -> None:
        """Note the end of timed step number `timed` (1-based)."""
        if timed > 0 and timed % self.per_window == 0 and len(self.ends) < WINDOWS:
            self.ends.append(time.perf_counter())

    def rates(self, start: float, images_per_step: int) -> list[float]:
        """img/s of each window, the first starting at `start`."""
        edges = [start, *self.ends]
        return [self.per_window * images_per_step / (b - a) for a, b in itertools.pairwise(edges)]


def time_steps(step: Callable[[], None], args: argparse.Namespace, device: torch.device, images: int) -> dict:
    """images/s of `step` over args.steps after args.warmup (and per window, to see the spread within a
    run); with --profile, a profile of args.profile_steps more."""
    for _ in range(args.warmup):
        step()
    synchronize(device)
    windows = Windows(args.steps)
    start = time.perf_counter()
    for timed in range(1, args.steps + 1):
        step()
        windows.step_ended(timed)
    synchronize(device)
    result = {
        "img_s": args.steps * images / (time.perf_counter() - start),
        "window_img_s": windows.rates(start, images),
    }
    if args.profile:
        with profiler(device) as prof:
            start = time.perf_counter()
            for _ in range(args.profile_steps):
                step()
            synchronize(device)
            wall = time.perf_counter() - start
        result["profile"] = profile_summary(prof, wall, args.profile_steps)
    return result


def peak_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


# -- the figures ------------------------------------------------------------------------------------


def replayed(update: Callable[[dict[str, torch.Tensor]], object], optimizer: torch.optim.Optimizer,
             batch: dict[str, torch.Tensor]) -> Callable[[], None]:  # fmt: skip
    """`update(batch)` run eagerly `WARMUP_STEPS` times (compiling, creating the optimizer's state), then
    captured as one CUDA graph: the returned step replays it."""
    for _ in range(WARMUP_STEPS):
        update(batch)
    graph = GraphedStep(update, [optimizer], batch)
    return lambda: graph(batch)


def bare_step(
    student: StudentConfig,
    regime: Regime,
    args: argparse.Namespace,
    device: torch.device,
    graphed: bool = False,
) -> Callable[..., None]:
    """bench_bare's step: the network alone, compiled in --compile's mode (unless --no-compile-bare), BCE
    and fused AdamW on one batch already on `device`. `step(update=False)` leaves out the optimizer step.
    `graphed`: the whole step replayed as one CUDA graph (bare_graphed; `step()` only)."""
    network = create_student(**student.kwargs()).to(device)
    if device.type == "cuda":
        network.to(memory_format=torch.channels_last)

    def loss(image: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.binary_cross_entropy_with_logits(network(image).float(), target)

    mode = args.compile or "default"
    mode = WITHOUT_CUDAGRAPHS.get(mode, mode) if graphed else mode
    compiled = torch.compile(loss, mode=mode) if args.compile_bare else loss
    optimizer = torch.optim.AdamW(network.parameters(), lr=1e-3, fused=device.type == "cuda")
    batch = fake_batch(regime, device)
    inputs = {"image": batch["image"], "target": batch["mask"].float()}

    def step(inputs: dict[str, torch.Tensor] = inputs, update: bool = True) -> None:
        if args.compile_bare and mode == "reduce-overhead":
            torch.compiler.cudagraph_mark_step_begin()
        with autocast(device, args.precision):
            total = compiled(inputs["image"], inputs["target"])
        total.backward()
        if update:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return replayed(step, optimizer, inputs) if graphed else step


def bench_bare(
    student: StudentConfig,
    regime: Regime,
    args: argparse.Namespace,
    device: torch.device,
    graphed: bool = False,
) -> dict:
    """The network alone, compiled, BCE + fused AdamW on a batch on the GPU: the closest practical ceiling;
    `graphed`: replayed as one CUDA graph, the GPU's own ceiling for it."""
    step = bare_step(student, regime, args, device, graphed)
    reset_peak(device)
    result = time_steps(step, args, device, regime.batch)
    return {**result, "peak_gib": peak_gib(device)}


def training_module(student: StudentConfig, args: argparse.Namespace) -> DistillModule:
    """The module the pure and pipeline figures train: KD on, torch.compile in the mode of --compile, the
    whole update one CUDA graph with --cuda-graph (model.cuda_graph)."""
    compile = args.compile or False
    if args.cuda_graph:
        compile = WITHOUT_CUDAGRAPHS.get(compile, compile)
    return DistillModule(student=student, loss={"kd_alpha": 0.5}, compile=compile, cuda_graph=args.cuda_graph)


def bench_pure(
    student: StudentConfig, regime: Regime, args: argparse.Namespace, device: torch.device
) -> dict:
    """DistillModule's step (loss, clipping, AdamW) on a batch already on the GPU, without Trainer or data."""
    module = training_module(student, args).to(device)
    if device.type == "cuda":
        module.student.to(memory_format=torch.channels_last)  # as DistillModule.setup does under the Trainer
    module.on_fit_start()  # torch.compile, as under the Trainer
    # as configure_optimizers: fused on CUDA unless fp16's GradScaler
    optimizer = module.make_optimizer(fused=device.type == "cuda" and not args.precision.startswith("16"))
    batch = fake_batch(regime, device)

    def update(inputs: dict[str, torch.Tensor] = batch) -> None:
        with autocast(device, args.precision):  # around the loss too, as Lightning's precision plugin does
            total, _, _ = module.training_loss(inputs)
        total.backward()
        torch.nn.utils.clip_grad_norm_(module.parameters(), GRADIENT_CLIP)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step = replayed(update, optimizer, batch) if args.cuda_graph else update
    reset_peak(device)
    result = time_steps(step, args, device, regime.batch)
    return {**result, "peak_gib": peak_gib(device)}


class StepTimer(pl.Callback):
    """Times steps warmup..warmup+steps and profiles the `profile_steps` after them; rank 0 writes `out` (JSON).

    `between_steps_ms`: the host's mean time from one step's end to the next one's start, where the
    loop fetches batches.
    """

    def __init__(
        self, warmup: int, steps: int, profile_steps: int, batch: int, out: Path, sample_host: bool = False
    ):
        self.warmup, self.steps, self.profile_steps, self.batch, self.out = (
            warmup,
            steps,
            profile_steps,
            batch,
            out,
        )
        self.sample_host = sample_host
        self.sampler: HostSampler | None = None  # started in the training process (ddp_spawn pickles this)
        self.last_end: float | None = None
        self.windows = Windows(steps)
        self.between = 0.0
        self.result: dict = {}
        self.profiler: torch.profiler.profile | None = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        step, now = trainer.global_step, time.perf_counter()
        if step == self.warmup:
            synchronize(pl_module.device)
            self.start = time.perf_counter()
            if self.sample_host:
                self.sampler = HostSampler().__enter__()
        elif self.warmup < step < self.warmup + self.steps:
            self.between += now - self.last_end
        elif step == self.warmup + self.steps and self.profile_steps:
            self.profiler = profiler(pl_module.device)
            self.profiler.__enter__()
            self.profile_start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.last_end = time.perf_counter()
        step = trainer.global_step  # already counts this step
        if step <= self.warmup + self.steps:
            self.windows.step_ended(step - self.warmup)
        if step == self.warmup + self.steps:
            synchronize(pl_module.device)
            seconds = time.perf_counter() - self.start
            images = self.steps * self.batch * trainer.world_size
            self.result = {
                "img_s": images / seconds,
                "window_img_s": self.windows.rates(self.start, self.batch * trainer.world_size),
                "world_size": trainer.world_size,
                "between_steps_ms": 1000 * self.between / max(1, self.steps - 1),
            }
            if self.sampler is not None:
                self.sampler.__exit__()
                self.result["host"] = self.sampler.summary()
        elif self.profiler is not None and step == self.warmup + self.steps + self.profile_steps:
            synchronize(pl_module.device)
            wall = time.perf_counter() - self.profile_start
            self.profiler.__exit__(None, None, None)
            self.result["profile"] = profile_summary(self.profiler, wall, self.profile_steps)
            self.profiler = None

    def on_train_end(self, trainer, pl_module) -> None:
        if trainer.is_global_zero:
            self.out.write_text(json.dumps(self.result))


def timed_trainer(args: argparse.Namespace, regime: Regime, devices: int, out: Path) -> pl.Trainer:
    """The Trainer of the Lightning figures: no validation, logger or checkpoints; StepTimer writes `out`.

    Several devices: DDP with spawned processes (this script does more than fit), which time out
    after 5 minutes rather than hang when one of them stops.
    """
    profile_steps = args.profile_steps if args.profile else 0  # under DDP every rank profiles; rank 0 reports
    strategy = DDPStrategy(start_method="spawn", timeout=timedelta(minutes=5)) if devices > 1 else "auto"
    return pl.Trainer(
        accelerator=args.accelerator,
        devices=devices,
        strategy=strategy,
        precision=args.precision,
        max_steps=args.warmup + args.steps + profile_steps,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        log_every_n_steps=10,
        gradient_clip_val=GRADIENT_CLIP,
        callbacks=[StepTimer(args.warmup, args.steps, profile_steps, regime.batch, out, args.host_samples)],
    )


def bench_pipeline(
    student: StudentConfig,
    regime: Regime,
    augment_on: str,
    devices: int,
    args: argparse.Namespace,
    data: Path,
    cache: Path,
) -> dict:
    out = args.work / "pipeline.json"
    out.unlink(missing_ok=True)
    trainer = timed_trainer(args, regime, devices, out)
    trainer.fit(training_module(student, args), datamodule=datamodule(args, regime, augment_on, data, cache))
    return json.loads(out.read_text())


class SameBatch:
    """A train "loader" that hands out one pre-made CPU batch (pinned on CUDA) `length` times: free data."""

    def __init__(self, batch: dict[str, torch.Tensor], length: int):
        pin = torch.cuda.is_available()
        self.batch = {k: v.pin_memory() if pin else v for k, v in batch.items()}
        self.length = length

    def __len__(self) -> int:
        return self.length

    def __iter__(self):
        for _ in range(self.length):
            yield self.batch


def bench_loop(student: StudentConfig, regime: Regime, args: argparse.Namespace) -> dict:
    """The Lightning loop (module, logging, host->GPU copy) on free data: what the data path could reach."""
    out = args.work / "loop.json"
    out.unlink(missing_ok=True)
    trainer = timed_trainer(args, regime, 1, out)
    batches = SameBatch(fake_batch(regime, torch.device("cpu")), trainer.max_steps)
    trainer.fit(training_module(student, args), train_dataloaders=batches)
    timed = json.loads(out.read_text())
    return {key: timed[key] for key in ("img_s", "window_img_s", "between_steps_ms", "host") if key in timed}


def bench_loader(
    regime: Regime, augment_on: str, args: argparse.Namespace, data: Path, cache: Path, device: torch.device
) -> dict:
    """The train stream alone, batches on the device, across epoch boundaries as training runs it."""
    dm = datamodule(args, regime, augment_on, data, cache)
    dm.setup("fit")
    # The stream a fit gets: on the trainer's device (on CUDA, copied there by the stream itself).
    dm.trainer = pl.Trainer(accelerator=args.accelerator, devices=1, logger=False, enable_progress_bar=False)
    stream, seen = dm.train_dataloader(), 0
    while seen < args.warmup + args.steps:
        for _batch in stream:
            if seen == args.warmup:
                synchronize(device)
                start = time.perf_counter()
            seen += 1
            if seen == args.warmup + args.steps:
                break
    synchronize(device)
    dm.close_train_stream()
    return {"img_s": args.steps * regime.batch / (time.perf_counter() - start)}


def bench_sample(regime: Regime, args: argparse.Namespace, data: Path, cache: Path) -> dict:
    """One DataLoader worker's work per training crop (read, cut, augment; no collation), timed in a forked
    process set up as a worker is (`init_worker`, one torch thread), with its minor page faults per crop."""
    dm = datamodule(args, regime, "workers", data, cache)
    dm.setup("fit")
    split = dm.splits["train"]  # what a worker makes its samples with (VesselSplit)
    draws = [Draw(number % len(split), number) for number in range((args.warmup + args.steps) * regime.batch)]
    warmup = args.warmup * regime.batch

    def worker(results: multiprocessing.queues.Queue) -> None:
        torch.set_num_threads(1)  # what the DataLoader sets in each worker
        init_worker()
        for draw in draws[:warmup]:
            split[draw]
        faults, start = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, time.perf_counter()
        for draw in draws[warmup:]:
            split[draw]
        seconds = time.perf_counter() - start
        results.put((seconds, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults))

    context = multiprocessing.get_context("fork")
    results = context.Queue()
    process = context.Process(target=worker, args=(results,))
    process.start()
    process.join()  # (what it puts is a few bytes: its queue does not hold the exit up)
    if process.exitcode != 0:
        raise RuntimeError(
            f"the sample figure's worker process failed (exit code {process.exitcode}; its error is above)"
        )
    seconds, faults = results.get()
    samples = args.steps * regime.batch
    return {"ms_per_sample": 1000 * seconds / samples, "page_faults_per_sample": faults / samples}


@torch.no_grad()
def bench_inference(
    student: StudentConfig, regime: Regime, args: argparse.Namespace, device: torch.device
) -> dict:
    network = create_student(**student.kwargs()).to(device).eval()
    if device.type == "cuda":
        network.to(memory_format=torch.channels_last)
    result = {}
    for batch, key in ((1, "latency_b1_ms"), (regime.batch, "img_s")):
        images = torch.randint(0, 256, (batch, 3, regime.size, regime.size), dtype=torch.uint8, device=device)
        for _ in range(args.warmup):
            with autocast(device, args.precision):
                network(images)
        times = []
        for _ in range(max(3, args.steps)):
            synchronize(device)
            start = time.perf_counter()
            with autocast(device, args.precision):
                network(images)
            synchronize(device)
            times.append(time.perf_counter() - start)
        median = float(np.median(times))
        result[key] = median * 1000 if batch == 1 else batch / median
    return result


# -- the run ----------------------------------------------------------------------------------------


def measure(
    name: str, student: StudentConfig, regime: Regime, args: argparse.Namespace, data: Path, cache: Path
) -> dict:
    """Every requested figure of one model in one regime, with the wall time each took (compiling included)."""
    device = torch.device("cuda" if args.accelerator == "gpu" else "cpu")
    entry: dict = {
        "model": name,
        "regime": str(regime),
        "params": count_parameters(create_student(**student.kwargs())),
    }
    seconds: dict[str, float] = {}

    def run(figure: str, bench: Callable[..., dict], *bench_args: object) -> None:
        print(f"--- {name} {regime} {figure}", flush=True)
        start = time.perf_counter()
        entry[figure] = bench(*bench_args)
        seconds[figure] = time.perf_counter() - start

    # Compiled graphs are shared by bare, pure and pipeline (one network, one shape) but not kept
    # for the next model or regime: a second shape would make dynamo recompile with dynamic sizes.
    torch._dynamo.reset()
    if "bare" in args.figures:
        run("bare", bench_bare, student, regime, args, device)
    if "bare_graphed" in args.figures:
        run("bare_graphed", bench_bare, student, regime, args, device, True)
    if "pure" in args.figures:
        run("pure", bench_pure, student, regime, args, device)
    if "pipeline" in args.figures:
        for augment_on in args.augment_on:
            for devices in args.devices:
                figure = f"pipeline_{augment_on}" + (f"_{devices}gpu" if devices > 1 else "")
                run(figure, bench_pipeline, student, regime, augment_on, devices, args, data, cache)
    if "loop" in args.figures:
        run("loop", bench_loop, student, regime, args)
    if "loader" in args.figures:
        for augment_on in args.augment_on:
            run(f"loader_{augment_on}", bench_loader, regime, augment_on, args, data, cache, device)
    if "sample" in args.figures:
        run("sample", bench_sample, regime, args, data, cache)
    if "inference" in args.figures:
        run("inference", bench_inference, student, regime, args, device)
    entry["seconds"] = seconds
    entry["ratios"] = ratios(entry, args)
    return entry


def ratios(entry: dict, args: argparse.Namespace) -> dict[str, float]:
    """pipeline/bare, pure/bare, pipeline/pure per augmentation path; N-GPU pipeline over 1-GPU (scaling)."""
    rate = {
        figure: value["img_s"]
        for figure, value in entry.items()
        if isinstance(value, dict) and "img_s" in value
    }
    out = {}
    for base in ("bare", "bare_graphed"):
        if base in rate and "pure" in rate:
            out[f"pure/{base}"] = rate["pure"] / rate[base]
    for augment_on in args.augment_on:
        one = rate.get(f"pipeline_{augment_on}")
        for base in ("bare", "bare_graphed", "pure"):
            if one is not None and base in rate:
                out[f"pipeline_{augment_on}/{base}"] = one / rate[base]
        for devices in args.devices:
            many = rate.get(f"pipeline_{augment_on}_{devices}gpu")
            if one is not None and many is not None:
                out[f"pipeline_{augment_on}_{devices}gpu/1gpu"] = many / one
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument(
        "--regimes",
        nargs="+",
        type=Regime.parse,
        help="SIZExBATCH (default: 256x16 512x32; 64x4 with --tiny)",
    )
    parser.add_argument("--figures", nargs="+", default=["bare", "pure", "pipeline"], choices=FIGURES)
    parser.add_argument("--augment-on", nargs="+", default=["device"], choices=["device", "workers"])
    parser.add_argument(
        "--devices", nargs="+", type=int, default=[1], help="GPU counts for the pipeline (>1: DDP)"
    )
    parser.add_argument("--precision", default="bf16-mixed")
    parser.add_argument(
        "--warmup",
        type=int,
        default=100,
        help="steps before timing starts. While the step compiles, workers queue 2 batches each; when they "
        "are slower than the GPU that queue shrinks by less than a batch per step, and timed steps that "
        "still draw on it read high",
    )
    parser.add_argument("--steps", type=int, default=200, help="timed steps")
    parser.add_argument(
        "--profile", action="store_true", help="profile bare and the pipelines (torch.profiler)"
    )
    parser.add_argument("--profile-steps", type=int, default=5)
    parser.add_argument(
        "--host-samples",
        action="store_true",
        help="sample the host's Python stack over the timed steps of the Lightning figures (HostSampler)",
    )
    parser.add_argument(
        "--images", type=int, default=384, help="dataset size at 512 px (the train split is ~70%%)"
    )
    parser.add_argument(
        "--unique", type=int, default=16, help="distinct synthetic images (repeated under new ids)"
    )
    parser.add_argument("--num-workers", type=int, default=8)
    parser.add_argument(
        "--augment", default="default", choices=list_presets(), help="augmentation preset (data.augment)"
    )
    parser.add_argument(
        "--epoch-samples",
        type=int,
        default=850,
        help="training samples per epoch (data.samples_per_epoch; 0: one pass over the train split). "
        "Default 850, the train split of a ~1220-image set, so that epoch ends (where Lightning logs "
        "and syncs) come as often as in real runs",
    )
    parser.add_argument(
        "--compile",
        nargs="?",
        const="default",
        choices=list(get_args(CompileMode)),
        help="torch.compile the student and loss in pure and pipeline (model.compile), and bare, in "
        "this mode (default: 'default'); without it pure and pipeline run eagerly",
    )
    parser.add_argument(
        "--no-compile-bare", dest="compile_bare", action="store_false", help="bare uncompiled"
    )
    parser.add_argument(
        "--cuda-graph",
        action="store_true",
        help="pure and pipeline replay their whole update as one CUDA graph (model.cuda_graph); --compile's "
        "mode then runs without CUDA graphs of its own inside it (reduce-overhead -> default)",
    )
    parser.add_argument("--tag", default="", help="added to the JSON's name")
    parser.add_argument("--out", default="benchmarks")
    parser.add_argument(
        "--work", default=None, help="where data and cache go (default: a temporary directory)"
    )
    parser.add_argument("--tiny", action="store_true", help="CPU smoke test: 64 px, tiny models, a few steps")
    args = parser.parse_args(argv)
    args.accelerator = "gpu" if torch.cuda.is_available() else "cpu"
    if args.cuda_graph and args.accelerator != "gpu":
        parser.error("--cuda-graph replays CUDA graphs: it needs a GPU")
    args.size = 64 if args.tiny else 512  # of the synthetic images
    args.regimes = args.regimes or ([Regime(64, 4)] if args.tiny else [Regime(256, 16), Regime(512, 32)])
    if args.tiny:
        args.warmup, args.steps, args.profile_steps, args.images, args.unique = 1, 2, 2, 24, 4
        args.num_workers, args.precision, args.epoch_samples = 0, "32-true", None
    if args.epoch_samples is not None and args.epoch_samples < 0:
        parser.error("--epoch-samples must be >= 0 (0: one pass over the train split)")
    if "pipeline" not in args.figures and args.devices != [1]:
        parser.error("--devices concerns the pipeline figure")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    gpu = torch.cuda.get_device_name(0) if args.accelerator == "gpu" else "cpu"
    if args.accelerator == "gpu":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    models = TINY_MODELS if args.tiny else MODELS
    name = re.sub(r"[^A-Za-z0-9]+", "_", gpu).strip("_").lower()
    out = (
        Path(args.out) / f"fit_{name}{'_' + args.tag if args.tag else ''}{'_tiny' if args.tiny else ''}.json"
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    report = {
        "device": gpu,
        "gpus": torch.cuda.device_count(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "torch": torch.__version__,
        "lightning": pl.__version__,
        "cpu_count": os.cpu_count(),
        "settings": {
            key: getattr(args, key)
            for key in (
                "precision",
                "warmup",
                "steps",
                "images",
                "num_workers",
                "augment",
                "epoch_samples",
                "compile",
                "compile_bare",
                "cuda_graph",
                "devices",
            )
        },
        "results": [],
    }
    pl.seed_everything(0, verbose=False)
    with tempfile.TemporaryDirectory(prefix="bench_fit_") as tmp:
        args.work = Path(args.work or tmp)
        data, cache = make_data(args.work, args.images, args.unique, args.size)
        for regime in args.regimes:
            for model in args.models:
                report["results"].append(measure(model, models[model], regime, args, data, cache))
                out.write_text(json.dumps(report, indent=2) + "\n")
                print_table(report, out)
    return report


def print_table(report: dict, out: Path) -> None:
    rows = report["results"]
    figures = sorted({k for r in rows for k, v in r.items() if isinstance(v, dict) and "img_s" in v})
    ratio_names = sorted({k for r in rows for k in r["ratios"]})
    print(f"\n{report['device']}, {report['settings']['precision']}  (img/s; ratios)")
    print(
        f"{'model':<14}{'regime':>8}"
        + "".join(f"{f:>22}" for f in figures)
        + "".join(f"{n:>30}" for n in ratio_names)
    )
    for r in rows:
        cells = [f"{r[f]['img_s']:>22.1f}" if f in r else f"{'-':>22}" for f in figures]
        cells += [f"{r['ratios'][n]:>30.2f}" if n in r["ratios"] else f"{'-':>30}" for n in ratio_names]
        print(f"{r['model']:<14}{r['regime']:>8}" + "".join(cells))
    for r in rows:
        if "sample" in r:
            print(
                f"sample {r['regime']}: {r['sample']['ms_per_sample']:.2f} ms per training crop (one worker), "
                f"{r['sample']['page_faults_per_sample']:.0f} minor page faults"
            )
        for figure, value in r.items():
            if isinstance(value, dict) and "profile" in value:
                p = value["profile"]
                busy = "-" if p["gpu_busy_fraction"] is None else f"{p['gpu_busy_fraction']:.2f}"
                print(
                    f"profile {r['model']} {r['regime']} {figure}: wall {p['wall_ms_per_step']:.2f} ms/step, "
                    f"GPU busy {busy}, {p['launch_calls_per_step']:.0f} launches, "
                    f"{p['host_syncs_per_step']:.1f} host syncs per step"
                )
    print(f"wrote {out}", flush=True)


if __name__ == "__main__":
    main()
