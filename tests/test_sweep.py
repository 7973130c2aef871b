"""The W&B-sweep-YAML -> optuna mapping, the local runner (resume, workers) and the refusals."""

import json
import math
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
import yaml

from distill.errors import ConfigError
from distill.fit import main as fit_main
from distill.sweep.runner import LocalSweep, main, results_rows
from distill.sweep.spec import expand_command, load_sweep, make_pruner, make_sampler

FAKE_TRIAL = Path(__file__).parent / "_fake_trial.py"


def write_sweep(tmp_path: Path, parameters: dict, method: str = "random", **extra) -> Path:
    spec = {
        "program": "distill/fit.py",
        "method": method,
        "metric": {"name": "val/student/dice@best", "goal": "maximize"},
        "parameters": parameters,
        "command": ["${env}", "python", str(FAKE_TRIAL), "${args}"],
        **extra,
    }
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def sample(path: Path, n: int = 200, seed: int = 0) -> list[dict]:
    spec = load_sweep(path)
    study = optuna.create_study(sampler=make_sampler(spec, seed), direction=spec.direction)
    out = []

    def objective(trial):
        out.append({p.name: p.suggest(trial) for p in spec.params})
        return 0.0

    study.optimize(objective, n_trials=n)
    return out


def test_every_distribution_samples_inside_its_wandb_support(tmp_path):
    params = {
        "const": {"value": 7},
        "cat": {"values": ["unet", "segformer"]},
        "int_default": {"min": 1, "max": 4},
        "float_default": {"min": 0.1, "max": 0.9},
        "iu": {"distribution": "int_uniform", "min": 2, "max": 5},
        "u": {"distribution": "uniform", "min": -1.0, "max": 1.0},
        "qu": {"distribution": "q_uniform", "min": 0.0, "max": 1.0, "q": 0.25},
        "luv": {"distribution": "log_uniform_values", "min": 1e-4, "max": 1e-1},
        "qluv": {"distribution": "q_log_uniform_values", "min": 8, "max": 256, "q": 8},
        "lu": {"distribution": "log_uniform", "min": math.log(1e-3), "max": math.log(1.0)},
        "qlu": {"distribution": "q_log_uniform", "min": 0.0, "max": math.log(100.0)},
        "iluv": {"distribution": "inv_log_uniform_values", "min": 0.01, "max": 10.0},
        "ilu": {"distribution": "inv_log_uniform", "min": 0.0, "max": math.log(100.0)},
    }
    draws = sample(write_sweep(tmp_path, params))
    col = {k: [d[k] for d in draws] for k in params}
    assert set(col["const"]) == {7}
    assert set(col["cat"]) == {"unet", "segformer"}
    assert set(col["int_default"]) == {1, 2, 3, 4} and all(isinstance(v, int) for v in col["int_default"])
    assert all(0.1 <= v <= 0.9 for v in col["float_default"])
    assert set(col["iu"]) == {2, 3, 4, 5}
    assert all(-1 <= v <= 1 for v in col["u"])
    assert set(col["qu"]) <= {0.0, 0.25, 0.5, 0.75, 1.0} and len(set(col["qu"])) >= 4
    assert all(1e-4 <= v <= 1e-1 for v in col["luv"])
    # log-uniform: about a third of the draws in each decade
    assert 0.2 < sum(v < 1e-3 for v in col["luv"]) / len(draws) < 0.45
    assert all(v % 8 == 0 and 8 <= v <= 256 and isinstance(v, int) for v in col["qluv"])
    assert all(1e-3 <= v <= 1.0 for v in col["lu"])
    assert all(float(v).is_integer() and 1 <= v <= 100 for v in col["qlu"])
    assert all(0.01 <= v <= 10.0 for v in col["iluv"])
    assert all(0.01 <= v <= 1.0 for v in col["ilu"])


@pytest.mark.parametrize(
    ("method", "sampler"),
    [
        ("grid", optuna.samplers.GridSampler),
        ("random", optuna.samplers.RandomSampler),
        ("bayes", optuna.samplers.TPESampler),
    ],
)
def test_methods_map_to_samplers(tmp_path, method, sampler):
    spec = load_sweep(
        write_sweep(tmp_path, {"a": {"values": [1, 2]}, "b": {"min": 0, "max": 2}}, method=method)
    )
    assert isinstance(make_sampler(spec), sampler)


def test_grid_enumerates_every_combination(tmp_path):
    path = write_sweep(
        tmp_path, {"a": {"values": [1, 2, 3]}, "b": {"values": ["x", "y"]}, "c": {"value": 0}}, "grid"
    )
    assert math.prod(len(v) for v in load_sweep(path).grid().values()) == 6
    draws = sample(path, n=6)
    assert {(d["a"], d["b"]) for d in draws} == {(a, b) for a in (1, 2, 3) for b in ("x", "y")}


def test_hyperband_maps_to_optuna_pruner(tmp_path):
    early = {"type": "hyperband", "min_iter": 2, "max_iter": 27, "eta": 3}
    pruner = make_pruner(load_sweep(write_sweep(tmp_path, {"a": {"values": [1]}}, early_terminate=early)))
    assert isinstance(pruner, optuna.pruners.HyperbandPruner)
    assert (pruner._min_resource, pruner._max_resource, pruner._reduction_factor) == (2, 27, 3)
    assert isinstance(
        make_pruner(load_sweep(write_sweep(tmp_path, {"a": {"values": [1]}}))), optuna.pruners.NopPruner
    )


def test_command_expands_like_a_wandb_agent(tmp_path):
    spec = load_sweep(write_sweep(tmp_path, {"loss.kd_alpha": {"values": [0.5]}}))
    argv = expand_command(spec, {"loss.kd_alpha": 0.5, "model.student.name": "unet"})
    assert argv == [sys.executable, str(FAKE_TRIAL), "--loss.kd_alpha=0.5", "--model.student.name=unet"]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"method": "hyperopt"}, "method 'hyperopt'"),
        ({"command": ["python", "-m", "distill.fit"]}, "no \\$\\{args\\}"),
        (
            {"parameters": {"a": {"distribution": "normal", "mu": 0, "sigma": 1}}},
            "'normal' cannot be run locally",
        ),
        ({"parameters": {"a": {"distribution": "beta", "a": 1, "b": 1}}}, "'beta' cannot"),
        ({"parameters": {"a": {"min": 1, "max": 1}}}, "min < max"),
        ({"parameters": {"a": {"parameters": {"b": {"value": 1}}}}}, "dotted name"),
        ({"parameters": {"a": {"distribution": "log_uniform_values", "min": 0, "max": 1}}}, "min > 0"),
        ({"early_terminate": {"type": "median"}}, "only type: hyperband"),
        ({"command": ["python", "x.py", "${args_json}"]}, "no \\$\\{args\\}|not supported"),
        ({"metric": {"name": "x", "goal": "up"}}, "maximize or minimize"),
        (  # values where exponents belong: would sample learning rates near e^0 = 1
            {"parameters": {"a": {"distribution": "log_uniform", "min": 1e-5, "max": 1e-2}}},
            "log_uniform takes natural-log exponents.*`distribution: log_uniform_values`",
        ),
        (  # exp(1000) overflows
            {"parameters": {"a": {"distribution": "q_log_uniform", "min": 1, "max": 1000}}},
            "not exponents.*beyond float range.*`distribution: q_log_uniform_values`",
        ),
        (
            {"parameters": {"a": {"distribution": "inv_log_uniform", "min": 0.001, "max": 0.1}}},
            "`distribution: inv_log_uniform_values`",
        ),
    ],
)
def test_refusals_name_the_file_and_the_fix(tmp_path, change, message):
    spec = {
        "method": "random",
        "metric": {"name": "val/student/dice@best", "goal": "maximize"},
        "parameters": {"a": {"values": [1, 2]}},
        "command": ["python", "x.py", "${args}"],
    }
    spec.update(change)
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(spec))
    with pytest.raises(ConfigError, match=message) as err:
        load_sweep(path)
    assert str(path) in str(err.value)


def test_exponent_numbers_without_a_dot_are_numbers(tmp_path):
    """PyYAML reads `1e-4` (no dot) as a string; the bounds are still numbers, and values given where
    exponents belong are still refused with the fix."""
    path = tmp_path / "s.yaml"
    head = (
        "method: random\nmetric: {name: m, goal: maximize}\ncommand: [python, x.py, '${args}']\nparameters:\n"
    )
    path.write_text(head + "  lr: {distribution: log_uniform_values, min: 1e-4, max: 1e-2}\n")
    (param,) = load_sweep(path).params
    assert param.low == pytest.approx(1e-4) and param.high == pytest.approx(1e-2)
    path.write_text(head + "  lr: {distribution: log_uniform, min: 1e-4, max: 1e-2}\n")
    with pytest.raises(ConfigError, match="`distribution: log_uniform_values`"):
        load_sweep(path)


def test_a_null_in_a_sweep_reaches_fit_as_none(tmp_path, capsys):
    """The local runner writes values as a W&B agent does (str(None) = "None"); fit reads them as null."""
    student = {"name": "unet", "encoder": "resnet18", "encoder_weights": None}
    parameters = {
        "data.crop_size": {"values": [None]},
        "data.cache_dir": {"value": None},
        "model.student": {"values": [student]},
    }
    spec = load_sweep(write_sweep(tmp_path, parameters))
    (drawn,) = sample(write_sweep(tmp_path, parameters), n=1)
    argv = expand_command(spec, drawn)[2:]
    assert "--data.crop_size=None" in argv and "--data.cache_dir=None" in argv
    with pytest.raises(SystemExit):
        fit_main(["--config=configs/fit/demo.yaml", *argv, "--print_config"])
    config = yaml.safe_load(capsys.readouterr().out)
    assert config["data"]["crop_size"] is None and config["data"]["cache_dir"] is None
    assert config["model"]["student"]["encoder_weights"] is None


def test_grid_refuses_continuous_parameters(tmp_path):
    with pytest.raises(ConfigError, match="needs discrete parameters"):
        load_sweep(write_sweep(tmp_path, {"a": {"min": 0.0, "max": 1.0}}, method="grid"))


def test_local_sweep_runs_resumes_and_writes_results(tmp_path, capsys):
    path = write_sweep(
        tmp_path, {"x": {"min": 0.0, "max": 1.0}, "arch": {"values": ["a", "b"]}}, method="bayes"
    )
    out = tmp_path / "out"
    assert main([str(path), "--trials", "3", "--out", str(out)]) == 0
    rows = list((out / "results.csv").read_text().splitlines())
    assert len(rows) == 1 + 3
    assert not (out / "param_importance.png").exists()  # 3 finished trials are too few to rank anything
    assert (
        "needs 5 finished trials with a varying parameter, and 3 finished so far"
        in (out / "results.md").read_text()
    )
    assert main([str(path), "--trials", "5", "--out", str(out), "--workers", "2"]) == 0
    spec = load_sweep(path)
    study = LocalSweep(spec, out).study
    table = results_rows(study, spec)
    assert len(table) == 5 and all(r["state"] == "complete" for r in table)
    assert len({r["x"] for r in table}) == 5  # the resumed run draws new points, not a replay
    # the fake trial scores 1 - (x - 0.3)^2; each row's value follows from the args it ran with
    for r in table:
        assert r["val/student/dice@best"] == pytest.approx(1 - (r["x"] - 0.3) ** 2)
        assert Path(r["run_dir"]).name.startswith("sweep-t")
    values = [r["val/student/dice@best"] for r in table]
    assert values == sorted(values, reverse=True)
    assert (out / "results.md").read_text().count("](runs/") == 5
    assert (out / "metric_vs_params.png").exists() and (out / "param_importance.png").exists()
    assert "![parameter importance](param_importance.png)" in (out / "results.md").read_text()


def test_interrupted_trial_is_requeued_with_its_parameters(tmp_path):
    path = write_sweep(tmp_path, {"x": {"min": 0.0, "max": 1.0}})
    spec = load_sweep(path)
    sweep = LocalSweep(spec, tmp_path / "out")
    trial = sweep.study.ask()
    x = spec.params[0].suggest(trial)  # a sweep killed here leaves this trial RUNNING
    sweep = LocalSweep(spec, tmp_path / "out")
    sweep.run(trials=1)
    trials = sweep.study.get_trials()
    assert [t.state.name for t in trials] == ["FAIL", "COMPLETE"]
    assert trials[1].params["x"] == x


def test_failed_trial_is_recorded_not_hidden(tmp_path):
    path = write_sweep(tmp_path, {"x": {"values": [0.5]}, "fail": {"value": True}})
    sweep = LocalSweep(load_sweep(path), tmp_path / "out")
    sweep.run(trials=1)
    (trial,) = sweep.study.get_trials()
    assert trial.state.name == "FAIL" and "exit status 3" in trial.user_attrs["error"]


def test_pruned_trial_from_hyperband(tmp_path):
    # the fake trial reports 6 epochs through SweepReporter; hyperband prunes the weak ones
    early = {"type": "hyperband", "min_iter": 1, "max_iter": 2, "eta": 3}  # one bracket
    path = write_sweep(
        tmp_path, {"x": {"values": [0.3, 0.95, 0.31, 0.0]}}, method="grid", early_terminate=early
    )
    sweep = LocalSweep(load_sweep(path), tmp_path / "out")
    sweep.run(trials=4)
    states = [t.state.name for t in sweep.study.get_trials()]
    assert "PRUNED" in states and "COMPLETE" in states
    result = json.loads((tmp_path / "out" / "trials").glob("*/result.json").__next__().read_text())
    assert result["values"]


def test_mapping_values_travel_through_optuna_as_json(tmp_path):
    students = [{"name": "unet", "encoder": "resnet18"}, {"name": "segformer", "encoder": "mit_b0"}]
    path = write_sweep(tmp_path, {"model.student": {"values": students}}, method="grid")
    draws = sample(path, n=2)
    assert sorted(d["model.student"]["name"] for d in draws) == ["segformer", "unet"]
    argv = expand_command(load_sweep(path), {"model.student": students[0]})
    assert argv[-1] == "--model.student={'name': 'unet', 'encoder': 'resnet18'}"


@pytest.mark.parametrize("path", sorted(Path("configs/sweeps").glob("*.yaml")), ids=lambda p: p.stem)
def test_shipped_sweeps_set_what_fit_reads(path, capsys):
    """Each swept name reaches the resolved fit config with the value the agent passes (a renamed
    setting would otherwise fail every trial, or worse, be ignored)."""
    spec = load_sweep(path)
    assert spec.command[-1] == "${args}" and spec.metric == "val/student/dice@best"
    values = {p.name: p.values[0] if p.values else p.high for p in spec.params}
    argv = expand_command(spec, values)
    with pytest.raises(SystemExit) as done:
        fit_main([*argv[argv.index("distill.fit") + 1 :], "--print_config"])
    assert done.value.code == 0
    resolved = yaml.safe_load(capsys.readouterr().out)
    for name, value in values.items():
        found = resolved
        for key in name.split("."):
            found = found[key]
        assert found == value or (isinstance(value, dict) and value.items() <= found.items()), name


def test_arguments_after_a_bare_double_dash_reach_every_trial(tmp_path):
    path = write_sweep(tmp_path, {"x": {"values": [0.5]}})
    assert main([str(path), "--trials", "1", "--out", str(tmp_path / "out"), "--", "--extra.flag=7"]) == 0
    study = LocalSweep(load_sweep(path), tmp_path / "out").study
    assert study.trials[0].user_attrs["command"].endswith("--extra.flag=7")


def test_resumed_random_sweep_does_not_replay_earlier_draws(tmp_path):
    path = write_sweep(tmp_path, {"x": {"min": 0.0, "max": 1.0}}, method="random")
    out = tmp_path / "out"
    assert main([str(path), "--trials", "2", "--out", str(out)]) == 0
    assert main([str(path), "--trials", "4", "--out", str(out)]) == 0
    xs = [t.params["x"] for t in LocalSweep(load_sweep(path), out).study.get_trials()]
    assert len(xs) == 4 and len(set(xs)) == 4


def test_python_dash_m_distill_sweep_runs_the_runner(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "distill.sweep", str(tmp_path / "missing.yaml"), "--trials", "1"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2 and "missing.yaml: no such sweep file" in done.stderr
