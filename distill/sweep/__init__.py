"""Sweeps: one W&B sweep YAML, run by a W&B agent online or by `python -m distill.sweep` locally.

`spec` parses the YAML into an optuna search (pure, no Lightning), `runner` runs trials as
`distill.fit` subprocesses against a journal-backed study and writes the results, `callback` is
the Lightning callback a trial reports its metric through.
"""
