"""InsTag end to end: `score tags` with a local tagger (a tiny GPT-2 trained in this session on the
Vicuna format, as the released InsTagger), `normalize tags`, `diverse complexity_first` — in a recipe
run, checked against what the tagger was trained to say and a direct complexity-first loop."""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl

from conftest import POOL_SMALL, TAGGER_TAGS, tagger_reply
from tamis.dsl.compile import compile_text
from tamis.runtime.executor import LocalExecutor, RunConfig

RECIPE = """
model tagger = api("gpt-4")
score tags using tagger with max_tokens=64
| normalize tags with min_freq=1, lower=true, stem=true
| diverse complexity_first(budget=4, tags="tags")
"""


def _direct_complexity_first(tags: list[list[str] | None], budget: int) -> list[int]:
    order = sorted(range(len(tags)), key=lambda i: -len(tags[i] or []))
    picked: list[int] = []
    while len(picked) < budget:
        covered: set[str] = set()
        added = False
        for i in order:
            if i in picked or not tags[i]:
                continue
            if set(tags[i]) - covered:
                picked.append(i)
                covered |= set(tags[i])
                added = True
                if len(picked) == budget:
                    break
        if not added:
            break
    return picked


def test_instag_recipe_tags_normalises_and_samples(tiny_tagger, tmp_path):
    cfg = RunConfig(pool=str(POOL_SMALL), model_paths={"gpt-4": tiny_tagger}, dtype="fp32",
                    cache_dir=str(tmp_path / "cache"), progress=False)
    ex = LocalExecutor(compile_text(RECIPE).graph, cfg)
    res = ex.run()
    rows = [json.loads(line) for line in Path(POOL_SMALL).read_text().splitlines()]
    # the tags the tagger was trained to write, read from fenced JSON, prose around it, or a bare list;
    # the row with no JSON has no tags and says why
    raw = dict(zip(res.scores["id"].to_list(), res.scores["tags"].to_list()))
    said = dict(zip(res.scores["id"].to_list(), res.scores["tags_said"].to_list()))
    exact = [i for i, row in enumerate(rows) if said[row["id"]] == tagger_reply(i)]
    assert len(exact) >= 6, [said[r["id"]] for r in rows]  # the tiny tagger learnt (nearly) every reply
    for i in exact:
        assert raw[rows[i]["id"]] == (TAGGER_TAGS[i] if TAGGER_TAGS[i] else None), (i, said[rows[i]["id"]])
    reasons = dict(zip(res.scores["id"].to_list(), res.scores["tags_reason"].to_list()))
    no_tags = [r["id"] for r in rows if raw[r["id"]] is None]
    assert all(reasons[i].startswith("tagger's reply holds no tags") for i in no_tags)
    assert all(reasons[r["id"]] is None for r in rows if raw[r["id"]] is not None)
    tag_stage = next(s for s in res.stages if s.label.startswith("score tags"))
    assert sum(tag_stage.skipped.values()) == len(no_tags) >= (1 if 6 in exact else 0)
    # normalisation: lower-case and stemmed ("French" -> "french"), counts raw -> normalised
    norm = next(s for s in res.stages if s.label.startswith("normalize"))
    assert norm.tag_counts["raw"] == len({t for tags in raw.values() if tags for t in tags})
    frame = ex._frames[next(n for n in ex._order if ex.g.nodes[n]["op"] == "normalize")]
    normalised = frame["tags"].to_list()
    from tamis.runtime.instag import normalise_tags

    direct = normalise_tags([raw[r["id"]] for r in rows], min_freq=1, lower=True, stem=True)
    assert normalised == direct.rows  # each group named by its most frequent spelling
    assert norm.tag_counts == direct.counts
    # complexity-first over the normalised tags, as a direct loop picks
    want = _direct_complexity_first(normalised, 4)
    assert res.selected["id"].to_list() == [frame["id"][i] for i in want]
    # run again: every tag comes from the cache
    again = LocalExecutor(compile_text(RECIPE).graph, cfg).run()
    assert next(s for s in again.stages if s.label.startswith("score tags")).cached_rows == len(rows)
    assert again.selected["id"].to_list() == res.selected["id"].to_list()
    assert isinstance(res.selected, pl.DataFrame)
