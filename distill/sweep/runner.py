"""Run a W&B sweep YAML locally, with no W&B server: `python -m distill.sweep configs/sweeps/X.yaml`.

Each trial is an ordinary `distill.fit` run started with the YAML's own `command` (so what runs here
is what a `wandb agent` would run), with its own run directory and an offline W&B run grouped by
sweep. optuna keeps the study in a journal file, so several workers (threads here, or several
`distill.sweep` processes on one filesystem) share it, and an interrupted sweep resumes: `--trials N`
is the total wanted, so running again with a larger N adds the difference.

Each validation epoch the trial's metric reaches the study through `TrialReporter`, run by the
Lightning callback `distill.sweep.callback.SweepReporter` that the trial gets via
`--trainer.callbacks+=`, which also feeds the pruner (`early_terminate`).
A trial's value is the best value of the metric over its epochs (the epoch of its best checkpoint).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from distill.cli import reports_user_errors
from distill.errors import DistillError
from distill.sweep.spec import SweepSpec, expand_command, load_sweep, make_pruner, make_sampler

ENV_STORAGE = "DISTILL_SWEEP_STORAGE"
ENV_STUDY = "DISTILL_SWEEP_STUDY"
ENV_TRIAL = "DISTILL_SWEEP_TRIAL_ID"
ENV_METRIC = "DISTILL_SWEEP_METRIC"
ENV_RESULT = "DISTILL_SWEEP_RESULT"
ENV_SPEC = "DISTILL_SWEEP_SPEC"


def open_study(storage_path: Path, spec: SweepSpec, seed: int = 0) -> Any:
    """Create or load the study kept in `storage_path` (optuna's journal file, shared by workers)."""
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    storage_path.parent.mkdir(parents=True, exist_ok=True)
    storage = JournalStorage(JournalFileBackend(str(storage_path)))
    return optuna.create_study(
        study_name=spec.name,
        storage=storage,
        sampler=make_sampler(spec, seed),
        pruner=make_pruner(spec),
        direction=spec.direction,
        load_if_exists=True,
    )


class TrialReporter:
    """Inside a trial: report the metric each epoch to the study and say when the pruner stops it.

    Configured only through environment variables set by `distill.sweep`, so that the trial's
    command line stays what a W&B agent would run plus one `--trainer.callbacks+=` item. Without
    those variables (a plain fit, or a W&B agent) it only records.
    """

    def __init__(self) -> None:
        self.metric = os.environ.get(ENV_METRIC)
        self.result_path = Path(os.environ[ENV_RESULT]) if ENV_RESULT in os.environ else None
        self.values: list[float] = []
        self.pruned = False
        self._trial = None

    def _optuna_trial(self) -> Any:
        if self._trial is None and ENV_STORAGE in os.environ:
            import optuna
            from optuna.storages import JournalStorage
            from optuna.storages.journal import JournalFileBackend

            # The pruner lives on the Study object, not in the storage: rebuild it from the YAML.
            storage = JournalStorage(JournalFileBackend(os.environ[ENV_STORAGE]))
            pruner = make_pruner(load_sweep(os.environ[ENV_SPEC]))
            study = optuna.load_study(study_name=os.environ[ENV_STUDY], storage=storage, pruner=pruner)
            self._trial = optuna.trial.Trial(study, int(os.environ[ENV_TRIAL]))
        return self._trial

    def report(self, value: float) -> bool:
        """Record one epoch's value (for the sweep and its pruner); True when the trial should stop."""
        self.values.append(value)
        trial = self._optuna_trial()
        if trial is not None:
            trial.report(value, step=len(self.values))
            self.pruned = trial.should_prune()
        if self.result_path is not None:
            tmp = self.result_path.with_suffix(".tmp")
            tmp.write_text(json.dumps({"values": self.values, "pruned": self.pruned}))
            os.replace(tmp, self.result_path)
        return self.pruned


def trial_value(values: list[float], goal: str) -> float:
    """The trial's score: its best epoch (the one its best checkpoint comes from)."""
    return max(values) if goal == "maximize" else min(values)


class LocalSweep:
    """Runs trials of one sweep YAML against a journal-backed optuna study."""

    def __init__(self, spec: SweepSpec, out_dir: Path, seed: int = 0, extra_args: list[str] | None = None):
        self.spec = spec
        self.out_dir = out_dir
        self.storage_path = out_dir / "journal.log"
        self.study = open_study(self.storage_path, spec, seed)
        self.extra_args = extra_args or []
        self.seed = seed

    def requeue_interrupted(self) -> int:
        """Trials left RUNNING by a killed sweep: mark them failed and queue their parameters again."""
        import optuna

        stale = [
            t for t in self.study.get_trials(deepcopy=False) if t.state == optuna.trial.TrialState.RUNNING
        ]
        for t in stale:
            self.study._storage.set_trial_user_attr(t._trial_id, "interrupted", True)
            self.study._storage.set_trial_state_values(t._trial_id, optuna.trial.TrialState.FAIL)
            if t.params:
                self.study.enqueue_trial(t.params, skip_if_exists=False)
        return len(stale)

    def _counted(self) -> int:
        """Trials that count toward --trials: started ones, less those interrupted and re-queued."""
        import optuna

        waiting = optuna.trial.TrialState.WAITING
        trials = self.study.get_trials(deepcopy=False)
        return sum(t.state != waiting and not t.user_attrs.get("interrupted") for t in trials)

    def objective(self, trial: Any) -> float:
        """One trial: sample, run the YAML's command as a subprocess, return its score."""
        import optuna

        values = {p.name: p.suggest(trial) for p in self.spec.params}
        run_name = f"{self.spec.name}-t{trial.number:03d}"
        trial_dir = self.out_dir / "trials" / run_name
        trial_dir.mkdir(parents=True, exist_ok=True)
        result_path = trial_dir / "result.json"
        argv = expand_command(self.spec, values)
        argv += [
            f"--run_name={run_name}",
            f"--runs_dir={self.out_dir / 'runs'}",
            "--trainer.callbacks+=distill.sweep.callback.SweepReporter",
            *self.extra_args,
        ]
        env = dict(os.environ)
        env.update(
            {
                ENV_STORAGE: str(self.storage_path),
                ENV_STUDY: self.spec.name,
                ENV_TRIAL: str(trial._trial_id),
                ENV_METRIC: self.spec.metric,
                ENV_RESULT: str(result_path),
                ENV_SPEC: str(self.spec.path),
                "WANDB_RUN_GROUP": self.spec.name,
                "WANDB_MODE": env.get("WANDB_MODE", "offline"),
            }
        )
        trial.set_user_attr("args", values)
        trial.set_user_attr("run_dir", str(self.out_dir / "runs" / run_name))
        trial.set_user_attr("command", " ".join(argv))
        print(f"[sweep] trial {trial.number} started: {values}", flush=True)
        started = time.time()
        with open(trial_dir / "log.txt", "w") as log:
            code = subprocess.call(argv, env=env, stdout=log, stderr=subprocess.STDOUT)
        trial.set_user_attr("seconds", round(time.time() - started, 1))
        result = (
            json.loads(result_path.read_text()) if result_path.exists() else {"values": [], "pruned": False}
        )
        if result["pruned"] and result["values"]:
            print(f"[sweep] trial {trial.number} pruned after {len(result['values'])} epoch(s)", flush=True)
            raise optuna.TrialPruned()
        if code != 0 or not result["values"]:
            trial.set_user_attr("error", f"exit status {code}; see {trial_dir / 'log.txt'}")
            raise TrialFailed(
                f"trial {trial.number} failed with exit status {code}; see {trial_dir / 'log.txt'}"
            )
        value = trial_value(result["values"], self.spec.goal)
        print(f"[sweep] trial {trial.number} done: {self.spec.metric} = {value:.4f}", flush=True)
        return value

    def run(self, trials: int, workers: int = 1) -> None:
        """Run until the study holds `trials` trials (or the grid is exhausted)."""
        import optuna

        requeued = self.requeue_interrupted()
        if requeued:
            print(f"[sweep] {requeued} interrupted trial(s) re-queued", flush=True)
        remaining = trials - self._counted()
        if remaining <= 0:
            print(f"[sweep] the study already has {self._counted()} trial(s); nothing to do", flush=True)
            return
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        # A resumed sweep must not replay the first run's draws: offset the seed by the trials so far.
        self.study.sampler = make_sampler(self.spec, self.seed + len(self.study.get_trials(deepcopy=False)))
        self.study.optimize(self.objective, n_trials=remaining, n_jobs=max(1, workers), catch=(TrialFailed,))


class TrialFailed(DistillError):
    """A trial's process failed; the study records it as FAIL and the sweep goes on."""


def results_rows(study: Any, spec: SweepSpec) -> list[dict[str, Any]]:
    """One row per trial, best first (finished trials by value, then the rest)."""
    rows = []
    for t in study.get_trials(deepcopy=False):
        row = {"trial": t.number, "state": t.state.name.lower(), spec.metric: t.value}
        row.update(t.user_attrs.get("args", t.params))
        row["seconds"] = t.user_attrs.get("seconds")
        row["run_dir"] = t.user_attrs.get("run_dir", "")
        rows.append(row)
    sign = -1 if spec.goal == "maximize" else 1
    rows.sort(key=lambda r: (r[spec.metric] is None, sign * (r[spec.metric] or 0.0), r["trial"]))
    return rows


MIN_TRIALS_FOR_IMPORTANCE = 5  # importances from fewer finished trials are noise


def write_results(study: Any, spec: SweepSpec, out_dir: Path) -> list[dict[str, Any]]:
    """results.csv, results.md (best first, each row linked to its run directory) and the plots."""
    rows = results_rows(study, spec)
    columns = ["trial", "state", spec.metric, *[p.name for p in spec.params], "seconds", "run_dir"]
    with open(out_dir / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    lines = [
        f"# Sweep `{spec.name}` ({spec.method}, {spec.goal} `{spec.metric}`)",
        "",
        "| " + " | ".join(columns) + " |",
        "|" + "---|" * len(columns),
    ]
    for r in rows:
        cells = []
        for c in columns:
            v = r.get(c)
            if c == "run_dir" and v:
                v = f"[{Path(v).name}]({os.path.relpath(v, out_dir)})"
            elif isinstance(v, float):
                v = f"{v:.4f}"
            cells.append("" if v is None else str(v))
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", *_plot(study, spec, out_dir, rows)]
    (out_dir / "results.md").write_text("\n".join(lines) + "\n")
    return rows


def _label(value: Any) -> str:
    """A categorical value as an axis label: mappings (a whole student config) by their values."""
    return " ".join(str(v) for v in value.values()) if isinstance(value, dict) else str(value)


def _plot(study: Any, spec: SweepSpec, out_dir: Path, rows: list[dict[str, Any]]) -> list[str]:
    """metric_vs_params.png, and param_importance.png from MIN_TRIALS_FOR_IMPORTANCE finished trials
    on; returns Markdown lines for results.md naming what was drawn, or why not."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import optuna

    done = [r for r in rows if r[spec.metric] is not None]
    swept = [p for p in spec.params if p.kind != "constant"]
    if not done or not swept:
        return ["No finished trial yet: nothing plotted."]
    fig, axes = plt.subplots(1, len(swept), figsize=(3.4 * len(swept), 3.6), squeeze=False)
    best = done[0]  # rows are best first
    for ax, p in zip(axes[0], swept, strict=True):
        ys = [r[spec.metric] for r in done]
        if p.kind == "categorical":  # even when the values are numbers: they are choices, not a scale
            labels = [_label(v) for v in p.values]
            xs = [labels.index(_label(r.get(p.name))) for r in done]
            ax.set_xticks(range(len(labels)), labels, rotation=30, ha="right", fontsize=7)
            ax.set_xlim(-0.5, len(labels) - 0.5)
            best_x = labels.index(_label(best.get(p.name)))
        else:
            xs = [r.get(p.name) for r in done]
            if p.kind.startswith(("log", "q_log", "inv_log")):
                ax.set_xscale("log")
            best_x = best.get(p.name)
        ax.scatter(xs, ys, alpha=0.7, label="finished trial")
        ax.scatter([best_x], [best[spec.metric]], marker="*", s=160, color="tab:red", label="best")
        ax.set_xlabel(p.name, fontsize=8)
        ax.set_ylabel(spec.metric, fontsize=8)
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0)
    fig.suptitle(
        f"sweep {spec.name}: {spec.metric} ({spec.goal}) per trial, {len(done)} finished of {len(rows)}",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(out_dir / "metric_vs_params.png", dpi=100)
    plt.close(fig)
    notes = ["![metric against each parameter](metric_vs_params.png)"]

    complete = [t for t in study.get_trials(deepcopy=False) if t.state == optuna.trial.TrialState.COMPLETE]
    varying = [p.name for p in swept if len({repr(t.params.get(p.name)) for t in complete}) > 1]
    importance_png = out_dir / "param_importance.png"
    if len(complete) < MIN_TRIALS_FOR_IMPORTANCE or not varying:
        importance_png.unlink(missing_ok=True)
        return [
            *notes,
            "",
            f"No parameter importance: it needs {MIN_TRIALS_FOR_IMPORTANCE} finished trials with a "
            f"varying parameter, and {len(complete)} finished so far.",
        ]
    importances = optuna.importance.get_param_importances(study, params=varying)
    fig, ax = plt.subplots(figsize=(6, 1.0 + 0.4 * len(importances)))
    names = list(importances)[::-1]
    ax.barh(names, [importances[n] for n in names])
    ax.set_xlabel(f"importance for {spec.metric} (optuna's default evaluator, sums to 1)")
    ax.set_title(f"sweep {spec.name}: parameter importance from {len(complete)} finished trials", fontsize=9)
    fig.tight_layout()
    fig.savefig(importance_png, dpi=100)
    plt.close(fig)
    (out_dir / "param_importance.json").write_text(json.dumps(importances, indent=2))
    return [*notes, "", "![parameter importance](param_importance.png)"]


@reports_user_errors
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m distill.sweep",
        description="Run a W&B sweep YAML locally (no W&B server): optuna samples, distill.fit trains.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="""examples:
  python -m distill.sweep configs/sweeps/demo.yaml --trials 3
  python -m distill.sweep configs/sweeps/demo.yaml --trials 5          # adds 2 more to the same study
  python -m distill.sweep configs/sweeps/kd_alpha_temperature.yaml --trials 40 --workers 2
  # online instead, the same file:  wandb sweep configs/sweeps/X.yaml && wandb agent ENTITY/PROJECT/ID

methods map to optuna samplers: grid -> GridSampler, random -> RandomSampler, bayes -> TPESampler;
early_terminate: {type: hyperband} -> HyperbandPruner on the metric reported each validation epoch.""",
    )
    parser.add_argument("sweep", type=Path, help="a W&B sweep YAML (configs/sweeps/*.yaml)")
    parser.add_argument("--trials", type=int, required=True, help="total trials wanted in the study")
    parser.add_argument("--workers", type=int, default=1, help="trials run at the same time (default 1)")
    parser.add_argument(
        "--out", type=Path, default=None, help="sweep folder (default students/sweeps/<name>)"
    )
    parser.add_argument("--seed", type=int, default=0, help="sampler seed")
    argv = list(sys.argv[1:] if argv is None else argv)
    # Everything after a bare `--` goes to every trial unchanged (argparse would try to parse it).
    extra = argv[argv.index("--") + 1 :] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    parser.epilog += (
        "\n\nafter a bare --, arguments go to every trial: ... --trials 3 -- --trainer.max_epochs=2"
    )
    args = parser.parse_args(argv)
    spec = load_sweep(args.sweep)
    out_dir = args.out or Path("students") / "sweeps" / spec.name
    sweep = LocalSweep(spec, out_dir, seed=args.seed, extra_args=extra)
    sweep.run(args.trials, args.workers)
    rows = write_results(sweep.study, spec, out_dir)
    table = (out_dir / "results.md").read_text().splitlines()[2:]
    print("\n".join(line for line in table if not line.startswith("!")).rstrip())
    pictures = [
        p.name for p in (out_dir / "metric_vs_params.png", out_dir / "param_importance.png") if p.is_file()
    ]
    print(f"\n{len(rows)} trial(s) in {out_dir}: results.csv, results.md, {', '.join(pictures)}")
    return 0
