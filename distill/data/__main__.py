"""`python -m distill.data check`: load every item of a dataset, summarise it, and list every problem."""

from __future__ import annotations

import argparse
import inspect
import logging
import sys
import warnings
from collections import Counter

import numpy as np

from distill.cli import add_deprecated_alias, key_value
from distill.data import list_formats, open_dataset
from distill.data.dataset import COMMON_OPTIONS, FORMATS, DatasetWarning, SkippedItemsWarning, VesselDataset
from distill.data.images import DecodeWarning
from distill.data.splits import SPLITS
from distill.errors import DistillError

EPILOG = """\
examples:
  python -m distill.data check --data-format merged --data-root data/synthetic
  python -m distill.data check --data-format labelme --data-root data/drawn --reader-option line_width=5 \\
      --reader-option 'label_filter=[vessel]'
  python -m distill.data check --data-format coco --data-root data/coco \\
      --reader-option annotation_file=instances.json --reader-option 'categories=[artery, vein]'
  python -m distill.data check --data-format mask_folder --data-root data/drive --skip-bad

The flags are spelled as in cache_teacher (and fit's data.data_format, data.data_root,
data.reader_options); --format, --root and --option still work this release. Every item is decoded,
so truncated images and size mismatches show up too; all problems are listed at once, and notes on
how files were read (lossy or many-valued masks, bit depths) name each file. Exit status: 0 when
nothing is wrong, 1 otherwise (with --skip-bad: 1 only when no good item is left or the index itself
cannot be read). The split file <root>/splits.json is created or updated.
"""


def reader_options_help() -> str:
    """One line per format naming its reader options (from the reader's signature, so it cannot drift)."""
    lines = []
    for name in list_formats():
        signature = inspect.signature(FORMATS[name].read_index)
        options = [f"{p.name}={p.default!r}" for p in signature.parameters.values() if p.name != "self"]
        lines.append(f"  {name}: {', '.join(options) or '(none)'}")
    common = ", ".join(f"{name}=..." for name in COMMON_OPTIONS)
    return f"reader options (--reader-option KEY=VALUE), besides {common} for every format:\n" + "\n".join(
        lines
    )


def spread(values: list[float]) -> str:
    v = np.asarray(values)
    return f"mean {v.mean():.4f}, min {v.min():.4f}, max {v.max():.4f}"


def summarise(ds: VesselDataset) -> list[str]:
    """Summary lines: sizes, vessel fraction, ROI coverage and split sizes over the items that load."""
    sizes: Counter[str] = Counter()
    fractions, coverage, inside, outside = [], [], [], Counter()
    for record in ds:
        sizes[f"{record.image.shape[0]}x{record.image.shape[1]}"] += 1
        fractions.append(float(record.mask.mean()))
        if record.roi is not None:
            coverage.append(float(record.roi.mean()))
            inside.append(float(record.mask[record.roi].mean()) if record.roi.any() else 0.0)
            outside[record.id] = int((record.mask.astype(bool) & ~record.roi).sum())
    sizes_text = ", ".join(f"{size} ({n})" for size, n in sizes.most_common())
    empty = sum(f == 0 for f in fractions)
    lines = [
        f"image sizes: {sizes_text}",
        f"vessel pixel fraction: {spread(fractions)}"
        + (f" ({empty} items with an empty mask)" if empty else ""),
    ]
    if coverage:
        lines += [
            f"roi: {len(coverage)} of {len(ds)} items have one; it covers {spread(coverage)} of the image",
            f"vessel pixel fraction inside the roi: {spread(inside)}",
        ]
        if sum(outside.values()):
            lines.append(
                f"vessel pixels outside the roi (losses and metrics ignore them): {sum(outside.values())} "
                f"in {sum(n > 0 for n in outside.values())} items"
            )
    return [*lines, "splits: " + ", ".join(f"{s} {len(ds.split_ids(s))}" for s in SPLITS)]


def notes_of(caught: list[warnings.WarningMessage]) -> list[str]:
    """The dataset warnings worth reading, each once, in order; a decoding note names its file."""
    notes = []
    for w in caught:
        if not issubclass(w.category, DatasetWarning) or issubclass(w.category, SkippedItemsWarning):
            continue
        source = getattr(w.message, "source", None) if issubclass(w.category, DecodeWarning) else None
        notes.append(f"{source}: {w.message}" if source is not None else str(w.message))
    return list(dict.fromkeys(notes))


def check(args: argparse.Namespace) -> int:
    print(f"format: {args.data_format}\nroot: {args.data_root}")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", DatasetWarning)
        try:
            ds = open_dataset(
                args.data_format,
                args.data_root,
                skip_bad=True,
                split_seed=args.split_seed,
                **dict(args.reader_options),
            )
        except DistillError as error:
            print(f"FAILED: {error}")
            return 1
        lines = summarise(ds)
    print(f"items: {len(ds)} good, {len(ds.problems)} bad")
    print("\n".join(lines))
    for note in notes_of(caught):
        print(f"warning: {note}")
    if ds.problems:
        print(f"bad items ({len(ds.problems)}):")
        for problem in ds.problems:
            print(f"  {problem}")
        print("FAILED" if not args.skip_bad else "bad items left out (--skip-bad)")
        return 0 if args.skip_bad else 1
    print("OK")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m distill.data", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    checker = commands.add_parser(
        "check",
        help="validate every item and print a summary",
        description="Validate every item of a dataset, print a summary, and list all problems at once.",
        epilog=EPILOG + "\n" + reader_options_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    data_format = checker.add_argument(
        "--data-format", choices=list_formats(), help="dataset format (required)"
    )
    data_root = checker.add_argument("--data-root", help="dataset root folder (required)")
    checker.add_argument(
        "--skip-bad", action="store_true", help="list bad items but exit 0 if good ones remain"
    )
    checker.add_argument("--split-seed", type=int, default=0, help="seed for ids not yet in splits.json")
    reader_options = checker.add_argument(
        "--reader-option",
        dest="reader_options",
        type=key_value,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="reader option (value parsed as YAML), e.g. line_width=5; repeatable",
    )
    for alias, target in (("--format", data_format), ("--root", data_root), ("--option", reader_options)):
        add_deprecated_alias(checker, alias, target)
    args = parser.parse_args(argv)
    missing = [
        flag
        for flag, value in (("--data-format", args.data_format), ("--data-root", args.data_root))
        if not value
    ]
    if missing:
        checker.error(f"the following arguments are required: {', '.join(missing)}")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    return check(args)


if __name__ == "__main__":
    sys.exit(main())
