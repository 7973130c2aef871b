"""`python -m distill.cache_teacher`: the Done-when flow, resume after SIGKILL, shards, views,
the checkpoint teacher, stale caches and --verify. Slow teachers come from the plugin module
tests/_slow_teacher.py, loaded with `--import tests._slow_teacher`."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from distill.cache import TeacherCache
from distill.cache_teacher import main, parse_args
from distill.synth import make_dataset
from distill.views import VIEWS, apply_view
from tests._slow_teacher import save_tiny_student

REPO = Path(__file__).resolve().parents[1]
PLUGIN = ["--import", "tests._slow_teacher"]


def pixel(data: Path, *extra: str | Path | int) -> list:
    """Arguments of a run of the test plugin's `pixel` teacher on the merged dataset at `data`."""
    return [*PLUGIN, "--teacher", "pixel", "--data-format", "merged", "--data-root", data, *extra]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("synth") / "d", count=8, size=64, style="fundus", seed=2)


def cli(*args: str | Path, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", *map(str, args)], cwd=REPO, capture_output=True, text=True, timeout=timeout
    )


def popen(*args: str | Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "distill.cache_teacher", *map(str, args)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def run(*args: str | Path) -> int:
    return main([str(a) for a in args])


def summary_of(path: Path) -> dict:
    return json.loads(path.read_text())


def contents(root: Path) -> dict:
    """Everything a reader can see: per (id, view) the float16 bytes, and each id's status."""
    cache = TeacherCache(root)
    maps = {(i, v): cache.read(i, v).tobytes() for i in cache.ids for v in cache.views if cache.has(i, v)}
    return {
        "maps": maps,
        "status": {i: cache.status(i) for i in cache.ids},
        "teacher": cache.manifest["teacher"],
    }


def test_done_when_flow_as_subprocesses(tmp_path):
    data, out = tmp_path / "s", tmp_path / "c"
    steps = [
        ("distill.synth", "--out", data, "--count", 8, "--size", 128, "--seed", 1),
        (
            "distill.cache_teacher",
            "--teacher",
            "frangi",
            "--data-format",
            "merged",
            "--data-root",
            data,
            "--out",
            out,
        ),
        ("distill.cache_teacher", "--verify", out),
    ]
    for step in steps:
        result = cli(*step)
        assert result.returncode == 0, f"{step}:\n{result.stdout}\n{result.stderr}"


def test_kill_midway_then_resume_equals_uninterrupted_run(data, tmp_path):
    common = pixel(data)
    common += ["--views", "identity,hflip", "--batch-size", 1]
    killed = tmp_path / "killed"
    process = popen(*common, "--out", killed, "--teacher-option", "delay=0.4")
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:  # wait until a first commit made some rows durable
            if (killed / "manifest.json").exists() and TeacherCache(killed).index.rows:
                break
            assert process.poll() is None, process.communicate()
            time.sleep(0.1)
        process.send_signal(signal.SIGKILL)
    finally:
        process.wait()
    assert process.returncode == -signal.SIGKILL
    before = TeacherCache(killed)
    rows_before = len(before.index.rows)
    complete_before = sum(before.status(i) == "ok" for i in before.ids)
    assert 0 < rows_before < 16, "kill did not land midway"

    assert run(*common, "--out", killed, "--summary-json", tmp_path / "resumed.json") == 0
    resumed = summary_of(tmp_path / "resumed.json")
    assert resumed["maps"] == 16 - rows_before  # only the missing (id, view) pairs were computed
    assert resumed["skipped"] == complete_before and resumed["done"] == 8 - complete_before

    assert run(*common, "--out", tmp_path / "straight") == 0
    assert contents(killed) == contents(tmp_path / "straight")
    assert run("--verify", killed) == 0


def test_killing_a_run_with_worker_processes_kills_its_workers(data, tmp_path):
    """Spawned workers used to outlive a SIGKILLed parent, keep writing (and holding GPUs), and make the
    rerun fail with "writer id ... is in use by another running process"."""
    common = pixel(data, "--batch-size", 1)
    out = tmp_path / "cache"
    process = popen(*common, "--out", out, "--workers", 2, "--teacher-option", "delay=4")  # 16 s per worker
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:  # both workers are writing
            if len(list(out.glob("*.index"))) == 2 and TeacherCache(out).index.rows:
                break
            assert process.poll() is None, process.communicate()
            time.sleep(0.2)
        workers = [int(pid) for pid in subprocess.run(["pgrep", "-P", str(process.pid)], capture_output=True,
                                                      text=True).stdout.split()]  # fmt: skip
        process.send_signal(signal.SIGKILL)
    finally:
        process.wait()
    assert workers, "the run had worker processes"
    deadline = time.monotonic() + 6  # far less than the workers' remaining work
    alive = workers
    while alive and time.monotonic() < deadline:
        alive = [
            pid
            for pid in alive
            if Path(f"/proc/{pid}").exists() and "Z" not in Path(f"/proc/{pid}/stat").read_text().split()[2]
        ]
        time.sleep(0.2)
    assert not alive, f"worker processes {alive} outlived their killed parent"
    assert (
        run(*common, "--out", out, "--workers", 2, "--teacher-option", "delay=0") == 0
    )  # the rerun completes it
    assert run("--verify", out) == 0


def test_two_shard_processes_into_one_cache_and_merge(data, tmp_path):
    common = pixel(data, "--num-shards", 2)
    processes = [popen(*common, "--shard-index", i, "--out", tmp_path / "both") for i in (0, 1)]
    for process in processes:
        stdout, stderr = process.communicate(timeout=120)
        assert process.returncode == 0, stderr
        assert "4 done" in stdout
    assert run("--verify", tmp_path / "both") == 0
    # The same split over two caches (two nodes), then merged.
    for i in (0, 1):
        assert run(*common, "--shard-index", i, "--out", tmp_path / f"node{i}") == 0
    assert run("--verify", tmp_path / "node0") == 1  # half the ids are missing
    assert run("--merge", tmp_path / "merged", tmp_path / "node0", tmp_path / "node1") == 0
    assert run("--verify", tmp_path / "merged") == 0
    assert contents(tmp_path / "merged")["maps"] == contents(tmp_path / "both")["maps"]


def test_each_view_is_stored_in_the_original_orientation(data, tmp_path):
    views = ["identity", "hflip", "rot90", "antitranspose"]
    args = pixel(data, "--out", tmp_path / "v")
    assert run(*args, "--views", ",".join(views)) == 0
    cache = TeacherCache(tmp_path / "v")
    from distill.data import open_dataset

    dataset = open_dataset("merged", data)
    for record in dataset:
        expected = ((128.0 - record.image[..., 1].astype(np.float32)) / 32.0).astype(np.float16)
        stack = cache.read_views(record.id, views)
        for view, stored in zip(views, stack, strict=True):
            np.testing.assert_array_equal(stored, expected, err_msg=f"{record.id} {view}")
    # A teacher that is NOT per-pixel: Frangi's Hessian commutes exactly with flips (skimage's
    # Frangi is not exactly transpose-equivariant, so quarter turns are checked with the pixel teacher).
    frangi = [*args[2:-1], tmp_path / "f", "--teacher", "frangi"]
    assert run(*frangi, "--views", "identity,hflip,vflip") == 0
    stack = TeacherCache(tmp_path / "f").read_views(dataset.ids[0])
    np.testing.assert_array_equal(stack[1], stack[0])
    np.testing.assert_array_equal(stack[2], stack[0])
    assert not np.array_equal(stack[0], apply_view(stack[0], "hflip"))  # so the check can fail


def test_checkpoint_teacher_through_the_cli_with_tta(data, tmp_path):
    ckpt = tmp_path / "best.ckpt"
    student = save_tiny_student(ckpt, seed=0)
    config = tmp_path / "teacher.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "teacher": "checkpoint",
                "data-format": "merged",  # the long flag's name, as --help says
                "data_root": str(data),
                "out": str(tmp_path / "ignored"),
                "teacher-option": {"checkpoints": [str(ckpt)], "tta": ["identity", "hflip"]},
                "batch_size": 4,
            }
        )
    )
    assert run("--config", config, "--out", tmp_path / "c") == 0  # the flag overrides the config's out
    assert not (tmp_path / "ignored").exists()
    cache = TeacherCache(tmp_path / "c")
    assert cache.manifest["teacher"]["tta"] == ["identity", "hflip"]
    from distill.data import open_dataset

    record = open_dataset("merged", data)[0]
    x = torch.from_numpy(record.image.copy()).permute(2, 0, 1)[None]
    with torch.no_grad():
        expected = (student(x) + student(x.flip(-1)).flip(-1))[0, 0].numpy() / 2
    np.testing.assert_allclose(cache.read(record.id).astype(np.float32), expected, atol=2e-2, rtol=1e-2)
    assert run("--verify", tmp_path / "c") == 0


def test_stale_cache_is_refused(data, tmp_path, capsys):
    out = tmp_path / "c"
    args = ["--teacher", "frangi", "--data-format", "merged", "--data-root", data, "--out", out]
    assert run(*args) == 0
    assert run(*args, "--teacher-option", "sigmas=[1,2]") == 2
    assert "sigmas: cache [1.0, 2.0, 3.0] vs given [1.0, 2.0]" in capsys.readouterr().err
    changed = tmp_path / "changed"
    subprocess.run(["cp", "-r", str(data), str(changed)], check=True)
    image = next((changed / "images").iterdir())
    image.write_bytes(image.read_bytes() + b"\0")  # same pixels for a decoder, different content hash
    assert run(*args[:-3], changed, "--out", out) == 2
    assert "changed content" in capsys.readouterr().err


def test_verify_catches_a_corrupted_shard(data, tmp_path, capsys):
    out = tmp_path / "c"
    assert run(*pixel(data, "--out", out)) == 0
    assert run("--verify", out) == 0
    shard = next(out.glob("*.f16"))
    raw = bytearray(shard.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    shard.write_bytes(bytes(raw))
    assert run("--verify", out) == 1
    assert "checksum mismatch" in capsys.readouterr().err


def test_a_bad_image_fails_loudly_or_is_listed_with_skip_bad(data, tmp_path, capsys):
    broken = tmp_path / "broken"
    subprocess.run(["cp", "-r", str(data), str(broken)], check=True)
    bad = sorted((broken / "images").iterdir())[1]
    bad.write_bytes(b"not an image")
    args = pixel(broken)
    assert run(*args, "--out", tmp_path / "a") == 2
    assert bad.name in capsys.readouterr().err
    summary = tmp_path / "s.json"
    assert run(*args, "--out", tmp_path / "b", "--skip-bad", "--summary-json", summary) == 0
    assert summary_of(summary)["failed"] == 1 and summary_of(summary)["done"] == 7
    assert bad.name in capsys.readouterr().out


def test_help_teaches_and_info_summarises(data, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    assert "examples:" in text and "--gpus-per-model" in text and "--import" in text
    # every built-in teacher's options, read from its constructor, as one writes them after K=
    assert "frangi: sigmas=[1.0, 2.0, 3.0], black_ridges=true" in text
    assert "checkpoint: checkpoints, tta=[identity]" in text and "path=generate" in text
    out = tmp_path / "c"
    assert run(*pixel(data, "--out", out)) == 0
    capsys.readouterr()
    assert run("--info", out) == 0
    assert '"ids_complete": 8' in capsys.readouterr().out
    assert os.path.exists(out / "manifest.json")


CALIBRATED = [*PLUGIN, "--teacher", "calibrated", "--data-format", "merged"]


def test_a_complete_cache_is_rerun_without_fitting_or_running_the_teacher(data, tmp_path, capsys):
    args = [*CALIBRATED, "--data-root", data, "--out", tmp_path / "c", "--views", "identity,hflip"]
    assert run(*args) == 0
    capsys.readouterr()
    forbid = ["--teacher-option", "forbid_work=true"]  # fit or predict_logits would raise
    assert run(*args, *forbid, "--summary-json", tmp_path / "s.json") == 0
    assert "nothing to do, all 8 id(s) already cached; the teacher was not run" in capsys.readouterr().out
    assert summary_of(tmp_path / "s.json")["todo"] == 0
    # Another teacher is still refused, and still without running it.
    assert run(*args, *forbid, "--teacher-option", "no_mask=true") == 2
    assert "no_mask: cache false vs given true" in capsys.readouterr().err


def test_all_no_mask_and_empty_shard_runs_print_their_summaries(data, tmp_path, capsys):
    common = [*CALIBRATED, "--data-root", data]
    assert run(*common, "--out", tmp_path / "none", "--teacher-option", "no_mask=true") == 0
    out = capsys.readouterr().out
    assert "0 done, 0 skipped (already cached), 8 no_mask" in out
    assert "self-check: not checked (0 pixels)" in out
    cache = TeacherCache(tmp_path / "none")
    assert {cache.status(i) for i in cache.ids} == {"no_mask"} and len(cache.ids) == 8
    # 8 ids over 9 shards leave shard 8 none: nothing to do, and the teacher is not even fitted.
    empty = ["--num-shards", 9, "--shard-index", 8, "--teacher-option", "forbid_work=true"]
    assert run(*common, "--out", tmp_path / "empty", *empty) == 0
    assert "nothing to do, no ids selected; the teacher was not run" in capsys.readouterr().out


def test_a_grown_dataset_computes_only_its_new_ids_and_a_changed_image_is_refused_by_id(tmp_path, capsys):
    from distill.data import open_dataset

    small = make_dataset(tmp_path / "small", count=8, size=64, style="fundus", seed=2)
    grown = make_dataset(tmp_path / "grown", count=11, size=64, style="fundus", seed=2)
    frangi = ["--teacher", "frangi", "--data-format", "merged"]
    out = tmp_path / "c"
    assert run(*frangi, "--data-root", small, "--out", out) == 0
    fitted = TeacherCache(out).manifest["teacher"]
    assert run(*frangi, "--data-root", grown, "--out", out, "--summary-json", tmp_path / "s.json") == 0
    summary = summary_of(tmp_path / "s.json")
    assert (summary["maps"], summary["skipped"], summary["done"]) == (3, 8, 3)
    cache = TeacherCache(out)
    assert cache.manifest["teacher"] == fitted and len(cache.ids) == 11  # the first run's fit goes on
    # ... which matters: fitting on the grown train split gives another teacher.
    assert run(*frangi, "--data-root", grown, "--out", tmp_path / "fresh") == 0
    assert TeacherCache(tmp_path / "fresh").manifest["teacher"] != fitted
    cache.check_dataset(open_dataset("merged", grown).fingerprint())
    cache.check_dataset(open_dataset("merged", small).fingerprint())  # extra cached ids are fine
    against_grown = ["--verify", out, "--data-format", "merged", "--data-root", grown]
    assert run("--verify", out) == 0 and run(*against_grown) == 0

    edited = grown / "images" / "fundus_00003.jpg"
    edited.write_bytes(edited.read_bytes() + b"\0")  # same pixels for a decoder, different content hash
    capsys.readouterr()
    assert run(*frangi, "--data-root", grown, "--out", out) == 2
    err = capsys.readouterr().err
    assert "1 id(s) with changed content since they were cached (e.g. fundus_00003)" in err and "Fix:" in err
    assert run(*against_grown) == 1
    assert "changed content" in capsys.readouterr().err


def test_views_d4_names_all_eight_and_unknown_views_are_refused(capsys):
    required = ["--teacher", "frangi", "--data-format", "merged", "--data-root", "d", "--out", "o"]
    assert list(parse_args([*required, "--views", "d4"]).job.views) == list(VIEWS)
    with pytest.raises(SystemExit):
        parse_args([*required, "--views", "identity,spin"])
    assert "--views: unknown view(s) ['spin']" in capsys.readouterr().err
