"""`python -m distill.fit` end to end on tiny synthetic data with a real Frangi cache: files, contract, resume."""

import contextlib
import csv
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from distill.cache import CacheWriter, TeacherCache
from distill.data.datamodule import TeacherMaps
from distill.errors import ConfigError, DistillError
from distill.evaluate import evaluate
from distill.fit import _command_line as _fit_command_line
from distill.fit import main
from distill.losses import DistillLoss
from distill.module import DistillModule
from distill.students import load_student
from distill.views import VIEWS
from tests._loss_term_plugin import MeanProbability
from tests.conftest import TINY_STUDENT, tiny_fit_args


def test_fit_writes_contract_metrics_pictures_and_a_loadable_checkpoint(tiny_data_and_cache, tmp_path):
    data, cache = tiny_data_and_cache
    reports = main(
        tiny_fit_args(
            data, cache, tmp_path, "--run_name=e2e", "--trainer.max_epochs=1", "--loss.kd_alpha=0.0"
        )
    )
    run = tmp_path / "e2e"
    for name in (
        "config.yaml",
        "curves_val.png",
        "overlays_val.png",
        "checkpoints/best.ckpt",
        "checkpoints/last.ckpt",
    ):
        assert (run / name).is_file(), name
    for split in ("val", "test"):
        metrics = json.loads((run / f"metrics_{split}.json").read_text())
        assert metrics == json.loads(
            json.dumps(reports[split] | {k: metrics[k] for k in ("student_params", "checkpoint")})
        )
        n = len(metrics["thresholds"])
        assert metrics["split"] == split and metrics["n_images"] >= 1
        for who in ("student", "teacher"):
            assert all(len(metrics[who][name]) == n for name in ("dice", "recall", "precision", "iou"))
            assert set(metrics["at_chosen"][who]) >= {"dice", "recall", "precision"}
            assert metrics["chosen_threshold"][who] in metrics["thresholds"]
        assert metrics["chosen_threshold"]["rule"] == "max_dice"
        assert metrics["student_params"] > 0 and metrics["checkpoint"].endswith("best.ckpt")
    val, test = (json.loads((run / f"metrics_{s}.json").read_text()) for s in ("val", "test"))
    assert test["chosen_threshold"] == val["chosen_threshold"]  # frozen on validation
    student, info = load_student(run / "checkpoints" / "best.ckpt")
    assert info["chosen_threshold"] == val["chosen_threshold"]["student"]
    assert student(torch.zeros(1, 3, 50, 70, dtype=torch.uint8)).shape == (1, 1, 50, 70)
    assert "loss:\n  kd_alpha: 0.0" in (run / "config.yaml").read_text()


def test_resume_continues_from_the_checkpoint(tiny_data_and_cache, tmp_path):
    data, cache = tiny_data_and_cache
    main(tiny_fit_args(data, cache, tmp_path, "--run_name=first", "--trainer.max_epochs=1", "--wandb=false"))
    first = torch.load(tmp_path / "first/checkpoints/last.ckpt", weights_only=True)
    main(
        tiny_fit_args(data, cache, tmp_path, "--run_name=second", "--trainer.max_epochs=2", "--wandb=false")
        + [f"--ckpt_path={tmp_path / 'first/checkpoints/last.ckpt'}"]
    )
    second = torch.load(tmp_path / "second/checkpoints/last.ckpt", weights_only=True)
    assert second["epoch"] == first["epoch"] + 1
    assert second["global_step"] == 2 * first["global_step"]


def test_a_loss_term_registered_outside_distill_is_trained_and_logged_by_fit(tiny_data_and_cache, tmp_path):
    data, cache = tiny_data_and_cache
    term = "test_mean_probability"
    assert MeanProbability.__name__ in repr(type(DistillLoss({term: {"weight": 1.0}}).terms[term]))
    main(
        tiny_fit_args(data, cache, tmp_path, "--run_name=plugin", "--trainer.max_epochs=1", "--wandb=false")
        + [f"--loss.{term}.weight=0.25", f"--loss.{term}.power=2", "--trainer.log_every_n_steps=1"]
    )
    run = tmp_path / "plugin"
    rows = list(csv.DictReader((run / "logs" / "metrics.csv").read_text().splitlines()))
    logged = [float(r[f"train/loss/{term}_step"]) for r in rows if r.get(f"train/loss/{term}_step")]
    assert logged and all(0 < value < 1 for value in logged)
    assert any(r.get(f"train/loss/{term}_epoch") for r in rows)
    hparams = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["hyper_parameters"]
    assert hparams["loss"][term] == {"weight": 0.25, "power": 2.0}
    assert yaml.safe_load((run / "config.yaml").read_text())["loss"][term] == {"weight": 0.25, "power": 2.0}


def test_a_run_directory_of_another_run_is_refused_unless_resumed_or_overwritten(tiny_run, tmp_path, capsys):
    runs = tmp_path / "runs"
    shutil.copytree(tiny_run, runs / "tiny")
    before = {p: p.stat().st_mtime_ns for p in (runs / "tiny").rglob("*")}
    config = str(tiny_run / "config.yaml")  # the same config, pointed at other data: still another run
    args = [f"--config={config}", f"--runs_dir={runs}", "--data.data_root=elsewhere", "--wandb=false"]
    with pytest.raises(
        ConfigError, match=r"already holds a run .*--ckpt_path .*last\.ckpt.*--run_name.*--overwrite"
    ):
        main(args)
    assert {p: p.stat().st_mtime_ns for p in (runs / "tiny").rglob("*")} == before  # nothing written
    assert _fit_command_line(args) == 2 and "already holds a run" in capsys.readouterr().err

    (runs / "tiny" / "student.onnx").write_bytes(b"from the old run")
    resumed = [*args[:2], f"--ckpt_path={runs / 'tiny' / 'checkpoints' / 'last.ckpt'}", "--wandb=false"]
    capsys.readouterr()
    main(resumed)  # resuming a finished run: allowed, it continues in its own directory
    assert (runs / "tiny" / "student.onnx").is_file()
    assert "student.onnx in" in capsys.readouterr().out  # said to be stale, not deleted
    with pytest.raises(ConfigError, match="--overwrite would delete"):
        main([*resumed, "--overwrite=true"])

    main([*args[:2], "--overwrite", "--wandb=false"])  # the bare flag, as the message says
    assert not (runs / "tiny" / "student.onnx").exists()  # cleared, then written afresh
    assert (runs / "tiny" / "metrics_test.json").is_file()
    assert "overwrite: false" in (runs / "tiny" / "config.yaml").read_text()


def test_a_run_that_failed_before_saving_anything_does_not_block_its_retry(
    tiny_data_and_cache, tmp_path, capsys
):
    """A failed setup (here: a cache that does not exist) left config.yaml and logs/, and the retry was
    refused with advice to resume from a checkpoint that was never written."""
    data, cache = tiny_data_and_cache
    args = tiny_fit_args(data, cache, tmp_path, "--run_name=retry", "--trainer.max_epochs=1", "--wandb=false")
    with pytest.raises(DistillError):
        main([*args, f"--data.cache_dir={tmp_path / 'no_such_cache'}"])
    assert (tmp_path / "retry").is_dir() and not (tmp_path / "retry" / "checkpoints").exists()
    main(args)
    assert "held only what a failed attempt left" in capsys.readouterr().out
    assert (tmp_path / "retry" / "metrics_test.json").is_file()


def test_kd_without_a_cache_is_refused(tiny_data_and_cache, tmp_path):
    data, _ = tiny_data_and_cache
    args = tiny_fit_args(data, "null", tmp_path, "--trainer.max_epochs=1", "--wandb=false")
    with pytest.raises(ConfigError, match=r"\['kd_bce'\] need a teacher cache.*--loss.kd_alpha=0"):
        main([a if not a.startswith("--data.cache_dir") else "--data.cache_dir=null" for a in args])


def three_image_eval_splits(data, tmp_path):
    """A copy of the tiny data whose val and test splits hold 3 images each (2 processes need >= 1 each)."""
    odd = tmp_path / "data"
    shutil.copytree(data, odd)
    ids = sorted(json.loads((data / "splits.json").read_text())["splits"])
    splits = {i: "val" if n < 3 else "test" if n < 6 else "train" for n, i in enumerate(ids)}
    (odd / "splits.json").write_text(
        json.dumps({"seed": 0, "fractions": [0.5, 0.25, 0.25], "splits": splits})
    )
    return odd, splits


def test_ddp_fit_metrics_equal_one_process_and_count_every_image_once(tiny_data_and_cache, tmp_path):
    """Two gloo processes on val/test splits of 3 images (not divisible by 2: a padded sampler would repeat one).

    Two epochs, so that DDP's second step would fail on any parameter the first left without a gradient
    (smp's unused deep encoder stages did), with an EMA of the weights kept on every rank.
    """
    data, cache = tiny_data_and_cache
    odd, splits = three_image_eval_splits(data, tmp_path)
    ids = sorted(splits)
    args = tiny_fit_args(odd, cache, tmp_path, "--run_name=ddp", "--trainer.max_epochs=2", "--wandb=false")
    args += ["--model.ema_decay=0.5"]
    args += ["--trainer.devices=2", "--trainer.strategy=ddp", "--data.batch_size=2"]
    done = subprocess.run(
        [sys.executable, "-m", "distill.fit", *args], check=True, timeout=300, capture_output=True, text=True
    )
    assert "sync_dist=True" not in done.stderr  # no warning per logged metric name
    run = tmp_path / "ddp"
    for split in ("val", "test"):
        ddp = json.loads((run / f"metrics_{split}.json").read_text())
        assert ddp["n_images"] == 3 and ddp["per_image_ids"] == [i for i in ids if splits[i] == split]
    one = evaluate(run / "checkpoints/best.ckpt", split="val", out=tmp_path / "one", accelerator="cpu")
    ddp = json.loads((run / "metrics_val.json").read_text())
    assert one["per_image_ids"] == ddp["per_image_ids"] and one["chosen_threshold"] == ddp["chosen_threshold"]
    for who in ("student", "teacher"):
        for name in ("dice", "recall", "precision", "iou"):
            assert one[who][name] == pytest.approx(ddp[who][name], abs=1e-6), (who, name)
        assert one["per_image_dice"][who] == pytest.approx(ddp["per_image_dice"][who], abs=1e-6)


def test_fit_on_a_cache_with_no_mask_ids_scores_them_as_empty_teacher_predictions(
    tiny_data_and_cache, tmp_path
):
    data, cache = tiny_data_and_cache
    full = TeacherCache(cache)
    splits = json.loads((data / "splits.json").read_text())["splits"]
    val_ids = sorted(i for i, split in splits.items() if split == "val")
    missing = {val_ids[0], next(i for i, split in sorted(splits.items()) if split == "train")}
    with CacheWriter(tmp_path / "cache", "w0", full.manifest) as writer:
        for item_id in full.ids:
            if item_id in missing:
                writer.write_status(item_id)
            else:
                writer.write(item_id, "identity", full.read(item_id))
    with pytest.warns(UserWarning, match="no map for 2 of"):
        reports = main(
            tiny_fit_args(data, tmp_path / "cache", tmp_path, "--run_name=nomask", "--trainer.max_epochs=1")
            + ["--wandb=false"]
        )
    val = reports["val"]
    assert val["teacher_no_mask_ids"] == [val_ids[0]]
    assert json.loads((tmp_path / "nomask" / "metrics_val.json").read_text())["teacher_no_mask_ids"] == [
        val_ids[0]
    ]
    position = val["per_image_ids"].index(val_ids[0])
    assert val["per_image_dice"]["teacher"][position] == 0.0  # an empty prediction of an image with vessels
    assert all(d > 0 for i, d in enumerate(val["per_image_dice"]["teacher"]) if i != position)


def test_fit_scores_the_student_with_and_without_views_each_at_its_own_val_threshold(tiny_views_run):
    val, test = (json.loads((tiny_views_run / f"metrics_{s}.json").read_text()) for s in ("val", "test"))
    for metrics in (val, test):
        assert metrics["test_views"] == list(VIEWS)  # d4
        assert set(metrics["at_chosen"]) == {"teacher", "student", "student_views"}
        assert len(metrics["student_views"]["dice"]) == len(metrics["thresholds"])
        assert len(metrics["per_image_dice"]["student_views"]) == metrics["n_images"]
    assert test["chosen_threshold"] == val["chosen_threshold"]  # every side frozen on validation
    assert val["kd_margin"] == pytest.approx(
        val["at_chosen"]["teacher"]["dice"] - val["at_chosen"]["student"]["dice"], abs=1e-6
    )
    checkpoint = torch.load(tiny_views_run / "checkpoints/best.ckpt", weights_only=True)
    info = checkpoint["distill"]
    assert info["test_views"] == list(VIEWS)
    assert info["views_threshold"] == val["chosen_threshold"]["student_views"]
    # model.ema_decay: the checkpoint holds the averaged weights, the live ones only for resuming
    live, averaged = checkpoint["current_model_state"], checkpoint["state_dict"]
    assert live.keys() == averaged.keys()
    assert any(not torch.equal(live[k], averaged[k]) for k in averaged if k.startswith("student."))


def test_the_small_data_config_trains_by_steps_validates_every_k_steps_and_reports_progress(
    tiny_data_and_cache, tmp_path, capsys, recwarn
):
    """configs/fit/small_data.yaml as shipped (device augmentation included), on CPU with a tiny budget."""
    data, cache = tiny_data_and_cache
    main(
        [
            "--config=configs/fit/small_data.yaml",
            "--data.data_format=merged",
            f"--data.data_root={data}",
            f"--data.cache_dir={cache}",
            f"--runs_dir={tmp_path}",
            "--run_name=small",
            "--wandb=false",
            "--trainer.accelerator=cpu",
            "--trainer.precision=32-true",
            "--trainer.max_steps=6",
            "--model.cuda_graph=false",  # CUDA graphs need a GPU
            "--model.compile=false",
            "--trainer.val_check_interval=3",
            "--data.samples_per_epoch=8",  # epochs of 2 steps of 4: validation runs mid-epoch
            "--data.batch_size=4",
            "--data.crop_size=32",
            "--data.num_workers=0",
            "--progress_every_s=0",
            *TINY_STUDENT,
        ]
    )
    with open(tmp_path / "small" / "logs" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    validated_at = [int(r["step"]) for r in rows if r.get("val/student/dice@best")]
    # After steps 3 and 6 of the fit (Lightning logs the step index), then the best checkpoint's validate.
    assert validated_at == [2, 5, 6]
    assert not [w for w in recwarn if "logging interval" in str(w.message)]
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if line.startswith("step ")]
    assert len(lines) == 6  # one per step at progress_every_s=0; epochs of 2 steps
    assert re.fullmatch(
        r"step 6/6 \(100%\)  epoch 2  \d+ img/s  elapsed 0:\d\d:\d\d  remaining 0:00:00  loss \d+\.\d{4}",
        lines[-1],
    )
    assert re.search(r"validation at step 3: student dice@best \d\.\d{4}  teacher dice@best \d\.\d{4}", out)


def test_a_ground_truth_run_reads_no_teacher_map_for_training_and_still_scores_the_teacher(
    tiny_data_and_cache, tmp_path, monkeypatch
):
    data, cache = tiny_data_and_cache
    read = []
    original = TeacherMaps.read
    monkeypatch.setattr(TeacherMaps, "read", lambda self, id, *a: read.append(id) or original(self, id, *a))
    reports = main(
        tiny_fit_args(data, cache, tmp_path, "--run_name=gt", "--trainer.max_epochs=1", "--wandb=false")
        + ["--loss.kd_alpha=0.0"]
    )
    train = {
        i for i, split in json.loads((data / "splits.json").read_text())["splits"].items() if split == "train"
    }
    assert read and not set(read) & train
    assert "teacher" in reports["val"] and "teacher" in reports["test"]


def test_a_ddp_process_that_stops_makes_the_run_fail_with_a_message_not_hang(tiny_data_and_cache, tmp_path):
    """Rank 1 stalls before its first step; rank 0 waits in the gradient all-reduce until --ddp_timeout_s."""
    data, cache = tiny_data_and_cache
    data, _ = three_image_eval_splits(data, tmp_path)
    args = tiny_fit_args(data, cache, tmp_path, "--run_name=stall", "--trainer.max_epochs=1", "--wandb=false")
    args += ["--trainer.devices=2", "--trainer.strategy=ddp", "--data.batch_size=2", "--ddp_timeout_s=20"]
    args += ["--trainer.callbacks+=tests._stall.StallOnRank1"]
    log = tmp_path / "stderr.txt"
    with open(log, "w") as stderr:  # not a pipe: the stalled rank would hold it open
        launcher = subprocess.Popen(
            [sys.executable, "-m", "distill.fit", *args], stderr=stderr, start_new_session=True
        )
        try:
            launcher.wait(timeout=400)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(launcher.pid, signal.SIGKILL)  # the stalled rank too
    stderr = log.read_text()
    assert launcher.returncode != 0
    assert "waited 20 s (--ddp_timeout_s) for another process, which stopped making progress" in stderr


def test_the_command_line_prints_no_lightning_warning_about_args():
    """main() hands LightningCLI the whole command line itself; Lightning's "args parameter" warning is noise."""
    done = subprocess.run(
        [sys.executable, "-m", "distill.fit", "--config", "configs/fit/demo.yaml", "--print_config"],
        check=True,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert "run_name" in done.stdout and "args parameter" not in done.stderr


def recorded_steps(path) -> dict[int, list[str]]:
    return {step: ids for step, ids in map(json.loads, path.read_text().splitlines())}


RECORD = "--trainer.callbacks+=tests._record_batches.RecordBatchIds"


def test_last_ckpt_is_every_validation_and_a_resumed_run_continues_the_batch_stream(
    tiny_data_and_cache, tmp_path, monkeypatch
):
    """2 steps an epoch, validation every epoch. last.ckpt was written only when best improved, and a
    resumed run dealt the stream from its first batch again (it read the step count before Lightning
    restored it)."""
    data, cache = tiny_data_and_cache
    original = DistillModule._log_report

    def worsening(self, report):  # the monitored val Dice never improves after the first validation
        if report["split"] == "val":
            at = report["at_chosen"]
            report = {
                **report,
                "at_chosen": {**at, "student": {**at["student"], "dice": 1 / (2 + self.global_step)}},
            }
        original(self, report)

    monkeypatch.setattr(DistillModule, "_log_report", worsening)
    common = ["--wandb=false", RECORD]
    monkeypatch.setenv("RECORD_BATCH_IDS", str(tmp_path / "whole.jsonl"))
    main(tiny_fit_args(data, cache, tmp_path, "--run_name=whole", "--trainer.max_epochs=3", *common))
    checkpoints = tmp_path / "whole" / "checkpoints"
    assert torch.load(checkpoints / "best.ckpt", weights_only=False)["global_step"] == 2
    assert torch.load(checkpoints / "last.ckpt", weights_only=False)["global_step"] == 6

    monkeypatch.setenv("RECORD_BATCH_IDS", str(tmp_path / "cut.jsonl"))
    main(tiny_fit_args(data, cache, tmp_path, "--run_name=cut", "--trainer.max_epochs=1", *common))
    last = tmp_path / "cut" / "checkpoints" / "last.ckpt"
    main(
        tiny_fit_args(
            data, cache, tmp_path, "--run_name=cut", "--trainer.max_epochs=3", f"--ckpt_path={last}", *common
        )
    )
    # The resumed run keeps the config and the log rows of the run it continues, and adds its own.
    assert yaml.safe_load((tmp_path / "cut" / "config.yaml").read_text())["trainer"]["max_epochs"] == 1
    assert (
        yaml.safe_load((tmp_path / "cut" / "config.resumed.yaml").read_text())["trainer"]["max_epochs"] == 3
    )
    assert (tmp_path / "cut" / "logs" / "metrics.csv").is_file()
    assert len(list((tmp_path / "cut" / "logs").glob("resumed-*/metrics.csv"))) == 1
    whole, cut = recorded_steps(tmp_path / "whole.jsonl"), recorded_steps(tmp_path / "cut.jsonl")
    assert sorted(cut) == sorted(whole) == list(range(6)) and cut == whole


def test_fit_never_clears_or_joins_a_folder_it_did_not_make(tiny_data_and_cache, tiny_run, tmp_path):
    data, cache = tiny_data_and_cache
    mine = tmp_path / "mine"
    (mine / "important").mkdir(parents=True)
    (mine / "notes.txt").write_text("precious")
    args = tiny_fit_args(data, cache, tmp_path, "--run_name=mine", "--trainer.max_epochs=1", "--wandb=false")
    for extra in ([], ["--overwrite"]):
        with pytest.raises(
            ConfigError, match=r"holds files that distill.fit did not write \(important, notes.txt\)"
        ):
            main([*args, *extra])
    assert (mine / "notes.txt").read_text() == "precious" and not (mine / "checkpoints").exists()
    # What only looks like a run (pictures, someone's checkpoints) or a failed attempt with more in it
    photos, project, failed = tmp_path / "photos", tmp_path / "project", tmp_path / "failed"
    (photos / "holiday.png").parent.mkdir()
    (photos / "holiday.png").write_bytes(b"png")
    (project / "checkpoints").mkdir(parents=True)
    (project / "checkpoints" / "epoch=3.ckpt").write_bytes(b"ckpt")
    (failed / "inner").mkdir(parents=True)
    (failed / ".distill-run").touch()
    (failed / "config.yaml").write_text("{}")
    for folder in (photos, project, failed):
        before = sorted(folder.rglob("*"))
        with pytest.raises(ConfigError, match="holds files that distill.fit did not write"):
            main([*args, f"--run_name={folder.name}", "--overwrite"])
        assert sorted(folder.rglob("*")) == before
    (tmp_path / "afile").write_text("x")
    with pytest.raises(ConfigError, match="is a file or a symbolic link"):
        main([*args, "--run_name=afile"])
    with pytest.raises(ConfigError, match="not a checkpoint"):
        main([*args, "--run_name=new", f"--ckpt_path={tmp_path / 'afile'}"])
    for name in (".", "..", "a/b"):
        with pytest.raises(ConfigError, match="plain folder name"):
            main([*args, f"--run_name={name}"])
    with pytest.raises(ConfigError, match="no such checkpoint file"):
        main([*args, "--run_name=new", f"--ckpt_path={tmp_path / 'nothere.ckpt'}"])

    runs = tmp_path / "runs"
    shutil.copytree(tiny_run, runs / "a")
    shutil.copytree(tiny_run, runs / "b")
    other = runs / "b" / "checkpoints" / "last.ckpt"
    with pytest.raises(ConfigError, match=r"already holds a run .*another run's"):
        main(
            [
                f"--config={tiny_run / 'config.yaml'}",
                f"--runs_dir={runs}",
                "--run_name=a",
                f"--ckpt_path={other}",
            ]
        )
    # A new run may start from another run's checkpoint; it scores its own weights, never that run's best.
    main([*args, "--run_name=fresh", f"--ckpt_path={other}", "--trainer.max_epochs=2"])
    scored = json.loads((tmp_path / "fresh" / "metrics_test.json").read_text())["checkpoint"]
    assert Path(scored).parent == tmp_path / "fresh" / "checkpoints"


def test_a_run_stopped_before_its_first_validation_scores_its_final_weights(
    tiny_data_and_cache, tmp_path, caplog
):
    data, cache = tiny_data_and_cache
    main(
        tiny_fit_args(
            data,
            cache,
            tmp_path,
            "--run_name=short",
            "--trainer.max_epochs=-1",
            "--trainer.max_steps=1",
            "--wandb=false",
        )
    )
    assert "before its first validation" in caplog.text
    run = tmp_path / "short"
    assert (run / "checkpoints" / "last.ckpt").is_file() and (run / "metrics_test.json").is_file()


@pytest.mark.parametrize("stop, name", [(signal.SIGTERM, "SIGTERM"), (signal.SIGINT, "Ctrl-C")])
def test_a_stopped_run_exits_with_the_signals_status_and_how_to_resume(
    tiny_data_and_cache, tmp_path, stop, name
):
    """Lightning's SIGTERMException is a SystemExit without a code: schedulers saw a pre-empted run succeed."""
    data, cache = tiny_data_and_cache
    record = tmp_path / "steps.jsonl"
    args = tiny_fit_args(
        data, cache, tmp_path, "--run_name=term", "--trainer.max_epochs=500", "--wandb=false", RECORD
    )
    env = {**os.environ, "RECORD_BATCH_IDS": str(record)}
    process = subprocess.Popen(
        [sys.executable, "-m", "distill.fit", *args],
        env=env,
        stderr=subprocess.PIPE,
        text=True,
        # A shell that starts the suite in the background leaves SIGINT ignored in its children, and
        # Python keeps it so: the run as a user starts it, with Ctrl-C live.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    deadline = time.monotonic() + 240
    while not (record.is_file() and len(record.read_text().splitlines()) > 4) and time.monotonic() < deadline:
        time.sleep(0.5)
    process.send_signal(stop)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 128 + stop
    assert f"stopped by {name} at step" in stderr and "--ckpt_path" in stderr


def test_a_run_stopped_while_scoring_exits_143_and_says_how_to_score_it(tiny_data_and_cache, tmp_path):
    """SIGTERM in the final test pass ended with Lightning's code-less SystemExit: status 0, no metrics."""
    data, cache = tiny_data_and_cache
    args = tiny_fit_args(
        data,
        cache,
        tmp_path,
        "--run_name=scoring",
        "--trainer.max_epochs=1",
        "--wandb=false",
        "--data.batch_size=1",  # several test batches: Lightning stops after the first
        "--trainer.callbacks+=tests._signals.TerminateDuringTest",
    )
    done = subprocess.run(
        [sys.executable, "-m", "distill.fit", *args], capture_output=True, text=True, timeout=600
    )
    best = tmp_path / "scoring" / "checkpoints" / "best.ckpt"
    assert done.returncode == 128 + signal.SIGTERM, done.stderr[-2000:]
    assert f"stopped by SIGTERM while scoring {best}" in done.stderr
    assert f"python -m distill.evaluate --ckpt {best}" in done.stderr and best.is_file()


def test_lightning_optimizer_flags_are_refused_rather_than_silently_replacing_the_module_s(capsys):
    """--optimizer=SGD would have dropped model.lr, weight_decay and the warm-up/cosine schedule unsaid."""
    for flag in ("--optimizer=SGD", "--lr_scheduler=StepLR"):
        with pytest.raises(SystemExit) as stop:
            main(["--config=configs/fit/demo.yaml", flag, "--print_config"])
        assert stop.value.code != 0 and f"unrecognized arguments: {flag}" in capsys.readouterr().err


@pytest.mark.parametrize("strategy", ["ddp_spawn", "ddp_fork"])
def test_spawned_or_forked_ranks_are_refused_before_training(tiny_data_and_cache, tmp_path, strategy):
    """Their validation and test ran in the ranks and fit's own model held no scores: KeyError at the end."""
    data, cache = tiny_data_and_cache
    args = tiny_fit_args(data, cache, tmp_path, "--run_name=spawn", "--wandb=false")
    with pytest.raises(ConfigError, match="use --trainer.strategy=ddp"):
        main([*args, "--trainer.accelerator=cpu", "--trainer.devices=2", f"--trainer.strategy={strategy}"])
    assert not (tmp_path / "spawn" / "checkpoints").exists()


def test_compiling_with_whole_images_of_any_size_warns(tiny_data_and_cache, tmp_path):
    data, cache = tiny_data_and_cache
    args = tiny_fit_args(data, cache, tmp_path, "--run_name=c", "--wandb=false", "--model.compile=true")
    with pytest.warns(UserWarning, match="every new size compiles the step again"):
        main([*args, "--trainer.max_steps=1", "--trainer.max_epochs=-1"])


def test_a_cuda_graph_with_whole_images_of_any_size_is_refused_before_training(tiny_data_and_cache, tmp_path):
    data, cache = tiny_data_and_cache
    args = tiny_fit_args(data, cache, tmp_path, "--run_name=g", "--wandb=false", "--model.cuda_graph=true")
    with pytest.raises(
        ConfigError, match="model.cuda_graph=true replays one batch shape.*set data.crop_size"
    ):
        main([*args, "--trainer.max_steps=1", "--trainer.max_epochs=-1"])
    assert not (tmp_path / "g" / "checkpoints").exists()


def test_a_shipped_cuda_graph_config_on_the_cpu_is_refused_before_reading_data_or_saving_its_config(
    tiny_data_and_cache, tmp_path
):
    data, cache = tiny_data_and_cache
    args = [
        "--config=configs/fit/small_data.yaml", "--data.data_format=merged", f"--data.data_root={data}",
        f"--data.cache_dir={cache}", f"--runs_dir={tmp_path}", "--run_name=cpu", "--wandb=false",
        "--trainer.accelerator=cpu",
    ]  # fmt: skip
    with pytest.raises(
        ConfigError, match="not cpu under SingleDeviceStrategy.*or set model.cuda_graph=false"
    ):
        main(args)
    assert not (tmp_path / "cpu" / "config.yaml").exists()  # a retry reuses the claimed directory


def test_fits_without_a_run_name_in_one_process_get_their_own_timestamped_runs(
    tiny_data_and_cache, tmp_path, monkeypatch
):
    """The name is shared with DDP ranks through the environment; it used to outlive the fit, so the
    next fit in the process (a notebook, a loop) reused it and was refused as "already holds a run".
    Two fits in one second: the second gets "-2"."""
    import distill.fit

    class FrozenClock:
        def __getattr__(self, name):
            return getattr(time, name)

        @staticmethod
        def strftime(spec, *when):
            return "20261130-120000"

    monkeypatch.setattr(distill.fit, "time", FrozenClock())
    data, cache = tiny_data_and_cache
    args = tiny_fit_args(data, cache, tmp_path, "--run_name=null", "--trainer.max_epochs=1", "--wandb=false")
    main(args)
    main(args)
    runs = sorted(p.name for p in tmp_path.iterdir() if p.is_dir())
    assert runs == ["20261130-120000", "20261130-120000-2"]
    assert all((tmp_path / run / "metrics_test.json").is_file() for run in runs)
    assert "DISTILL_RUN_NAME" not in os.environ
