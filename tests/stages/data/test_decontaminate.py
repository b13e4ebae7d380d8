"""The eval split holds no near-copies of training examples: a held-out score must not reward memorising them."""

import itertools

import pytest
from IPython.core.error import UsageError

from llmops_jupyter.core.errors import ConfigError, DataError
from llmops_jupyter.core.runner import Runner
from llmops_jupyter.stages.data.format import dropped_table, load_dataset
from llmops_jupyter.stages.data.stage import EVAL_NEAR_COPY, _norm, _shingles, near_copies

SUMS = list(itertools.product(range(1, 30), range(1, 30)))
NOTES = [
    "The quarterly meeting was moved to Tuesday because the large conference room was booked by finance.",
    "Our delivery van broke down near the bridge, so the furniture will arrive on Friday afternoon instead.",
    "The library extends its opening hours during exam weeks and closes at midnight from Monday to Thursday.",
    "After the storm the ferry service to the island was suspended until the harbour inspection is complete.",
    "The new printer on the third floor only accepts jobs sent from laptops connected to the office network.",
    "Volunteers planted two hundred oak saplings along the river path on the first weekend of the spring.",
    "The bakery on the corner now opens at six in the morning and sells rye bread only on Saturdays.",
    "The museum's dinosaur exhibition closes in March while the skeletons are cleaned and moved upstairs.",
    "Parking behind the town hall will be free on Sundays starting next month, the council announced.",
    "The cycling club changed its Thursday evening ride to a shorter route because of the road works.",
    "Students must hand in the chemistry lab reports by email before noon on the last day of the term.",
    "The swimming pool reopens after repairs to the roof, with early lanes reserved for club members.",
]


def sums(n: int) -> list[dict[str, str]]:
    return [{"question": f"What is {a} plus {b}?", "answer": str(a + b)} for a, b in SUMS[:n]]


def contaminated() -> list[dict[str, str]]:
    """Distinct short sums, plus each summary task twice: once as written and once with a trailing space before
    the final full stop and the answer's capital dropped (a scraped near-copy, Jaccard ≈ 0.95)."""
    rows = sums(40)
    for note in NOTES:
        summary = note.split(",")[0].split(" because")[0].rstrip(".") + "."
        rows.append({"question": f"Summarize in one sentence: {note}", "answer": summary})
        rows.append({"question": f"Summarize in one sentence: {note[:-1]} .", "answer": summary[0].lower() + summary[1:]})
    return rows


def jaccard(a: dict, b: dict) -> float:
    sa, sb = _shingles(_norm(a["messages"])), _shingles(_norm(b["messages"]))
    return len(sa & sb) / len(sa | sb)


def max_similarity_to_train(ds) -> float:
    return max(jaccard(e, t) for e in ds.eval for t in ds.train)


def test_eval_near_copies_of_train_are_removed_and_listed(registry):
    res = Runner(registry).run("data", source=contaminated(), eval_fraction=0.5)
    ds = load_dataset(res.run_id, registry)
    assert ds.manifest["decontaminate"] == 0.9 and res.params["decontaminate"] == 0.9  # on by default
    removed = [d for d in ds.dropped if d["reason"] == EVAL_NEAR_COPY]
    n = len(removed)
    assert n >= 2 and ds.manifest["dropped"] == {EVAL_NEAR_COPY: n}
    assert max_similarity_to_train(ds) < 0.9
    train_ids, eval_ids = {e["id"] for e in ds.train}, {e["id"] for e in ds.eval}
    for d in removed:
        assert d["similarity"] >= 0.9 and d["matched"]["id"] in train_ids and d["matched"]["where"].startswith("row ")
        assert d["messages"] != d["matched"]["messages"]
        assert d["messages"][0]["content"].startswith("Summarize in one sentence:")
    assert res.metrics["eval"] == len(ds.eval) and res.metrics["examples"] == len(ds.train) + len(ds.eval)
    assert ds.manifest["counts"]["kept"] == len(ds.train) + len(ds.eval) == len(contaminated()) - n
    # the report counts them and shows each beside the training example it matched
    report = str(res.outputs["report"])
    assert f"dropped: {EVAL_NEAR_COPY}" in report
    assert f"eval examples at similarity >= 0.9 to a train example removed ({n})" in report
    assert f"Dropped examples ({n})" in report and removed[0]["matched"]["where"] in report
    assert EVAL_NEAR_COPY in res.outputs["report"]._repr_html_()
    assert len(dropped_table(ds.path, reasons=(EVAL_NEAR_COPY,), limit=None)) == n

    # off: the same split as drawn, with the near-copies in it
    off = Runner(registry).run("data", source=contaminated(), eval_fraction=0.5, decontaminate=False)
    raw = load_dataset(off.run_id, registry)
    assert raw.manifest["decontaminate"] is None and raw.dropped == [] and len(raw.eval) == len(ds.eval) + n
    assert {e["id"] for e in raw.eval} - eval_ids == {d_id for d_id in (_id(d) for d in removed)}
    assert max_similarity_to_train(raw) >= 0.9
    assert "eval decontamination" in str(off.outputs["report"]) and "off (--no-decontaminate)" in str(
        off.outputs["report"])


def _id(dropped: dict) -> str:
    from llmops_jupyter.stages.data.format import example_id

    return example_id(dropped["messages"])


def test_short_prompts_that_differ_in_a_number_are_not_near_copies():
    a = [{"role": "user", "content": "What is 12 plus 7?"}, {"role": "assistant", "content": "19"}]
    b = [{"role": "user", "content": "What is 12 plus 8?"}, {"role": "assistant", "content": "20"}]
    assert jaccard({"messages": a}, {"messages": b}) == pytest.approx(0.641, abs=1e-3)
    assert near_copies([_norm(a)], [_norm(b)], 0.9) == {}
    assert near_copies([_norm(a)], [_norm(b), _norm(a)], 0.9) == {0: (1, 1.0)}  # an exact copy is one


def test_distinct_sums_keep_their_eval_split(registry):
    res = Runner(registry).run("data", source=sums(320), eval_fraction=0.5)
    ds = load_dataset(res.run_id, registry)
    assert res.metrics["dropped"] == 0 and len(ds.eval) == 160 and ds.dropped == []


def test_demo_dataset_eval_split_has_no_near_copies(registry, tiny_model):
    """The data stage as notebook 02 calls it on the shipped demo set: one held-out review ("I found the coffee
    terrible from start to finish.") is a synonym swap of a training one ("… horrible …", Jaccard 0.91) and goes;
    the closest left is 0.88 (two extraction tasks whose names differ in one letter)."""
    from llmops_jupyter.demo_data import shipped_path

    res = Runner(registry).run("data", source=str(shipped_path()), tokenizer=str(tiny_model), eval_size=60,
                               name="demo-instructions")
    ds = load_dataset(res.run_id, registry)
    removed = [d for d in ds.dropped if d["reason"] == EVAL_NEAR_COPY]
    assert len(removed) == 1 and len(ds.eval) == 59 and len(ds.train) == 340
    assert "terrible" in removed[0]["messages"][0]["content"]
    assert "horrible" in removed[0]["matched"]["messages"][0]["content"]
    assert max_similarity_to_train(ds) < 0.9


def test_decontaminate_flags(shell, registry, capsys):
    shell.user_ns["rows"] = contaminated()
    assert shell.run_line_magic("llmops", "data $rows --eval-fraction 0.5").params["decontaminate"] == 0.9
    assert shell.run_line_magic("llmops", "data $rows --no-decontaminate").params["decontaminate"] is None
    assert shell.run_line_magic("llmops", "data $rows --decontaminate 0.8").params["decontaminate"] == 0.8
    assert shell.run_line_magic("llmops", "data $rows --decontaminate").params["decontaminate"] == 0.9
    with pytest.raises(UsageError, match=r"--decontaminate must be >= 0.5 and <= 1.0 \(got 0.2\)"):
        shell.run_line_magic("llmops", "data $rows --decontaminate 0.2")
    with pytest.raises(UsageError, match="--no-decontaminate takes no value"):
        shell.run_line_magic("llmops", "data --no-decontaminate $rows")
    assert Runner(registry).run("data", source=sums(20), decontaminate=True).params["decontaminate"] == 0.9
    with pytest.raises(ConfigError, match="--decontaminate must be >= 0.5"):
        Runner(registry).run("data", source=sums(20), decontaminate=0.1)
    shell.run_line_magic("llmops", "data --help")
    out = " ".join(capsys.readouterr().out.split())
    assert "--decontaminate [THRESHOLD], --no-decontaminate [THRESHOLD]" in out
    assert "remove from the eval split every example whose character-5-gram Jaccard similarity" in out
    assert "(default: 0.9)" in out


def test_an_eval_split_of_only_near_copies_is_refused(registry):
    rows = [{"question": f"Summarize in one sentence: {NOTES[0][:-1]}{end}", "answer": "Meeting moved."}
            for end in (".", "!", "?", "!!")]
    with pytest.raises(DataError, match="Every held-out example .* is a near-copy of a training example"):
        Runner(registry).run("data", source=rows, eval_size=1)
    assert Runner(registry).run("data", source=rows, eval_size=1, decontaminate=None).metrics["eval"] == 1
