"""`python -m distill.data check`: load every item of a dataset, summarise it, and list every problem."""

from __future__ import annotations

import argparse
import inspect
import logging
import sys
import warnings
from collections import Counter

import numpy as np

from distill.cli import key_value
from distill.data import list_formats, open_dataset
from distill.data.dataset import FORMATS, DatasetWarning, SkippedItemsWarning, VesselDataset
from distill.data.splits import SPLITS
from distill.errors import DistillError

EPILOG = """\
examples:
  python -m distill.data check --format merged --root data/synthetic
  python -m distill.data check --format labelme --root data/drawn --option line_width=5 \\
      --option 'label_filter=["vessel"]'
  python -m distill.data check --format coco --root data/coco --option annotation_file=instances.json \\
      --option 'categories=["artery", "vein"]'
  python -m distill.data check --format mask_folder --root data/drive --skip-bad

Every item is decoded, so truncated images and size mismatches show up too. All problems are listed
at once. Exit status: 0 when nothing is wrong, 1 otherwise (with --skip-bad: 1 only when no good item
is left or the index itself cannot be read). The split file <root>/splits.json is created or updated.
"""


def reader_options_help() -> str:
    """One line per format naming its reader options (from the reader's signature, so it cannot drift)."""
    lines = []
    for name in list_formats():
        signature = inspect.signature(FORMATS[name].read_index)
        options = [f"{p.name}={p.default!r}" for p in signature.parameters.values() if p.name != "self"]
        lines.append(f"  {name}: {', '.join(options) or '(none)'}")
    return "reader options (--option KEY=VALUE), besides split_file=PATH for every format:\n" + "\n".join(
        lines
    )


def summarise(ds: VesselDataset) -> list[str]:
    """Summary lines: sizes, vessel fraction and split sizes over the items that load."""
    sizes: Counter[str] = Counter()
    fractions = []
    for record in ds:
        sizes[f"{record.image.shape[0]}x{record.image.shape[1]}"] += 1
        fractions.append(float(record.mask.mean()))
    sizes_text = ", ".join(f"{size} ({n})" for size, n in sizes.most_common())
    f = np.asarray(fractions)
    return [
        f"image sizes: {sizes_text}",
        f"vessel pixel fraction: mean {f.mean():.4f}, min {f.min():.4f}, max {f.max():.4f}"
        + (f" ({int((f == 0).sum())} items with an empty mask)" if (f == 0).any() else ""),
        "splits: " + ", ".join(f"{s} {len(ds.split_ids(s))}" for s in SPLITS),
    ]


def check(args: argparse.Namespace) -> int:
    print(f"format: {args.format}\nroot: {args.root}")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", DatasetWarning)
        try:
            ds = open_dataset(
                args.format, args.root, skip_bad=True, split_seed=args.split_seed, **dict(args.option)
            )
        except DistillError as error:
            print(f"FAILED: {error}")
            return 1
        lines = summarise(ds)
    print(f"items: {len(ds)} good, {len(ds.problems)} bad")
    print("\n".join(lines))
    notes = [
        w
        for w in caught
        if issubclass(w.category, DatasetWarning) and not issubclass(w.category, SkippedItemsWarning)
    ]
    for note in notes:
        print(f"warning: {note.message}")
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
    checker.add_argument("--format", required=True, choices=list_formats(), help="dataset format")
    checker.add_argument("--root", required=True, help="dataset root folder")
    checker.add_argument(
        "--skip-bad", action="store_true", help="list bad items but exit 0 if good ones remain"
    )
    checker.add_argument("--split-seed", type=int, default=0, help="seed for ids not yet in splits.json")
    checker.add_argument(
        "--option",
        type=key_value,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="reader option (value parsed as YAML), e.g. line_width=5; repeatable",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    return check(args)


if __name__ == "__main__":
    sys.exit(main())
