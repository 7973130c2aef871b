"""The caching pipeline: run a teacher over a dataset once and store its logits in a teacher cache.

A `CacheJob` says what to cache; `run_job(job)` does it (what `python -m distill.cache_teacher` runs
after reading its flags; benchmarks and tests call it directly). The job is spread over workers,
each with its own writer shard (no locks): G visible GPUs and `gpus_per_model` K give G // K
workers, `shard_index`/`num_shards` split the ids between processes or nodes.

A worker first plans, before its teacher does anything expensive: which of its (id, view) rows
the cache still lacks (`plan_worker`). Nothing to do = the teacher is never run, nor fitted when it
can take its fit back from the cache. Then three stages overlap, so that the cost of caching is the
teacher's own time: read + view (decode each record, apply each missing view; a background
thread), teacher forward (this thread), write (map back to the original frame, append to the
shard; a background thread).
"""

from __future__ import annotations

import importlib
import inspect
import os
import queue
import shlex
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from distill.cache import CacheWriter, read_manifest
from distill.cache.format import MANIFEST
from distill.cache.writer import pending_rows
from distill.cli import comma_list
from distill.data import VesselDataset, open_dataset
from distill.data.splits import SPLITS
from distill.errors import ConfigError, DistillError
from distill.teachers import Teacher, create_teacher, teacher_factory
from distill.views import apply_view, check_views, invert_view


@dataclass(frozen=True)
class CacheJob:
    """One caching run. Each field means what the `cache_teacher` flag of the same name means;
    `workers=None` is `--workers auto`, `command` is recorded in the manifest (default: this
    process's command line). Bad values raise ConfigError naming the flag."""

    teacher: str
    data_format: str
    data_root: str | Path
    out: str | Path
    teacher_options: dict[str, Any] = field(default_factory=dict)
    reader_options: dict[str, Any] = field(default_factory=dict)
    views: Sequence[str] = ("identity",)
    splits: Sequence[str] = SPLITS
    fit_split: str = "train"
    fit_images: int = 32
    batch_size: int = 8
    skip_bad: bool = False
    imports: Sequence[str] = ()
    gpus_per_model: int = 1
    workers: int | None = None
    shard_index: int = 0
    num_shards: int = 1
    command: str = ""

    def __post_init__(self) -> None:
        try:
            check_views(list(self.views))
        except ValueError as err:
            raise ConfigError(f"--views: {err}") from err
        bad_splits = sorted(set(self.splits) - set(SPLITS))
        if bad_splits or not self.splits:
            raise ConfigError(f"--splits: {bad_splits or 'nothing'} given; choose from {list(SPLITS)}")
        if not 0 <= self.shard_index < self.num_shards:
            raise ConfigError(
                f"--shard-index {self.shard_index} must be in [0, --num-shards {self.num_shards})"
            )
        if self.batch_size < 1 or self.gpus_per_model < 1 or (self.workers is not None and self.workers < 1):
            raise ConfigError("--batch-size, --gpus-per-model and --workers must be >= 1")


# -- the teacher -------------------------------------------------------------------------------------


def create_job_teacher(job: CacheJob, devices: list[int] | None) -> Teacher:
    """The job's teacher, constructed only (cheap by the teacher contract: heavy loading waits for the
    first `predict_logits`), with `devices` for teachers that place themselves on GPUs."""
    options = dict(job.teacher_options)
    parameters = inspect.signature(teacher_factory(job.teacher)).parameters
    if devices is not None and "devices" in parameters:
        options["devices"] = devices
    missing = [
        name for name, p in parameters.items()
        if p.default is inspect.Parameter.empty and p.kind is p.POSITIONAL_OR_KEYWORD and name not in options
    ]  # fmt: skip
    if missing:
        flags = ", ".join(f"--teacher-option {name}=... (or --{name.replace('_', '-')})" for name in missing)
        raise ConfigError(f"--teacher {job.teacher} needs {flags}")
    try:
        return create_teacher(job.teacher, **options)
    except TypeError as err:
        raise ConfigError(f"--teacher {job.teacher}: bad teacher option ({err})") from err


def fit_teacher(job: CacheJob, teacher: Teacher, dataset: VesselDataset) -> None:
    """Fit `teacher` on a seeded sample of at most `job.fit_images` images of `job.fit_split`."""
    fit_ids = dataset.split_ids(job.fit_split)
    if not fit_ids:
        raise ConfigError(
            f"--fit-split {job.fit_split}: no images in that split to fit teacher {job.teacher!r}"
        )
    if len(fit_ids) > job.fit_images:
        picks = np.random.default_rng(0).choice(len(fit_ids), size=job.fit_images, replace=False)
        fit_ids = [fit_ids[i] for i in sorted(picks)]
    records = [dataset.get(i) for i in tqdm(fit_ids, desc=f"fitting {job.teacher}", leave=False)]
    teacher.fit([r.image for r in records], [r.mask for r in records])


# -- planning: what is left to do, known before the teacher runs -----------------------------------


@dataclass
class WorkerPlan:
    """One worker's share of the job: its opened dataset and teacher, the manifest its writer opens
    the cache with, and its (id, views still missing) rows, in dataset order."""

    dataset: VesselDataset
    teacher: Teacher
    manifest: dict[str, Any]
    todo: list[tuple[str, list[str]]]
    skipped: int  # ids of this worker already complete (or no_mask) in the cache


def select_ids(dataset: VesselDataset, splits: Sequence[str]) -> list[str]:
    """The dataset's ids in the chosen splits, in the dataset's (sorted) order."""
    wanted = set(splits)
    return [i for i in dataset.ids if dataset.split_of(i) in wanted]


def plan_worker(job: CacheJob, worker: int, n_workers: int, devices: list[int] | None) -> WorkerPlan:
    """Open the dataset and the teacher and find this worker's missing rows (ids[shard::num_shards]
    [worker::n_workers]). A teacher that needs a fit takes it back from an existing cache when it can
    (`Teacher.restore_fit`), else is fitted here: its fingerprint, which the cache compares, holds the
    fit. CacheError when the cache at `job.out` belongs to another teacher or holds changed ids."""
    dataset = open_dataset(job.data_format, job.data_root, skip_bad=job.skip_bad, **job.reader_options)
    ids = select_ids(dataset, job.splits)[job.shard_index :: job.num_shards][worker::n_workers]
    teacher = create_job_teacher(job, devices)
    cached = read_manifest(job.out) if (Path(job.out) / MANIFEST).is_file() else None
    restored = cached is not None and teacher.needs_fit and teacher.restore_fit(cached["teacher"])
    if teacher.needs_fit and not restored and (cached is not None or ids):
        fit_teacher(job, teacher, dataset)
    manifest = {
        "teacher": teacher.fingerprint(),
        "dataset": {**dataset.fingerprint(), "source": dataset_source(job)},
        "views": list(job.views),
        "dtype": "float16",
        "command": job.command or shlex.join([sys.executable, *sys.argv]),
    }
    todo = pending_rows(job.out, manifest, ids)
    return WorkerPlan(dataset, teacher, manifest, todo, skipped=len(ids) - len(todo))


def dataset_source(job: CacheJob) -> dict[str, Any]:
    """Where the dataset lived and what was cached from it, so that --verify can re-open it. Informational:
    the cache compares items by input hash, so a dataset or cache moved elsewhere still fits."""
    return {
        "data_format": job.data_format,
        "data_root": str(Path(job.data_root).resolve()),
        "reader_options": dict(job.reader_options),
        "splits": list(job.splits),
        "fit_split": job.fit_split,
        "fit_images": job.fit_images,
    }


# -- the three stages ---------------------------------------------------------------------------------


@dataclass
class Item:
    """One teacher input: the image of `id` seen through `view` (`source`: the image unviewed)."""

    id: str
    view: str
    image: np.ndarray
    text: str | None
    source: np.ndarray


@dataclass
class Tally:
    """What a worker did, counted as it goes (the read stage adds its failures from its thread)."""

    failures: list[tuple[str, str]] = field(default_factory=list)  # (id, why), listed in the summary
    failed: set[str] = field(default_factory=set)  # ids of the to-do list that failed here
    no_mask: set[str] = field(default_factory=set)
    maps: int = 0
    forward_s: float = 0.0

    def fail(self, item_id: str, why: str) -> None:
        self.failures.append((item_id, why))
        self.failed.add(item_id)


def read_items(
    dataset: VesselDataset,
    todo: list[tuple[str, list[str]]],
    batch_size: int,
    skip_bad: bool,
    tally: Tally,
    put: Callable[[list[Item]], None],
) -> None:
    """Stage 1, read + view: decode each id, apply each view it still lacks, `put` batches of Items."""
    batch: list[Item] = []
    for item_id, views in todo:
        try:
            record = dataset.get(item_id)
        except DistillError as err:
            if not skip_bad:
                raise
            tally.fail(item_id, str(err))
            continue
        batch += [Item(item_id, v, apply_view(record.image, v), record.text, record.image) for v in views]
        while len(batch) >= batch_size:
            put(batch[:batch_size])
            batch = batch[batch_size:]
    if batch:
        put(batch)


def forward(teacher: Teacher, name: str, items: list[Item], tally: Tally) -> list[np.ndarray | None]:
    """Stage 2, teacher forward: one teacher call, its outputs checked (count, shape, finite)."""
    start = time.perf_counter()
    if teacher.views_in_one_pass:
        outputs = forward_by_image(teacher, items)
    else:
        outputs = teacher.predict_logits([it.image for it in items], [it.text for it in items])
    tally.forward_s += time.perf_counter() - start
    if len(outputs) != len(items):
        raise RuntimeError(f"teacher {name!r} returned {len(outputs)} maps for {len(items)} images")
    for item, logits in zip(items, outputs, strict=True):
        if logits is not None:
            check_logits(item, logits, name)
    return outputs


def forward_by_image(teacher: Teacher, items: list[Item]) -> list[np.ndarray | None]:
    """`predict_views` on each id's unviewed image with the views its items need; outputs in item order."""
    by_id = {item.id: item for item in items}  # the items of one id share its source image and text
    ids = list(by_id)
    views = [[item.view for item in items if item.id == i] for i in ids]
    per_id = teacher.predict_views([by_id[i].source for i in ids], views, [by_id[i].text for i in ids])
    maps = {
        (i, view): logits
        for i, vs, out in zip(ids, views, per_id, strict=True)
        for view, logits in zip(vs, out, strict=True)
    }
    return [maps[item.id, item.view] for item in items]


def check_logits(item: Item, logits: Any, teacher: str) -> None:
    if not isinstance(logits, np.ndarray) or logits.shape != item.image.shape[:2]:
        shape = getattr(logits, "shape", type(logits).__name__)
        raise RuntimeError(
            f"teacher {teacher!r} returned {shape} for {item.id} ({item.view}); expected {item.image.shape[:2]}"
        )
    if not np.isfinite(logits).all():
        raise RuntimeError(f"teacher {teacher!r} returned non-finite logits for {item.id} ({item.view})")


def forward_or_isolate(
    job: CacheJob, teacher: Teacher, items: list[Item], tally: Tally
) -> list[tuple[Item, np.ndarray | None]]:
    """The batch's (item, logits or None for no mask). A failing batch stops the run, or with
    `skip_bad` is retried image by image, each failure tallied."""
    try:
        return list(zip(items, forward(teacher, job.teacher, items, tally), strict=True))
    except Exception as err:
        if not job.skip_bad:
            raise RuntimeError(
                f"teacher {job.teacher!r} failed on ids {sorted({it.id for it in items})}: {err}"
            ) from err
    results = []
    for item in items:
        try:
            results.append((item, forward(teacher, job.teacher, [item], tally)[0]))
        except Exception as single:
            tally.fail(item.id, f"{type(single).__name__}: {single}")
    return results


class BackgroundWriter:
    """Stage 3, write: maps logits back to the original frame and appends them in a thread."""

    def __init__(self, writer: CacheWriter):
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
                item, logits = job
                if logits is None:
                    self.writer.write_status(item.id, "no_mask", view=item.view)
                else:
                    self.writer.write(item.id, item.view, invert_view(logits, item.view))
            except BaseException as err:
                self.error = err

    def put(self, item: Item, logits: np.ndarray | None) -> None:
        """Queue the item's map (None: record no_mask for its view); re-raises an earlier write error."""
        if self.error is not None:
            raise self.error
        self.channel.put((item, logits))

    def finish(self) -> None:
        self.channel.put(None)
        self.thread.join()
        if self.error is not None:
            raise self.error


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


def cache_rows(job: CacheJob, plan: WorkerPlan, writer: CacheWriter, tally: Tally, bar: tqdm) -> None:
    """Stream the plan's rows through read + view -> teacher forward -> write, into `writer`."""
    views_left = {i: len(views) for i, views in plan.todo}
    background = BackgroundWriter(writer)
    read = partial(read_items, plan.dataset, plan.todo, job.batch_size, job.skip_bad, tally)
    try:
        for items in in_background(read):
            finished = 0
            for item, logits in forward_or_isolate(job, plan.teacher, items, tally):
                if item.id in tally.failed:
                    continue
                background.put(item, logits)
                if logits is None:
                    tally.no_mask.add(item.id)
                else:
                    tally.maps += 1
                views_left[item.id] -= 1
                finished += views_left[item.id] == 0
            bar.update(finished)
    finally:
        background.finish()


# -- workers -------------------------------------------------------------------------------------------


def run_worker(
    job: CacheJob, worker: int = 0, n_workers: int = 1, gpu_group: list[str] | None = None
) -> dict[str, Any]:
    """Cache this worker's ids into its own writer shard; its summary (see `combine`). `gpu_group`:
    the physical GPU ids this worker may see (set before this process touches CUDA)."""
    if gpu_group is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(gpu_group)
    for module in job.imports:
        importlib.import_module(module)
    start = time.perf_counter()
    plan = plan_worker(job, worker, n_workers, None if gpu_group is None else list(range(len(gpu_group))))
    # Items the dataset itself left out (skip_bad) are listed once per process, with the teacher's failures.
    left_out = plan.dataset.problems if worker == 0 else []
    tally = Tally(failures=[(getattr(p, "item_id", str(p.path)), str(p)) for p in left_out])
    setup_s = time.perf_counter() - start
    try:
        if not plan.todo:
            return _summary(plan, tally, setup_s, wall_s=0.0)
        name = f"shard{job.shard_index}of{job.num_shards}" + (
            f"-worker{worker}of{n_workers}" if n_workers > 1 else ""
        )
        desc = f"caching {job.teacher}" + (f" [worker {worker}/{n_workers}]" if n_workers > 1 else "")
        loop_start = time.perf_counter()
        with (
            CacheWriter(job.out, name, plan.manifest) as writer,
            tqdm(total=len(plan.todo), desc=desc, unit="img", position=worker, dynamic_ncols=True) as bar,
        ):
            cache_rows(job, plan, writer, tally, bar)
        summary = _summary(plan, tally, setup_s, wall_s=time.perf_counter() - loop_start)
        summary["teacher_stats"] = [plan.teacher.stats()]
        summary.update(_peak_memory(gpu_group))
        return summary
    finally:
        plan.teacher.close()


def _summary(plan: WorkerPlan, tally: Tally, setup_s: float, wall_s: float) -> dict[str, Any]:
    failed_ids = sorted({i for i, _ in tally.failures})
    no_mask = tally.no_mask - tally.failed
    return {
        "todo": len(plan.todo),
        "done": len(plan.todo) - len(no_mask) - len(tally.failed),
        "skipped": plan.skipped,
        "no_mask": len(no_mask),
        "failed": len(failed_ids),
        "failed_ids": failed_ids,
        "failures": [f"{i}: {why}" for i, why in tally.failures],
        "maps": tally.maps,
        "forward_s": tally.forward_s,
        "setup_s": setup_s,
        "wall_s": wall_s,
        "teacher_stats": [],
    }


def _peak_memory(gpu_group: list[str] | None) -> dict[str, Any]:
    import torch

    if not torch.cuda.is_available():
        return {}
    physical = gpu_group or [str(d) for d in range(torch.cuda.device_count())]
    return {
        "peak_memory_gib": {
            f"cuda:{physical[d]}": torch.cuda.max_memory_allocated(d) / 2**30
            for d in range(torch.cuda.device_count())
        }
    }


def gpu_groups(job: CacheJob) -> list[list[str] | None]:
    """Physical GPU ids per worker; [None] * n on a machine without CUDA (n CPU workers, default 1)."""
    import torch

    if not torch.cuda.is_available():
        return [None] * (job.workers or 1)
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    physical = comma_list(visible) if visible else [str(d) for d in range(torch.cuda.device_count())]
    k = job.gpus_per_model
    available = len(physical) // k
    if available == 0:
        raise ConfigError(f"--gpus-per-model {k}: only {len(physical)} GPU(s) visible ({physical})")
    n = job.workers or available
    if n > available:
        raise ConfigError(
            f"--workers {n}: {len(physical)} GPUs with --gpus-per-model {k} allow 1..{available}"
        )
    return [physical[w * k : (w + 1) * k] for w in range(n)]


def _die_with_parent() -> None:
    """Linux: have the kernel kill this worker when the process that started it dies (even by SIGKILL),
    so that a killed `cache_teacher` leaves no worker holding GPUs and writing to its shard."""
    if sys.platform.startswith("linux"):
        import ctypes
        import signal

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def _spawned_worker(
    job: CacheJob, worker: int, n: int, group: list[str] | None, parent: int, results: Any
) -> None:
    _die_with_parent()
    if os.getppid() != parent:  # the parent died before the line above
        return
    try:
        results.put((worker, run_worker(job, worker, n, group), None))
    except DistillError as err:  # the user's to fix: re-raised as itself in the parent
        results.put((worker, None, err))
    except BaseException:
        results.put((worker, None, traceback.format_exc()))


def _collect(processes: list[Any], results: Any) -> tuple[list[dict[str, Any]], list[Any]]:
    """Each worker's (summary or error); a worker that dies without reporting is an error, not a hang."""
    summaries, errors, reported = [], [], set()
    while len(reported) < len(processes):
        try:
            worker, summary, error = results.get(timeout=5)
        except queue.Empty:
            for w, process in enumerate(processes):
                if w not in reported and not process.is_alive() and results.empty():
                    reported.add(w)
                    errors.append(f"worker {w} died without a result (exit code {process.exitcode})")
            continue
        reported.add(worker)
        (errors.append(error if isinstance(error, DistillError) else f"worker {worker}:\n{error}")
         if error is not None else summaries.append(summary))  # fmt: skip
    return summaries, errors


def run_job(job: CacheJob) -> dict[str, Any]:
    """Run `job` on all its workers (in this process when there is one, else one spawned process
    each, killed with this one); the combined summary. Raises DistillError for bad input (a worker's
    own included), RuntimeError for a failed teacher or a worker that died."""
    groups = gpu_groups(job)
    if len(groups) == 1:
        return combine([run_worker(job, 0, 1, groups[0])])
    import torch.multiprocessing as mp

    context = mp.get_context("spawn")
    results = context.Queue()
    processes = [
        context.Process(target=_spawned_worker, args=(job, w, len(groups), group, os.getpid(), results))
        for w, group in enumerate(groups)
    ]
    for process in processes:
        process.start()
    summaries, errors = _collect(processes, results)
    for process in processes:
        process.join()
    user_errors = [e for e in errors if isinstance(e, DistillError)]
    if user_errors:
        raise user_errors[0]
    if errors:
        raise RuntimeError("teacher workers failed:\n" + "\n".join(errors))
    return combine(summaries)


def combine(summaries: list[dict[str, Any]]) -> dict[str, Any]:
    """One summary for all workers: counts summed (todo = ids the cache lacked; done, skipped, no_mask,
    failed, maps), wall and setup time the slowest worker's (they run in parallel), images/s, the
    overhead of caching over the slowest worker's teacher forward, teacher stats and peak memory."""
    total: dict[str, Any] = {
        k: sum(s[k] for s in summaries) for k in ("todo", "done", "skipped", "no_mask", "failed", "maps")
    }
    total["failures"] = [f for s in summaries for f in s["failures"]]
    total["workers"] = len(summaries)
    total["wall_s"] = max(s["wall_s"] for s in summaries)
    total["setup_s"] = max(s["setup_s"] for s in summaries)
    forward_s = max(s["forward_s"] for s in summaries)
    total["forward_s"] = sum(s["forward_s"] for s in summaries)
    total["images_per_s"] = total["done"] / total["wall_s"] if total["wall_s"] > 0 else 0.0
    total["overhead_pct"] = 100.0 * (total["wall_s"] - forward_s) / forward_s if forward_s > 0 else 0.0
    total["teacher_stats"] = [stats for s in summaries for stats in s["teacher_stats"]]
    memory = {k: v for s in summaries for k, v in s.get("peak_memory_gib", {}).items()}
    if memory:
        total["peak_memory_gib"] = memory
    return total
