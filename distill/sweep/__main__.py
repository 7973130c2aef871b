"""`python -m distill.sweep configs/sweeps/X.yaml --trials N`: see `distill.sweep.runner`."""

import sys

from distill.sweep.runner import main

sys.exit(main())
