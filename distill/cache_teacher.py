"""Run a teacher over a dataset once and cache its logits: `python -m distill.cache_teacher --help`.

One process = one or more workers, each with its own writer shard (no locks): G visible GPUs and
`--gpus-per-model K` give G // K workers; `--shard-index I --num-shards N` splits the ids between
processes or nodes (SLURM arrays). Decoding, views and writes overlap the teacher's forward in
background threads, so the cost of caching is the teacher's own time. Reruns resume.
"""

from __future__ import annotations

import argparse
import inspect
import json
import shlex
import sys
import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from distill.cache import TeacherCache, cache_info, merge_cache, verify_cache
from distill.caching import CacheJob, run_job
from distill.cli import comma_list, key_value, reports_user_errors
from distill.data import open_dataset
from distill.data.splits import SPLITS
from distill.errors import ConfigError
from distill.teachers import list_teachers, teacher_factory
from distill.views import expand_views

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

  # inspect and check a cache (exit 0 only when it is complete and sound), also against grown data
  python -m distill.cache_teacher --info teacher_cache/frangi_synthetic
  python -m distill.cache_teacher --verify teacher_cache/frangi_synthetic
  python -m distill.cache_teacher --verify teacher_cache/frangi_synthetic --data-format merged --data-root data/x

  # your own teacher: a module whose import calls @register_teacher("mine") (plugin mechanism)
  python -m distill.cache_teacher --import mypackage.my_teacher --teacher mine ...

A rerun on the same --out computes only the (id, view) pairs that are missing (after the dataset
grew: only the new ids; nothing missing: it exits at once, without running the teacher). A cache
made by another teacher or views is refused saying what differs, and ids whose image or text (what
the teacher saw) changed since they were cached are refused by id; a corrected mask keeps its rows.
"""


def as_yaml(value: Any) -> str:
    """`value` as one would write it after K= (YAML flow style: [1.0, 2.0], true, null)."""
    return yaml.safe_dump(value, default_flow_style=True).removesuffix("\n...\n").strip()


def teacher_options_help() -> str:
    """Each built-in teacher's options (names and defaults, read from its constructor) for --help."""
    lines = ["teacher options, given as --teacher-option K=V (or a `teacher_options:` mapping in --config):"]
    for name in list_teachers():
        parameters = inspect.signature(teacher_factory(name)).parameters.values()
        shown = [
            p.name if p.default is p.empty else f"{p.name}={as_yaml(p.default)}"
            for p in parameters
            if p.name != "devices"  # set by --gpus-per-model and --workers
        ]
        lines += textwrap.wrap(
            f"{name}: {', '.join(shown)}", width=100, initial_indent="  ", subsequent_indent="      "
        )
    return "\n".join(lines)


# -- command line and config ----------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m distill.cache_teacher",
        description="Run a teacher (frangi, checkpoint, sa2va, or a plugin) over a dataset and cache its "
        "per-pixel logits as float16 shards for distillation. Resumable, sharded, verifiable.",
        epilog=EPILOG + "\n" + teacher_options_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    mode = parser.add_argument_group("other modes (instead of caching)")
    mode.add_argument(
        "--verify",
        metavar="DIR",
        help="check a cache against its dataset (the one it was made from, or --data-format/--data-root); "
        "exit 0 only if sound and complete",
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
        "--dtype",
        choices=["bfloat16", "float16", "float32"],
        help="sa2va: weights and inputs (default bfloat16)",
    )
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
_SA2VA_FLAGS = (
    "model_path",
    "trust_remote_code",
    "prompt",
    "use_dataset_text",
    "max_memory",
    "quantize",
    "dtype",
)
_NOT_IN_CONFIG = ("config", "verify", "info", "merge")


def load_config(path: str, parser: argparse.ArgumentParser) -> dict[str, Any]:
    """YAML -> parser defaults. Keys are long flag names (dashes or underscores)."""
    try:
        config = yaml.safe_load(Path(path).read_text()) or {}
    except (OSError, yaml.YAMLError) as err:
        raise ConfigError(f"--config {path}: cannot read it ({err})") from err
    if not isinstance(config, dict):
        raise ConfigError(f"--config {path}: expected a mapping of flag names to values")
    # A key is a long flag's name (`teacher-option`, `teacher_option`) or its destination (`teacher_options`).
    dests, flags = {}, []
    for action in parser._actions:
        if action.dest in ("help", *_NOT_IN_CONFIG):
            continue
        dests[action.dest] = action.dest
        for flag in action.option_strings:
            if flag.startswith("--"):
                dests[flag[2:].replace("-", "_")] = action.dest
                flags.append(flag[2:])
    defaults = {}
    for key, value in config.items():
        dest = dests.get(str(key).replace("-", "_"))
        if dest is None:
            raise ConfigError(f"--config {path}: unknown key {key!r}; use long flag names: {sorted(flags)}")
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
    """The flags (over the --config file's values); for a caching run, `args.job` is its CacheJob."""
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
        args.job = make_job(args)
    except ConfigError as err:
        parser.error(str(err))
    return args


def make_job(args: argparse.Namespace) -> CacheJob:
    """The caching job the parsed flags describe (the sa2va flags join the teacher options). ConfigError
    for bad values."""
    options = dict(args.teacher_options)
    options.update({k: getattr(args, k) for k in _SA2VA_FLAGS if getattr(args, k) is not None})
    workers = str(args.workers)  # a --config file may give a number
    if workers != "auto" and not workers.isdigit():
        raise ConfigError(f"--workers {workers}: give auto or a number")
    try:
        views = expand_views(args.views)  # `d4` = all 8
    except ValueError as err:
        raise ConfigError(f"--views: {err}") from err
    return CacheJob(
        teacher=args.teacher,
        data_format=args.data_format,
        data_root=args.data_root,
        out=args.out,
        teacher_options=options,
        reader_options=args.reader_options,
        views=views,
        splits=args.splits,
        fit_split=args.fit_split,
        fit_images=args.fit_images,
        batch_size=args.batch_size,
        skip_bad=args.skip_bad,
        imports=args.imports,
        gpus_per_model=args.gpus_per_model,
        workers=None if workers == "auto" else int(workers),
        shard_index=args.shard_index,
        num_shards=args.num_shards,
        command=shlex.join([sys.executable, "-m", "distill.cache_teacher", *sys.argv[1:]]),
    )


# -- summary and modes -----------------------------------------------------------------------------


def print_summary(summary: dict[str, Any], out: str) -> None:
    """The end-of-run report: counts, speed, memory, the teacher's self-check, failures."""
    if summary["todo"] == 0:
        what = f"all {summary['skipped']} id(s) already cached" if summary["skipped"] else "no ids selected"
        lines = [f"cache {out}: nothing to do, {what}; the teacher was not run"]
    else:
        lines = [
            f"cache {out}: {summary['done']} done, {summary['skipped']} skipped (already cached), "
            f"{summary['no_mask']} no_mask, {summary['failed']} failed  [{summary['maps']} maps, {summary['workers']} worker(s)]",
            f"  {summary['images_per_s']:.2f} images/s; teacher forward {summary['forward_s']:.2f}s vs wall "
            f"{summary['wall_s']:.2f}s (overhead {summary['overhead_pct']:.1f}%); setup (data, teacher, fit) {summary['setup_s']:.2f}s",
        ]
    if summary["todo"] and summary["no_mask"] == summary["todo"]:
        lines.append(
            "  warning: the teacher gave no mask for any image (all no_mask): students would learn from ground "
            "truth alone. Check the prompt (--prompt, --use-dataset-text) and the model."
        )
    for device, gib in summary.get("peak_memory_gib", {}).items():
        lines.append(f"  peak memory {device}: {gib:.2f} GiB")
    lines += [self_check_line(stats) for stats in summary["teacher_stats"] if "agreement" in stats]
    lines += [
        forced_line(stats["teacher_forced"])
        for stats in summary["teacher_stats"]
        if "teacher_forced" in stats
    ]
    if summary["failures"]:
        lines.append("  failed (left out with --skip-bad):")
        lines += [f"    {f}" for f in summary["failures"]]
    print("\n".join(lines), flush=True)


def self_check_line(stats: dict[str, Any]) -> str:
    """The summary line of a teacher's self-check (sa2va: its logits against its own masks)."""
    if stats["agreement"] is None:
        return "  self-check: not checked (0 pixels)"
    return (
        f"  self-check: sigmoid(logits) > 0.5 agrees with the teacher's own masks on "
        f"{100 * stats['agreement']:.4f}% of {stats['pixels_checked']:,} pixels "
        f"(worst image {100 * stats['worst_image_mismatch']:.4f}% off)"
    )


def forced_line(forced: dict[str, Any]) -> str:
    """The summary line of sa2va's teacher-forced path: how many images it served and its sample check."""
    line = (
        f"  teacher-forced: {forced['forced']} image(s) forced, {forced['fallback']} fell back to generate "
        f"(greedy answer differed), {forced['sampled']} sampled against predict_forward"
    )
    if forced["fallback"] and not forced["forced"]:
        line += "; every image fell back: the expected answer (--teacher-option answer) is not what the model says"
    if forced["sample_agreement"] is not None:
        line += (
            f": masks agree on {100 * forced['sample_agreement']:.4f}% of pixels "
            f"(worst image {100 * forced['worst_sample_agreement']:.4f}%)"
        )
    return line


def verify(args: argparse.Namespace) -> int:
    """Check the cache `args.verify` against a dataset (the one --data-format/--data-root name, else the
    one its manifest recorded), so that ids, input hashes and shapes are all checked."""
    root = args.verify
    if args.data_root:
        data_format, data_root, options = args.data_format, args.data_root, args.reader_options
    else:
        source = TeacherCache(root).manifest["dataset"].get("source") or {}
        data_format, data_root = source.get("data_format"), source.get("data_root")
        options = source.get("reader_options", {})
        if not data_root:
            raise ConfigError(
                f"{root}/manifest.json records no dataset source: give --data-format and --data-root"
            )
    if not data_format:
        raise ConfigError("--verify with --data-root needs --data-format")
    dataset = open_dataset(data_format, data_root, **options)
    problems = verify_cache(root, dataset=dataset)
    for problem in problems:
        print(f"  {problem}", file=sys.stderr)
    verdict = "OK" if not problems else f"{len(problems)} problem(s)"
    print(
        f"verify {root} against {data_root}: {verdict} ({len(dataset.ids)} ids x {len(TeacherCache(root).views)} views)"
    )
    return 0 if not problems else 1


@reports_user_errors
def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.verify:
        return verify(args)
    if args.info:
        print(json.dumps(cache_info(args.info), indent=2, default=str))
        return 0
    if args.merge:
        if len(args.merge) < 2:
            raise ConfigError("--merge needs DST and at least one SRC")
        merge_cache(args.merge[0], *args.merge[1:])
        print(f"merged {len(args.merge) - 1} cache(s) into {args.merge[0]}")
        return 0
    summary = run_job(args.job)
    print_summary(summary, args.out)
    if args.summary_json:
        Path(args.summary_json).write_text(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
