import json
import multiprocessing
import os
import pickle
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from _cache_writer_proc import VIEWS, fake_logits, make_ids, make_manifest, run

from distill.cache import CacheWriter, TeacherCache, cache_info, merge_cache, verify_cache
from distill.errors import CacheError

COUNT = 14
WRITER_SCRIPT = Path(__file__).with_name("_cache_writer_proc.py")


def start_writer(root: Path, writer_id: str, *args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, str(WRITER_SCRIPT), str(root), writer_id, "--count", str(COUNT), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def finish(process: subprocess.Popen) -> int:
    out, err = process.communicate(timeout=60)
    assert process.returncode == 0, err
    return int(out.strip().splitlines()[-1].split()[1])


def contents(root: Path) -> dict:
    """Every (id, view) -> map bytes or 'no_mask': what two equal caches must share."""
    cache = TeacherCache(root)
    out = {}
    for id in cache.ids:
        for view in cache.views:
            out[id, view] = (
                "no_mask" if cache.status(id, view) == "no_mask" else cache.read(id, view).tobytes()
            )
    return out


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """An uninterrupted run, in-process."""
    root = tmp_path_factory.mktemp("reference")
    assert run(str(root), "w0", COUNT, 0, 1, 0.0, 3) == 26
    return root


def test_round_trip_mixed_shapes_views_and_no_mask(reference):
    cache = TeacherCache(reference)
    assert cache.views == VIEWS and cache.ids == make_ids(COUNT) and cache.missing(make_ids(COUNT)) == []
    for id in cache.ids:
        if fake_logits(id, "identity") is None:
            assert cache.status(id) == "no_mask" and not cache.has(id, "identity")
            with pytest.raises(CacheError, match="no_mask"):
                cache.read(id)
            continue
        assert cache.status(id) == "ok"
        for view in VIEWS:
            got = cache.read(id, view)
            assert got.dtype == np.float16 and got.flags.writeable
            np.testing.assert_array_equal(got, fake_logits(id, view).astype(np.float16))
        stack = cache.read_views(id)
        assert stack.shape == (2, *fake_logits(id, "identity").shape)
    assert len({cache.read(i).shape for i in cache.ids if cache.status(i) == "ok"}) > 3
    info = cache_info(reference)
    assert info["rows"] == 24 and info["no_mask_ids"] == ["img006", "img013"] and info["ids_complete"] == 12
    manifest = json.loads((reference / "manifest.json").read_text())
    assert manifest["counts"]["rows"] == 24 and manifest["writers"][0]["id"] == "w0"
    assert manifest["dtype"] == "float16" and manifest["created"]["distill_version"]
    assert verify_cache(reference) == []


def test_writer_refuses_bad_rows_and_saturates_to_float16(tmp_path):
    with CacheWriter(tmp_path, "w0", make_manifest(3)) as w:
        w.write("img000", "identity", np.array([[1e6, -np.inf], [0.5, 0]]))
        with pytest.raises(CacheError, match="already cached"):
            w.write("img000", "identity", np.zeros((2, 2)))
        with pytest.raises(CacheError, match="NaN"):
            w.write("img001", "identity", np.full((2, 2), np.nan))
        with pytest.raises(CacheError, match="not in the dataset"):
            w.write("other", "identity", np.zeros((2, 2)))
        with pytest.raises(CacheError, match="views"):
            w.write("img001", "rot90", np.zeros((2, 2)))
        with pytest.raises(CacheError, match="in use"):
            CacheWriter(tmp_path, "w0", make_manifest(3))
        w.write_status("img002")
        assert w.done("img002", "hflip") and w.todo() == ["img000", "img001"]
    assert TeacherCache(tmp_path).read("img000").tolist() == [[65504, -65504], [0.5, 0]]


def test_reopen_after_close_skips_done_rows(tmp_path):
    with CacheWriter(tmp_path, "w0", make_manifest(3)) as w:
        w.write("img000", "identity", np.ones((4, 5)))
    with CacheWriter(tmp_path, "w1", make_manifest(3)) as w:  # another writer id sees w0's rows
        assert w.done("img000", "identity") and not w.done("img000", "hflip")
        assert w.todo() == make_ids(3)
        w.write("img000", "hflip", np.zeros((4, 5)))
    assert TeacherCache(tmp_path).missing(make_ids(3)) == ["img001", "img002"]


def test_reader_pickles_and_reads_in_forked_and_spawned_processes(reference):
    cache = TeacherCache(reference)
    expected = cache.read("img003", "hflip")  # opens the memory map in this process
    clone = pickle.loads(pickle.dumps(cache))
    assert clone._maps == {} and np.array_equal(clone.read("img003", "hflip"), expected)
    for method in ("fork", "spawn"):
        with multiprocessing.get_context(method).Pool(1) as pool:
            np.testing.assert_array_equal(pool.apply(cache.read, ("img003", "hflip")), expected)


def test_sigkill_midway_then_resume_equals_uninterrupted_run(tmp_path, reference):
    committed = 0
    for printed in (4, 5, 7):  # killed three times at different points, each resumed by the next run
        process = start_writer(tmp_path, "w0", "--delay", "0.03", "--commit-every", "3")
        for _ in range(printed):
            assert process.stdout.readline()
        process.send_signal(signal.SIGKILL)
        process.wait()
        now = 26 - _records_missing(tmp_path)
        assert committed <= now <= committed + printed  # rows after the last commit are not counted as done
        committed = now
    assert 0 < committed < 26
    assert finish(start_writer(tmp_path, "w0")) == 26 - committed  # computes only what was missing
    assert contents(tmp_path) == contents(reference)
    # no stray bytes of killed rows are left in the shard
    assert (tmp_path / "w0.f16").stat().st_size == (reference / "w0.f16").stat().st_size
    assert verify_cache(tmp_path) == []


def _records_missing(root: Path) -> int:
    """How many of the 26 (id, view)/status records are not committed yet."""
    cache = TeacherCache(root)
    done = sum(1 for i in cache.ids for v in VIEWS if cache.has(i, v))
    done += sum(1 for i in cache.ids if cache.status(i) == "no_mask")
    return 26 - done


def test_torn_index_tail_and_uncommitted_bytes_are_recovered(tmp_path):
    with CacheWriter(tmp_path, "w0", make_manifest(3)) as w:
        w.write("img000", "identity", np.ones((4, 5)))
        w.write("img000", "hflip", np.full((4, 5), 2.0))
    good_index, good_data = (tmp_path / "w0.index").read_bytes(), (tmp_path / "w0.f16").read_bytes()
    with open(tmp_path / "w0.index", "ab") as f:
        f.write(b'{"id": "img001", "view": "identity", "status": "ok", "off')
    with open(tmp_path / "w0.f16", "ab") as f:
        f.write(b"\x7f" * 17)  # half a row that was never indexed
    cache = TeacherCache(tmp_path)
    assert cache.read("img000", "hflip").tolist() == [[2.0] * 5] * 4 and not cache.has("img001", "identity")
    assert any("torn" in p for p in verify_cache(tmp_path))
    with CacheWriter(tmp_path, "w0", make_manifest(3)) as w:
        assert (tmp_path / "w0.index").read_bytes() == good_index
        assert (tmp_path / "w0.f16").read_bytes() == good_data
        w.write("img001", "identity", np.zeros((3, 3)))
    assert TeacherCache(tmp_path).read("img001").shape == (3, 3)


def test_truncated_data_file_is_reported_then_recomputed(tmp_path):
    with CacheWriter(tmp_path, "w0", make_manifest(2)) as w:
        for id in make_ids(2):
            for view in VIEWS:
                w.write(id, view, np.full((8, 8), 1.5))
    os.truncate(tmp_path / "w0.f16", 3 * 128 + 10)  # the last row is cut short
    problems = verify_cache(tmp_path)
    assert any("past the end of the file" in p and "img001" in p for p in problems)
    with pytest.raises(CacheError, match="truncated"):
        TeacherCache(tmp_path).read("img001", "hflip")
    with pytest.warns(UserWarning, match="dropped"), CacheWriter(tmp_path, "w0", make_manifest(2)) as w:
        assert w.todo() == ["img001"] and (tmp_path / "w0.f16").stat().st_size == 3 * 128
        w.write("img001", "hflip", np.full((8, 8), 1.5))
    assert verify_cache(tmp_path) == []


def test_verify_catches_nan_bytes_in_a_row_and_wrong_shapes(tmp_path, reference):
    root = tmp_path / "c"
    merge_cache(root, reference)
    assert verify_cache(root) == []
    with open(root / "w0.f16", "r+b") as f:
        f.seek(64)
        f.write(np.full(4, np.nan, np.float16).tobytes())
    problems = verify_cache(root)
    assert any("checksum" in p for p in problems) and any("NaN" in p for p in problems)

    items = make_manifest(COUNT)["dataset"]
    wrong = SimpleNamespace(
        ids=make_ids(COUNT),
        fingerprint=lambda: items,
        get=lambda id: SimpleNamespace(image=np.zeros((64, 64, 3), np.uint8)),
    )
    assert any("image shape (64, 64)" in p for p in verify_cache(reference, dataset=wrong))


def test_two_writer_processes_at_once_then_read_together(tmp_path, reference):
    processes = [start_writer(tmp_path, f"shard-{k}-of-2", "--part", str(k), "--parts", "2") for k in (0, 1)]
    assert sum(finish(p) for p in processes) == 26
    assert sorted(p.name for p in tmp_path.glob("shard-*")) == [
        f"shard-{k}-of-2.{ext}" for k in (0, 1) for ext in ("f16", "index")
    ]
    assert contents(tmp_path) == contents(reference)
    assert verify_cache(tmp_path) == []


def test_merge_two_roots_and_refuse_conflicts(tmp_path, reference):
    halves = [tmp_path / "node0", tmp_path / "node1"]
    for k, root in enumerate(halves):
        run(str(root), "w-rank0", COUNT, k, 2, 0.0, 3)  # same writer id on both nodes
    merged = tmp_path / "merged"
    info = merge_cache(merged, *halves)
    assert info["rows"] == 24 and sorted(info["writers"]) == ["w-rank0", "w-rank0@1"]
    assert contents(merged) == contents(reference) and verify_cache(merged) == []
    assert merge_cache(merged, reference)["rows"] == 24  # identical duplicates are accepted, not doubled
    files = sorted((p.name, p.stat().st_size) for p in merged.iterdir())
    merge_cache(merged, *halves)  # merging again adds nothing: no empty shard copies
    assert sorted((p.name, p.stat().st_size) for p in merged.iterdir()) == files

    clash = tmp_path / "clash"
    with CacheWriter(clash, "w0", make_manifest(COUNT)) as w:
        w.write("img000", "identity", np.zeros((3, 3)))
    before = sorted(p.name for p in merged.iterdir())
    with pytest.raises(CacheError, match="different content"):
        merge_cache(merged, clash)
    assert sorted(p.name for p in merged.iterdir()) == before

    other_teacher = tmp_path / "other"
    CacheWriter(other_teacher, "w0", make_manifest(COUNT, teacher_version=2)).close()
    with pytest.raises(CacheError, match="teacher version: cache 1 vs given 2"):
        merge_cache(merged, other_teacher)


def test_changed_teacher_or_changed_ids_are_refused_by_what_differs(tmp_path, reference):
    cache = TeacherCache(reference)
    dataset = make_manifest(COUNT)["dataset"]
    cache.check_dataset(dataset)
    edited = {**dataset, "items": {**dataset["items"], "img002": "edited", "img009": "edited"}}
    with pytest.raises(CacheError) as error:
        cache.check_dataset(edited)
    message = str(error.value)
    assert "2 id(s) with changed content since they were cached (e.g. img002, img009)" in message
    assert (
        "Fix: restore those items, or give the edited items new ids" in message and "--out NEW_DIR" in message
    )
    assert any(
        "changed content" in p and "img002" in p for p in verify_cache(reference, dataset=_as_dataset(edited))
    )

    other_data = {**dataset, "items": {i: f"other {i}" for i in dataset["items"]}}
    with pytest.raises(CacheError, match=r"14 of the 14 id\(s\) both hold .* made for another dataset"):
        cache.check_dataset(other_data)  # not "restore 14 items": the cache belongs to other data

    with pytest.raises(CacheError, match=r"teacher version: cache 1 vs given 2(.|\n)*new --out"):
        CacheWriter(reference, "w9", make_manifest(COUNT, teacher_version=2))
    with pytest.raises(CacheError, match=r"changed content(.|\n)*img002, img009"):
        CacheWriter(reference, "w9", {**make_manifest(COUNT), "dataset": edited})
    assert not (reference / "w9.index").exists() or (reference / "w9.index").read_bytes() == b""

    partial = tmp_path / "partial"
    run(str(partial), "w0", COUNT, 0, 2, 0.0, 3)
    with pytest.raises(CacheError, match=r"7 of 14 id\(s\) missing(.|\n)*again with the same"):
        TeacherCache(partial).check_dataset(dataset)


def _as_dataset(fingerprint: dict) -> SimpleNamespace:
    """A stand-in VesselDataset for verify_cache: ids, fingerprint, and images of the fake maps' shapes."""

    def get(id):
        shape = fake_logits(id, "identity").shape if fake_logits(id, "identity") is not None else (8, 8)
        return SimpleNamespace(image=np.zeros((*shape, 3), np.uint8))

    return SimpleNamespace(ids=sorted(fingerprint["items"]), fingerprint=lambda: fingerprint, get=get)


def test_the_cache_grows_with_its_dataset_and_serves_a_shrunk_one(tmp_path):
    assert run(str(tmp_path), "w0", 6, 0, 1, 0.0, 3) == 12
    grown = make_manifest(9)
    cache = TeacherCache(tmp_path)
    cache.check_dataset(make_manifest(4)["dataset"])  # extra cached ids are fine
    with pytest.raises(
        CacheError, match=r"incomplete: 3 of 9 id\(s\) missing \(e.g. img006, img007, img008\)"
    ):
        cache.check_dataset(grown["dataset"])
    problems = verify_cache(tmp_path, dataset=_as_dataset(grown["dataset"]))
    assert len(problems) == 1 and "3 of 9 id(s) lack a map" in problems[0]

    assert run(str(tmp_path), "w1", 9, 0, 1, 0.0, 3) == 5  # the rerun on the grown dataset: only the new ids
    cache = TeacherCache(tmp_path)
    cache.check_dataset(grown["dataset"])
    assert cache.ids == make_ids(9) and cache.status("img006") == "no_mask" and cache.status("img007") == "ok"
    assert (
        verify_cache(tmp_path, dataset=_as_dataset(grown["dataset"])) == [] and verify_cache(tmp_path) == []
    )
    info = cache_info(tmp_path)
    assert (info["ids_complete"], info["no_mask"], info["ids_partial"]) == (8, 1, 0)
    records = [json.loads(line) for line in (tmp_path / "w1.index").read_text().splitlines()]
    assert {r["hash"] for r in records} == {"sha-img006", "sha-img007", "sha-img008"}

    # Two nodes caching different grown copies of the data merge; rows of one id from different content do not.
    node = tmp_path.parent / f"{tmp_path.name}-node"
    with CacheWriter(node, "w0", make_manifest(12)) as w:
        for id in ("img010", "img011"):
            w.write(id, "identity", np.zeros((2, 2)))
            w.write(id, "hflip", np.zeros((2, 2)))
    merged = tmp_path.parent / f"{tmp_path.name}-merged"
    assert merge_cache(merged, tmp_path, node)["ids_complete"] == 10
    assert verify_cache(merged) == []
    edited = tmp_path.parent / f"{tmp_path.name}-edited"
    manifest = make_manifest(12)
    manifest["dataset"]["items"]["img010"] = "edited"
    with CacheWriter(edited, "w0", manifest) as w:
        w.write("img010", "hflip", np.zeros((2, 2)))
    with pytest.raises(CacheError, match="different content"):
        merge_cache(merged, edited)


def test_a_version_1_cache_is_read_resumed_and_merged_through_its_manifest_hashes(tmp_path, reference):
    """Version-1 records carry no item hash: theirs are the manifest's dataset items."""
    old = tmp_path / "v1"
    merge_cache(old, reference)
    manifest = json.loads((old / "manifest.json").read_text())
    (old / "manifest.json").write_text(json.dumps({**manifest, "format_version": 1}))
    for index in old.glob("*.index"):
        records = [json.loads(line) for line in index.read_text().splitlines()]
        index.write_text(
            "".join(json.dumps({k: v for k, v in r.items() if k != "hash"}) + "\n" for r in records)
        )
    assert '"hash"' not in (old / "w0.index").read_text()
    cache = TeacherCache(old)
    dataset = make_manifest(COUNT)["dataset"]
    cache.check_dataset(dataset)
    assert contents(old) == contents(reference) and verify_cache(old) == []
    with pytest.raises(CacheError, match=r"changed content(.|\n)*img003"):
        cache.check_dataset({**dataset, "items": {**dataset["items"], "img003": "edited"}})
    with CacheWriter(old, "w1", make_manifest(COUNT + 1)) as w:  # a grown dataset on a version-1 cache
        assert w.todo() == ["img014"]
        w.write("img014", "identity", np.ones((3, 3)))
        w.write("img014", "hflip", np.ones((3, 3)))
    TeacherCache(old).check_dataset(make_manifest(COUNT + 1)["dataset"])
    assert merge_cache(tmp_path / "v2", old)["ids_complete"] == 13
    assert '"hash"' in (tmp_path / "v2" / "w0.index").read_text() and verify_cache(tmp_path / "v2") == []


def test_the_same_views_in_another_order_extend_the_cache_and_other_views_are_refused(tmp_path):
    """`--views hflip,identity` on a cache made with `identity,hflip` is the same cache: rows are keyed by view."""
    root = tmp_path / "cache"
    with CacheWriter(root, "w0", make_manifest(COUNT)) as w:
        w.write("img000", VIEWS[0], np.zeros((3, 3)))
    with CacheWriter(root, "w1", {**make_manifest(COUNT), "views": VIEWS[::-1]}) as w:
        w.write("img001", VIEWS[0], np.ones((3, 3)))
    cache = TeacherCache(root)
    assert cache.views == VIEWS and cache.has("img000", VIEWS[0]) and cache.has("img001", VIEWS[0])
    with pytest.raises(CacheError, match="views: cache"):
        CacheWriter(root, "w2", {**make_manifest(COUNT), "views": VIEWS[:1]})
