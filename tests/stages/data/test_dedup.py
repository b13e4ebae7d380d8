"""Data is never thinned silently: only exact duplicates go by default; near duplicates are opt-in and shown."""

import itertools
import json

import pytest
from IPython.core.error import UsageError

from llmops_jupyter.core.errors import ConfigError
from llmops_jupyter.core.runner import Runner
from llmops_jupyter.stages.data.format import DROPPED_FILE, dropped_table, load_dataset

CAPITALS = [("France", "Paris"), ("Japan", "Tokyo"), ("Italy", "Rome"), ("Spain", "Madrid"), ("Egypt", "Cairo"),
            ("Kenya", "Nairobi"), ("Peru", "Lima"), ("Chile", "Santiago"), ("Canada", "Ottawa"), ("Norway", "Oslo")]
SUMS = list(itertools.product(range(1, 30), range(1, 30)))  # distinct (a, b) pairs


def contact_frame():
    """The issue's DataFrame: 300 sum questions with an e-mail each (20 repeat an earlier question with another
    address, so they are identical once the e-mail is scrubbed) and 10 capitals."""
    import pandas as pd

    rows = [{"question": f"What is {a} plus {b}? Contact me at user{k}@example.com", "answer": str(a + b)}
            for k, (a, b) in enumerate(SUMS[:280])]
    rows += [{"question": f"What is {a} plus {b}? Contact me at user{1000 + k}@example.com", "answer": str(a + b)}
             for k, (a, b) in enumerate(SUMS[:20])]
    rows += [{"question": f"What is the capital of {c}?", "answer": x} for c, x in CAPITALS]
    return pd.DataFrame(rows)


def clean_sums(n=320):
    return [{"question": f"What is {a} plus {b}?", "answer": str(a + b)} for a, b in SUMS[:n]]


def test_default_drops_only_exact_duplicates_and_records_them(registry):
    df = contact_frame()
    assert len(df) == 310
    res = Runner(registry).run("data", source=df)
    assert res.metrics["examples"] == 290  # was 176: 114 distinct sums dropped as "near duplicates"
    ds = load_dataset(res.run_id, registry)
    assert ds.manifest["dropped"] == {"exact duplicate": 20}
    assert ds.manifest["near_dup"] is None
    # every drop is stored with what it matched, PII scrubbed like the kept examples
    assert len(ds.dropped) == 20
    first = ds.dropped[0]
    assert first["reason"] == "exact duplicate" and first["where"] == "row 280" and first["similarity"] == 1.0
    assert first["matched"]["where"] == "row 0" and first["matched"]["messages"] == first["messages"]
    assert first["messages"][0]["content"] == "What is 1 plus 1? Contact me at [EMAIL]"
    assert "@example.com" not in (ds.path / DROPPED_FILE).read_text()
    kept_ids = {e["id"] for e in ds.train + ds.eval}
    assert {d["matched"]["id"] for d in ds.dropped} <= kept_ids
    # the run's summary and report point at the stored list
    assert res.summary["dropped_examples"] == str(ds.path / DROPPED_FILE)
    assert res.summary["dropped"] == {"exact duplicate": 20}
    report = str(res.outputs["report"])
    assert "dropped: exact duplicate" in report and str(ds.path / DROPPED_FILE) in report
    assert "near duplicates                kept (exact duplicates only; --near-dup THRESHOLD" in report


def test_distinct_short_prompts_are_all_kept(registry):
    res = Runner(registry).run("data", source=clean_sums(320))
    assert res.metrics["examples"] == 320 and res.metrics["dropped"] == 0  # was 306
    assert load_dataset(res.run_id, registry).dropped == []


def test_near_dup_is_opt_in_and_lists_dropped_beside_matched(shell, registry):
    shell.user_ns["sums"] = clean_sums(60)
    # At 0.85 nothing goes: LSH only proposes, the exact 5-gram Jaccard (at most 0.72 here) decides.
    res = shell.run_line_magic("llmops", "data $sums --near-dup 0.85")
    assert res.metrics["examples"] == 60 and res.params["near_dup"] == 0.85
    # At 0.6 the one-digit variants go, and each is listed beside the example it matched.
    res = shell.run_line_magic("llmops", "data $sums --near-dup 0.6")
    ds = load_dataset(res.run_id, registry)
    n = ds.manifest["dropped"]["near duplicate"]
    assert n > 0 and res.metrics["examples"] == 60 - n and ds.manifest["near_dup"] == 0.6
    near = [d for d in ds.dropped if d["reason"] == "near duplicate"]
    assert len(near) == n
    for d in near:
        assert d["similarity"] >= 0.6 and d["matched"]["messages"] != d["messages"]
        assert d["matched"]["id"] in {e["id"] for e in ds.train + ds.eval}
    d = near[0]
    report = str(res.outputs["report"])
    assert f"Dropped examples ({n})" in report and "similarity" in report
    assert d["messages"][0]["content"] in report and d["matched"]["messages"][0]["content"] in report
    assert "removed at similarity >= 0.6" in report
    assert "Dropped examples" in res.outputs["report"]._repr_html_()
    # what `%llmops show data@…` can list: the stored file, beside its matches
    table = dropped_table(ds.path, limit=None)
    assert len(dropped_table(ds.path)) == 50 and "6 more in" in dropped_table(ds.path).note
    assert len(table) == n and table.columns[:4] == ["dropped", "reason", "example", "matched"]
    assert str(ds.path / DROPPED_FILE) in res.summary["dropped_examples"]


def test_no_near_dup_is_a_deprecated_no_op(shell, registry):
    shell.user_ns["sums"] = clean_sums(40)
    default = shell.run_line_magic("llmops", "data $sums")
    old = shell.run_line_magic("llmops", "data $sums --no-near-dup --eval-size 4")  # as the example notebooks write it
    assert old.status in ("finished", "cached") and old.params["near_dup"] is None
    assert old.metrics["examples"] == default.metrics["examples"] == 40
    assert Runner(registry).run("data", source=clean_sums(40), near_dup=False).metrics["examples"] == 40
    with pytest.raises(UsageError, match=r"--no-near-dup takes no value \(it is deprecated: near-duplicate removal "
                                         r"is off by default\)"):
        shell.run_line_magic("llmops", "data --no-near-dup $sums")
    with pytest.raises(UsageError, match="--near-dup needs a THRESHOLD between 0.5 and 1.0, e.g. --near-dup 0.9"):
        shell.run_line_magic("llmops", "data $sums --near-dup")
    with pytest.raises(UsageError, match=r"--near-dup must be >= 0.5 and <= 1.0 \(got 0.3\)"):
        shell.run_line_magic("llmops", "data $sums --near-dup 0.3")
    with pytest.raises(ConfigError, match="--near-dup takes a similarity THRESHOLD now, not true.*--near-dup 0.9"):
        Runner(registry).run("data", source=clean_sums(4), near_dup=True)


def test_help_documents_the_dedup_flags(shell, capsys):
    shell.run_line_magic("llmops", "data --help")
    out = " ".join(capsys.readouterr().out.split())
    assert "--near-dup [THRESHOLD], --no-near-dup [THRESHOLD]" in out
    assert "opt-in: also remove near duplicates" in out and "--no-near-dup is deprecated and does nothing" in out
    assert "remove exact duplicates: examples whose every turn is identical" in out


def test_dropped_jsonl_records_every_reason_and_not_the_version(registry):
    rows = clean_sums(6) + [{"question": "", "answer": "x"}, clean_sums(1)[0],
                            {"question": "Mail a@b.example.com please", "answer": ""}]
    res = Runner(registry).run("data", source=rows, eval_size=1)
    ds = load_dataset(res.run_id, registry)
    assert [(d["where"], d["reason"]) for d in ds.dropped] == [("row 6", "empty text"), ("row 7", "exact duplicate"),
                                                               ("row 8", "empty text")]
    assert "a@b.example.com" not in json.dumps(ds.dropped)  # scrubbed although dropped before scrubbing
    same = Runner(registry).run("data", source=clean_sums(6), eval_size=1)
    assert same.summary["version"] == res.summary["version"]  # the dropped list is not part of the version
