"""The README's "Results": issue 13's three claims measured on the synthetic demo data, on this machine.

(a) test-time views raise a student's Dice; (b) an ensemble of K checkpoints is a better teacher than
one; (c) with a teacher clearly better than the student, KD beats ground truth only at an equal budget.

    python scripts/synthetic_results.py [--out students/results] [--k 3] [--seeds 0 1 2]   # repo root

Steps, each skipped when its output is already there: the demo data and Frangi cache
(`scripts/demo.sh PY data`); K teachers (the demo's UNet-ResNet18, 3.1M, on ground truth only) and
their ensemble cache (K checkpoints x the 8 D4 views) by `scripts/train_ensemble.sh`; caches of one
checkpoint and of the K checkpoints without views, each scored by `distill.evaluate` on the same
images; then a tiny student (UNet-ResNet18 cut at encoder_depth 3, 0.72M) for a few epochs, from
ground truth only and by KD from one checkpoint and from the ensemble, with the same seeds, batches
and steps (KD as configured in demo.yaml, alpha 0.5 and T 2, and two variants). Every run is scored
with and without the D4 views (`model.test_views`). Writes results.json and results.md (Markdown
tables) under --out, whether or not the claims hold.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

TINY_STUDENT = "--model.student.extra={encoder_depth: 3, decoder_channels: [16, 8, 4]}"
DATA = ["--data-format", "merged", "--data-root", "data/synthetic"]


def run(*command: str, env: dict[str, str] | None = None) -> None:
    print("+", " ".join(command), flush=True)
    subprocess.run(command, check=True, env={**os.environ, **(env or {})})


def metrics(run_dir: Path) -> dict[str, dict]:
    return {split: json.loads((run_dir / f"metrics_{split}.json").read_text()) for split in ("val", "test")}


def dice(report: dict, who: str) -> float:
    return report["at_chosen"][who]["dice"]


def cache_checkpoints(out: Path, name: str, checkpoints: list[Path], views: str) -> Path:
    cache = out / "caches" / name
    if not (cache / "manifest.json").is_file():
        listed = "[" + ",".join(str(c) for c in checkpoints) + "]"
        run(sys.executable, "-m", "distill.cache_teacher", "--teacher", "checkpoint", *DATA, "--out", str(cache),
            "--teacher-option", f"checkpoints={listed}", "--teacher-option", f"tta={views}")  # fmt: skip
    return cache


def score_teacher(out: Path, name: str, cache: Path, ckpt: Path) -> tuple[float, float]:
    """A cached teacher's Dice on val (its threshold chosen there) and on test at that threshold."""
    scores = []
    for split in ("val", "test"):
        eval_dir = out / "teachers" / name / split
        if not (eval_dir / "metrics.json").is_file():
            run(sys.executable, "-m", "distill.evaluate", "--ckpt", str(ckpt), "--cache", str(cache),
                "--split", split, "--threshold-from", "val", "--out", str(eval_dir))  # fmt: skip
        scores.append(dice(json.loads((eval_dir / "metrics.json").read_text()), "teacher"))
    return scores[0], scores[1]


def train(out: Path, name: str, *args: str) -> dict[str, dict]:
    run_dir = out / "runs" / name
    if not (run_dir / "metrics_test.json").is_file():  # unfinished runs are cleared and trained again
        run(sys.executable, "-m", "distill.fit", "--config", "configs/fit/demo.yaml", *args,
            f"--runs_dir={out / 'runs'}", f"--run_name={name}", "--wandb=false", "--overwrite=true",
            "--trainer.enable_progress_bar=false")  # fmt: skip
    return metrics(run_dir)


def mean(values: list[float]) -> str:
    spread = f" ± {statistics.stdev(values):.4f}" if len(values) > 1 else ""
    return f"{statistics.mean(values):.4f}{spread}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("students/results"))
    parser.add_argument("--k", type=int, default=3, help="teachers in the ensemble")
    parser.add_argument("--teacher-epochs", type=int, default=20)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="student seeds")
    parser.add_argument("--student-epochs", type=int, default=8, help="the tiny student's budget")
    args = parser.parse_args(argv)
    out = args.out.resolve()

    run("bash", "scripts/demo.sh", sys.executable, "data")
    env = {"PY": sys.executable, "RUNS": str(out / "runs"), "CACHES": str(out / "caches"), "VIEWS": "d4"}
    teacher_args = [
        "--loss.kd_alpha=0.0",
        f"--trainer.max_epochs={args.teacher_epochs}",
        "--trainer.check_val_every_n_epoch=2",
        "--model.test_views=d4",
        "--wandb=false",
    ]
    run(
        "bash",
        "scripts/train_ensemble.sh",
        "configs/fit/demo.yaml",
        str(args.k),
        "teacher",
        *teacher_args,
        env=env,
    )
    teachers = [metrics(out / "runs" / f"teacher-seed{s}") for s in range(args.k)]
    checkpoints = [out / "runs" / f"teacher-seed{s}" / "checkpoints" / "best.ckpt" for s in range(args.k)]
    ensemble = f"{args.k} checkpoints x D4"
    caches = {
        "one checkpoint": cache_checkpoints(out, "teacher_one", checkpoints[:1], "identity"),
        f"{args.k} checkpoints": cache_checkpoints(out, "teacher_k", checkpoints, "identity"),
        ensemble: out / "caches" / "teacher",
    }

    # Every arm: the same tiny student, seeds, batches and steps; only the loss and the teacher differ.
    arms = {
        "ground truth only": ("gt", caches[ensemble], ["--loss.kd_alpha=0.0"]),
        "KD from one checkpoint": ("kd-one", caches["one checkpoint"], []),
        f"KD from {ensemble}": ("kd-ens", caches[ensemble], []),
        f"KD from {ensemble}, trust_gt": ("kd-ens-trust", caches[ensemble], ["--loss.kd_trust_gt=true"]),
        f"KD from {ensemble}, trust_gt, T 1, soft Dice 1": (
            "kd-ens-dice",
            caches[ensemble],
            ["--loss.kd_trust_gt=true", "--loss.kd_bce.temperature=1.0", "--loss.kd_dice.weight=1.0"],
        ),
    }
    budget = [TINY_STUDENT, f"--trainer.max_epochs={args.student_epochs}", "--model.test_views=d4"]
    students = {
        name: [
            train(
                out,
                f"{tag}-seed{seed}",
                *budget,
                f"--seed_everything={seed}",
                f"--data.cache_dir={cache}",
                *extra,
            )
            for seed in args.seeds
        ]
        for name, (tag, cache, extra) in arms.items()
    }

    # Teachers on the same images: the Frangi column of a teacher run, each cache through evaluate.
    any_student = out / "runs" / f"gt-seed{args.seeds[0]}" / "checkpoints" / "best.ckpt"
    frangi = (dice(teachers[0]["val"], "teacher"), dice(teachers[0]["test"], "teacher"))
    teacher_rows = {"Frangi (the demo's teacher)": frangi}
    for name, cache in caches.items():
        teacher_rows[name] = score_teacher(out, cache.name, cache, any_student)

    rows = ["| teacher | val Dice | test Dice |", "|---|---|---|"]
    rows += [f"| {n} | {v:.4f} | {t:.4f} |" for n, (v, t) in teacher_rows.items()]
    rows += ["", f"| tiny student (0.72M), {args.student_epochs} epochs, seeds {args.seeds} | val Dice | test Dice "
             "| test Dice, D4 views | KD margin (val) |", "|---|---|---|---|---|"]  # fmt: skip
    for name, runs in students.items():
        rows.append(
            f"| {name} | {mean([dice(r['val'], 'student') for r in runs])} "
            f"| {mean([dice(r['test'], 'student') for r in runs])} "
            f"| {mean([dice(r['test'], 'student_views') for r in runs])} "
            f"| {mean([r['val']['kd_margin'] for r in runs])} |"
        )
    rows += ["", f"| teacher run (UNet-R18 3.1M, {args.teacher_epochs} epochs, ground truth) | test Dice "
             "| test Dice, D4 views |", "|---|---|---|"]  # fmt: skip
    rows += [
        f"| seed {s} | {dice(t['test'], 'student'):.4f} | {dice(t['test'], 'student_views'):.4f} |"
        for s, t in enumerate(teachers)
    ]
    all_runs = [r for runs in students.values() for r in runs] + teachers
    gt_test = statistics.mean(dice(r["test"], "student") for r in students["ground truth only"])
    claims = {
        "a: D4 views raise test Dice (mean over every student and teacher run)": statistics.mean(
            dice(r["test"], "student_views") - dice(r["test"], "student") for r in all_runs
        ),
        f"b: {args.k} checkpoints beat one as a teacher (test Dice)": teacher_rows[f"{args.k} checkpoints"][1]
        - teacher_rows["one checkpoint"][1],
    }
    for name, runs in students.items():
        if name.startswith(f"KD from {ensemble}"):
            claims[f"c: {name} beats ground truth only (student test Dice, mean)"] = (
                statistics.mean(dice(r["test"], "student") for r in runs) - gt_test
            )
    rows += ["", "| claim | difference | holds |", "|---|---|---|"]
    rows += [
        f"| {claim} | {value:+.4f} | {'yes' if value > 0 else 'no'} |" for claim, value in claims.items()
    ]
    table = "\n".join(rows) + "\n"
    (out / "results.md").write_text(table)
    (out / "results.json").write_text(
        json.dumps({"claims": claims, "teachers": teacher_rows}, indent=1) + "\n"
    )
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
