"""W&B sweep YAML -> an optuna search, faithfully or not at all.

The same file drives `wandb sweep` + `wandb agent` (online) and `python -m distill.sweep` (local, no
server). This module is the pure part: parse and validate the YAML, map each parameter's W&B
distribution to an optuna suggestion, map `method` to a sampler and `early_terminate` to a pruner,
and expand `command` for a trial exactly as a W&B agent would. Anything it cannot map is refused
with a message that says what to change, never approximated silently.
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from distill.errors import ConfigError

METHODS = ("grid", "random", "bayes")
# W&B macros a local run can expand. `${args}` is required: without it an agent silently drops the
# sampled parameters and every trial trains the same model.
MACROS = (
    "${env}",
    "${interpreter}",
    "${program}",
    "${args}",
    "${args_no_hyphens}",
    "${args_no_boolean_flags}",
)
_MAX_EXPONENT = math.log(sys.float_info.max)  # ~709.78: e^x of larger x overflows a float
_UNMAPPABLE = {
    "normal": "optuna has no normal distribution",
    "q_normal": "optuna has no normal distribution",
    "log_normal": "optuna has no log-normal distribution",
    "q_log_normal": "optuna has no log-normal distribution",
    "beta": "optuna has no beta distribution",
}


@dataclass(frozen=True)
class Param:
    """One swept parameter: `kind` is the W&B distribution, the rest its settings."""

    name: str
    kind: str  # constant | categorical | int_uniform | uniform | log_uniform_values | ...
    values: tuple[Any, ...] = ()
    low: float = 0.0
    high: float = 0.0
    q: float | None = None

    def suggest(self, trial: Any) -> Any:
        """Draw this parameter's value from an optuna trial (the W&B semantics, see module doc)."""
        if self.kind == "constant":
            return self.values[0]
        if self.kind == "categorical":
            choices = self.choices()
            picked = trial.suggest_categorical(self.name, choices)
            return self.values[choices.index(picked)]
        if self.kind == "int_uniform":
            return trial.suggest_int(self.name, int(self.low), int(self.high))
        # W&B's q-variants draw X from the continuous distribution, then return round(X / q) * q:
        # the sampler sees X and the trial runs with the snapped value. Log kinds store the values'
        # bounds in low/high (log_uniform's exponents were converted when parsing).
        log = self.kind not in ("uniform", "q_uniform")
        value = trial.suggest_float(self.name, self.low, self.high, log=log)
        return _snap(value, self.q) if self.q else value

    def choices(self) -> list[Any]:
        """Categorical values as optuna can store them: JSON text for lists and mappings.

        W&B allows a whole mapping as one value (e.g. a student {name, encoder} pair, which is how a
        grid pairs only valid combinations); optuna takes only scalars, so those travel as JSON.
        """
        scalar = (str, int, float, bool, type(None))
        if all(isinstance(v, scalar) for v in self.values):
            return list(self.values)
        return [json.dumps(v, sort_keys=True) for v in self.values]


def _snap(value: float, q: float | None) -> float | int:
    """round(value / q) * q, as W&B's q-distributions do; ints stay ints when q is whole."""
    snapped = round(value / q) * q
    if float(q).is_integer():
        return int(round(snapped))
    return round(snapped, 12)


@dataclass
class SweepSpec:
    """A parsed, validated sweep YAML."""

    path: Path
    name: str
    method: str
    metric: str
    goal: str  # maximize | minimize
    params: list[Param]
    command: list[str]
    program: str | None = None
    early_terminate: dict[str, Any] | None = None
    run_cap: int | None = None
    raw: dict[str, Any] = field(default_factory=dict)

    @property
    def direction(self) -> str:
        return "maximize" if self.goal == "maximize" else "minimize"

    def grid(self) -> dict[str, list[Any]]:
        """The search space for optuna's GridSampler (grid needs every parameter discrete)."""
        space = {}
        for p in self.params:
            if p.kind == "categorical":
                space[p.name] = p.choices()
            elif p.kind == "constant":
                space[p.name] = list(p.values)
            elif p.kind == "int_uniform":
                space[p.name] = list(range(int(p.low), int(p.high) + 1))
            else:
                raise ConfigError(
                    f"{self.path}: method 'grid' needs discrete parameters, but {p.name!r} is {p.kind}; "
                    "give it `values: [...]` or use method random/bayes"
                )
        return space


def _number(value: Any) -> Any:
    """A number written without a dot in its exponent (`1e-4`) is a string to PyYAML (YAML 1.1); read it
    as the number it is. Anything else is returned as given."""
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def _parse_param(path: Path, name: str, block: Any) -> Param:
    where = f"{path}: parameter {name!r}"
    if not isinstance(block, dict):
        raise ConfigError(f"{where} must be a mapping such as {{values: [...]}} or {{min: 0, max: 1}}")
    if "parameters" in block:
        raise ConfigError(
            f"{where} nests `parameters`; write the dotted name instead (e.g. loss.kd_alpha), "
            "which is how LightningCLI takes overrides"
        )
    if "value" in block:
        return Param(name, "constant", (block["value"],))
    kind = block.get("distribution")
    if kind is None:
        # W&B's defaults: values -> categorical; integer min/max -> int_uniform; else uniform.
        if "values" in block:
            kind = "categorical"
        elif isinstance(block.get("min"), int) and isinstance(block.get("max"), int):
            kind = "int_uniform"
        elif "min" in block and "max" in block:
            kind = "uniform"
        else:
            raise ConfigError(
                f"{where} needs `value`, `values`, or `min`/`max` (with an optional `distribution`)"
            )
    if kind in _UNMAPPABLE:
        raise ConfigError(
            f"{where}: distribution {kind!r} cannot be run locally ({_UNMAPPABLE[kind]}); "
            "use uniform, log_uniform_values, q_uniform, int_uniform or values"
        )
    if kind in ("constant",):
        return Param(name, "constant", (block["value"],))
    if kind == "categorical":
        values = block.get("values")
        if not isinstance(values, list) or not values:
            raise ConfigError(f"{where}: categorical needs a non-empty `values` list")
        return Param(name, "categorical", tuple(values))
    if "min" not in block or "max" not in block:
        raise ConfigError(f"{where}: distribution {kind!r} needs `min` and `max`")
    low, high = _number(block["min"]), _number(block["max"])
    if not (isinstance(low, (int, float)) and isinstance(high, (int, float))) or low >= high:
        raise ConfigError(f"{where}: needs numeric min < max, got min={low!r} max={high!r}")
    q = block.get("q")
    if kind.startswith("q_") and q is None:
        q = 1.0  # W&B's default quantum
    if q is not None and q <= 0:
        raise ConfigError(f"{where}: q must be > 0, got {q}")
    if kind == "int_uniform":
        if not (float(low).is_integer() and float(high).is_integer()):
            raise ConfigError(f"{where}: int_uniform needs integer min and max")
        return Param(name, kind, low=int(low), high=int(high))
    if kind in ("uniform", "q_uniform"):
        return Param(name, kind, low=float(low), high=float(high), q=q)
    if kind in ("log_uniform", "q_log_uniform", "inv_log_uniform"):
        _check_exponents(where, kind, low, high)
    if kind in ("log_uniform", "q_log_uniform"):
        # W&B: min/max are natural-log exponents, X = exp(U(min, max)).
        return Param(name, kind, low=math.exp(low), high=math.exp(high), q=q)
    if kind in ("log_uniform_values", "q_log_uniform_values", "inv_log_uniform_values"):
        # inv_log_uniform_values: 1/X log-uniform on [1/max, 1/min], which is X log-uniform on [min, max].
        if low <= 0:
            raise ConfigError(f"{where}: {kind} needs min > 0, got {low}")
        return Param(name, kind, low=float(low), high=float(high), q=q)
    if kind == "inv_log_uniform":
        # W&B: min/max are exponents of 1/X: X = exp(-U(min, max)), i.e. log-uniform on [e^-max, e^-min].
        return Param(name, kind, low=math.exp(-high), high=math.exp(-low), q=q)
    raise ConfigError(f"{where}: unknown distribution {kind!r}")


def _check_exponents(where: str, kind: str, low: float, high: float) -> None:
    """W&B's log_uniform kinds take natural-log exponents; refuse bounds that are values instead.

    Bounds past +-709 overflow exp() (or give 0); bounds inside (0, 1] are values such as learning
    rates (as exponents they would sample from [1, e], never what a log scale is for).
    """
    if max(abs(low), abs(high)) > _MAX_EXPONENT or 0 < low < high <= 1:
        raise ConfigError(
            f"{where}: {kind} takes natural-log exponents as min/max (X = e^U(min, max)), but "
            f"min={low!r} max={high!r} are not exponents (they give X from {_exp_text(low)} to "
            f"{_exp_text(high)}); for bounds given as values write `distribution: {kind}_values`, "
            f"or give exponents (e.g. min: {math.log(1e-5):.2f} for 1e-5)"
        )


def _exp_text(exponent: float) -> str:
    return f"{math.exp(exponent):.3g}" if abs(exponent) <= _MAX_EXPONENT else "beyond float range"


def load_sweep(path: str | Path) -> SweepSpec:
    """Parse and validate a W&B sweep YAML; raises ConfigError naming the file and what to fix."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such sweep file") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML ({err})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: a sweep file is a mapping with method, metric, parameters and command")
    method = raw.get("method")
    if method not in METHODS:
        raise ConfigError(f"{path}: method {method!r} is not one of {', '.join(METHODS)}")
    metric = raw.get("metric") or {}
    if not isinstance(metric, dict) or not metric.get("name"):
        raise ConfigError(f"{path}: needs `metric: {{name: val/student/dice@best, goal: maximize}}`")
    goal = metric.get("goal", "minimize")  # W&B's default
    if goal not in ("maximize", "minimize"):
        raise ConfigError(f"{path}: metric.goal must be maximize or minimize, got {goal!r}")
    params_raw = raw.get("parameters")
    if not isinstance(params_raw, dict) or not params_raw:
        raise ConfigError(f"{path}: needs a non-empty `parameters` mapping")
    params = [_parse_param(path, name, block) for name, block in params_raw.items()]
    command = raw.get("command")
    if command is None:
        raise ConfigError(
            f"{path}: needs a `command` list ending in ${{args}}, e.g. "
            "[${env}, python, -m, distill.fit, --config, configs/fit/demo.yaml, ${args}]"
        )
    if not isinstance(command, list) or not all(isinstance(c, str) for c in command):
        raise ConfigError(f"{path}: `command` must be a list of strings")
    arg_macros = [c for c in command if c.startswith("${args")]
    if not arg_macros:
        raise ConfigError(
            f"{path}: `command` has no ${{args}}: a W&B agent would silently drop every sampled "
            "parameter and each run would train the same model; add ${args} as the last item"
        )
    unknown = [c for c in command if c.startswith("${") and c not in MACROS]
    if unknown:
        raise ConfigError(
            f"{path}: command macro(s) {unknown} are not supported locally; use {', '.join(MACROS)}"
        )
    early = raw.get("early_terminate")
    if early is not None:
        if not isinstance(early, dict) or early.get("type") != "hyperband":
            raise ConfigError(f"{path}: early_terminate supports only type: hyperband, got {early!r}")
        if "min_iter" not in early and "max_iter" not in early:
            raise ConfigError(f"{path}: early_terminate hyperband needs min_iter (or max_iter with s)")
    spec = SweepSpec(
        path=path,
        name=str(raw.get("name") or path.stem),
        method=method,
        metric=metric["name"],
        goal=goal,
        params=params,
        command=command,
        program=raw.get("program"),
        early_terminate=early,
        run_cap=raw.get("run_cap"),
        raw=raw,
    )
    if method == "grid":
        spec.grid()  # validates that every parameter is discrete
    return spec


def make_sampler(spec: SweepSpec, seed: int = 0) -> Any:
    """grid -> GridSampler, random -> RandomSampler, bayes -> TPESampler (all seeded)."""
    import optuna

    if spec.method == "grid":
        return optuna.samplers.GridSampler(spec.grid(), seed=seed)
    if spec.method == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    return optuna.samplers.TPESampler(seed=seed)


def make_pruner(spec: SweepSpec) -> Any:
    """early_terminate hyperband -> optuna's HyperbandPruner; none -> NopPruner.

    W&B's hyperband stops runs at brackets min_iter * eta^k (or max_iter / eta^k for k < s);
    optuna's HyperbandPruner uses the same successive-halving brackets from min_resource with
    reduction_factor eta. Resource = validation epochs, the step the pruning callback reports.
    """
    import optuna

    if not spec.early_terminate:
        return optuna.pruners.NopPruner()
    early = spec.early_terminate
    eta = int(early.get("eta", 3))
    if "min_iter" in early:
        min_iter = int(early["min_iter"])
    else:
        min_iter = max(1, int(early["max_iter"]) // eta ** int(early.get("s", 2)))
    max_iter = int(early["max_iter"]) if "max_iter" in early else "auto"
    return optuna.pruners.HyperbandPruner(min_resource=min_iter, max_resource=max_iter, reduction_factor=eta)


def expand_command(spec: SweepSpec, values: dict[str, Any], python: str | None = None) -> list[str]:
    """The trial's argv, built the way a W&B agent builds it (`--name=value`, str() of the value: a
    null becomes `None`, which distill.fit reads as null).

    `python`/`python3`/`${interpreter}` become this interpreter, so a local sweep uses the same
    virtual environment; `${env}` is dropped (the child inherits our environment).
    """
    python = python or sys.executable
    argv: list[str] = []
    for item in spec.command:
        if item == "${env}":
            continue
        if item in ("${interpreter}", "python", "python3"):
            argv.append(python)
        elif item == "${program}":
            argv.append(str(spec.program))
        elif item == "${args}":
            argv += [f"--{k}={v}" for k, v in values.items()]
        elif item == "${args_no_hyphens}":
            argv += [f"{k}={v}" for k, v in values.items()]
        elif item == "${args_no_boolean_flags}":
            argv += [f"--{k}" if v is True else f"--{k}={v}" for k, v in values.items() if v is not False]
        else:
            argv.append(item)
    return argv
