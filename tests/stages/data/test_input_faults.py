"""Bad input in every format: one clear line naming file/line/field and the fix, and nothing half-written.

Each case builds a source (a file under ``tmp_path`` or a DataFrame) and expects either a ``DataError`` whose one
line matches a pattern, or a dataset with the stated counts (BOMs, huge or missing fields, odd dtypes must just work
or be counted as drops, never learned as "nan")."""

import json
import re

import pytest

from llmops_jupyter.core.errors import DataError, LlmopsError
from llmops_jupyter.core.runner import Runner
from llmops_jupyter.stages.data.format import load_dataset

GOOD = [{"question": f"What is {a} plus {b}?", "answer": str(a + b)} for a in range(1, 4) for b in range(1, 4)]


def jsonl_text(rows):
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


def csv_text(rows):
    return "question,answer\n" + "".join(f"{r['question']},{r['answer']}\n" for r in rows)


def write(name, data):
    def build(tmp):
        path = tmp / name
        path.write_bytes(data if isinstance(data, bytes) else data.encode())
        return str(path)

    return build


def latin1(text):  # a file saved by a tool that does not speak UTF-8
    return text.encode("latin-1")


def parquet(frame, cut=None):
    def build(tmp):
        import pandas as pd

        path = tmp / "d.parquet"
        pd.DataFrame(frame() if callable(frame) else frame).to_parquet(path)
        if cut:
            path.write_bytes(path.read_bytes()[:cut])
        return str(path)

    return build


def frame(make):
    def build(tmp):
        import pandas as pd

        return make(pd)

    return build


CAFE = GOOD[:2] + [{"question": "Translate café", "answer": "coffee"}] + GOOD[2:]


def bad_byte(data):
    """Line, byte offset and column of the first 0xe9 (latin-1 é) in ``data``, as the message should name them."""
    at = data.index(b"\xe9")
    return data.count(b"\n", 0, at) + 1, at, at - data.rfind(b"\n", 0, at)


JSONL_AT = bad_byte(latin1(jsonl_text(CAFE)))
JSON_AT = bad_byte(latin1(json.dumps(CAFE, indent=1, ensure_ascii=False)))
CSV_AT = bad_byte(latin1(csv_text(CAFE)))


def not_utf8(name, at):
    line, offset, col = at
    return (rf"{re.escape(name)}: line {line} is not valid UTF-8: byte 0xe9 at byte offset {offset} \(column {col}\)"
            r"\. Fix: re-save it as UTF-8 ")
HUGE = GOOD + [{"question": "Repeat x", "answer": "x" * 200_000}]

# (id, build(tmp_path) -> source, expected): expected is a regex for the DataError line, or a dict of checks
CASES = [
    # JSONL
    ("jsonl-latin1", write("d.jsonl", latin1(jsonl_text(CAFE))),
     not_utf8("d.jsonl", JSONL_AT) + r"\(e\.g\. `iconv -f latin1 -t utf-8 d\.jsonl > fixed\.jsonl`\)"),
    ("jsonl-utf16", write("d.jsonl", jsonl_text(GOOD).encode("utf-16")),
     r"d\.jsonl: the file is UTF-16-encoded \(byte-order mark at byte 0\), not UTF-8\. Fix: re-save it as UTF-8 "
     r"\(e\.g\. `iconv -f utf-16"),
    ("jsonl-utf16-no-bom", write("d.jsonl", jsonl_text(GOOD).encode("utf-16-le")),
     r"d\.jsonl: line 1 has a NUL byte at byte offset 1 \(column 2\); the file looks UTF-16-encoded, not UTF-8\. "
     r"Fix: re-save it as UTF-8 \(e\.g\. `iconv -f utf-16le"),
    ("jsonl-utf8-bom", write("d.jsonl", b"\xef\xbb\xbf" + jsonl_text(GOOD).encode()), {"examples": 9}),
    ("jsonl-truncated", write("d.jsonl", jsonl_text(GOOD)[:-20]),
     r"d\.jsonl: line 9 is not valid JSON \(.*\) \(the file may be truncated\)\. Fix: fix or delete that line"),
    ("jsonl-empty", write("d.jsonl", ""), r"Data source '.*d\.jsonl' has no examples\."),
    ("jsonl-blank-lines-only", write("d.jsonl", "\n \n"), r"has no examples"),
    ("jsonl-not-an-object", write("d.jsonl", jsonl_text(GOOD[:1]) + "[1, 2]\n"),
     r"d\.jsonl: line 2 is a list, not an object\. Fix: each record must be a JSON object"),
    ("jsonl-missing-columns", write("d.jsonl", jsonl_text([{"q": "a", "a": "b"}])),
     r"d\.jsonl: Missing instruction and response column\(s\); found columns: a, q\. Fix: map them with --columns"),
    ("jsonl-field-missing-in-one-row", write("d.jsonl", jsonl_text(GOOD + [{"question": "no answer"}])),
     {"examples": 9, "dropped": {"empty text": 1}}),
    ("jsonl-huge-field", write("d.jsonl", jsonl_text(HUGE)), {"examples": 9, "dropped": {"longer than 20000 chars": 1}}),
    ("jsonl-only-huge", write("d.jsonl", jsonl_text(HUGE[-1:])),
     r"No examples left after cleaning '.*d\.jsonl' \(dropped — longer than 20000 chars: 1\)\. Fix: relax"),
    ("jsonl-line-separator-in-text", write("d.jsonl", jsonl_text(GOOD + [{"question": "a\u2028b", "answer": "c"}])),
     {"examples": 10}),
    # JSON
    ("json-latin1", write("d.json", latin1(json.dumps(CAFE, indent=1, ensure_ascii=False))),
     not_utf8("d.json", JSON_AT)),
    ("json-utf16", write("d.json", json.dumps(GOOD).encode("utf-16")), r"d\.json: the file is UTF-16-encoded"),
    ("json-utf8-bom", write("d.json", b"\xef\xbb\xbf" + json.dumps(GOOD, indent=1).encode()), {"examples": 9}),
    ("json-truncated", write("d.json", json.dumps(GOOD, indent=1)[:-30]),
     r"d\.json: line \d+ is not valid JSON \(.*\) \(the file may be truncated\)\. Fix: fix the JSON"),
    ("json-empty", write("d.json", ""), r"has no examples"),
    ("json-object-not-list", write("d.json", json.dumps({"rows": GOOD})),
     r"d\.json: expected a list of objects, found a dict\. Fix: write a JSON array"),
    ("json-record-not-object", write("d.json", json.dumps(GOOD[:2] + ["x"])),
     r"d\.json: record 3 is a str, not an object"),
    # CSV
    ("csv-latin1", write("d.csv", latin1(csv_text(CAFE))),
     not_utf8("d.csv", CSV_AT) + r".*pandas: encoding='latin-1'"),
    ("csv-utf16", write("d.csv", csv_text(GOOD).encode("utf-16")), r"d\.csv: the file is UTF-16-encoded"),
    ("csv-utf8-bom", write("d.csv", b"\xef\xbb\xbf" + csv_text(GOOD).encode()), {"examples": 9}),
    ("csv-truncated-in-quotes", write("d.csv", csv_text(GOOD) + '"What is 9 plus'),
     r"d\.csv: cannot parse as CSV \(.*EOF inside string.*\)\. Fix: check quoting and the delimiter"),
    ("csv-ragged-row", write("d.csv", csv_text(GOOD) + "a,b,c\n"),
     r"d\.csv: cannot parse as CSV \(Error tokenizing data.*\)\. Fix: check quoting"),
    ("csv-missing-column", write("d.csv", "question,reply\nq,a\n"),
     r"d\.csv: Missing response column\(s\); found columns: question, reply\."),
    ("csv-empty", write("d.csv", ""), r"has no examples"),
    ("csv-header-only", write("d.csv", "question,answer\n"), r"has no examples"),
    ("csv-empty-cells", write("d.csv", csv_text(GOOD) + ",\nq,\n"), {"examples": 9, "dropped": {"empty text": 2}}),
    # Parquet
    ("parquet-truncated", parquet(GOOD, cut=200), r"d\.parquet: cannot read Parquet \(.*\)\. Fix: re-export the file"),
    ("parquet-not-parquet", write("d.parquet", "question,answer\n"), r"d\.parquet: cannot read Parquet"),
    ("parquet-missing-column", parquet([{"question": "q", "reply": "a"}]), r"d\.parquet: Missing response column"),
    ("parquet-int-and-bytes", parquet([{"question": r["question"].encode(), "answer": int(r["answer"])}
                                       for r in GOOD]), {"examples": 9, "answers": {"2", "3", "4", "5", "6"}}),
    ("parquet-nested-column", parquet([{"question": "q", "answer": {"text": "a"}}]),
     r"row 1: column 'answer' holds a dict, not text\. Fix: map a text column with --columns"),
    # DataFrames with odd dtypes
    ("df-nan-and-none", frame(lambda pd: pd.DataFrame(GOOD + [{"question": "q1", "answer": float("nan")},
                                                             {"question": None, "answer": "a"}])),
     {"examples": 9, "dropped": {"empty text": 2}, "no_nan": True}),
    ("df-int-answers-with-gap", frame(lambda pd: pd.DataFrame(
        {"question": [r["question"] for r in GOOD] + ["q"], "answer": [int(r["answer"]) for r in GOOD] + [None]})),
     {"examples": 9, "dropped": {"empty text": 1}, "answers": {"2", "3", "4", "5", "6"}}),
    ("df-nullable-and-categorical", frame(lambda pd: pd.DataFrame(
        {"question": pd.array([r["question"] for r in GOOD] + ["q"], dtype="string"),
         "answer": pd.Categorical([r["answer"] for r in GOOD] + [None])})),
     {"examples": 9, "dropped": {"empty text": 1}, "no_nan": True}),
    ("df-non-string-column-names", frame(lambda pd: pd.DataFrame(GOOD).assign(**{"0": 1}).rename(columns={"0": 0})),
     {"examples": 9}),
    ("df-list-cells", frame(lambda pd: pd.DataFrame(GOOD[:2] + [{"question": "q", "answer": ["a", "b"]}])),
     r"DataFrame: row 2: column 'answer' holds a list, not text\. Fix: map a text column with --columns "
     r"<role>=<column>, or convert it first \(e\.g\. df\['answer'\] = df\['answer'\]\.astype\(str\)\)"),
    ("df-all-answers-missing", frame(lambda pd: pd.DataFrame({"question": ["a", "b"], "answer": [None, None]})),
     r"No examples left after cleaning 'DataFrame' \(dropped — empty text: 2\)"),
    ("df-missing-columns", frame(lambda pd: pd.DataFrame({"text": ["a"]})),
     r"DataFrame: Missing instruction and response column\(s\); found columns: text\."),
    ("df-empty", frame(lambda pd: pd.DataFrame({"question": [], "answer": []})), r"has no examples"),
]


def nothing_half_written(registry):
    assert list(registry.tmp_dir.iterdir()) == []
    assert [a for a in registry.list_artifacts() if a.kind == "dataset"] == []


@pytest.mark.parametrize("build,expected", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_one_clear_line_and_leaves_nothing(registry, tmp_path, build, expected):
    source = build(tmp_path)
    if isinstance(expected, str):
        with pytest.raises(DataError) as info:
            Runner(registry).run("data", source=source)
        err = info.value
        assert isinstance(err, LlmopsError) and re.search(expected, str(err)), str(err)
        assert "\n" not in str(err) and " Fix: " in str(err)
        assert err._render_traceback_() == [f"\x1b[0;31mDataError\x1b[0m: {err}"]  # what the notebook shows
        assert err.__cause__ is None and (err.__context__ is None or err.__suppress_context__)  # nothing chained
        nothing_half_written(registry)
        assert registry.list_runs()[0]["status"] == "failed"
        return
    res = Runner(registry).run("data", source=source, eval_fraction=0.0)
    ds = load_dataset(res.run_id, registry)
    assert res.metrics["examples"] == expected["examples"]
    assert ds.manifest["dropped"] == expected.get("dropped", {})
    texts = [m["content"] for e in ds.train for m in e["messages"]]
    if "answers" in expected:
        assert {e["messages"][-1]["content"] for e in ds.train} == expected["answers"]
    if expected.get("no_nan"):
        assert not {"nan", "None", "<NA>", "NaN"} & set(texts)
    assert all("\ufeff" not in t for t in texts)  # a BOM never leaks into the first column name or text


def test_the_notebook_shows_one_line_not_a_traceback(shell, tmp_path, registry, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(latin1(jsonl_text(CAFE)))
    result = shell.run_cell(f"%llmops data '{bad}'")
    assert isinstance(result.error_in_exec, DataError)
    out = [ln for ln in capsys.readouterr().out.splitlines() if ln.strip()]
    assert out == [f"\x1b[0;31mDataError\x1b[0m: {result.error_in_exec}"]
    assert "bad.jsonl: line 3 is not valid UTF-8" in out[0] and "Traceback" not in out[0]
    nothing_half_written(registry)


def test_a_bad_file_in_a_folder_names_that_file(registry, tmp_path):
    folder = tmp_path / "parts"
    folder.mkdir()
    (folder / "a.jsonl").write_text(jsonl_text(GOOD))
    (folder / "b.jsonl").write_bytes(latin1(jsonl_text(CAFE)))
    with pytest.raises(DataError, match=r"parts/b\.jsonl: line 3 is not valid UTF-8"):
        Runner(registry).run("data", source=str(folder))
    nothing_half_written(registry)

