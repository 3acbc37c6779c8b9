"""The content-addressed cache: stable keys, resumable score shards, atomic artifacts."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import polars as pl
import pytest

from tamis.runtime.cache import (
    ArtifactCache,
    CacheError,
    ScoreCache,
    data_fingerprint,
    default_cache_root,
    fingerprint,
    open_cache,
    row_content_hashes,
)


def scores(ids: list[str], base: float = 0.0) -> pl.DataFrame:
    return pl.DataFrame({"id": ids, "ifd": [base + i for i in range(len(ids))]})


# --------------------------------------------------------------------------- keys


def test_fingerprint_is_canonical_and_sensitive() -> None:
    a = {"op": "ifd", "params": {"max_len": 512, "template": "alpaca"}, "model": "abc"}
    b = {"model": "abc", "params": {"template": "alpaca", "max_len": 512}, "op": "ifd"}
    assert fingerprint(a) == fingerprint(b)
    assert fingerprint(a) != fingerprint({**a, "model": "abd"})
    assert fingerprint([1, 2]) == fingerprint((1, 2))
    assert fingerprint({"x": 1}) != fingerprint({"x": "1"})
    assert len(fingerprint(a)) == 32 and int(fingerprint(a), 16) >= 0
    # a literal, so a change in canonicalisation (which would orphan every cache) is caught
    assert fingerprint({"k": [1, "é", None]}) == "71b941a2e8c892066d2fca5106ff16c1"  # tamis-cache-v2


def test_fingerprint_refuses_unstable_objects() -> None:
    with pytest.raises(CacheError):
        fingerprint({"f": object()})
    with pytest.raises(CacheError):
        fingerprint({1: "int key"})

    @dataclasses.dataclass
    class Params:
        r: int
        alpha: float

    assert fingerprint(Params(8, 16.0)) == fingerprint(Params(8, 16.0)) != fingerprint(Params(4, 16.0))
    assert fingerprint({"s": {3, 1, 2}}) == fingerprint({"s": {2, 3, 1}})


def test_row_and_data_hashes() -> None:
    frame = pl.DataFrame({"id": ["a", "b"], "instruction": ["q", "q"], "input": ["", ""], "output": ["x", "y"]})
    hashes = row_content_hashes(frame)
    assert hashes[0] != hashes[1] and hashes == row_content_hashes(frame.clone())
    assert data_fingerprint(frame) == data_fingerprint(frame.clone())
    assert data_fingerprint(frame) != data_fingerprint(frame.reverse())


def test_default_root_from_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("TAMIS_CACHE_DIR", str(tmp_path / "c"))
    assert default_cache_root() == tmp_path / "c"
    monkeypatch.delenv("TAMIS_CACHE_DIR")
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    assert default_cache_root() == Path.home() / ".cache" / "tamis"


# --------------------------------------------------------------------------- scores


def test_score_cache_resumes_after_a_killed_run(tmp_path: Path) -> None:
    key = fingerprint({"op": "ifd", "model": "m1"})
    ids = [f"r{i}" for i in range(10)]
    first_run = ScoreCache(tmp_path)
    found, missing = first_run.get(key, ids)
    assert found == {} and missing == ids
    first_run.put(key, scores(ids[0:3]))
    first_run.put(key, scores(ids[3:6], base=10))
    # ... killed here. A fresh process on the same root:
    second_run = ScoreCache(tmp_path)
    found, missing = second_run.get(key, ids)
    assert missing == ids[6:]
    assert found["r4"] == {"ifd": 11.0}
    assert [p.name for p in second_run.shards(key)] == ["shard-00000.parquet", "shard-00001.parquet"]
    frame, missing = second_run.get_frame(key, ids[::-1])
    assert sorted(frame["id"].to_list()) == sorted(ids[:6]) and missing == ids[6:][::-1]


def test_score_cache_keys_are_separate_and_later_shards_win(tmp_path: Path) -> None:
    cache = ScoreCache(tmp_path)
    k1, k2 = fingerprint("a"), fingerprint("b")
    cache.put(k1, scores(["x", "y"]))
    cache.put(k1, scores(["y"], base=5))
    assert cache.get(k1, ["x", "y"])[0] == {"x": {"ifd": 0.0}, "y": {"ifd": 5.0}}
    assert cache.get(k2, ["x"]) == ({}, ["x"])


def test_score_cache_rejects_bad_input(tmp_path: Path) -> None:
    cache = ScoreCache(tmp_path)
    with pytest.raises(CacheError):
        cache.put("../escape", scores(["a"]))
    with pytest.raises(CacheError):
        cache.put("k", pl.DataFrame({"score": [1.0]}))
    with pytest.raises(CacheError):
        cache.put("k", scores(["a", "a"]))
    assert cache.put("k", scores([])) is None
    assert not (tmp_path / "scores" / "k").exists()


def test_unreadable_shard_is_reported(tmp_path: Path) -> None:
    cache = ScoreCache(tmp_path)
    shard = cache.put("k", scores(["a"]))
    assert shard is not None
    shard.write_bytes(b"not parquet")
    with pytest.raises(CacheError, match="delete it"):
        cache.get("k", ["a"])


def test_failed_put_leaves_no_shard(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cache = ScoreCache(tmp_path)
    cache.put("k", scores(["a"]))

    def boom(self: pl.DataFrame, path: Path, *args: object, **kwargs: object) -> None:
        Path(path).write_bytes(b"PAR1 partial")
        raise OSError("disk full")

    monkeypatch.setattr(pl.DataFrame, "write_parquet", boom)
    with pytest.raises(OSError):
        cache.put("k", scores(["b"]))
    monkeypatch.undo()
    assert sorted(p.name for p in (tmp_path / "scores" / "k").iterdir()) == ["shard-00000.parquet"]
    assert cache.get("k", ["a", "b"]) == ({"a": {"ifd": 0.0}}, ["b"])


def test_disabled_score_cache(tmp_path: Path) -> None:
    cache = ScoreCache(tmp_path, disabled=True)
    assert cache.put("k", scores(["a"])) is None
    assert cache.get("k", ["a"]) == ({}, ["a"])
    assert not any(tmp_path.iterdir())


# --------------------------------------------------------------------------- artifacts


def test_artifact_building_publishes_on_success(tmp_path: Path) -> None:
    cache = ArtifactCache(tmp_path)
    key = fingerprint({"warmup": "pfm", "pct": 5})
    assert not cache.exists(key)
    with cache.building(key) as tmp:
        (tmp / "weights.bin").write_bytes(b"w")
        assert not cache.exists(key)
    assert cache.exists(key)
    assert (cache.path_for(key) / "weights.bin").read_bytes() == b"w"
    assert [p.name for p in (tmp_path / "artifacts").iterdir()] == [key]


def test_artifact_failure_leaves_nothing(tmp_path: Path) -> None:
    cache = ArtifactCache(tmp_path)
    with pytest.raises(KeyboardInterrupt):
        with cache.building("model") as tmp:
            (tmp / "half.bin").write_bytes(b"h")
            raise KeyboardInterrupt  # a killed training
    assert not cache.exists("model")
    assert list((tmp_path / "artifacts").iterdir()) == []


def test_artifact_race_keeps_the_first(tmp_path: Path) -> None:
    cache = ArtifactCache(tmp_path)
    with cache.building("m") as outer:
        (outer / "who").write_text("outer")
        with cache.building("m") as inner:
            (inner / "who").write_text("inner")
    assert (cache.path_for("m") / "who").read_text() == "inner"
    assert [p.name for p in (tmp_path / "artifacts").iterdir()] == ["m"]


def test_disabled_artifacts_live_only_for_the_run(tmp_path: Path) -> None:
    cache = open_cache(tmp_path, disabled=True)
    with cache.artifacts.building("m") as tmp:
        (tmp / "f").write_text("x")
    path = cache.artifacts.path_for("m")
    assert path.is_dir() and not str(path).startswith(str(tmp_path))
    assert not any(tmp_path.iterdir())
    root = cache.artifacts.root
    del cache, tmp
    import gc

    gc.collect()
    assert not root.exists()


# --------------------------------------------------------------------------- scaling: naming, journals, resume

SCHEMA = {"value": pl.Float64, "reason": pl.String}


def rows(ids: list[str], base: float = 0.0, reason: str | None = None) -> pl.DataFrame:
    return pl.DataFrame({"id": ids, "value": [base + i for i in range(len(ids))], "reason": [reason] * len(ids)},
                        schema={"id": pl.String, **SCHEMA})


def _count_listings(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every directory listing (os.scandir, os.listdir, Path.iterdir) is recorded."""
    import os

    seen: list[str] = []
    scandir, listdir, iterdir = os.scandir, os.listdir, Path.iterdir
    monkeypatch.setattr(os, "scandir", lambda p=".": (seen.append(str(p)), scandir(p))[1])
    monkeypatch.setattr(os, "listdir", lambda p=".": (seen.append(str(p)), listdir(p))[1])
    monkeypatch.setattr(Path, "iterdir", lambda self: (seen.append(str(self)), iterdir(self))[1])
    return seen


def test_put_numbers_shards_without_listing_the_folder_each_time(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    import tamis.runtime.cache as cache_mod

    monkeypatch.setattr(cache_mod, "fsync_file", lambda p: None)  # speed only; the naming is what is tested
    monkeypatch.setattr(cache_mod, "fsync_dir", lambda p: None)
    cache = ScoreCache(tmp_path)
    listings = _count_listings(monkeypatch)
    for i in range(40):
        cache.put("k", rows([f"r{i}"], base=i))
    assert len(listings) <= 1  # one listing seeds the counter; then never again
    monkeypatch.undo()
    assert [p.name for p in cache.shards("k")] == [f"shard-{i:05d}.parquet" for i in range(40)]
    # another process (a fresh cache object) continues after the numbers it finds, listing once
    other = ScoreCache(tmp_path)
    assert other.put("k", rows(["x"])).name == "shard-00040.parquet"
    # a stale counter (someone else wrote meanwhile) skips the taken numbers, never overwrites
    assert cache.put("k", rows(["y"])).name == "shard-00041.parquet"
    found, missing = ScoreCache(tmp_path).get("k", ["r0", "r39", "x", "y", "z"])
    assert found["r39"] == {"value": 39.0, "reason": None} and missing == ["z"]
    # very stale (another process wrote 100 shards since): it lists again once, not per number
    monkeypatch.setattr(cache_mod, "fsync_file", lambda p: None)
    monkeypatch.setattr(cache_mod, "fsync_dir", lambda p: None)
    for i in range(100):
        other.put("k", rows([f"o{i}"]))
    listings = _count_listings(monkeypatch)
    assert cache.put("k", rows(["late"])).name == "shard-00142.parquet" and len(listings) == 1


def test_writer_appends_chunks_without_listing_or_fsync_and_compacts_at_close(tmp_path: Path,
                                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    cache = ScoreCache(tmp_path)
    fsyncs: list[int] = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (fsyncs.append(fd), real_fsync(fd))[1])
    listings = _count_listings(monkeypatch)
    with cache.writer("k", sync_seconds=3600) as out:
        for i in range(300):
            out.put(rows([f"r{i}a", f"r{i}b"], base=i))
        during = (len(listings), len(fsyncs))
        journal = out.journal
        assert journal is not None and journal.name == "shard-00000.journal" and journal.exists()
        # readable while it is being written: a journal is part of the cache
        assert ScoreCache(tmp_path).lookup("k", ["r299b"], SCHEMA).row(0) == ("r299b", 300.0, None)
    monkeypatch.undo()
    assert during[0] <= 1  # the journal's number: one listing for the whole run
    assert during[1] == 0  # no fsync per chunk (nor for the journal's name, until its first synced chunk)
    assert not journal.exists()  # compacted into the shard of its number
    assert [p.name for p in cache.shards("k")] == ["shard-00000.parquet"] == [p.name for p in out.shards]
    assert sorted(p.name for p in cache.key_dir("k").iterdir()) == ["shard-00000.parquet"]
    hits = ScoreCache(tmp_path).lookup("k", [f"r{i}b" for i in range(300)], SCHEMA).sort("value")
    assert hits["value"].to_list() == [float(i + 1) for i in range(300)]


def test_writer_compacts_every_so_many_rows_and_syncs_by_time(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    cache = ScoreCache(tmp_path)
    with cache.writer("k", compact_rows=10, sync_seconds=0.0, background=False) as out:
        fsyncs: list[int] = []
        real_fsync = os.fsync
        monkeypatch.setattr(os, "fsync", lambda fd: (fsyncs.append(fd), real_fsync(fd))[1])
        for i in range(12):
            out.put(rows([f"a{i}", f"b{i}"]))
        monkeypatch.undo()
        assert len(out.shards) == 2  # 24 rows: compacted at 10 and 20 (at the chunk that reached them)
        assert len(fsyncs) >= 12  # sync_seconds=0: every chunk is synced (a slow judge's case)
    assert [p.name for p in cache.shards("k")] == ["shard-00000.parquet", "shard-00001.parquet", "shard-00002.parquet"]
    assert not list(cache.key_dir("k").glob("*.journal"))
    assert ScoreCache(tmp_path).lookup("k", [f"a{i}" for i in range(12)], SCHEMA).height == 12


def test_background_compaction_keeps_the_order_and_reports_its_failure(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    cache = ScoreCache(tmp_path)
    with cache.writer("k", compact_rows=4) as out:
        out.put(rows(["x", "y", "z", "w"], base=1.0))  # journal 0 full: compacted on a thread, as shard 0
        out.put(rows(["y"], base=2.0))  # journal 1: a later value for y, ranked after shard 0 whenever it lands
        assert cache.get("k", ["y"])[0]["y"]["value"] == 2.0
    assert [p.name for p in cache.shards("k")] == ["shard-00000.parquet", "shard-00001.parquet"]
    assert cache.get("k", ["x", "y"])[0] == {"x": {"value": 1.0, "reason": None}, "y": {"value": 2.0, "reason": None}}

    def disk_full(*args: object, **kwargs: object) -> Path:
        raise OSError("disk full")

    monkeypatch.setattr(ScoreCache, "_write_shard", disk_full)
    out = cache.writer("k2", compact_rows=2)
    out.put(rows(["a", "b"]))  # compaction fails in the background...
    with pytest.raises(OSError, match="disk full"):
        out.close()  # ...and says so; the journal keeps the chunk
    assert [p.name for p in cache.key_dir("k2").iterdir()] == ["shard-00000.journal"]
    assert cache.get("k2", ["a", "b"])[1] == []


def test_many_small_writes_stay_linear(tmp_path: Path) -> None:
    """Time per chunk does not grow with the number of chunks already written (the old `put`
    listed the folder on every write: quadratic). Coarse, best of two, generous bound."""
    import time

    def run(n: int, where: str) -> float:
        best = float("inf")
        for attempt in range(2):
            cache = ScoreCache(tmp_path / f"{where}-{attempt}")
            chunks = [rows([f"{i}-{j}" for j in range(4)]) for i in range(n)]
            t0 = time.perf_counter()
            with cache.writer("k", sync_seconds=3600, compact_rows=n * 4 + 1) as out:
                for chunk in chunks:
                    out.put(chunk)
            best = min(best, time.perf_counter() - t0)
        return best

    small, large = run(250, "small"), run(2000, "large")
    assert large < small * 8 * 2.5, (small, large)  # 8× the chunks; quadratic would be ~64×


def _write_and_die(root: str, chunks: int, torn: bool) -> None:  # runs in a child process
    import os
    import signal

    import polars as pl

    from tamis.runtime.cache import ScoreCache

    out = ScoreCache(root).writer("k", sync_seconds=3600)
    for i in range(chunks):
        out.put(pl.DataFrame({"id": [f"c{i}-{j}" for j in range(8)], "value": [float(i)] * 8, "reason": [None] * 8},
                             schema={"id": pl.String, "value": pl.Float64, "reason": pl.String}))
    if torn:  # a chunk cut off mid-write, as a kill inside `write` would leave it
        os.write(out._fd, b"TSJ1" + (10_000).to_bytes(8, "little") + b"\0\0\0\0" + b"partial")
    os.kill(os.getpid(), signal.SIGKILL)


@pytest.mark.skipif(sys.platform == "win32", reason="SIGKILL")
@pytest.mark.parametrize("torn", [False, True])
def test_a_killed_writer_loses_at_most_the_chunk_in_flight(tmp_path: Path, torn: bool) -> None:
    import multiprocessing

    child = multiprocessing.get_context("spawn").Process(target=_write_and_die, args=(str(tmp_path), 5, torn))
    child.start()
    child.join(60)
    assert child.exitcode == -9  # really killed: no close, no compaction
    cache = ScoreCache(tmp_path)
    assert [p.name for p in cache.key_dir("k").iterdir()] == ["shard-00000.journal"]
    wanted = [f"c{i}-{j}" for i in range(6) for j in range(8)]
    hits, missing = cache.get_frame("k", wanted, SCHEMA)
    assert hits.height == 40 and missing == wanted[40:]
    # the next run writes the rest beside the orphan journal; later entries win for repeated ids
    with cache.writer("k") as out:
        out.put(rows(["c0-0", "c5-0"], base=100.0))
    got = dict(ScoreCache(tmp_path).lookup("k", wanted, SCHEMA).select("id", "value").iter_rows())
    assert got["c0-0"] == 100.0 and got["c5-0"] == 101.0 and got["c4-7"] == 4.0 and len(got) == 41


def test_a_damaged_journal_frame_ends_the_journal_never_reads_garbage(tmp_path: Path) -> None:
    cache = ScoreCache(tmp_path)
    out = cache.writer("k", sync_seconds=3600)
    for i in range(3):
        out.put(rows([f"r{i}"], base=i))
    journal = out.journal
    out._close_fd()  # as if killed
    data = bytearray(journal.read_bytes())
    data[-3] ^= 0xFF  # the last chunk's bytes changed (a power loss, a bad sector): its CRC fails
    journal.write_bytes(bytes(data))
    hits, missing = cache.get_frame("k", ["r0", "r1", "r2"], SCHEMA)
    assert sorted(hits["id"].to_list()) == ["r0", "r1"] and missing == ["r2"]


def _race(root: str, who: int, n: int, start) -> None:  # runs in a child process
    import polars as pl

    from tamis.runtime.cache import ScoreCache

    cache = ScoreCache(root)
    schema = {"id": pl.String, "value": pl.Float64, "reason": pl.String}
    start.wait()
    with cache.writer("k", compact_rows=40, sync_seconds=3600) as out:
        for i in range(n):
            ids = [f"{who}-{i}-{j}" for j in range(4)] + [f"shared-{i}"]
            out.put(pl.DataFrame({"id": ids, "value": [float(i)] * 5, "reason": [None] * 5}, schema=schema))
            if i % 10 == 0:  # and one-shot shards in between, claiming numbers from the same space
                cache.put("k", pl.DataFrame({"id": [f"{who}-put-{i}"], "value": [1.0], "reason": [None]},
                                            schema=schema))


def test_two_processes_writing_one_key_never_clobber_each_other(tmp_path: Path) -> None:
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    start = ctx.Event()
    n = 120
    children = [ctx.Process(target=_race, args=(str(tmp_path), who, n, start)) for who in (1, 2)]
    for c in children:
        c.start()
    start.set()
    for c in children:
        c.join(120)
        assert c.exitcode == 0
    cache = ScoreCache(tmp_path)
    names = sorted(p.name for p in cache.key_dir("k").iterdir())
    assert all(name.endswith(".parquet") for name in names), names  # no journal or temporary file left
    numbers = [int(name[6:11]) for name in names]
    assert len(numbers) == len(set(numbers))
    wanted = ([f"{who}-{i}-{j}" for who in (1, 2) for i in range(n) for j in range(4)]
              + [f"shared-{i}" for i in range(n)] + [f"{who}-put-{i}" for who in (1, 2) for i in range(0, n, 10)])
    hits, missing = cache.get_frame("k", wanted, SCHEMA)
    assert missing == [] and hits.height == len(wanted)
    assert hits.filter(pl.col("id") == "shared-7")["value"].to_list() == [7.0]


def test_journal_and_shards_are_checked_against_the_schema(tmp_path: Path) -> None:
    cache = ScoreCache(tmp_path)
    out = cache.writer("k")
    out.put(pl.DataFrame({"id": ["b"], "reason": ["x"]}))  # a damaged chunk: no value column
    with pytest.raises(CacheError, match=r"corrupt cache entry .*shard-00000\.journal: missing column\(s\) value"):
        cache.lookup("k", ["b"], SCHEMA)
    out.close()
    with pytest.raises(CacheError, match=r"corrupt cache entry .*shard-00000\.parquet: missing column\(s\) value"):
        cache.get("k", ["b"], schema=SCHEMA)
    cache.clear("k")
    with cache.writer("k") as out:
        out.put(pl.DataFrame({"id": ["a"], "value": ["1.0"], "reason": [None]},
                             schema={"id": pl.String, "value": pl.String, "reason": pl.String}))
    with pytest.raises(CacheError, match="value is String, expected Float64"):
        cache.lookup("k", ["a"], SCHEMA)


def test_an_all_null_column_is_read_with_the_expected_type(tmp_path: Path) -> None:
    cache = ScoreCache(tmp_path)
    cache.put("k", pl.DataFrame({"id": ["a"], "value": [1.0], "reason": [None]}))  # reason: Null type
    with cache.writer("k") as out:
        out.put(pl.DataFrame({"id": ["b"], "value": [None], "reason": ["skipped"]}))  # value: Null type
    hits = cache.lookup("k", ["a", "b"], SCHEMA).sort("id")
    assert hits.schema == {"id": pl.String, **SCHEMA}
    assert hits.rows() == [("a", 1.0, None), ("b", None, "skipped")]


def test_later_entries_win_across_shards_and_journals(tmp_path: Path) -> None:
    cache = ScoreCache(tmp_path)
    with cache.writer("k") as out:
        out.put(rows(["x", "y"], base=1.0))
    cache.put("k", rows(["y"], base=5.0))
    assert dict(cache.lookup("k", ["x", "y"]).select("id", "value").iter_rows()) == {"x": 1.0, "y": 5.0}
    out = cache.writer("k")
    out.put(rows(["y"], base=7.0))
    out.put(rows(["y"], base=8.0))  # within a journal, later chunks win
    assert cache.get("k", ["y"])[0] == {"y": {"value": 8.0, "reason": None}}
    out.close()
    assert cache.get("k", ["y"])[0] == {"y": {"value": 8.0, "reason": None}}
    assert cache.get("k", ["x"])[0] == {"x": {"value": 1.0, "reason": None}}


def test_writer_keeps_the_chunks_done_when_the_scorer_fails(tmp_path: Path) -> None:
    cache = ScoreCache(tmp_path)
    with pytest.raises(KeyboardInterrupt):
        with cache.writer("k") as out:
            out.put(rows(["a", "b"]))
            raise KeyboardInterrupt  # Ctrl-C while the next chunk is being scored
    assert [p.name for p in cache.key_dir("k").iterdir()] == ["shard-00000.parquet"]
    assert cache.get("k", ["a", "b", "c"])[1] == ["c"]


def test_disabled_writer_clear_and_describe(tmp_path: Path) -> None:
    off = ScoreCache(tmp_path, disabled=True)
    with off.writer("k") as out:
        out.put(rows(["a"]))
    off.describe("k", {"op": "x"})
    assert off.lookup("k", ["a"], SCHEMA).height == 0 and not any(tmp_path.iterdir())
    cache = ScoreCache(tmp_path)
    cache.describe("k", {"op": "x"})
    cache.describe("k", {"op": "changed"})  # recorded once
    assert '"x"' in (cache.key_dir("k") / "key.json").read_text()
    out = cache.writer("k")
    out.put(rows(["a"]))
    cache.put("k", rows(["b"]))
    cache.clear("k")  # shards, journals, the key's description: all gone
    assert not cache.key_dir("k").exists() and cache.lookup("k", ["a", "b"]).height == 0
    cache.put("k", rows(["c"]))
    assert [p.name for p in cache.shards("k")] == ["shard-00000.parquet"]


def _old_read_all(folder: Path) -> pl.DataFrame | None:
    """The reader before journals: every shard read on its own, concatenated, last row per id."""
    import re

    found = sorted((int(m.group(1)), p.name, p) for p in folder.iterdir()
                   if (m := re.match(r"^shard-(\d+)(?:-[0-9a-f]+)?\.parquet$", p.name)))
    if not found:
        return None
    merged = pl.concat([pl.read_parquet(p) for _, _, p in found], how="diagonal_relaxed")
    return merged.unique(subset="id", keep="last", maintain_order=True)


def test_vectorised_resume_equals_the_old_reader_and_a_replay(tmp_path: Path) -> None:
    import random

    rng = random.Random(7)
    cache = ScoreCache(tmp_path)
    truth: dict[str, tuple[float | None, str | None]] = {}

    def chunk() -> pl.DataFrame:
        ids = rng.sample([f"r{i}" for i in range(80)], rng.randint(1, 6))
        value = [None if rng.random() < 0.2 else rng.random() for _ in ids]
        reason = [None if v is not None else rng.choice(["empty", "too long", ""]) for v in value]
        truth.update({i: (v, r) for i, v, r in zip(ids, value, reason)})
        return pl.DataFrame({"id": ids, "value": value, "reason": reason}, schema={"id": pl.String, **SCHEMA})

    # runs one after the other, as resumed runs are: one-shot shards, and writers whose journal
    # is compacted every 25 rows; the last writer is left open (a journal at the end, as if killed)
    for step in range(12):
        if step % 3 == 0:
            cache.put("k", chunk())
            continue
        out = cache.writer("k", compact_rows=25)
        for _ in range(rng.randint(1, 9)):
            out.put(chunk())
        if step < 11:
            out.close()
    assert list(cache.key_dir("k").glob("*.journal"))
    wanted = [f"r{i}" for i in range(90)]
    hits, missing = ScoreCache(tmp_path).get_frame("k", wanted, SCHEMA)
    assert {i: (v, r) for i, v, r in hits.iter_rows()} == {i: truth[i] for i in wanted if i in truth}
    assert missing == [i for i in wanted if i not in truth]
    out.close()  # everything in Parquet: the old reader sees what the new one sees
    old = _old_read_all(cache.key_dir("k"))
    new = ScoreCache(tmp_path).lookup("k", wanted, SCHEMA)
    assert new.sort("id").equals(old.filter(pl.col("id").is_in(wanted)).select(new.columns).sort("id"))


def test_align_lines_stored_results_up_with_the_ids_asked(tmp_path: Path) -> None:
    cache = ScoreCache(tmp_path)
    values, found = cache.align("k", ["a", "b"], SCHEMA)  # nothing stored yet
    assert values.rows() == [("a", None, None), ("b", None, None)] and found.to_list() == [False, False]
    cache.put("k", rows(["a", "b"], base=1.0))
    with cache.writer("k") as out:
        out.put(rows(["b"], base=9.0, reason="again"))  # b stored twice: the later row wins
    values, found = cache.align("k", pl.Series(["c", "b", "a", "b"]), SCHEMA)
    assert values.schema == {"id": pl.String, **SCHEMA}
    assert values.rows() == [("c", None, None), ("b", 9.0, "again"), ("a", 1.0, None), ("b", 9.0, "again")]
    assert found.to_list() == [False, True, True, True]


def _old_cached_rows(cache: ScoreCache, cfg, semantic, frame, report, schema, compute, names) -> pl.DataFrame:
    """`LocalExecutor._cached_rows` before it worked on frames (a dict and lists per row)."""
    import time
    from collections import Counter

    from tamis.runtime.executor import _next_chunk

    key = fingerprint(semantic)
    cache.describe(key, semantic)
    row_keys = row_content_hashes(frame)
    by_key = dict(zip(row_keys, range(frame.height)))
    found, missing = cache.get(key, list(dict.fromkeys(row_keys)), schema=schema)
    report.cached_rows = len(found)
    todo = [by_key[k] for k in missing]
    start, size = 0, min(cfg.chunk_rows, 8)
    while start < len(todo):
        idx = todo[start:start + size]
        t0 = time.perf_counter()
        chunk = pl.DataFrame({"id": [row_keys[i] for i in idx], **compute(frame[idx])},
                             schema={"id": pl.String, **schema})
        cache.put(key, chunk)
        found.update({r["id"]: r for r in chunk.iter_rows(named=True)})
        report.scored_rows += len(idx)
        start += len(idx)
        size = _next_chunk(len(idx), time.perf_counter() - t0, cfg.chunk_rows, cfg.checkpoint_seconds)
    values = [found[k] for k in row_keys]
    if "reason" in schema:
        report.skipped = dict(sorted(Counter(v["reason"] for v in values if v["reason"]).items()))
    return pl.DataFrame({"id": frame["id"], **{name: pl.Series([v[col] for v in values], dtype=schema[col])
                                               for col, name in names.items()}})


@pytest.mark.parametrize("no_cache", [False, True])
@pytest.mark.parametrize("repeats", [50, 1000])  # rows 50.. repeat the contents of rows 0..; or no repeats
def test_cached_rows_on_frames_equals_the_row_by_row_version(tmp_path: Path, no_cache: bool, repeats: int) -> None:
    from tamis.runtime.executor import LocalExecutor, RunConfig, StageReport

    n = 70
    texts = [f"answer {i % repeats}" if i % 9 else "" for i in range(n)]  # empty answers get a null and a reason
    frame = pl.DataFrame({"id": [f"p{i}" for i in range(n)], "instruction": [f"q{i % repeats}" for i in range(n)],
                          "input": [""] * n, "output": texts})
    schema = {"value": pl.Float64, "cond": pl.Float64, "reason": pl.String}
    names = {"value": "ifd", "cond": "ifd_cond", "reason": "ifd_reason"}
    semantic = {"op": "toy"}

    def make_compute(log: list[list[str]]):
        def compute(chunk: pl.DataFrame) -> dict:
            log.append(chunk["id"].to_list())
            outs = chunk["output"].to_list()
            return {"value": [float(len(t)) if t else None for t in outs], "cond": [1.5] * len(outs),
                    "reason": [None if t else ("empty answer" if len(t) == 0 else "") for t in outs]}
        return compute

    results = []
    for name in ("old", "new"):
        cfg = RunConfig(pool="-", cache_dir=str(tmp_path / name), no_cache=no_cache, chunk_rows=16, progress=False)
        ex = LocalExecutor(None, cfg)  # type: ignore[arg-type]  # _cached_rows needs no graph
        first_part = frame.head(23)  # an earlier run scored some rows
        run = ex._cached_rows if name == "new" else (
            lambda *a, ex=ex, cfg=cfg: _old_cached_rows(ex.cache.scores, cfg, *a))
        run(semantic, first_part, StageReport("s", "l", 23, 0, 0.0), schema, make_compute([]), names)
        log: list[list[str]] = []
        report = StageReport("s", "l", n, 0, 0.0)
        out = run(semantic, frame, report, schema, make_compute(log), names)
        results.append((out, report.cached_rows, report.scored_rows, report.skipped, log))
    (old, *old_counts, old_log), (new, *new_counts, new_log) = results
    assert new.equals(old) and new.columns == ["id", "ifd", "ifd_cond", "ifd_reason"]
    assert new_counts == old_counts and new_log == old_log
    assert new_counts[2] == {"empty answer": 8}
    if not no_cache:
        distinct = frame.select("instruction", "output").unique().height
        assert new_counts[0] > 0 and new_counts[0] + new_counts[1] == distinct


def test_row_content_hashes_are_the_documented_xxh3_scheme(monkeypatch: pytest.MonkeyPatch) -> None:
    """The row key, recomputed here from its documentation (tamis.runtime.rowhash) with the
    xxhash package: each field's XXH3-128 in hex ("-" for null; JSON text for a non-string
    value), then XXH3-128 of "name=hex|name=hex|…". The column-wise (plugin) path and the
    row-by-row fallback give it for every row, text full of JSON escapes and astral characters
    included."""
    import json
    import random

    import xxhash

    from tamis.runtime import rowhash

    def field(v: object) -> str:
        if v is None:
            return "-"
        text = v if isinstance(v, str) else json.dumps(v, ensure_ascii=False, separators=(",", ":"), sort_keys=True)
        return xxhash.xxh3_128(text.encode("utf-8")).hexdigest()

    def reference(frame: pl.DataFrame) -> list[str]:
        present = [c for c in ("instruction", "input", "output", "messages") if c in frame.columns]
        return [xxhash.xxh3_128("|".join(f"{c}={field(v)}" for c, v in zip(present, row)).encode()).hexdigest()
                for row in frame.select(present).iter_rows()]

    rng = random.Random(3)
    alphabet = [chr(i) for i in range(0x30)] + list('"\\/ab é中😀\u2028\u2029\x7f\ufeff\U0010ffff')

    def text() -> str | None:
        return None if rng.random() < 0.1 else "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 10)))

    n = 3000
    frame = pl.DataFrame({c: [text() for _ in range(n)] for c in ("instruction", "input", "output")},
                         schema={c: pl.String for c in ("instruction", "input", "output")})
    nulls = pl.DataFrame({"instruction": ["a", "b"], "input": [None, None], "output": ["x", "y"]})  # input: Null type
    chat = pl.DataFrame({"instruction": ["q", "q"], "messages": [[{"from": "human", "value": 'hi\n"'}], None]})
    assert rowhash._plugin() is not None  # the column-wise path is the one under test first
    for f in (frame, nulls, chat):
        assert row_content_hashes(f) == reference(f)
    assert rowhash.row_hashes(frame, ["instruction", "input", "output"], chunk=7).to_list() == reference(frame)
    monkeypatch.setattr(rowhash, "_plugin", lambda: None)  # a Polars the plugin was not built for
    for f in (frame.head(300), nulls, chat):
        assert row_content_hashes(f) == reference(f)
    # the same texts under other columns are another row
    assert row_content_hashes(pl.DataFrame({"instruction": ["a"], "output": ["b"]})) != \
        row_content_hashes(pl.DataFrame({"instruction": ["a"], "input": ["b"]}))
    # a literal, so a change in the row key (which would orphan every cached score) is caught
    assert row_content_hashes(pl.DataFrame({"instruction": ["q"], "input": [""], "output": ["a\n\"b\""]})) == \
        ["9f24c765211b08a00b953065f44f7789"]


def test_a_plugin_that_cannot_load_is_said_once_and_the_hashes_stay(monkeypatch: pytest.MonkeyPatch) -> None:
    from tamis.runtime import rowhash

    monkeypatch.setitem(sys.modules, "polars_hash", None)  # as a plugin built for another Polars fails
    with pytest.warns(RuntimeWarning, match="polars-hash: it does not load .* computed row by row with xxhash"):
        assert rowhash._plugin.__wrapped__() is None


# --------------------------------------------------------------------------- resume at scale: torn journals, in-order reads


def _pool(n: int) -> pl.DataFrame:
    return pl.DataFrame({"id": [f"r{i}" for i in range(n)], "instruction": [f"q{i}" for i in range(n)],
                         "input": [""] * n, "output": [f"a{i % 7}" for i in range(n)]})


def _cached(ex, frame: pl.DataFrame, computed: list[int], name: str = "s"):
    from tamis.runtime.executor import StageReport

    def compute(chunk: pl.DataFrame) -> dict:
        computed.append(chunk.height)
        return {"value": [float(len(t)) for t in chunk["instruction"].to_list()]}

    report = StageReport("n", name, frame.height, 0, 0.0)
    out = ex._cached_rows({"bench": "torn"}, frame, report, {"value": pl.Float64}, compute, {"value": name})
    return out, report


def test_rows_cut_off_in_a_torn_journal_are_counted_and_computed_again(tmp_path: Path) -> None:
    import os

    from tamis.runtime.executor import LocalExecutor, RunConfig

    pool = _pool(40)
    ex = LocalExecutor(None, RunConfig(pool="-", cache_dir=str(tmp_path), chunk_rows=8, progress=False))
    computed: list[int] = []
    first, _ = _cached(ex, pool.head(24), computed)
    # a run killed while appending its next chunk: the journal ends in a frame cut short
    key = next((tmp_path / "scores").iterdir()).name
    cache = ScoreCache(tmp_path)
    out = cache.writer(key, sync_seconds=3600)
    out.put(pl.DataFrame({"id": ["x"], "value": [1.0]}))  # a whole chunk first (a row no one asks for)
    header = b"TSJ2" + (10_000).to_bytes(8, "little") + b"\0\0\0\0" + (5).to_bytes(4, "little")
    os.write(out._fd, header + b"partial")
    out._close_fd()  # killed: no compaction
    assert cache.lookup(key, ["x"]).height == 1 and cache.torn_rows[key] == 5
    computed.clear()
    ex2 = LocalExecutor(None, RunConfig(pool="-", cache_dir=str(tmp_path), chunk_rows=8, progress=False))
    again, report = _cached(ex2, pool, computed)
    assert report.torn_rows == 5 and any("5 row(s) cut off" in n for n in report.notes)
    assert report.cached_rows == 24 and report.scored_rows == 16 == sum(computed)
    assert again.head(24).equals(first)
    # a journal whose last frame's header is cut too: a chunk of unknown size
    out = cache.writer(key, sync_seconds=3600)
    out.put(pl.DataFrame({"id": ["y"], "value": [2.0]}))
    os.write(out._fd, b"TSJ")
    out._close_fd()
    cache.lookup(key, ["y"])
    assert cache.torn_rows[key] == -1


def test_old_journal_frames_are_still_read(tmp_path: Path) -> None:
    import io
    import struct
    import zlib

    folder = ScoreCache(tmp_path).key_dir("k")
    folder.mkdir(parents=True)
    buf = io.BytesIO()
    pl.DataFrame({"id": ["a", "b"], "ifd": [1.0, 2.0]}).write_ipc_stream(buf, compression="uncompressed")
    payload = buf.getvalue()
    (folder / "shard-00000.journal").write_bytes(struct.pack("<4sQI", b"TSJ1", len(payload), zlib.crc32(payload))
                                                 + payload)
    assert ScoreCache(tmp_path).lookup("k", ["a", "b"]).sort("id")["ifd"].to_list() == [1.0, 2.0]


def test_align_reads_rows_stored_in_order_without_a_join(tmp_path: Path) -> None:
    cache = ScoreCache(tmp_path)
    ids = [f"k{i}" for i in range(10)]
    with cache.writer("k") as out:
        out.put(scores(ids[:4]))
        out.put(scores(ids[4:6], base=4.0))
    values, found = cache.align("k", ids, {"ifd": pl.Float64}, distinct=True)
    assert found.to_list() == [True] * 6 + [False] * 4
    assert values["id"].to_list() == ids and values["ifd"].to_list()[:6] == [0, 1, 2, 3, 4, 5]
    assert values["ifd"].null_count() == 4
    # out of order, or more stored than asked: the join gives the same answer
    for asked in (ids[::-1], ids[:3]):
        fast = cache.align("k", asked, {"ifd": pl.Float64}, distinct=True)
        slow = cache.align("k", asked, {"ifd": pl.Float64})
        assert fast[0].equals(slow[0]) and fast[1].equals(slow[1])


def test_row_keys_are_hashed_once_per_run_and_never_borrowed_across_contents(tmp_path: Path,
                                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    from tamis.runtime import cache as cache_module
    from tamis.runtime.executor import LocalExecutor, RunConfig

    pool = _pool(30)
    part = pool.filter(pl.col("id").is_in(["r3", "r1", "r7"])).reverse()
    other = part.with_columns(pl.lit("different").alias("output"))  # same ids, other content (another dataset)
    expected = {name: row_content_hashes(f) for name, f in (("pool", pool), ("part", part), ("other", other))}
    hashed: list[int] = []
    real = cache_module.row_content_keys
    monkeypatch.setattr(cache_module, "row_content_keys", lambda frame, *a: hashed.append(frame.height) or real(frame, *a))
    ex = LocalExecutor(None, RunConfig(pool="-", cache_dir=str(tmp_path), progress=False))
    keys = ex._row_keys(pool)
    assert keys.to_list() == expected["pool"] and hashed == [30]
    assert ex._row_keys(pool.clone()).equals(keys) and hashed == [30]  # the same rows again
    assert ex._row_keys(part).to_list() == expected["part"] and hashed == [30]  # some of them
    assert ex._row_keys(other).to_list() == expected["other"] and hashed == [30, 3]
