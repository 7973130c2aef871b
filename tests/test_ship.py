"""After training: evaluate (report files, threshold rules), compare, ONNX export, predict."""

import csv
import json
import re

import numpy as np
import pytest
from PIL import Image

from distill.errors import ConfigError
from distill.evaluate import main as evaluate_main
from distill.export import TOLERANCE, export_onnx, read_metadata
from distill.predict import main as predict_main


def test_evaluate_writes_contract_report_with_the_frozen_threshold(tiny_run, tmp_path, capsys):
    ckpt = tiny_run / "checkpoints" / "best.ckpt"
    out = tmp_path / "eval"
    assert (
        evaluate_main(["--ckpt", str(ckpt), "--split", "test", "--out", str(out), "--accelerator", "cpu"])
        == 0
    )
    assert (
        f"wrote {out}/: metrics.json, per_image.csv, curves.png, overlays.png, report.md"
        in capsys.readouterr().out
    )
    metrics = json.loads((out / "metrics.json").read_text())
    fit_test = json.loads((tiny_run / "metrics_test.json").read_text())
    # Same checkpoint, same data, same frozen thresholds: the same numbers as fit's own test report.
    assert metrics["chosen_threshold"] == fit_test["chosen_threshold"]
    for who in ("student", "teacher"):
        assert metrics["at_chosen"][who] == pytest.approx(fit_test["at_chosen"][who], abs=1e-6)
    n = len(metrics["thresholds"])
    assert all(len(metrics[who]["dice"]) == n for who in ("student", "teacher"))
    with open(out / "per_image.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == metrics["n_images"] and list(rows[0]) == [
        "id",
        "has_vessels",
        "student_dice",
        "teacher_dice",
    ]
    assert [r["id"] for r in rows] == metrics["per_image_ids"]
    for name in ("curves.png", "overlays.png", "report.md"):
        assert (out / name).is_file(), name
    assert "![threshold curves](curves.png)" in (out / "report.md").read_text()


def test_evaluate_with_a_fixed_threshold_adds_it_to_the_grid(tiny_run, tmp_path):
    ckpt = tiny_run / "checkpoints" / "best.ckpt"
    out = tmp_path / "fixed"
    assert (
        evaluate_main(["--ckpt", str(ckpt), "--threshold", "0.42", "--out", str(out), "--accelerator", "cpu"])
        == 0
    )
    metrics = json.loads((out / "metrics.json").read_text())
    assert 0.42 in metrics["thresholds"] and metrics["chosen_threshold"]["student"] == 0.42


def test_evaluate_val_at_a_fixed_threshold_scores_the_val_split(tiny_run, tmp_path):
    ckpt = tiny_run / "checkpoints" / "best.ckpt"
    out = tmp_path / "fixed_val"
    assert (
        evaluate_main(["--ckpt", str(ckpt), "--split", "val", "--threshold", "0.42", "--out", str(out)]) == 0
    )
    metrics = json.loads((out / "metrics.json").read_text())
    fit_val = json.loads((tiny_run / "metrics_val.json").read_text())
    assert metrics["split"] == "val" and metrics["per_image_ids"] == fit_val["per_image_ids"]
    assert metrics["chosen_threshold"] == {"rule": "fixed 0.42", "student": 0.42, "teacher": 0.42}


def test_evaluate_speaks_the_cache_teacher_vocabulary(tiny_run, tiny_data_and_cache, tmp_path, capsys):
    data, _ = tiny_data_and_cache
    ckpt = str(tiny_run / "checkpoints" / "best.ckpt")
    ids = sorted(json.loads((data / "splits.json").read_text())["splits"])
    split_file = tmp_path / "splits.json"
    split_file.write_text(
        json.dumps({i: "train" if n == 0 else "val" if n == 1 else "test" for n, i in enumerate(ids)})
    )
    out = tmp_path / "resplit"
    args = ["--ckpt", ckpt, "--out", str(out), "--data-format", "merged", "--data-root", str(data)]
    assert evaluate_main([*args, "--reader-option", f"split_file={split_file}"]) == 0
    assert json.loads((out / "metrics.json").read_text())["per_image_ids"] == ids[2:]
    capsys.readouterr()
    assert evaluate_main([*args, "--reader-option", "bogus=[1, 2]"]) == 2
    assert "unknown option(s) ['bogus'] for format 'merged'" in capsys.readouterr().err


@pytest.mark.parametrize("flag", ["--cache-dir", "--cache"])
def test_evaluate_takes_the_cache_dir_and_its_old_alias(tiny_run, tmp_path, capsys, flag):
    missing = tmp_path / "no_cache_here"
    assert evaluate_main(["--ckpt", str(tiny_run / "checkpoints" / "best.ckpt"), flag, str(missing)]) == 2
    err = capsys.readouterr().err
    assert str(missing) in err
    assert ("--cache is deprecated, use --cache-dir" in err) == (flag == "--cache")


def test_evaluate_refuses_a_foreign_checkpoint(tmp_path, capsys):
    import torch

    bad = tmp_path / "other.ckpt"
    torch.save({"state_dict": {}}, bad)
    assert evaluate_main(["--ckpt", str(bad)]) == 2
    assert "not a vessel-distill student checkpoint" in capsys.readouterr().err


def test_compare_prints_student_and_teacher_per_run(tiny_run, tmp_path, capsys):
    out = tmp_path / "compare.md"
    assert evaluate_main(["compare", str(tiny_run), "--out", str(out), "--latency-size", "64"]) == 0
    table = out.read_text()
    assert "student dice" in table and "teacher dice@0.5" in table and "| tiny |" in table
    assert re.search(r"\| \d+\.\d \(\d+\.\d-\d+\.\d\) \|", table)  # latency: median (min-max)


def test_onnx_export_matches_pytorch_and_carries_the_threshold(tiny_run, tmp_path):
    result = export_onnx(tiny_run / "checkpoints" / "best.ckpt", tmp_path / "student.onnx")
    assert result["max_abs_error"] <= TOLERANCE
    meta = read_metadata(tmp_path / "student.onnx")
    fit_val = json.loads((tiny_run / "metrics_val.json").read_text())
    assert meta["chosen_threshold"] == fit_val["chosen_threshold"]["student"]
    assert meta["student"]["name"] == "unet"
    assert meta["output"].endswith("mask = sigmoid(logits) >= chosen_threshold")  # the metrics' rule


def test_predict_folder_with_checkpoint_and_onnx_agree(tiny_run, tiny_data_and_cache, tmp_path):
    data, _ = tiny_data_and_cache
    ckpt = tiny_run / "checkpoints" / "best.ckpt"
    export_onnx(ckpt, tmp_path / "student.onnx")
    assert (
        predict_main(["--model", str(ckpt), "--images", str(data / "images"), "--out", str(tmp_path / "a")])
        == 0
    )
    onnx_args = ["--model", str(tmp_path / "student.onnx"), "--images", str(data / "images")]
    assert predict_main([*onnx_args, "--out", str(tmp_path / "b")]) == 0
    masks = sorted((tmp_path / "a" / "masks").glob("*.png"))
    assert len(masks) == 12
    for path in masks:
        a = np.asarray(Image.open(path))
        b = np.asarray(Image.open(tmp_path / "b" / "masks" / path.name))
        assert set(np.unique(a)) <= {0, 255} and a.shape == (64, 64)
        assert (a != b).mean() < 0.001  # float32 vs onnxruntime: at most a pixel at the threshold


def test_predict_refuses_an_empty_folder(tiny_run, tmp_path):
    with pytest.raises(ConfigError, match="no images"):
        from distill.predict import predict_folder

        predict_folder(tiny_run / "checkpoints" / "best.ckpt", tmp_path, tmp_path / "out")


def test_predict_takes_the_readers_images_upright_and_marks_prob_equal_to_the_threshold(
    tmp_path, monkeypatch
):
    """One suffix list (the readers', .gif and .webp too), one decoding (EXIF applied) and one rule
    (prob >= t, as the metrics and overlays) for checkpoints and ONNX alike."""
    import distill.predict as predict

    images = tmp_path / "new"
    images.mkdir()
    Image.fromarray(np.zeros((6, 8), np.uint8)).save(images / "a.gif")
    Image.fromarray(np.zeros((6, 8, 3), np.uint8)).save(images / "b.webp")
    exif = Image.Exif()
    exif[0x0112] = 6  # stored 8 wide x 6 high, shown 6 wide x 8 high
    Image.fromarray(np.zeros((6, 8, 3), np.uint8)).save(images / "c.jpg", exif=exif)

    def at_threshold(image: np.ndarray) -> np.ndarray:
        return np.full(image.shape[:2], 0.5, np.float32)

    monkeypatch.setattr(predict, "load_predictor", lambda model, device: (at_threshold, 0.5))
    assert predict.predict_folder(tmp_path / "student.onnx", images, tmp_path / "out") == 3
    for name, shape in (("a", (6, 8)), ("b", (6, 8)), ("c", (8, 6))):
        mask = np.asarray(Image.open(tmp_path / "out" / "masks" / f"{name}.png"))
        assert mask.shape == shape and (mask == 255).all(), name
