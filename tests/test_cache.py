"""The content-addressed cache: stable keys, resumable score shards, atomic artifacts."""

from __future__ import annotations

import dataclasses
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
    assert fingerprint({"k": [1, "é", None]}) == "9912c68214a64d7aed6c1c27c9282152"


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
