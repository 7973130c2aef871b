"""README "Results": issue 13's claims on the synthetic demo data, by scripts/synthetic_results.py.

Slow: 3 teachers and 15 tiny students on a CPU (about 75 minutes on the shared 2-core dev machine).
What held there is asserted: D4 views raise every run's test Dice, and an ensemble of 3 checkpoints
is a better teacher than one. KD from that ensemble did not beat ground truth only at the tiny
student's budget (README, Results), so that row is reported, not asserted.
"""

import json
import subprocess
import sys

import pytest


@pytest.mark.slow
def test_views_and_ensembles_help_on_the_synthetic_data(tmp_path):
    subprocess.run([sys.executable, "scripts/synthetic_results.py", "--out", str(tmp_path)], check=True)
    results = json.loads((tmp_path / "results.json").read_text())
    claims = results["claims"]
    views = next(value for name, value in claims.items() if name.startswith("a:"))
    ensemble = next(value for name, value in claims.items() if name.startswith("b:"))
    assert views > 0 and ensemble > 0, claims
    for run in (tmp_path / "runs").iterdir():
        at = json.loads((run / "metrics_test.json").read_text())["at_chosen"]
        assert at["student_views"]["dice"] > at["student"]["dice"], run.name
    teachers = results["teachers"]
    assert teachers["3 checkpoints x D4"][1] >= teachers["3 checkpoints"][1] > teachers["one checkpoint"][1]
