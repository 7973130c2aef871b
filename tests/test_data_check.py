"""`python -m distill.data check`: a summary when clean (exit 0), every problem at once otherwise (exit 1)."""

import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image
from test_data_formats import write_image, write_merged

from distill.data.__main__ import main

TRIANGLE = [[2, 2, 20, 3, 10, 18]]


def test_clean_dataset_prints_a_summary_and_exits_0(tmp_path, capsys):
    write_merged(tmp_path, [{"image": f"{n}.png", "mask": TRIANGLE} for n in "abcdef"])
    write_image(tmp_path / "images" / "f.png", np.zeros((40, 50, 3), np.uint8))
    assert main(["check", "--data-format", "merged", "--data-root", str(tmp_path)]) == 0
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
    assert main(["check", "--data-format", "merged", "--data-root", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert "items: 1 good, 3 bad" in out and "bad items (3):" in out and out.rstrip().endswith("FAILED")
    assert (
        "gone.png is missing" in out
        and "polygon has 2 points" in out
        and "short.png: image cannot be decoded" in out
    )


def test_skip_bad_lists_problems_but_exits_0(tmp_path, capsys):
    broken_dataset(tmp_path)
    assert main(["check", "--data-format", "merged", "--data-root", str(tmp_path), "--skip-bad"]) == 0
    assert "bad items (3):" in capsys.readouterr().out


def test_unreadable_index_and_reader_options(tmp_path, capsys):
    assert main(["check", "--data-format", "coco", "--data-root", str(tmp_path)]) == 1
    assert "FAILED: " in capsys.readouterr().out
    args = [
        "check",
        "--data-format",
        "merged",
        "--data-root",
        str(tmp_path),
        "--reader-option",
        "line_width=2",
    ]
    assert main(args) == 1
    assert "unknown option(s) ['line_width']" in capsys.readouterr().out


def test_help_teaches_by_example_and_runs_as_a_module(tmp_path):
    with pytest.raises(SystemExit):
        main(["check", "--help"])
    done = subprocess.run(
        [sys.executable, "-m", "distill.data", "check", "--help"], capture_output=True, text=True, check=True
    )
    assert (
        "examples:" in done.stdout
        and "--data-format mask_folder" in done.stdout
        and "Exit status" in done.stdout
    )


def test_old_flag_names_still_work_for_one_release_with_a_note(tmp_path, capsys):
    write_merged(tmp_path, [{"image": f"{n}.png", "mask": TRIANGLE} for n in "abc"])
    old = ["check", "--format", "merged", "--root", str(tmp_path), "--option", "split_file=null"]
    assert main(old) == 0
    captured = capsys.readouterr()
    notes = [line for line in captured.err.splitlines() if line.startswith("note: ")]
    assert notes == [
        f"note: {flag} is deprecated, use {new} (the old name goes in the next release)"
        for flag, new in (
            ("--format", "--data-format"),
            ("--root", "--data-root"),
            ("--option", "--reader-option"),
        )
    ]
    assert "items: 3 good, 0 bad" in captured.out and captured.out.rstrip().endswith("OK")
    assert (
        main(["check", "--format", "merged", "--data-root", str(tmp_path), "--option", "line_width=2"]) == 1
    )
    assert "unknown option(s) ['line_width']" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["check", "--data-root", str(tmp_path)])
    assert "required: --data-format" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["check", "--format", "nonsense", "--data-root", str(tmp_path)])
    assert "invalid choice: 'nonsense'" in capsys.readouterr().err


def test_when_every_item_is_bad_every_reason_is_printed(tmp_path, capsys):
    for name in ("a", "b"):
        write_image(tmp_path / f"{name}.png")
        shapes = [{"label": "vessel", "shape_type": "cuboid", "points": [[1, 1], [5, 5]]}]
        (tmp_path / f"{name}.json").write_text(json.dumps({"imagePath": f"{name}.png", "shapes": shapes}))
    for extra in ([], ["--skip-bad"]):
        assert main(["check", "--data-format", "labelme", "--data-root", str(tmp_path), *extra]) == 1
        out = capsys.readouterr().out
        assert "every item is bad" in out and "see the warnings" not in out
        for name in ("a", "b"):
            assert f"{name}.json: shape 0 (vessel): unsupported shape_type 'cuboid' (use polygon," in out


def test_roi_coverage_and_vessel_fraction_inside_it_are_reported(tmp_path, capsys):
    for stem, rows in (("a", slice(0, 12)), ("b", slice(0, 24))):
        write_image(tmp_path / "images" / f"{stem}.png")
        mask = np.zeros((24, 32), np.uint8)
        mask[4:6, :] = 255  # 64 px, inside both ROIs
        mask[20, :8] = 255  # 8 px, outside a's ROI
        write_image(tmp_path / "masks" / f"{stem}.png", mask)
        roi = np.zeros((24, 32), np.uint8)
        roi[rows] = 255
        write_image(tmp_path / "roi" / f"{stem}.png", roi)
    assert main(["check", "--data-format", "mask_folder", "--data-root", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "roi: 2 of 2 items have one; it covers mean 0.7500, min 0.5000, max 1.0000 of the image" in out
    # a: 64 of 384 roi pixels; b: 72 of 768
    assert f"vessel pixel fraction inside the roi: mean {(64 / 384 + 72 / 768) / 2:.4f}" in out
    assert "vessel pixels outside the roi (losses and metrics ignore them): 8 in 1 items" in out


def test_lossy_and_many_valued_masks_are_named_per_file(tmp_path, capsys):
    mask = np.zeros((24, 32), np.uint8)
    mask[5:8, 2:30] = 255
    for stem in ("a", "b", "c"):
        write_image(tmp_path / "images" / f"{stem}.png")
    (tmp_path / "masks").mkdir()
    Image.fromarray(mask).save(tmp_path / "masks" / "a.jpg", quality=70)
    soft = mask.copy()
    soft[4, 2:30] = 100  # an anti-aliased edge
    Image.fromarray(soft).save(tmp_path / "masks" / "b.png")
    Image.fromarray(mask).save(tmp_path / "masks" / "c.png")
    assert main(["check", "--data-format", "mask_folder", "--data-root", str(tmp_path)]) == 0
    warned = [line for line in capsys.readouterr().out.splitlines() if line.startswith("warning: ")]
    assert warned == [
        f"warning: {tmp_path / 'masks' / 'a.jpg'}: JPEG masks and ROIs: lossy compression leaves grey "
        "levels around every edge: read as set where brighter than half the brightest value",
        f"warning: {tmp_path / 'masks' / 'b.png'}: masks and ROIs with more than two grey levels "
        "(anti-aliased edges, or a label map?): read as set where brighter than half the brightest value",
    ]
