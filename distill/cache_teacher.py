"""Run a teacher over a dataset once and cache its logits: `python -m distill.cache_teacher --help`.

One process = one or more workers, each with its own writer shard (no locks): G visible GPUs and
`--gpus-per-model K` give G // K workers; `--shard-index I --num-shards N` splits the ids between
processes or nodes (SLURM arrays). Decoding, views and writes overlap the teacher's forward in
background threads, so the cost of caching is the teacher's own time. Reruns resume.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import os
import queue
import shlex
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from tqdm import tqdm

from distill.cli import comma_list, key_value
from distill.errors import ConfigError, DistillError
from distill.views import apply_view, expand_views, invert_view

SPLITS = ("train", "val", "test")

EPILOG = """\
examples:
  # the embedded default: Frangi vesselness on synthetic data (CPU, no weights)
  python -m distill.synth --out data/synthetic --count 96 --size 192 --seed 0
  python -m distill.cache_teacher --config configs/teacher/frangi_synthetic.yaml
  python -m distill.cache_teacher --verify teacher_cache/frangi_synthetic

  # the same with flags only, three views stored per image
  python -m distill.cache_teacher --teacher frangi --data-format merged --data-root data/synthetic \\
      --out teacher_cache/frangi3 --views identity,hflip,rot90 --teacher-option sigmas=[1,2,3,4]

  # a student trained by distill.fit as the teacher (an ensemble: several checkpoints), with flips
  python -m distill.cache_teacher --teacher checkpoint --data-format merged --data-root data/merged \\
      --teacher-option checkpoints=[students/a/checkpoints/best.ckpt,students/b/checkpoints/best.ckpt] \\
      --teacher-option tta=[identity,hflip,vflip] --batch-size 16 --out teacher_cache/unet_ens

  # Sa2VA-8B on four 24 GB GPUs: two workers, each model spread over two GPUs capped at 22 GiB
  python -m distill.cache_teacher --config configs/teacher/sa2va_8b_2x24gb.yaml \\
      --gpus-per-model 2 --max-memory 22GiB --workers auto

  # several processes or nodes (e.g. a SLURM array): each takes ids[I::N] into its own shard
  python -m distill.cache_teacher --config C.yaml --shard-index $SLURM_ARRAY_TASK_ID --num-shards 8
  python -m distill.cache_teacher --merge teacher_cache/all teacher_cache/node0 teacher_cache/node1

  # inspect and check a cache (exit 0 only when it is complete and sound)
  python -m distill.cache_teacher --info teacher_cache/frangi_synthetic
  python -m distill.cache_teacher --verify teacher_cache/frangi_synthetic

  # your own teacher: a module whose import calls @register_teacher("mine") (plugin mechanism)
  python -m distill.cache_teacher --import mypackage.my_teacher --teacher mine ...

A rerun on the same --out computes only the (id, view) pairs that are missing; a cache made by a
different teacher or from different data is refused with a message saying what differs.
"""


# -- command line and config ----------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m distill.cache_teacher",
        description="Run a teacher (frangi, checkpoint, sa2va, or a plugin) over a dataset and cache its "
        "per-pixel logits as float16 shards for distillation. Resumable, sharded, verifiable.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    mode = parser.add_argument_group("other modes (instead of caching)")
    mode.add_argument(
        "--verify", metavar="DIR", help="check a cache against its dataset; exit 0 only if sound"
    )
    mode.add_argument("--info", metavar="DIR", help="print a summary of a cache")
    mode.add_argument("--merge", nargs="+", metavar=("DST", "SRC"), help="merge caches SRC... into DST")

    run = parser.add_argument_group("what to cache")
    run.add_argument(
        "--config", metavar="FILE", help="YAML whose keys are the long flag names; flags override it"
    )
    run.add_argument(
        "--teacher", help="teacher name: frangi, checkpoint, sa2va, or one registered by --import"
    )
    run.add_argument("--data-format", help="dataset format: merged, labelme, coco, mask_folder")
    run.add_argument("--data-root", help="dataset directory")
    run.add_argument(
        "--reader-option", dest="reader_options", action="append", type=key_value, default=[], metavar="K=V",
        help="dataset reader option (repeatable)",
    )  # fmt: skip
    run.add_argument("--out", help="cache directory (created, or resumed when it exists)")
    run.add_argument(
        "--views",
        type=comma_list,
        default=["identity"],
        help="views to cache, e.g. identity,hflip,rot90 (d4 = all 8)",
    )
    run.add_argument("--splits", type=comma_list, default=list(SPLITS), help="splits to cache (default: all)")
    run.add_argument(
        "--fit-split", default="train", help="split whose ground truth fits teachers that need it"
    )
    run.add_argument(
        "--fit-images", type=int, default=32, help="at most this many fit-split images for the fit"
    )
    run.add_argument("--batch-size", type=int, default=8, help="(id, view) maps per teacher call")
    run.add_argument("--skip-bad", action="store_true", default=False, help="list bad images and go on")
    run.add_argument("--import", dest="imports", action="append", default=[], metavar="MODULE",
                     help="import a module that registers extra teachers (repeatable)")  # fmt: skip
    run.add_argument("--summary-json", metavar="FILE", help="also write the end-of-run summary as JSON")

    teacher = parser.add_argument_group("teacher options")
    teacher.add_argument(
        "--teacher-option", dest="teacher_options", action="append", type=key_value, default=[], metavar="K=V",
        help="option of the teacher (repeatable), value parsed as YAML: sigmas=[1,2,3], tta=[identity,hflip]",
    )  # fmt: skip
    teacher.add_argument("--model-path", help="sa2va: local Hugging Face directory of the model")
    teacher.add_argument("--trust-remote-code", action="store_true", default=None,
                         help="sa2va: allow running the model directory's own Python code (needed by Sa2VA)")  # fmt: skip
    teacher.add_argument("--prompt", help="sa2va: the referring prompt (must contain <image>)")
    teacher.add_argument("--use-dataset-text", action="store_true", default=None,
                         help="sa2va: use each image's dataset text as the prompt")  # fmt: skip
    teacher.add_argument("--max-memory", help="sa2va: memory cap per GPU, e.g. 22GiB for 24 GB cards")
    teacher.add_argument(
        "--quantize", choices=["none", "8bit", "4bit"], help="sa2va: bitsandbytes quantization"
    )

    scale = parser.add_argument_group("scale")
    scale.add_argument("--gpus-per-model", type=int, default=1, help="GPUs one teacher instance spans (K)")
    scale.add_argument("--workers", default="auto", help="auto (G//K on G GPUs, 1 on CPU) or a number")
    scale.add_argument("--shard-index", type=int, default=0, help="this process's index I in [0, N)")
    scale.add_argument(
        "--num-shards", type=int, default=1, help="N processes split the ids: I takes ids[I::N]"
    )
    return parser


# Keys of a --config file that are not plain `dest`s of the parser.
_SA2VA_FLAGS = ("model_path", "trust_remote_code", "prompt", "use_dataset_text", "max_memory", "quantize")
_NOT_IN_CONFIG = ("config", "verify", "info", "merge")


def load_config(path: str, parser: argparse.ArgumentParser) -> dict[str, Any]:
    """YAML -> parser defaults. Keys are long flag names (dashes or underscores)."""
    try:
        config = yaml.safe_load(Path(path).read_text()) or {}
    except (OSError, yaml.YAMLError) as err:
        raise ConfigError(f"--config {path}: cannot read it ({err})") from err
    if not isinstance(config, dict):
        raise ConfigError(f"--config {path}: expected a mapping of flag names to values")
    known = {a.dest for a in parser._actions} - {"help", *_NOT_IN_CONFIG}
    defaults = {}
    for key, value in config.items():
        dest = str(key).replace("-", "_")
        if dest not in known:
            raise ConfigError(f"--config {path}: unknown key {key!r}; use long flag names: {sorted(known)}")
        if dest in ("teacher_options", "reader_options"):
            if not isinstance(value, dict):
                raise ConfigError(f"--config {path}: {key} must be a mapping of option names to values")
            value = list(value.items())
        if dest in ("views", "splits") and isinstance(value, str):
            value = comma_list(value)
        if dest == "imports" and isinstance(value, str):
            value = [value]
        defaults[dest] = value
    return defaults


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.config:
        parser.set_defaults(**load_config(args.config, parser))
        args = parser.parse_args(argv)
    args.teacher_options = dict(args.teacher_options)  # later entries (the flags) win
    args.reader_options = dict(args.reader_options)
    if args.verify or args.info or args.merge:
        return args
    missing = [
        f"--{name.replace('_', '-')}"
        for name in ("teacher", "data_format", "data_root", "out")
        if not getattr(args, name)
    ]
    if missing:
        parser.error(f"missing {', '.join(missing)} (as flags or in --config)")
    try:
        args.views = expand_views(args.views)  # `d4` = all 8
    except ValueError as err:
        parser.error(f"--views: {err}")
    bad_splits = sorted(set(args.splits) - set(SPLITS))
    if bad_splits or not args.splits:
        parser.error(f"--splits: {bad_splits or 'nothing'} given; choose from {list(SPLITS)}")
    if not 0 <= args.shard_index < args.num_shards:
        parser.error(f"--shard-index {args.shard_index} must be in [0, --num-shards {args.num_shards})")
    if args.batch_size < 1 or args.gpus_per_model < 1:
        parser.error("--batch-size and --gpus-per-model must be >= 1")
    return args


# -- one worker: dataset -> teacher -> writer shard ------------------------------------------------


@dataclass
class Item:
    """One teacher input: the image of `id` seen through `view`."""

    id: str
    view: str
    image: np.ndarray
    text: str | None


def select_ids(dataset: Any, splits: Sequence[str]) -> list[str]:
    """The dataset's ids in the chosen splits, in the dataset's (sorted) order."""
    wanted = set(splits)
    return [i for i in dataset.ids if dataset.split_of(i) in wanted]


def open_data(args: argparse.Namespace) -> Any:
    from distill.data import open_dataset

    return open_dataset(args.data_format, args.data_root, skip_bad=args.skip_bad, **args.reader_options)


def teacher_options(args: argparse.Namespace, devices: list[int] | None) -> dict[str, Any]:
    """--teacher-option values plus the first-class sa2va flags that were given, plus `devices` for
    teachers that place themselves on GPUs."""
    from distill.teachers import base

    options = dict(args.teacher_options)
    options.update({k: getattr(args, k) for k in _SA2VA_FLAGS if getattr(args, k) is not None})
    if devices is not None:
        if args.teacher in base._TEACHER_MODULES:  # registered lazily: import before looking it up
            importlib.import_module(base._TEACHER_MODULES[args.teacher])
        factory = base._REGISTRY.get(args.teacher)
        if factory is not None and "devices" in inspect.signature(factory).parameters:
            options["devices"] = devices
    return options


def build_teacher(args: argparse.Namespace, dataset: Any, devices: list[int] | None) -> Any:
    """Create the teacher and, if it needs one, fit it on a seeded sample of the fit split."""
    from distill.teachers import create_teacher

    try:
        teacher = create_teacher(args.teacher, **teacher_options(args, devices))
    except TypeError as err:
        raise ConfigError(f"--teacher {args.teacher}: bad teacher option ({err})") from err
    if teacher.needs_fit:
        fit_ids = dataset.split_ids(args.fit_split)
        if not fit_ids:
            raise ConfigError(
                f"--fit-split {args.fit_split}: no images in that split to fit teacher {args.teacher!r}"
            )
        if len(fit_ids) > args.fit_images:
            picks = np.random.default_rng(0).choice(len(fit_ids), size=args.fit_images, replace=False)
            fit_ids = [fit_ids[i] for i in sorted(picks)]
        records = [dataset.get(i) for i in tqdm(fit_ids, desc=f"fitting {args.teacher}", leave=False)]
        teacher.fit([r.image for r in records], [r.mask for r in records])
    return teacher


def dataset_source(args: argparse.Namespace) -> dict[str, Any]:
    """Where the dataset lives and what was cached from it, kept in the manifest's dataset entry so that
    --verify can re-open it (the cache compares only the dataset's items, so a moved dataset still fits)."""
    return {
        "data_format": args.data_format,
        "data_root": str(Path(args.data_root).resolve()),
        "reader_options": args.reader_options,
        "splits": list(args.splits),
        "fit_split": args.fit_split,
        "fit_images": args.fit_images,
    }


def in_background(produce: Callable[[Callable[[Any], None]], None], depth: int = 2) -> Iterator[Any]:
    """Run `produce(put)` in a thread, yield what it puts; its exception is re-raised here."""
    channel: queue.Queue = queue.Queue(maxsize=depth)
    done = object()

    def target() -> None:
        try:
            produce(channel.put)
        except BaseException as err:  # handed to the consumer, which raises it
            channel.put(err)
        finally:
            channel.put(done)

    threading.Thread(target=target, daemon=True, name="cache-prefetch").start()
    while (got := channel.get()) is not done:
        if isinstance(got, BaseException):
            raise got
        yield got


class BackgroundWriter:
    """Maps logits back to the original frame and writes them in a thread, off the teacher's path."""

    def __init__(self, writer: Any):
        self.writer = writer
        self.channel: queue.Queue = queue.Queue(maxsize=4)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True, name="cache-writer")
        self.thread.start()

    def _run(self) -> None:
        while (job := self.channel.get()) is not None:
            if self.error is not None:
                continue
            try:
                kind, item, logits = job
                if kind == "row":
                    self.writer.write(item.id, item.view, invert_view(logits, item.view))
                else:
                    self.writer.write_status(item.id, "no_mask", view=item.view)
            except BaseException as err:
                self.error = err

    def put(self, kind: str, item: Item, logits: np.ndarray | None = None) -> None:
        if self.error is not None:
            raise self.error
        self.channel.put((kind, item, logits))

    def finish(self) -> None:
        self.channel.put(None)
        self.thread.join()
        if self.error is not None:
            raise self.error


def check_logits(item: Item, logits: Any, teacher: str) -> None:
    if not isinstance(logits, np.ndarray) or logits.shape != item.image.shape[:2]:
        shape = getattr(logits, "shape", type(logits).__name__)
        raise RuntimeError(
            f"teacher {teacher!r} returned {shape} for {item.id} ({item.view}); expected {item.image.shape[:2]}"
        )
    if not np.isfinite(logits).all():
        raise RuntimeError(f"teacher {teacher!r} returned non-finite logits for {item.id} ({item.view})")


def run_worker(
    args: argparse.Namespace, worker: int, n_workers: int, gpu_group: list[str] | None
) -> dict[str, Any]:
    """Cache this worker's ids (ids[shard::num_shards][worker::n_workers]) into its own writer shard."""
    if gpu_group is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(gpu_group)  # before this process touches CUDA
    import torch

    from distill.cache import CacheWriter

    for module in args.imports:
        importlib.import_module(module)
    setup_start = time.perf_counter()
    dataset = open_data(args)
    ids = select_ids(dataset, args.splits)[args.shard_index :: args.num_shards][worker::n_workers]
    devices = list(range(len(gpu_group))) if gpu_group is not None else None
    teacher = build_teacher(args, dataset, devices)
    manifest = {
        "teacher": teacher.fingerprint(),
        "dataset": {**dataset.fingerprint(), "source": dataset_source(args)},
        "views": list(args.views),
        "dtype": "float16",
        "command": shlex.join([sys.executable, "-m", "distill.cache_teacher", *sys.argv[1:]]),
    }
    writer_id = f"shard{args.shard_index}of{args.num_shards}" + (
        f"-worker{worker}of{n_workers}" if n_workers > 1 else ""
    )
    writer = CacheWriter(args.out, writer_id, manifest)
    todo = [(i, [v for v in args.views if not writer.done(i, v)]) for i in ids]
    todo = [(i, views) for i, views in todo if views]
    summary: dict[str, Any] = {
        "done": 0, "skipped": len(ids) - len(todo), "no_mask": 0, "failed": 0, "failed_ids": [],
        "maps": 0, "forward_s": 0.0, "setup_s": time.perf_counter() - setup_start,
    }  # fmt: skip
    # Items the dataset itself left out (--skip-bad) are listed once per process, with the teacher's failures.
    left_out = dataset.problems if worker == 0 else []
    failures: list[tuple[str, str]] = [(getattr(p, "item_id", str(p.path)), str(p)) for p in left_out]
    failed: set[str] = set()  # ids of `todo` that failed here

    def produce(put: Callable[[Any], None]) -> None:
        batch: list[Item] = []
        for item_id, views in todo:
            try:
                record = dataset.get(item_id)
            except DistillError as err:
                if not args.skip_bad:
                    raise
                failures.append((item_id, str(err)))
                failed.add(item_id)
                continue
            batch += [Item(item_id, v, apply_view(record.image, v), record.text) for v in views]
            while len(batch) >= args.batch_size:
                put(batch[: args.batch_size])
                batch = batch[args.batch_size :]
        if batch:
            put(batch)

    def forward(items: list[Item]) -> list[np.ndarray | None]:
        start = time.perf_counter()
        outputs = teacher.predict_logits([it.image for it in items], [it.text for it in items])
        summary["forward_s"] += time.perf_counter() - start
        if len(outputs) != len(items):
            raise RuntimeError(
                f"teacher {args.teacher!r} returned {len(outputs)} maps for {len(items)} images"
            )
        for item, logits in zip(items, outputs, strict=True):
            if logits is not None:
                check_logits(item, logits, args.teacher)
        return outputs

    views_left = {i: len(views) for i, views in todo}
    no_mask: set[str] = set()
    background = BackgroundWriter(writer)
    desc = f"caching {args.teacher}" + (f" [worker {worker}/{n_workers}]" if n_workers > 1 else "")
    bar = tqdm(total=len(todo), desc=desc, unit="img", position=worker, dynamic_ncols=True)
    loop_start = time.perf_counter()
    try:
        for items in in_background(produce):
            try:
                groups = [(items, forward(items))]
            except Exception as err:
                if not args.skip_bad:
                    raise RuntimeError(
                        f"teacher {args.teacher!r} failed on ids {sorted({it.id for it in items})}: {err}"
                    ) from err
                groups = []
                for item in items:  # isolate the bad image(s)
                    try:
                        groups.append(([item], forward([item])))
                    except Exception as single:
                        failures.append((item.id, f"{type(single).__name__}: {single}"))
                        failed.add(item.id)
            finished = 0
            for group_items, outputs in groups:
                for item, logits in zip(group_items, outputs, strict=True):
                    if item.id in failed:
                        continue
                    if logits is None:
                        no_mask.add(item.id)
                        background.put("status", item)
                    else:
                        background.put("row", item, logits)
                        summary["maps"] += 1
                    views_left[item.id] -= 1
                    finished += views_left[item.id] == 0
            bar.update(finished)
    finally:
        bar.close()
        background.finish()
        writer.close()
    wall = time.perf_counter() - loop_start
    failed_ids = sorted({i for i, _ in failures})
    summary.update(
        done=len(todo) - len(no_mask - failed) - len(failed),
        no_mask=len(no_mask - failed),
        failed=len(failed_ids),
        failed_ids=failed_ids,
        failures=[f"{i}: {why}" for i, why in failures],
        wall_s=wall,
    )
    if torch.cuda.is_available():
        physical = gpu_group or [str(d) for d in range(torch.cuda.device_count())]
        summary["peak_memory_gib"] = {
            f"cuda:{physical[d]}": torch.cuda.max_memory_allocated(d) / 2**30
            for d in range(torch.cuda.device_count())
        }
    summary["teacher_stats"] = [teacher.stats()]
    teacher.close()
    return summary


# -- workers, summary, modes ------------------------------------------------------------------------


def gpu_groups(args: argparse.Namespace) -> list[list[str]] | None:
    """Physical GPU ids per worker (None: CPU, one in-process worker, or --workers N CPU processes)."""
    import torch

    if not torch.cuda.is_available():
        return None
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    physical = comma_list(visible) if visible else [str(d) for d in range(torch.cuda.device_count())]
    k = args.gpus_per_model
    available = len(physical) // k
    if available == 0:
        raise ConfigError(f"--gpus-per-model {k}: only {len(physical)} GPU(s) visible ({physical})")
    n = available if args.workers == "auto" else int(args.workers)
    if not 1 <= n <= available:
        raise ConfigError(
            f"--workers {args.workers}: {len(physical)} GPUs with --gpus-per-model {k} allow 1..{available}"
        )
    return [physical[w * k : (w + 1) * k] for w in range(n)]


def _spawned_worker(
    args: argparse.Namespace, worker: int, n: int, group: list[str] | None, results: Any
) -> None:
    try:
        results.put((worker, run_worker(args, worker, n, group), None))
    except BaseException:
        results.put((worker, None, traceback.format_exc()))


def run_workers(args: argparse.Namespace) -> list[dict[str, Any]]:
    groups = gpu_groups(args)
    if groups is None:
        n = 1 if args.workers == "auto" else int(args.workers)
        groups_or_none: list[list[str] | None] = [None] * n
    else:
        groups_or_none = list(groups)
    if len(groups_or_none) == 1:
        return [run_worker(args, 0, 1, groups_or_none[0])]
    import torch.multiprocessing as mp

    context = mp.get_context("spawn")
    results = context.Queue()
    processes = [
        context.Process(target=_spawned_worker, args=(args, w, len(groups_or_none), group, results))
        for w, group in enumerate(groups_or_none)
    ]
    for process in processes:
        process.start()
    summaries, errors = [], []
    for _ in processes:
        worker, summary, error = results.get()
        (errors.append(f"worker {worker}:\n{error}") if error else summaries.append(summary))
    for process in processes:
        process.join()
    if errors:
        raise RuntimeError("teacher workers failed:\n" + "\n".join(errors))
    return summaries


def combine(summaries: list[dict[str, Any]]) -> dict[str, Any]:
    """One summary for all workers; workers run in parallel, so wall time is the slowest worker's."""
    total: dict[str, Any] = {
        k: sum(s[k] for s in summaries) for k in ("done", "skipped", "no_mask", "failed", "maps")
    }
    total["failures"] = [f for s in summaries for f in s["failures"]]
    total["workers"] = len(summaries)
    total["wall_s"] = max(s["wall_s"] for s in summaries)
    total["setup_s"] = max(s["setup_s"] for s in summaries)
    forward = max(s["forward_s"] for s in summaries)  # per worker, the slowest
    total["forward_s"] = sum(s["forward_s"] for s in summaries)
    total["images_per_s"] = total["done"] / total["wall_s"] if total["wall_s"] > 0 else 0.0
    total["overhead_pct"] = 100.0 * (total["wall_s"] - forward) / forward if forward > 0 else 0.0
    total["teacher_stats"] = [stats for s in summaries for stats in s.get("teacher_stats", [])]
    memory = {k: v for s in summaries for k, v in s.get("peak_memory_gib", {}).items()}
    if memory:
        total["peak_memory_gib"] = memory
    return total


def print_summary(summary: dict[str, Any], out: str) -> None:
    lines = [
        f"cache {out}: {summary['done']} done, {summary['skipped']} skipped (already cached), "
        f"{summary['no_mask']} no_mask, {summary['failed']} failed  [{summary['maps']} maps, {summary['workers']} worker(s)]",
        f"  {summary['images_per_s']:.2f} images/s; teacher forward {summary['forward_s']:.2f}s vs wall "
        f"{summary['wall_s']:.2f}s (overhead {summary['overhead_pct']:.1f}%); setup (load/fit) {summary['setup_s']:.2f}s",
    ]
    for device, gib in summary.get("peak_memory_gib", {}).items():
        lines.append(f"  peak memory {device}: {gib:.2f} GiB")
    for stats in summary.get("teacher_stats", []):
        if "agreement" in stats:
            lines.append(
                f"  self-check: sigmoid(logits) > 0.5 agrees with the teacher's own masks on "
                f"{100 * stats['agreement']:.4f}% of {stats['pixels_checked']:,} pixels "
                f"(worst image {100 * stats['worst_image_mismatch']:.4f}% off)"
            )
    if summary["failures"]:
        lines.append("  failed (left out with --skip-bad):")
        lines += [f"    {f}" for f in summary["failures"]]
    print("\n".join(lines), flush=True)


def verify(root: str) -> int:
    """Re-open the dataset the manifest names, so that ids, shapes and fingerprints are all checked."""
    from distill.cache import TeacherCache, verify_cache
    from distill.data import open_dataset

    source = TeacherCache(root).manifest["dataset"].get("source") or {}
    if not source.get("data_format") or not source.get("data_root"):
        raise ConfigError(
            f"{root}/manifest.json records no dataset source (data_format, data_root): cannot re-open it"
        )
    dataset = open_dataset(source["data_format"], source["data_root"], **source.get("reader_options", {}))
    problems = verify_cache(root, dataset=dataset)
    for problem in problems:
        print(f"  {problem}", file=sys.stderr)
    verdict = "OK" if not problems else f"{len(problems)} problem(s)"
    print(f"verify {root}: {verdict} ({len(dataset.ids)} ids x {len(TeacherCache(root).views)} views)")
    return 0 if not problems else 1


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        if args.verify:
            return verify(args.verify)
        if args.info:
            from distill.cache import cache_info

            info = cache_info(args.info)
            print(info if isinstance(info, str) else json.dumps(info, indent=2, default=str))
            return 0
        if args.merge:
            from distill.cache import merge_cache

            if len(args.merge) < 2:
                raise ConfigError("--merge needs DST and at least one SRC")
            merge_cache(args.merge[0], *args.merge[1:])
            print(f"merged {len(args.merge) - 1} cache(s) into {args.merge[0]}")
            return 0
        summary = combine(run_workers(args))
    except DistillError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print_summary(summary, args.out)
    if args.summary_json:
        Path(args.summary_json).write_text(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
