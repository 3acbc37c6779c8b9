"""`tamis cache list` / `tamis cache clean` on a cache written by real runs (tiny GPT-2, LoRA warmup)."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import polars as pl
import pytest
from typer.testing import CliRunner

from tamis.cli import app
from tamis.runtime import cache_admin
from tamis.runtime.cache import ArtifactCache, ScoreCache, row_content_hashes

FIX = Path(__file__).parent / "fixtures" / "data"
runner = CliRunner()
DAY = 86400.0
WARM = 'score ifd using warmup(pfm, 50%, lora(r=4), lr=1e-3, batch=2) with max_length=128 | rank | top 2'
PLAIN = 'score ifd using pfm with template="bare", max_length=128 | rank | top 2'


@pytest.fixture(scope="module")
def built(tiny_gpt2_dir, tmp_path_factory) -> Path:
    """A cache root holding what tamis stores: two score entries (the PFM's, a LoRA warmup's), the
    warmup artifact, a GGUF conversion and file-hashes.json, each written by tamis' own code.
    Read-only: tests that remove things work on a copy (`cache`)."""
    from tamis.dsl.compile import compile_text
    from tamis.runtime.executor import LocalExecutor, RunConfig

    root = tmp_path_factory.mktemp("built") / "cache"
    cfg = RunConfig(pool=str(FIX / "pool_small.jsonl"), pfm=tiny_gpt2_dir, dtype="fp32", cache_dir=str(root),
                    progress=False)
    for recipe in (PLAIN, WARM):
        LocalExecutor(compile_text(recipe).graph, cfg).run()
    gguf_dir = tmp_path_factory.mktemp("gguf")
    (gguf_dir / "m.gguf").write_bytes(b"GGUF")
    convert_gguf(root, gguf_dir / "m.gguf")
    return root


def convert_gguf(root: Path, gguf: Path) -> Path:
    """A GGUF conversion through the real hashing, staging and rename (the conversion itself is
    SmolLM2-sized, so it is faked)."""
    from tamis.runtime import models

    def convert(source, out: Path) -> None:
        (out / "config.json").write_text("{}")
        (out / "model.safetensors").write_bytes(b"\0" * 1000)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(models, "_convert_gguf", convert)
        token = models._CACHE_ROOT.set(root)  # file-hashes.json of this root, as a run's load does
        try:
            return models._converted_gguf_folder(models._Source("gguf", gguf.parent, gguf.name, None), root)
        finally:
            models._CACHE_ROOT.reset(token)


@pytest.fixture
def cache(built, tmp_path) -> Path:
    """A copy of the built cache, mtimes kept, to remove things from."""
    copy = tmp_path / "cache"
    shutil.copytree(built, copy, symlinks=True)
    return copy


def listing(root: Path, *extra: str) -> dict:
    res = runner.invoke(app, ["cache", "list", "--cache-dir", str(root), "--json", *extra])
    assert res.exit_code == 0, res.output
    return json.loads(res.output)


def age(path: Path, days: float) -> None:
    """Set the mtime of `path` and everything under it to `days` ago (as if untouched since)."""
    t = time.time() - days * DAY
    for dirpath, dirs, files in os.walk(path, topdown=False):
        for name in [*files, *dirs]:
            os.utime(Path(dirpath) / name, (t, t), follow_symlinks=False)
    os.utime(path, (t, t), follow_symlinks=False)


def by_kind(data: dict, kind: str) -> list[dict]:
    return [e for e in data["entries"] if e["kind"] == kind]


# --------------------------------------------------------------------------- list


def test_list_says_what_each_entry_is(built, tiny_gpt2_dir):
    data = listing(built)
    assert data["root"] == str(built) and data["exists"] and not data["unexpected"]
    kinds = sorted(e["kind"] for e in data["entries"])
    assert kinds == ["index", "model conversion", "score", "score", "warmup"]
    scores = by_kind(data, "score")
    assert all(e["rows"] == 8 for e in scores)  # pool_small's 8 rows, each scored once
    whats = sorted(e["what"] for e in scores)
    # the scorer, its parameters, and the model named from the cache's own file hashes (no model loaded)
    assert all(w.startswith("ifd(form=loss_ratio") and "max_length=128" in w for w in whats)
    plain = next(w for w in whats if "template=bare" in w)
    assert plain.endswith(f"using {cache_admin._folder_label(built, Path(tiny_gpt2_dir).resolve())}, fp32")
    warm = next(w for w in whats if "template=alpaca" in w)
    assert " using warmup " in warm and f"of {Path(tiny_gpt2_dir).name} (LoRA, 4 rows" in warm
    (warmup,) = by_kind(data, "warmup")
    assert warmup["entry"].startswith("artifacts/") and "LoRA, 4 rows" in warmup["what"]
    (conversion,) = by_kind(data, "model conversion")
    assert conversion["what"] == "m.gguf as safetensors" and conversion["size_bytes"] >= 1002
    (index,) = by_kind(data, "index")
    assert index["entry"] == "file-hashes.json" and "model files" in index["what"]
    for e in data["entries"]:
        assert e["size_bytes"] > 0 and e["size"] and 0 <= e["age_seconds"] < 3600
        assert e["last_used"].endswith("+00:00")
    assert data["totals"]["entries"] == 5
    assert data["totals"]["size_bytes"] == sum(e["size_bytes"] for e in data["entries"])
    assert data["totals"]["by_kind"]["score"]["entries"] == 2


def test_list_as_text_has_a_line_per_entry_and_totals(built, monkeypatch):
    monkeypatch.setenv("TAMIS_CACHE_DIR", str(built))  # the default root, as `tamis run` uses it
    res = runner.invoke(app, ["cache", "list"])
    assert res.exit_code == 0, res.output
    lines = res.output.splitlines()
    assert lines[0] == f"tamis cache at {built}"
    assert lines[1].split() == ["kind", "entry", "rows", "size", "last", "use", "what"]
    assert sum(line.startswith("score ") for line in lines) == 2
    assert any(line.startswith("warmup ") for line in lines)
    assert any(line.startswith("model conversion ") for line in lines)
    assert lines[-1].startswith("total: 5 entries, ") and "score 2: " in lines[-1]
    assert " ago)" in lines[2]


def test_list_of_a_missing_cache_says_so(tmp_path):
    res = runner.invoke(app, ["cache", "list", "--cache-dir", str(tmp_path / "none")])
    assert res.exit_code == 0 and "no tamis cache at" in res.output
    assert listing(tmp_path / "none")["entries"] == []


def test_a_conversion_no_run_would_use_is_marked(cache, tmp_path):
    gguf = tmp_path / "n.gguf"
    gguf.write_bytes(b"GGUF1")
    first = convert_gguf(cache, gguf)
    notes = {e["path"]: e["note"] for e in by_kind(listing(cache), "model conversion")}
    assert notes[str(first)] == "last use from file access time (to within a day)"
    gguf.write_bytes(b"GGUF2-edited")
    os.utime(gguf, ns=(10**18, 10**18))  # a different stamp whatever the clock's resolution
    second = convert_gguf(cache, gguf)
    assert second != first
    notes = {e["path"]: e["note"] for e in by_kind(listing(cache), "model conversion")}
    assert notes[str(first)].startswith("unused: its GGUF file has changed")
    assert notes[str(second)] == "last use from file access time (to within a day)"
    gguf.unlink()
    notes = {e["path"]: e["note"] for e in by_kind(listing(cache), "model conversion")}
    assert notes[str(first)] == notes[str(second)] == "unused: its GGUF file is gone"


def test_a_score_entry_of_an_earlier_cache_format_is_marked(cache):
    from tamis.runtime.cache import CACHE_FORMAT

    scores = by_kind(listing(cache), "score")
    assert all(not (e["note"] or "").startswith("unused") for e in scores)  # written by this version
    meta_file = Path(scores[0]["path"]) / "key.json"
    meta = json.loads(meta_file.read_text())
    assert meta["cache_format"] == CACHE_FORMAT and "cache_format" not in scores[0]["what"]
    del meta["cache_format"]  # as tamis-cache-v1 wrote it (blake2b row keys: no run looks them up)
    meta_file.write_text(json.dumps(meta))
    notes = {e["path"]: e["note"] for e in by_kind(listing(cache), "score")}
    assert notes[scores[0]["path"]] == f"unused: written in cache format tamis-cache-v1, this version reads {CACHE_FORMAT}"
    assert not (notes[scores[1]["path"]] or "").startswith("unused")


def test_loading_a_conversion_counts_as_a_use(cache):
    (conversion,) = by_kind(listing(cache), "model conversion")
    folder = Path(conversion["path"])
    age(folder, 40)
    old = time.time() - 40 * DAY
    for f in folder.iterdir():
        os.utime(f, (old, old))  # atime too
    assert by_kind(listing(cache), "model conversion")[0]["age_seconds"] > 39 * DAY
    now = time.time()
    os.utime(folder / "config.json", (now, old))  # what a load's read does to its access time
    assert by_kind(listing(cache), "model conversion")[0]["age_seconds"] < 600


def test_the_fingerprint_rule_matches_the_loaders():
    from tamis.runtime import models

    assert cache_admin._hash_parts("a|b", "", "fp32") == models._hash_parts("a|b", "", "fp32")
    assert set(cache_admin._DTYPES) <= set(models._DTYPE_NAMES.values())


def test_using_an_entry_records_its_last_use(cache):
    data = listing(cache)
    score = next(e for e in by_kind(data, "score"))
    (warmup,) = by_kind(data, "warmup")
    for e in (score, warmup):
        age(Path(e["path"]), 40)
    aged = {e["entry"]: e for e in listing(cache)["entries"]}
    assert aged[score["entry"]]["age_seconds"] > 39 * DAY and aged[warmup["entry"]]["age_seconds"] > 39 * DAY
    key = Path(score["path"]).name
    ScoreCache(cache).lookup(key, ["x"])  # what a resuming run does
    ArtifactCache(cache).exists(Path(warmup["path"]).name)  # what a warmup does before loading
    used = {e["entry"]: e for e in listing(cache)["entries"]}
    assert used[score["entry"]]["age_seconds"] < 600 and used[warmup["entry"]]["age_seconds"] < 600
    # and listing itself is not a use
    age(Path(score["path"]), 40)
    listing(cache)
    assert {e["entry"]: e for e in listing(cache)["entries"]}[score["entry"]]["age_seconds"] > 39 * DAY


# --------------------------------------------------------------------------- clean


def test_clean_older_than_removes_only_unused_entries(cache):
    before = listing(cache)
    keep = by_kind(before, "score")[0]
    for e in before["entries"]:
        if e["entry"] != keep["entry"]:
            age(Path(e["path"]), 40)
    res = runner.invoke(app, ["cache", "clean", "--cache-dir", str(cache), "--older-than", "30d"])
    assert res.exit_code == 0, res.output
    gone = [e for e in before["entries"] if e["entry"] != keep["entry"] and e["kind"] != "index"]
    freed = sum(e["size_bytes"] for e in gone)
    assert f"removed {len(gone)} entries" in res.output and f"({freed:,} bytes) freed" in res.output
    for e in gone:
        assert e["entry"][:20] in res.output and not Path(e["path"]).exists()
    after = listing(cache)
    assert sorted(e["entry"] for e in after["entries"]) == sorted([keep["entry"], "file-hashes.json"])
    # no trash left behind, and the kept entry still serves its rows
    assert not any(p.name == cache_admin.TRASH for p in cache.rglob("*"))
    pool = pl.read_ndjson(FIX / "pool_small.jsonl")
    assert ScoreCache(cache).lookup(Path(keep["path"]).name, row_content_hashes(pool)).height == 8


def test_clean_older_than_as_json(cache):
    for e in listing(cache)["entries"]:
        age(Path(e["path"]), 3)
    res = runner.invoke(app, ["cache", "clean", "--cache-dir", str(cache), "--older-than", "2d", "--json"])
    assert res.exit_code == 0, res.output
    data = json.loads(res.output)
    assert data["older_than_seconds"] == 2 * DAY and not data["dry_run"] and data["kept"] == 1  # file-hashes.json
    assert data["freed_bytes"] == sum(e["size_bytes"] for e in data["removed"]) > 0
    res = runner.invoke(app, ["cache", "clean", "--cache-dir", str(cache), "--older-than", "1w"])
    assert res.exit_code == 0 and "nothing to remove" in res.output


def test_dry_run_removes_nothing(cache):
    before = listing(cache)
    files = sorted(str(p) for p in cache.rglob("*"))
    res = runner.invoke(app, ["cache", "clean", "--cache-dir", str(cache), "--all", "--dry-run"])
    assert res.exit_code == 0, res.output
    assert f"would remove {len(before['entries'])} entries" in res.output and "freed" not in res.output
    assert sorted(str(p) for p in cache.rglob("*")) == files


def test_clean_all_removes_everything_tamis_stored(cache):
    total = listing(cache)["totals"]["size_bytes"]
    res = runner.invoke(app, ["cache", "clean", "--cache-dir", str(cache), "--all", "--json"])
    assert res.exit_code == 0, res.output
    data = json.loads(res.output)
    assert data["freed_bytes"] == total and len(data["removed"]) == 5
    assert "file-hashes.json" in [e["entry"] for e in data["removed"]]
    assert listing(cache)["entries"] == []
    assert not [p for p in cache.rglob("*") if p.is_file()]


@pytest.mark.parametrize("args, message", [
    (["--older-than", "30 days"], "cannot read '30 days' as a duration"),
    (["--older-than", "-1d"], "cannot read '-1d'"),
    (["--older-than", "3x"], "90m, 12h, 30d, 2w"),
    ([], "say what to remove: --older-than DURATION"),
    (["--all", "--older-than", "2d"], "not both"),
])
def test_bad_options_name_the_flag_and_the_forms(cache, args, message):
    files = sorted(str(p) for p in cache.rglob("*"))
    res = runner.invoke(app, ["cache", "clean", "--cache-dir", str(cache), *args])
    assert res.exit_code == 2
    assert message in " ".join(res.output.split()) and "--older-than" in res.output
    assert sorted(str(p) for p in cache.rglob("*")) == files


def test_parse_duration():
    assert cache_admin.parse_duration("90m") == 5400
    assert cache_admin.parse_duration("12h") == 12 * 3600
    assert cache_admin.parse_duration("30d") == 30 * DAY
    assert cache_admin.parse_duration("2w") == 14 * DAY
    assert cache_admin.parse_duration("1d12h") == 1.5 * DAY
    assert cache_admin.parse_duration("1.5h") == 5400
    for bad in ("", "30", "d", "30 x", "1d-2h"):
        with pytest.raises(cache_admin.CacheAdminError, match="--older-than: cannot read"):
            cache_admin.parse_duration(bad)


# --------------------------------------------------------------------------- refusals and odd states


def test_refuses_a_folder_that_is_not_a_tamis_cache(tmp_path):
    home = tmp_path / "home"  # what `--cache-dir ~` points at: a cache among other things
    (home / "Documents").mkdir(parents=True)
    (home / "Documents" / "thesis.tex").write_text("precious")
    (home / ".bashrc").write_text("alias x=y")
    (home / "models").mkdir()
    (home / "models" / "mine").mkdir()
    (home / "models" / "mine" / "weights.bin").write_text("precious too")
    res = runner.invoke(app, ["cache", "clean", "--cache-dir", str(home), "--all"])
    assert res.exit_code == 1
    assert "does not look like a tamis cache" in res.output and "Documents" in res.output
    assert "nothing was removed" in res.output
    assert (home / "Documents" / "thesis.tex").exists() and (home / "models" / "mine" / "weights.bin").exists()
    # listing is harmless, and says why clean would refuse
    res = runner.invoke(app, ["cache", "list", "--cache-dir", str(home)])
    assert res.exit_code == 0 and "tamis never writes" in res.output
    # only things tamis does not write, hidden ones included
    other = tmp_path / "other"
    other.mkdir()
    (other / ".config").write_text("x")
    res = runner.invoke(app, ["cache", "clean", "--cache-dir", str(other), "--older-than", "1d"])
    assert res.exit_code == 1 and "does not look like a tamis cache" in res.output and (other / ".config").exists()


def test_refuses_the_home_directory_itself(tmp_path, monkeypatch):
    home = tmp_path / "me"
    (home / "scores").mkdir(parents=True)  # even when it looks like a cache
    monkeypatch.setenv("HOME", str(home))
    res = runner.invoke(app, ["cache", "clean", "--cache-dir", "~", "--all"])
    assert res.exit_code == 1 and "your home directory" in res.output and (home / "scores").is_dir()


def test_a_cache_that_does_not_exist_has_nothing_to_clean(tmp_path):
    res = runner.invoke(app, ["cache", "clean", "--cache-dir", str(tmp_path / "nope"), "--all"])
    assert res.exit_code == 0 and "nothing to remove" in res.output
    assert not (tmp_path / "nope").exists()


def test_links_are_removed_never_followed(cache, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep.txt").write_text("not the cache's")
    (cache / "scores" / ("f" * 32)).symlink_to(outside, target_is_directory=True)
    data = listing(cache)
    link = next(e for e in data["entries"] if e["entry"] == "scores/" + "f" * 32)
    assert link["kind"] == "other" and link["size_bytes"] < 1000  # the link, not what it points at
    res = runner.invoke(app, ["cache", "clean", "--cache-dir", str(cache), "--all"])
    assert res.exit_code == 0, res.output
    assert not (cache / "scores" / ("f" * 32)).exists() and (outside / "keep.txt").read_text() == "not the cache's"


def test_half_removed_entries_are_never_read_and_are_cleaned_up(cache):
    """A clean killed between its rename and its delete leaves a hidden trash folder: no reader
    looks there, `list` shows it, and the next clean removes it whatever its age."""
    score = by_kind(listing(cache), "score")[0]
    key = Path(score["path"]).name
    trash = cache / "scores" / cache_admin.TRASH
    trash.mkdir()
    os.rename(score["path"], trash / f"{key}-dead")
    assert ScoreCache(cache).shards(key) == []  # the entry is simply gone: its rows are recomputed
    left = next(e for e in listing(cache)["entries"] if e["entry"] == f"scores/{cache_admin.TRASH}")
    assert left["kind"] == "other" and "interrupted" in left["what"]
    res = runner.invoke(app, ["cache", "clean", "--cache-dir", str(cache), "--older-than", "52w"])
    assert res.exit_code == 0, res.output
    assert not trash.exists() and len(by_kind(listing(cache), "score")) == 1


def test_a_build_in_progress_is_never_removed(cache):
    building = cache / "artifacts" / f".{'a' * 32}.tmp-{os.getpid()}-abcd1234"  # this process: alive
    building.mkdir()
    (building / "partial.safetensors").write_bytes(b"x" * 10)
    dead = cache / "artifacts" / f".{'b' * 32}.tmp-999999999-abcd1234"  # a killed build
    dead.mkdir()
    (dead / "partial.safetensors").write_bytes(b"x" * 10)
    entries = {e["entry"]: e for e in listing(cache)["entries"]}
    assert entries[f"artifacts/{building.name}"]["busy"] and not entries[f"artifacts/{dead.name}"]["busy"]
    res = runner.invoke(app, ["cache", "clean", "--cache-dir", str(cache), "--all"])
    assert res.exit_code == 0, res.output
    assert building.is_dir() and not dead.exists()
