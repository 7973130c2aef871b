"""Vessel datasets: every format yields the same Record (see docs/DESIGN.md, "Datasets")."""

from distill.data import formats  # noqa: F401  (registers every format by name)
from distill.data.dataset import DatasetWarning, VesselDataset, list_formats, open_dataset
from distill.data.record import Record

__all__ = ["DatasetWarning", "Record", "VesselDataset", "list_formats", "open_dataset"]
