"""The one record every dataset reader yields (see docs/DESIGN.md, "Datasets")."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass
class Record:
    """One image with its vessel mask.

    id: unique and stable across runs (the key that joins a dataset with a teacher cache).
    image: HxWx3 uint8 RGB. mask: HxW uint8 in {0, 1}. roi: HxW bool, pixels that count (None = all).
    text: the referring prompt, when the dataset has one. source: the file the image came from.
    """

    id: str
    image: np.ndarray
    mask: np.ndarray
    source: Path
    roi: np.ndarray | None = None
    text: str | None = None
