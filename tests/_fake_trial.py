"""A stand-in for `distill.fit` in sweep tests: reports 6 'epochs' of a known score via SweepReporter."""

import sys

from distill.sweep.runner import TrialReporter

args = dict(a[2:].split("=", 1) for a in sys.argv[1:] if a.startswith("--") and "=" in a)
if args.get("fail") == "True":
    sys.exit(3)
x = float(args["x"])
reporter = TrialReporter()
for epoch in range(6):
    if reporter.report((1 - (x - 0.3) ** 2) * (epoch + 1) / 6):
        break
