"""Train/val/test splits: deterministic, seeded by id, persisted next to the data, stable as it grows.

Each id falls in a split by a seeded hash of the id alone, so adding images never moves an existing
one. The result is written to <root>/splits.json; an existing file is honoured for every id it lists
(ids it does not list are assigned and the file is updated), and explicit splits (folders, or a split
file the user gives) override both.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path

from distill.errors import ConfigError, DatasetError

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
SPLIT_FILE = "splits.json"
# Folder names that give the items under them their split; `valid` is Roboflow's name for val.
SPLIT_FOLDERS = {"train": "train", "val": "val", "valid": "val", "test": "test"}


def check_fractions(fractions: Iterable[float]) -> tuple[float, float, float]:
    """(train, val, test) fractions: three non-negative numbers summing to 1."""
    values = tuple(float(f) for f in fractions)
    if len(values) != 3 or min(values) < 0 or abs(sum(values) - 1.0) > 1e-6:
        raise ConfigError(f"split_fractions must be three non-negative numbers summing to 1, got {values}")
    return values  # type: ignore[return-value]


def hash_fraction(item_id: str, seed: int) -> float:
    """A number in [0, 1) that depends only on (seed, id): where the id falls on the split line."""
    digest = hashlib.sha256(f"{seed}:{item_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def split_by_hash(item_id: str, seed: int, fractions: tuple[float, float, float]) -> str:
    u = hash_fraction(item_id, seed)
    if u < fractions[0]:
        return "train"
    return "val" if u < fractions[0] + fractions[1] else "test"


def fill_empty_splits(
    assigned: dict[str, str], movable: list[str], seed: int, fractions: tuple[float, float, float]
) -> None:
    """Give every split with a nonzero fraction at least one id, moving only newly assigned ids.

    The id moved into an empty split is the one whose hash lies nearest that split's interval, taken
    from the largest split, so the choice is deterministic and a small dataset still validates and tests.
    """
    bounds = (0.0, fractions[0], fractions[0] + fractions[1], 1.0)
    for index, split in enumerate(SPLITS):
        if fractions[index] == 0 or split in assigned.values():
            continue
        sizes = {s: sum(1 for i in movable if assigned[i] == s) for s in SPLITS}
        donor = max(SPLITS, key=lambda s: sizes[s])
        candidates = [i for i in movable if assigned[i] == donor]
        if sizes[donor] < 2:
            return
        centre = (bounds[index] + bounds[index + 1]) / 2
        chosen = min(candidates, key=lambda i: (abs(hash_fraction(i, seed) - centre), i))
        assigned[chosen] = split


def read_split_file(path: Path) -> dict[str, str]:
    """{id: split} from a JSON file holding {id: split}, {"train": [ids], ...} or a splits.json we wrote."""
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise DatasetError(path, "split file not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise DatasetError(path, f"split file is not valid JSON ({error})", "fix or delete it") from None
    if isinstance(data, dict) and isinstance(data.get("splits"), dict):
        data = data["splits"]
    if isinstance(data, dict) and data and all(isinstance(v, list) for v in data.values()):
        data = {item_id: split for split, ids in data.items() for item_id in ids}
    if not isinstance(data, dict) or not all(isinstance(k, str) and v in SPLITS for k, v in data.items()):
        raise DatasetError(
            path,
            f"split file must map ids to one of {SPLITS} (or each split to a list of ids)",
            "fix or delete it",
        )
    return data


def write_split_file(
    path: Path, seed: int, fractions: tuple[float, float, float], splits: Mapping[str, str]
) -> None:
    """Write splits.json atomically (temp file + rename), so a reader never sees half a file."""
    payload = {"seed": seed, "fractions": list(fractions), "splits": dict(sorted(splits.items()))}
    handle, temp = tempfile.mkstemp(prefix=".splits.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "w") as file:
            json.dump(payload, file, indent=1)
            file.write("\n")
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise


def resolve_splits(
    root: Path,
    ids: list[str],
    *,
    seed: int,
    fractions: tuple[float, float, float],
    explicit: Mapping[str, str],
    split_file: Path | None = None,
) -> dict[str, str]:
    """{id: split} for `ids`: explicit splits, then the given split file, then <root>/splits.json, then the hash."""
    persisted_path = root / SPLIT_FILE
    persisted = read_split_file(persisted_path) if persisted_path.exists() else {}
    if persisted:
        saved_seed = json.loads(persisted_path.read_text()).get("seed")
        if saved_seed is not None and saved_seed != seed:
            log.warning(
                "splits: %s was made with seed %s; its ids keep their splits (delete it to re-split with seed %s)",
                persisted_path,
                saved_seed,
                seed,
            )
    given = read_split_file(split_file) if split_file is not None else {}
    fixed = {**persisted, **given, **explicit}
    assigned = {i: fixed[i] for i in ids if i in fixed}
    new_ids = [i for i in ids if i not in fixed]
    for item_id in new_ids:
        assigned[item_id] = split_by_hash(item_id, seed, fractions)
    if len(ids) >= 3 and not explicit and not given:
        fill_empty_splits(assigned, new_ids, seed, fractions)

    merged = {**persisted, **assigned}
    if merged != persisted:
        counts = {s: sum(1 for i in new_ids if assigned[i] == s) for s in SPLITS}
        try:
            write_split_file(persisted_path, seed, fractions, merged)
            log.info("splits: %d ids newly assigned %s; wrote %s", len(new_ids), counts, persisted_path)
        except OSError as error:
            log.warning(
                "splits: could not write %s (%s); splits hold for this run only", persisted_path, error
            )
    empty = [s for s, f in zip(SPLITS, fractions, strict=True) if f > 0 and s not in assigned.values()]
    if empty and len(ids) >= 3:
        log.warning("splits: %s empty for %d items (delete %s to re-split)", empty, len(ids), persisted_path)
    return assigned
