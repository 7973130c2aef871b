"""`python -m distill.data check`: a summary when clean (exit 0), every problem at once otherwise (exit 1)."""

import subprocess
import sys

import numpy as np
import pytest
from test_data_formats import write_image, write_merged

from distill.data.__main__ import main

TRIANGLE = [[2, 2, 20, 3, 10, 18]]


def test_clean_dataset_prints_a_summary_and_exits_0(tmp_path, capsys):
    write_merged(tmp_path, [{"image": f"{n}.png", "mask": TRIANGLE} for n in "abcdef"])
    write_image(tmp_path / "images" / "f.png", np.zeros((40, 50, 3), np.uint8))
    assert main(["check", "--format", "merged", "--root", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "format: merged" in out and f"root: {tmp_path}" in out and "items: 6 good, 0 bad" in out
    assert "image sizes: 24x32 (5), 40x50 (1)" in out
    assert "vessel pixel fraction: mean" in out and "splits: train" in out and out.rstrip().endswith("OK")
    assert (tmp_path / "splits.json").exists()


def broken_dataset(root):
    write_merged(
        root,
        [
            {"image": "good.png", "mask": TRIANGLE},
            {"image": "short.png", "mask": TRIANGLE},
            {"image": "gone.png", "mask": TRIANGLE},
            {"image": "line.png", "mask": [[0, 0, 4, 4]]},
        ],
        images=["good.png", "short.png", "line.png"],
    )
    path = root / "images" / "short.png"
    path.write_bytes(path.read_bytes()[:60])


def test_every_problem_is_listed_at_once_and_exit_is_1(tmp_path, capsys):
    broken_dataset(tmp_path)
    assert main(["check", "--format", "merged", "--root", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert "items: 1 good, 3 bad" in out and "bad items (3):" in out and out.rstrip().endswith("FAILED")
    assert (
        "gone.png is missing" in out
        and "polygon has 2 points" in out
        and "short.png: image cannot be decoded" in out
    )


def test_skip_bad_lists_problems_but_exits_0(tmp_path, capsys):
    broken_dataset(tmp_path)
    assert main(["check", "--format", "merged", "--root", str(tmp_path), "--skip-bad"]) == 0
    assert "bad items (3):" in capsys.readouterr().out


def test_unreadable_index_and_reader_options(tmp_path, capsys):
    assert main(["check", "--format", "coco", "--root", str(tmp_path)]) == 1
    assert "FAILED: " in capsys.readouterr().out
    assert main(["check", "--format", "merged", "--root", str(tmp_path), "--option", "line_width=2"]) == 1
    assert "unknown option(s) ['line_width']" in capsys.readouterr().out


def test_help_teaches_by_example_and_runs_as_a_module(tmp_path):
    with pytest.raises(SystemExit):
        main(["check", "--help"])
    done = subprocess.run(
        [sys.executable, "-m", "distill.data", "check", "--help"], capture_output=True, text=True, check=True
    )
    assert (
        "examples:" in done.stdout and "--format mask_folder" in done.stdout and "Exit status" in done.stdout
    )
