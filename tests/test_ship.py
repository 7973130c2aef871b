"""After training: evaluate (report files, threshold rules), compare, ONNX export, predict."""

import csv
import json
import re
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from PIL import Image

from distill.errors import ConfigError
from distill.evaluate import main as evaluate_main
from distill.export import TOLERANCE, export_onnx, read_metadata
from distill.export import main as export_main
from distill.predict import main as predict_main
from distill.students import load_student
from distill.views import VIEWS, ViewMean


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


def test_evaluate_val_keeps_the_checkpoints_thresholds_by_default(tiny_run, tmp_path):
    """--threshold-from ckpt (the default) held for test but not for val, which chose again."""
    ckpt = torch.load(tiny_run / "checkpoints" / "best.ckpt", map_location="cpu", weights_only=False)
    ckpt["distill"]["chosen_threshold"], ckpt["distill"]["teacher_threshold"] = 0.85, 0.15
    moved = tmp_path / "run" / "checkpoints" / "best.ckpt"
    moved.parent.mkdir(parents=True)
    torch.save(ckpt, moved)
    shutil.copy(tiny_run / "config.yaml", tmp_path / "run" / "config.yaml")
    assert evaluate_main(["--ckpt", str(moved), "--split", "val", "--out", str(tmp_path / "e")]) == 0
    chosen = json.loads((tmp_path / "e" / "metrics.json").read_text())["chosen_threshold"]
    assert (chosen["student"], chosen["teacher"]) == (0.85, 0.15)
    assert evaluate_main(["--ckpt", str(moved), "--split", "val", "--threshold-from", "val", "--out",
                          str(tmp_path / "v")]) == 0  # fmt: skip
    again = json.loads((tmp_path / "v" / "metrics.json").read_text())["chosen_threshold"]
    assert (again["student"], again["teacher"]) != (0.85, 0.15)


def test_evaluate_speaks_the_cache_teacher_vocabulary(tiny_run, tiny_data_and_cache, tmp_path, capsys):
    # A copy: a split_file is persisted into the data's splits.json, which other tests' runs rely on.
    data = Path(shutil.copytree(tiny_data_and_cache[0], tmp_path / "data"))
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


def test_evaluate_gives_fits_numbers_at_the_runs_precision_and_views(tiny_views_run, tmp_path):
    """The run trained in bf16 with model.test_views=d4: evaluate's defaults reproduce its test report."""
    ckpt = tiny_views_run / "checkpoints" / "best.ckpt"
    assert evaluate_main(["--ckpt", str(ckpt), "--out", str(tmp_path / "eval"), "--accelerator", "cpu"]) == 0
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    fit_test = json.loads((tiny_views_run / "metrics_test.json").read_text())
    assert metrics["chosen_threshold"] == fit_test["chosen_threshold"]
    for who in ("student", "student_views", "teacher"):
        for name in ("dice", "recall", "precision"):
            assert metrics[who][name] == pytest.approx(fit_test[who][name], abs=1e-6), (who, name)
    with open(tmp_path / "eval" / "per_image.csv") as f:
        columns = set(next(csv.DictReader(f)))
    assert columns == {"id", "has_vessels", "student_dice", "student_views_dice", "teacher_dice"}
    # The precision is what made them equal: fp32 scores this bf16-trained student differently.
    fp32 = tmp_path / "fp32"
    assert evaluate_main(["--ckpt", str(ckpt), "--out", str(fp32), "--precision", "32-true"]) == 0
    assert json.loads((fp32 / "metrics.json").read_text())["student"] != metrics["student"]


def test_evaluate_views_on_a_run_without_them_chooses_their_threshold_on_val(tiny_run, tmp_path, capsys):
    ckpt = tiny_run / "checkpoints" / "best.ckpt"
    out = tmp_path / "eval"
    assert evaluate_main(["--ckpt", str(ckpt), "--views", "identity,hflip", "--out", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    fit_val = json.loads((tiny_run / "metrics_val.json").read_text())
    assert metrics["test_views"] == ["identity", "hflip"]
    assert metrics["chosen_threshold"]["student"] == fit_val["chosen_threshold"]["student"]
    assert metrics["chosen_threshold"]["student_views"] in metrics["thresholds"]
    assert "student+views" in capsys.readouterr().out


def test_evaluate_with_another_teacher_chooses_its_threshold_on_val(
    tiny_run, tiny_data_and_cache, tmp_path, capsys
):
    """The run's teacher threshold was chosen for its own cache; another teacher's maps get their own."""
    from distill import cache_teacher

    data, _ = tiny_data_and_cache
    other = tmp_path / "other_teacher"
    made = [
        "--config",
        "configs/teacher/frangi_synthetic.yaml",
        "--data-root",
        str(data),
        "--out",
        str(other),
    ]
    assert cache_teacher.main([*made, "--views", "identity", "--teacher-option", "sigmas=[2,4]"]) == 0
    ckpt = str(tiny_run / "checkpoints" / "best.ckpt")
    capsys.readouterr()
    assert evaluate_main(["--ckpt", ckpt, "--cache-dir", str(other), "--out", str(tmp_path / "test")]) == 0
    assert "is not the teacher the run chose its teacher threshold for (differs in teacher." in (
        capsys.readouterr().out
    )
    on_val = tmp_path / "val"
    args = ["--ckpt", ckpt, "--cache-dir", str(other), "--split", "val", "--threshold-from", "val"]
    assert evaluate_main([*args, "--out", str(on_val)]) == 0
    chosen = json.loads((tmp_path / "test" / "metrics.json").read_text())["chosen_threshold"]
    fit_test = json.loads((tiny_run / "metrics_test.json").read_text())["chosen_threshold"]
    assert (
        chosen["teacher"] == json.loads((on_val / "metrics.json").read_text())["chosen_threshold"]["teacher"]
    )
    assert chosen["student"] == fit_test["student"]
    # The run's own cache: its threshold holds, nothing said.
    capsys.readouterr()
    assert evaluate_main(["--ckpt", ckpt, "--out", str(tmp_path / "own")]) == 0
    assert "is not the teacher" not in capsys.readouterr().out


def test_evaluate_with_a_cache_for_a_run_without_one_chooses_the_teachers_threshold_on_val(
    tiny_data_and_cache, tmp_path
):
    from distill.fit import main as fit_main
    from tests.conftest import tiny_fit_args

    data, cache = tiny_data_and_cache
    no_teacher = ["--run_name=gt", "--data.cache_dir=null", "--loss.kd_alpha=0", "--trainer.max_epochs=1"]
    fit_main(tiny_fit_args(data, cache, tmp_path, *no_teacher))
    ckpt = str(tmp_path / "gt" / "checkpoints" / "best.ckpt")
    args = ["--ckpt", ckpt, "--cache-dir", str(cache)]
    assert evaluate_main([*args, "--out", str(tmp_path / "test")]) == 0
    assert (
        evaluate_main([*args, "--split", "val", "--threshold-from", "val", "--out", str(tmp_path / "val")])
        == 0
    )
    chosen = {
        split: json.loads((tmp_path / split / "metrics.json").read_text())["chosen_threshold"]["teacher"]
        for split in ("test", "val")
    }
    assert chosen["test"] == chosen["val"]


def test_evaluate_refuses_unknown_views(tiny_run, capsys):
    with pytest.raises(SystemExit):
        evaluate_main(["--ckpt", str(tiny_run / "checkpoints" / "best.ckpt"), "--views", "d4,spin"])
    assert "unknown view(s) ['spin']" in capsys.readouterr().err


def test_onnx_export_folds_the_views_into_the_graph(tiny_views_run, tmp_path):
    ckpt = tiny_views_run / "checkpoints" / "best.ckpt"
    result = export_onnx(ckpt, tmp_path / "views.onnx", views=list(VIEWS))
    assert result["max_abs_error"] <= TOLERANCE  # onnxruntime vs PyTorch's ViewMean, non-square images
    meta = read_metadata(tmp_path / "views.onnx")
    fit_val = json.loads((tiny_views_run / "metrics_val.json").read_text())
    assert meta["views"] == list(VIEWS)
    assert meta["chosen_threshold"] == fit_val["chosen_threshold"]["student_views"]
    student, _ = load_student(ckpt)
    images = torch.randint(0, 256, (1, 3, 40, 56), dtype=torch.uint8)
    with torch.no_grad():
        assert not torch.allclose(ViewMean(student, list(VIEWS))(images), student(images))


def test_onnx_holds_only_the_weights_that_run_and_the_checkpoint_is_as_small(tiny_run, tmp_path):
    """The demo-style student (resnet18, encoder_depth 3) used to carry layer3 and layer4: 11.3M, not 0.8M."""
    ckpt = tiny_run / "checkpoints" / "best.ckpt"
    params = json.loads((tiny_run / "metrics_test.json").read_text())["student_params"]
    assert params < 1_000_000
    export_onnx(ckpt, tmp_path / "student.onnx")
    graph = onnx.load(str(tmp_path / "student.onnx")).graph
    weights = sum(int(np.prod(t.dims)) for t in graph.initializer)
    assert weights <= params * 1.01  # BatchNorm may be folded into convolutions, never more
    # weights + AdamW's two moments in float32, plus a little bookkeeping
    assert ckpt.stat().st_size < 3 * 4 * params + 2_000_000


def test_predict_with_views_from_a_checkpoint_and_from_a_views_onnx_agree(
    tiny_views_run, tiny_data_and_cache, tmp_path
):
    data, _ = tiny_data_and_cache
    ckpt = tiny_views_run / "checkpoints" / "best.ckpt"
    export_onnx(ckpt, tmp_path / "views.onnx", views=list(VIEWS))
    images = ["--images", str(data / "images")]
    assert predict_main(["--model", str(ckpt), *images, "--views", "d4", "--out", str(tmp_path / "a")]) == 0
    assert predict_main(["--model", str(tmp_path / "views.onnx"), *images, "--out", str(tmp_path / "b")]) == 0
    for path in sorted((tmp_path / "a" / "probs").glob("*.png")):
        a = np.asarray(Image.open(path)).astype(int)
        b = np.asarray(Image.open(tmp_path / "b" / "probs" / path.name)).astype(int)
        assert np.abs(a - b).max() <= 1  # float32 vs onnxruntime, rounded to 1/255
    with pytest.raises(ConfigError, match="folded in already"):
        from distill.predict import load_predictor

        load_predictor(tmp_path / "views.onnx", views=["hflip"])


def _fake_predictor(monkeypatch) -> None:
    """predict without a model: every image gets probability 0.5 at threshold 0.5 (the folder logic alone)."""
    import distill.predict as predict

    def half(image: np.ndarray) -> np.ndarray:
        return np.full(image.shape[:2], 0.5, np.float32)

    monkeypatch.setattr(predict, "load_predictor", lambda model, device, views: (half, 0.5))


def _image(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.zeros((6, 8, 3), np.uint8)).save(path)
    return path


def test_predict_takes_the_readers_images_upright_and_marks_prob_equal_to_the_threshold(
    tmp_path, monkeypatch
):
    """One suffix list (the readers', .gif and .webp too), one decoding (EXIF applied) and one rule
    (prob >= t, as the metrics and overlays) for checkpoints and ONNX alike."""
    from distill.predict import predict_folder

    _fake_predictor(monkeypatch)
    images = tmp_path / "new"
    images.mkdir()
    Image.fromarray(np.zeros((6, 8), np.uint8)).save(images / "a.gif")
    Image.fromarray(np.zeros((6, 8, 3), np.uint8)).save(images / "b.webp")
    exif = Image.Exif()
    exif[0x0112] = 6  # stored 8 wide x 6 high, shown 6 wide x 8 high
    Image.fromarray(np.zeros((6, 8, 3), np.uint8)).save(images / "c.jpg", exif=exif)
    assert predict_folder(tmp_path / "student.onnx", images, tmp_path / "out").written == 3
    for name, shape in (("a", (6, 8)), ("b", (6, 8)), ("c", (8, 6))):
        mask = np.asarray(Image.open(tmp_path / "out" / "masks" / f"{name}.png"))
        assert mask.shape == shape and (mask == 255).all(), name


def test_views_in_another_order_are_the_same_views(tiny_views_run, tmp_path):
    """Their logit mean does not depend on the order, so neither does the threshold chosen for them."""
    import warnings

    ckpt = tiny_views_run / "checkpoints" / "best.ckpt"
    fit_val = json.loads((tiny_views_run / "metrics_val.json").read_text())
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "the run chose no threshold over the views"
        export_onnx(ckpt, tmp_path / "views.onnx", views=list(reversed(VIEWS)), check_sizes=(32,))
    assert (
        read_metadata(tmp_path / "views.onnx")["chosen_threshold"]
        == fit_val["chosen_threshold"]["student_views"]
    )
    from distill.module import DistillModule

    model = DistillModule.load_from_checkpoint(
        str(ckpt), map_location="cpu", test_views=list(reversed(VIEWS))
    )
    assert model.views_threshold == fit_val["chosen_threshold"]["student_views"]


@pytest.mark.parametrize(
    "name, content, what",
    [
        ("missing.onnx", None, "no such file"),
        ("fake.onnx", b"garbage", "not an ONNX model"),
        ("empty.onnx", b"", "not an ONNX model"),
        ("config.json", b"{}", "not a PyTorch checkpoint"),
        ("best.ckpt", b"", "not a PyTorch checkpoint"),
    ],
)
def test_predict_refuses_a_model_file_it_cannot_read_in_words(tmp_path, capsys, name, content, what):
    model = tmp_path / name
    if content is not None:
        model.write_bytes(content)
    images = _image(tmp_path / "new" / "a.png").parent
    assert predict_main(["--model", str(model), "--images", str(images), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {model}: {what}") and "distill." in err  # names the tool that writes one


def test_export_refuses_a_file_that_is_not_a_checkpoint(tmp_path, capsys):
    config = tmp_path / "config.json"
    config.write_text("{}")
    assert export_main(["--ckpt", str(config), "--out", str(tmp_path / "s.onnx")]) == 2
    assert capsys.readouterr().err.startswith(f"error: {config}: not a PyTorch checkpoint")


def test_predict_on_cuda_without_cuda_suggests_the_cpu(tiny_run, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    images = _image(tmp_path / "new" / "a.png").parent
    ckpt = str(tiny_run / "checkpoints" / "best.ckpt")
    assert predict_main(["--model", ckpt, "--images", str(images), "--device", "cuda"]) == 2
    err = capsys.readouterr().err
    assert "CUDA is not available" in err and "--device cpu" in err
    assert predict_main(["--model", ckpt, "--images", str(images), "--device", "gpu"]) == 2
    assert "--device gpu" in capsys.readouterr().err


def test_evaluate_refuses_an_unknown_precision_in_words(tiny_run, capsys):
    assert (
        evaluate_main(["--ckpt", str(tiny_run / "checkpoints" / "best.ckpt"), "--precision", "banana"]) == 2
    )
    err = capsys.readouterr().err
    assert err.startswith("error: --precision banana") and "bf16-mixed" in err


def test_predict_refuses_two_images_that_would_write_one_mask_before_writing_any(
    tmp_path, monkeypatch, capsys
):
    _fake_predictor(monkeypatch)
    png, jpg = _image(tmp_path / "new" / "x.png"), _image(tmp_path / "new" / "x.jpg")
    _image(tmp_path / "new" / "a.png")
    out = tmp_path / "out"
    assert predict_main(["--model", "m.onnx", "--images", str(tmp_path / "new"), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert str(png) in err and str(jpg) in err and "x.png" in err and "rename" in err
    assert not out.exists()


def test_predict_does_not_read_its_own_outputs_inside_the_images_folder(tmp_path, monkeypatch, capsys):
    _fake_predictor(monkeypatch)
    images = tmp_path / "new"
    _image(images / "a.png")
    args = ["--model", "m.onnx", "--images", str(images), "--out", str(images / "pred")]
    assert predict_main(args) == 0
    assert predict_main(args) == 0
    assert "wrote 1 masks" in capsys.readouterr().out.splitlines()[-1]
    assert sorted(p.relative_to(images).as_posix() for p in images.rglob("*.png")) == [
        "a.png", "pred/masks/a.png", "pred/probs/a.png",
    ]  # fmt: skip


def test_predict_says_the_images_folder_does_not_exist(tmp_path, capsys):
    args = ["--model", "m.onnx", "--images", str(tmp_path / "nowhere")]
    assert predict_main(args) == 2
    assert f"{tmp_path / 'nowhere'}: does not exist" in capsys.readouterr().err


def test_predict_skip_bad_lists_unreadable_images_and_goes_on(tmp_path, monkeypatch, capsys):
    _fake_predictor(monkeypatch)
    images = tmp_path / "new"
    _image(images / "a.png")
    (images / "b.png").write_bytes(b"not a png")
    args = ["--model", "m.onnx", "--images", str(images)]
    assert predict_main([*args, "--out", str(tmp_path / "stop")]) == 2
    assert "b.png" in (err := capsys.readouterr().err) and "--skip-bad" in err
    assert predict_main([*args, "--out", str(tmp_path / "on"), "--skip-bad"]) == 0
    out = capsys.readouterr().out
    assert "wrote 1 masks" in out and "left out 1 unreadable image" in out and str(images / "b.png") in out
    assert (tmp_path / "on" / "masks" / "a.png").is_file()
    (images / "a.png").write_bytes(b"nor this")
    assert predict_main([*args, "--out", str(tmp_path / "none"), "--skip-bad"]) == 2
    assert "none of the 2 images" in capsys.readouterr().err


@pytest.mark.parametrize("tool", ["predict", "evaluate"])
@pytest.mark.parametrize("threshold", ["5", "-0.1", "nan"])
def test_a_threshold_is_a_probability(tiny_run, tmp_path, capsys, tool, threshold):
    ckpt = str(tiny_run / "checkpoints" / "best.ckpt")
    main, args = (predict_main, ["--model", ckpt, "--images", str(tmp_path)]) if tool == "predict" else (
        evaluate_main, ["--ckpt", ckpt])  # fmt: skip
    with pytest.raises(SystemExit) as exit_:
        main([*args, "--threshold", threshold])
    assert exit_.value.code == 2 and "[0, 1]" in capsys.readouterr().err


def test_export_refuses_an_out_without_the_onnx_suffix(tiny_run, tmp_path, capsys):
    out = tmp_path / "student"
    assert export_main(["--ckpt", str(tiny_run / "checkpoints" / "best.ckpt"), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: --out {out}:") and f"{out}.onnx" in err
    assert not out.exists() and not list(tmp_path.iterdir())


def test_evaluate_reads_None_as_null_and_scores_without_the_teacher(tiny_run, tmp_path, capsys):
    ckpt = str(tiny_run / "checkpoints" / "best.ckpt")
    out = tmp_path / "alone"
    args = ["--ckpt", ckpt, "--out", str(out), "--data-root", "None", "--cache-dir", "None"]
    assert evaluate_main(args) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert "teacher" not in metrics and "student" in metrics
    assert (
        metrics["per_image_ids"] == json.loads((tiny_run / "metrics_test.json").read_text())["per_image_ids"]
    )


def test_evaluate_on_other_data_names_its_own_cache_flag(tiny_run, tmp_path, capsys):
    from distill.synth import make_dataset

    other = make_dataset(tmp_path / "other", count=12, size=64, style="fundus", seed=1)
    ckpt = str(tiny_run / "checkpoints" / "best.ckpt")
    assert evaluate_main(["--ckpt", ckpt, "--data-root", str(other), "--out", str(tmp_path / "e")]) == 2
    err = capsys.readouterr().err
    assert "--cache-dir DIR" in err and "--cache-dir None" in err


@pytest.mark.parametrize("tool", ["predict", "export"])
def test_predict_and_export_read_None_as_their_default_out(tiny_run, tmp_path, monkeypatch, tool):
    ckpt = tiny_run / "checkpoints" / "best.ckpt"
    monkeypatch.chdir(tmp_path)
    if tool == "export":
        copy = tmp_path / "run" / "checkpoints" / "best.ckpt"
        copy.parent.mkdir(parents=True)
        shutil.copy(ckpt, copy)
        assert export_main(["--ckpt", str(copy), "--out", "None"]) == 0
        assert (tmp_path / "run" / "student.onnx").is_file() and not (tmp_path / "None").exists()
    else:
        _fake_predictor(monkeypatch)
        images = _image(tmp_path / "new" / "a.png").parent
        assert predict_main(["--model", "m.onnx", "--images", str(images), "--out", "None"]) == 0
        assert (tmp_path / "predictions" / "masks" / "a.png").is_file() and not (tmp_path / "None").exists()


def test_evaluate_reads_the_config_of_a_run_made_with_a_since_removed_data_option(tiny_run, tmp_path):
    from distill.evaluate import build_datamodule

    run = shutil.copytree(tiny_run, tmp_path / "older")
    config = run / "config.yaml"
    config.write_text(config.read_text().replace("\ndata:\n", "\ndata:\n  gil_switch_interval: 0.0002\n", 1))
    assert "gil_switch_interval" in config.read_text()
    datamodule = build_datamodule(run / "checkpoints" / "best.ckpt", {})
    assert not hasattr(datamodule, "gil_switch_interval")
