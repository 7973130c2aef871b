"""Is the data path ever the bottleneck? Training throughput of students with and without the real pipeline.

For each student (UNet-ResNet34, SegFormer-B0) at 512x512, batch 32, bf16-mixed:
  (a) pure_step_img_s: forward + DistillLoss + backward + clipping + AdamW on a batch already on the GPU
      (the ceiling);
  (b) pipeline_img_s: the real fit path (VesselDataModule: decoded records, augmentation, teacher-cache
      reads, collate, host->GPU copy; DistillModule under a Lightning Trainer), timed over a fixed
      number of steps after warm-up by a callback;
  (c) inference latency at batch 1 and throughput at batch 32, parameters, peak GPU memory;
  (d) loop_img_s: the same Lightning loop on one pre-made batch (data free, host->GPU copy kept), and
      loader_img_s: the DataLoader alone; together they say whether a gap is the loop's or the data's.
It makes its own synthetic 512x512 data and a teacher cache of synthetic logits (written with CacheWriter).
Writes benchmarks/fit_<gpu>.json (pure_step_img_s, pipeline_img_s, ratio per model) and prints a table.

    python scripts/bench_fit.py                 # one GPU, < 8 minutes on an H100
    python scripts/bench_fit.py --devices 2     # the pipeline under DDP on 2 GPUs (ddp_spawn)
    python scripts/bench_fit.py --tiny          # CPU smoke test: 64 px, a few steps
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import lightning.pytorch as pl  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

from distill.cache import CacheWriter, TeacherCache  # noqa: E402
from distill.data import open_dataset  # noqa: E402
from distill.data.datamodule import VesselDataModule  # noqa: E402
from distill.data.writers import write_dataset  # noqa: E402
from distill.module import DistillModule  # noqa: E402
from distill.students import StudentConfig, count_parameters  # noqa: E402
from distill.synth import generate_sample  # noqa: E402

MODELS = {
    "unet_r34": StudentConfig(name="unet", encoder="resnet34"),
    "segformer_b0": StudentConfig(name="segformer", encoder="mit_b0"),
}
GRADIENT_CLIP = 1.0  # as in configs/fit/*_kd.yaml
TINY_MODELS = {
    "unet_r34": StudentConfig(
        name="unet", encoder="resnet18", extra={"encoder_depth": 3, "decoder_channels": [16, 8, 4]}
    ),
    "segformer_b0": StudentConfig(name="segformer", encoder="mit_b0"),
}


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


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def fake_batch(batch: int, size: int, device: torch.device) -> dict[str, torch.Tensor]:
    mask = (torch.rand(batch, 1, size, size, device=device) > 0.85).to(torch.uint8)
    return {
        "image": torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8, device=device),
        "mask": mask,
        "roi": torch.ones_like(mask),
        "teacher": (4 * mask.float() - 2).half(),
    }


def autocast(device: torch.device, precision: str):
    enabled = precision.startswith("bf16")
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled)


def training_module(student: StudentConfig, args: argparse.Namespace) -> DistillModule:
    """The module all three training figures use: KD on, torch.compile with --compile."""
    return DistillModule(student=student, loss={"kd_alpha": 0.5}, compile=args.compile)


def bench_pure_step(student: StudentConfig, args: argparse.Namespace, device: torch.device) -> dict:
    """The same module and loss as fit, without loader, Trainer or logging: the ceiling."""
    module = training_module(student, args).to(device)
    module.on_fit_start()  # channels_last and torch.compile, as under the Trainer
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    optimizer = module.make_optimizer()  # the one fit uses
    batch = fake_batch(args.batch, args.size, device)
    for step in range(args.warmup + args.steps):
        if step == args.warmup:
            synchronize(device)
            start = time.perf_counter()
        with autocast(device, args.precision):  # around the loss too, as Lightning's precision plugin does
            logits = module(batch["image"])
            total, _ = module.loss(logits, batch["mask"], batch["roi"], batch["teacher"])
        total.backward()
        torch.nn.utils.clip_grad_norm_(module.parameters(), GRADIENT_CLIP)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    synchronize(device)
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return {"pure_step_img_s": args.steps * args.batch / seconds, "train_peak_mem_gib": peak}


class StepTimer(pl.Callback):
    """Times steps warmup .. warmup+steps on rank 0 and writes images/s (all ranks) to a JSON file.

    Also `between_steps_ms`: the host's mean time from one step's end to the next one's start, which
    is where the loop fetches batches; the pipeline's figure minus the loop's is time spent waiting
    for data (a GPU-bound run waits inside the step instead, for the previous step's loss check).
    """

    def __init__(self, warmup: int, steps: int, batch: int, out: Path):
        self.warmup, self.steps, self.batch, self.out = warmup, steps, batch, out
        self.last_end: float | None = None
        self.between = 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        now = time.perf_counter()
        if trainer.global_step == self.warmup:
            synchronize(pl_module.device)
            self.start = time.perf_counter()
        elif trainer.global_step > self.warmup:
            self.between += now - self.last_end

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.last_end = time.perf_counter()
        if trainer.global_step == self.warmup + self.steps:
            synchronize(pl_module.device)
            seconds = time.perf_counter() - self.start
            if trainer.is_global_zero:
                images = self.steps * self.batch * trainer.world_size
                result = {
                    "pipeline_img_s": images / seconds,
                    "world_size": trainer.world_size,
                    "between_steps_ms": 1000 * self.between / max(1, self.steps - 1),
                }
                self.out.write_text(json.dumps(result))


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


def timed_trainer(args: argparse.Namespace, out: Path) -> pl.Trainer:
    """The Trainer both Lightning figures use: no validation, logger or checkpoints; StepTimer writes `out`."""
    return pl.Trainer(
        accelerator=args.accelerator,
        devices=args.devices,
        strategy="ddp_spawn" if args.devices > 1 else "auto",
        precision=args.precision,
        max_steps=args.warmup + args.steps,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        log_every_n_steps=10,
        gradient_clip_val=GRADIENT_CLIP,
        callbacks=[StepTimer(args.warmup, args.steps, args.batch, out)],
    )


def bench_loop(student: StudentConfig, args: argparse.Namespace, work: Path) -> dict:
    """The Lightning loop (module, logging, host->GPU copy) on free data: what the data path could reach."""
    out = work / "loop.json"
    out.unlink(missing_ok=True)
    batch = fake_batch(args.batch, args.size, torch.device("cpu"))
    module = training_module(student, args)
    timed_trainer(args, out).fit(module, train_dataloaders=SameBatch(batch, args.warmup + args.steps))
    timed = json.loads(out.read_text())
    return {"loop_img_s": timed["pipeline_img_s"], "loop_between_steps_ms": timed["between_steps_ms"]}


def bench_datamodule(args: argparse.Namespace, data: Path, cache: Path) -> VesselDataModule:
    """The DataModule both pipeline figures use: the synthetic set, its cache, default augmentation."""
    return VesselDataModule(
        data_format="merged",
        data_root=str(data),
        cache_dir=str(cache),
        batch_size=args.batch,
        num_workers=args.num_workers,
        augment="default",
    )


def bench_pipeline(
    student: StudentConfig, args: argparse.Namespace, data: Path, cache: Path, work: Path
) -> dict:
    out = work / "pipeline.json"
    out.unlink(missing_ok=True)
    datamodule = bench_datamodule(args, data, cache)
    module = training_module(student, args)
    trainer = timed_trainer(args, out)
    trainer.fit(module, datamodule=datamodule)
    return json.loads(out.read_text())


def bench_loader(args: argparse.Namespace, data: Path, cache: Path, device: torch.device) -> dict:
    """The data path alone: train batches out of the DataLoader and onto the device, images/s.

    Iterates across epoch boundaries as training does, so the restart of the workers' pipeline at
    each epoch is part of the figure.
    """
    datamodule = bench_datamodule(args, data, cache)
    datamodule.setup("fit")
    loader = datamodule.train_dataloader()
    seen, start = 0, None
    while seen < args.warmup + args.steps:
        for batch in loader:
            if seen == args.warmup:
                synchronize(device)
                start = time.perf_counter()
            for key in ("image", "mask", "roi", "teacher"):
                batch[key].to(device, non_blocking=True)
            seen += 1
            if seen == args.warmup + args.steps:
                break
    synchronize(device)
    return {
        "loader_img_s": args.steps * args.batch / (time.perf_counter() - start),
        "batches_per_epoch": len(loader),
    }


@torch.no_grad()
def bench_inference(student: StudentConfig, args: argparse.Namespace, device: torch.device) -> dict:
    module = DistillModule(student=student).to(device).eval()
    if device.type == "cuda":
        module.student.to(memory_format=torch.channels_last)
        torch.cuda.reset_peak_memory_stats(device)
    result = {"params": count_parameters(module.student)}
    for batch, key in ((1, "latency_b1_ms"), (args.batch, "infer_img_s")):
        images = torch.randint(0, 256, (batch, 3, args.size, args.size), dtype=torch.uint8, device=device)
        repeats = max(3, args.steps)
        for _ in range(args.warmup):
            with autocast(device, args.precision):
                module(images)
        times = []
        for _ in range(repeats):
            synchronize(device)
            start = time.perf_counter()
            with autocast(device, args.precision):
                module(images)
            synchronize(device)
            times.append(time.perf_counter() - start)
        median = float(np.median(times))
        result[key] = median * 1000 if batch == 1 else batch / median
    result["infer_peak_mem_gib"] = (
        torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    )
    return result


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--precision", default="bf16-mixed")
    parser.add_argument("--warmup", type=int, default=10, help="steps before timing starts")
    parser.add_argument("--steps", type=int, default=40, help="timed steps")
    parser.add_argument("--images", type=int, default=384, help="dataset size (train split is ~70%%)")
    parser.add_argument(
        "--unique", type=int, default=16, help="distinct synthetic images (repeated under new ids)"
    )
    parser.add_argument("--num-workers", type=int, default=8)
    parser.add_argument("--devices", type=int, default=1, help="GPUs for the pipeline run (>1: DDP)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the student (model.compile)")
    parser.add_argument("--out", default="benchmarks")
    parser.add_argument("--work", default=None, help="where data and cache go (default: a temp dir)")
    parser.add_argument("--tiny", action="store_true", help="CPU smoke test: 64 px, batch 4, a few steps")
    args = parser.parse_args(argv)
    args.accelerator = "gpu" if torch.cuda.is_available() else "cpu"
    if args.tiny:
        args.size, args.batch, args.warmup, args.steps, args.images, args.unique = 64, 4, 1, 3, 24, 4
        args.num_workers, args.precision = 0, "32-true"
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    device = torch.device("cuda" if args.accelerator == "gpu" else "cpu")
    gpu = torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu"
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    models = TINY_MODELS if args.tiny else MODELS
    pl.seed_everything(0, verbose=False)
    results: dict = {}
    with tempfile.TemporaryDirectory(prefix="bench_fit_") as tmp:
        work = Path(args.work or tmp)
        data, cache = make_data(work, args.images, args.unique, args.size)
        for name in args.models:
            student = models[name]
            print(f"--- {name}", flush=True)
            entry = {**bench_inference(student, args, device), **bench_pure_step(student, args, device)}
            entry.update(bench_pipeline(student, args, data, cache, work))
            if args.devices == 1:
                entry.update(bench_loop(student, args, work))
            entry.update(bench_loader(args, data, cache, device))
            entry["ratio"] = entry["pipeline_img_s"] / (entry["pure_step_img_s"] * entry["world_size"])
            results[name] = entry
    report = {
        "device": gpu,
        "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "torch": torch.__version__,
        "lightning": pl.__version__,
        "settings": {
            k: getattr(args, k)
            for k in (
                "size",
                "batch",
                "precision",
                "warmup",
                "steps",
                "images",
                "num_workers",
                "devices",
                "compile",
            )
        },
        "cpu_count": os.cpu_count(),
        "models": results,
    }
    out = (
        Path(args.out)
        / f"fit_{re.sub(r'[^A-Za-z0-9]+', '_', gpu).strip('_').lower()}{'_compile' if args.compile else ''}{'_tiny' if args.tiny else ''}.json"
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(
        f"\n{gpu}, {args.size}px, batch {args.batch}, {args.precision}, pipeline on {args.devices} device(s)"
    )
    columns = [  # (header, width, format, JSON key)
        ("params M", 9, ".1f", "params_m"),
        ("pure img/s", 11, ".1f", "pure_step_img_s"),
        ("pipe img/s", 11, ".1f", "pipeline_img_s"),
        ("ratio", 6, ".2f", "ratio"),
        ("loop img/s", 11, ".1f", "loop_img_s"),
        ("gap ms pipe", 12, ".2f", "between_steps_ms"),
        ("gap ms loop", 12, ".2f", "loop_between_steps_ms"),
        ("loader img/s", 13, ".1f", "loader_img_s"),
        ("b1 ms", 7, ".2f", "latency_b1_ms"),
        ("infer img/s", 12, ".1f", "infer_img_s"),
        ("peak GiB", 9, ".1f", "train_peak_mem_gib"),
    ]
    print(f"{'model':<14}" + "".join(f"{header:>{width}}" for header, width, _, _ in columns))
    for name, r in results.items():
        r = {**r, "params_m": r["params"] / 1e6}
        cells = (
            f"{r[key]:>{width}{fmt}}" if r.get(key) is not None else f"{'-':>{width}}"
            for _, width, fmt, key in columns
        )
        print(f"{name:<14}" + "".join(cells))
    print(f"wrote {out}")
    return report


if __name__ == "__main__":
    main()
