"""The data stage: formats, validation errors, cleaning, PII, templating, deterministic versioned splits."""

import json

import pytest

from llmops_jupyter.core.errors import ConfigError, DataError
from llmops_jupyter.core.runner import Runner
from llmops_jupyter.stages.data.format import load_dataset
from llmops_jupyter.testing import tiny_records


def write_jsonl(path, rows):
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def run_data(registry, **params):
    return Runner(registry).run("data", **params)


def nothing_half_written(registry):
    assert list(registry.tmp_dir.iterdir()) == []
    assert [a for a in registry.list_artifacts() if a.kind == "dataset"] == []


def test_jsonl_with_tokenizer_template_split_and_version(registry, tmp_path, tiny_model):
    src = write_jsonl(tmp_path / "d.jsonl", tiny_records(40))
    res = run_data(registry, source=str(src), tokenizer=str(tiny_model), eval_fraction=0.25, seed=3)
    ds = load_dataset(res.run_id, registry)
    assert len(ds.eval) == round(res.metrics["examples"] * 0.25)
    assert len(ds.train) + len(ds.eval) == res.metrics["examples"]
    ex = ds.train[0]
    assert ex["prompt"].startswith("<|im_start|>user\n") and ex["prompt"].endswith("<|im_start|>assistant\n")
    assert ex["completion"].endswith("<|im_end|>\n") and ex["n_tokens"] > 5
    assert ds.manifest["tokenizer_hash"] and ds.manifest["lengths"]["unit"] == "tokens"
    # Same inputs → same version and the same artifact; different seed → different split and version.
    again = run_data(registry, source=str(src), tokenizer=str(tiny_model), eval_fraction=0.25, seed=3)
    assert again.artifact.hash == res.artifact.hash
    other = run_data(registry, source=str(src), tokenizer=str(tiny_model), eval_fraction=0.25, seed=4)
    assert other.summary["version"] != res.summary["version"]
    # Split membership is stable when new data is appended.
    more = write_jsonl(tmp_path / "more.jsonl", tiny_records(40) + tiny_records(20, seed=9))
    grown = load_dataset(run_data(registry, source=str(more), tokenizer=str(tiny_model), eval_fraction=0.25,
                                  seed=3).run_id, registry)
    old_eval = {e["id"] for e in ds.eval}
    assert not old_eval & {e["id"] for e in grown.train}
    # Lineage: raw file → dataset
    chain = registry.lineage_chain(res.artifact)
    assert [a.kind for a in chain] == ["raw-data", "dataset"]


@pytest.mark.parametrize("fmt", ["csv", "parquet", "dataframe", "hf", "list", "json"])
def test_other_sources(registry, tmp_path, fmt):
    import pandas as pd

    rows = [{"question": r["instruction"], "answer": r["response"]} for r in tiny_records(24)]
    df = pd.DataFrame(rows)
    if fmt == "csv":
        src = tmp_path / "d.csv"
        df.to_csv(src, index=False)
        src = str(src)
    elif fmt == "parquet":
        src = tmp_path / "d.parquet"
        df.to_parquet(src)
        src = str(src)
    elif fmt == "json":
        src = tmp_path / "d.json"
        src.write_text(json.dumps(rows, indent=1))
        src = str(src)
    elif fmt == "dataframe":
        src = df
    elif fmt == "hf":
        datasets = pytest.importorskip("datasets")
        src = datasets.Dataset.from_pandas(df)
    else:
        src = rows
    res = run_data(registry, source=src, eval_size=4)  # question/answer columns are detected
    assert res.metrics["train"] + res.metrics["eval"] == res.metrics["examples"] and res.metrics["eval"] == 4


def test_chat_messages_and_sharegpt(registry, tmp_path):
    rows = [{"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": f"Say {i}"},
                          {"role": "assistant", "content": f"{i}"}]} for i in range(10)]
    rows += [{"conversations": [{"from": "human", "value": f"Hi {i}"}, {"from": "gpt", "value": f"Hello {i}!"}]}
             for i in range(10)]
    a = run_data(registry, source=rows[:10], eval_size=2)
    b = run_data(registry, source=rows[10:], eval_size=2)
    ds = load_dataset(a.run_id, registry)
    assert ds.train[0]["messages"][0] == {"role": "system", "content": "Be brief."}
    assert load_dataset(b.run_id, registry).train[0]["messages"][1]["role"] == "assistant"


def test_cleaning_dedup_near_dup_and_pii(registry, tmp_path):
    rows = tiny_records(30)
    rows += [rows[0], {"instruction": "  " + rows[1]["instruction"].upper() + " ", "response": rows[1]["response"]}]
    rows += [{"instruction": "Write the long sentence about the quick brown fox that jumps over the lazy dog now",
              "response": "The quick brown fox jumps over the lazy dog, and then it runs far away into the woods."},
             {"instruction": "Write the long sentence about the quick brown fox that jumps over the lazy dog now!",
              "response": "The quick brown fox jumps over the lazy dog, and then it runs far away into the woods!"}]
    rows += [{"instruction": "Contact me at jane.doe@example.org or 555-867-5309, card 4111 1111 1111 1111",
              "response": "My IP is 10.0.0.12."},
             {"instruction": "", "response": "no instruction"}, {"instruction": "no response", "response": ""}]
    res = run_data(registry, source=rows, eval_size=3, near_dup=0.85)  # near-duplicate removal is opt-in
    ds = load_dataset(res.run_id, registry)
    dropped = ds.manifest["dropped"]
    assert dropped["exact duplicate"] >= 2 and dropped["near duplicate"] >= 1 and dropped["empty text"] == 2
    assert ds.manifest["pii"] == {"EMAIL": 1, "PHONE": 1, "CARD": 1, "IP": 1}
    blob = (ds.path / "train.jsonl").read_text() + (ds.path / "eval.jsonl").read_text()
    assert "jane.doe@example.org" not in blob and "4111" not in blob and "10.0.0.12" not in blob
    assert "[EMAIL]" in blob and "[CARD]" in blob
    report = str(res.outputs["report"])
    assert "PII scrubbed: EMAIL" in report and "dropped: exact duplicate" in report
    assert res.outputs["figure"].layout.title.text.startswith("Example length")


def test_malformed_jsonl_names_file_and_line(registry, tmp_path):
    src = tmp_path / "broken.jsonl"
    src.write_text('{"instruction": "a", "response": "b"}\n\n{"instruction": "c", "response": }\n')
    with pytest.raises(DataError, match=r"broken.jsonl: line 3 is not valid JSON.*Fix: fix or delete that line"):
        run_data(registry, source=str(src))
    nothing_half_written(registry)
    assert registry.list_runs()[0]["status"] == "failed"


def test_empty_and_missing_inputs(registry, tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(DataError, match="has no examples"):
        run_data(registry, source=str(empty))
    with pytest.raises(DataError, match="does not exist"):
        run_data(registry, source=str(tmp_path / "nope.jsonl"))
    with pytest.raises(DataError, match="No examples left after cleaning"):
        run_data(registry, source=[{"instruction": "x", "response": "y"}], min_chars=5)
    nothing_half_written(registry)


def test_missing_columns_lists_found_columns_and_the_mapping_option(registry):
    rows = [{"prompt_text": "a", "reply": "b"}]
    with pytest.raises(DataError, match=r"Missing instruction and response column\(s\); found columns: prompt_text, "
                                        r"reply\..*--columns instruction=<col> response=<col>"):
        run_data(registry, source=rows)
    with pytest.raises(DataError, match="Column 'answer' .* found columns: prompt_text, reply"):
        run_data(registry, source=rows, columns={"instruction": "prompt_text", "response": "answer"})
    res = run_data(registry, source=rows * 1, columns={"instruction": "prompt_text", "response": "reply"},
                   eval_fraction=0.0)
    assert res.metrics["train"] == 1


def test_invalid_values_name_field_and_range(registry):
    with pytest.raises(ConfigError, match=r"data: --eval-fraction must be >= 0.0 and <= 0.9 \(got 1.5\)"):
        run_data(registry, source="x.jsonl", eval_fraction=1.5)
    with pytest.raises(ConfigError, match="--max-tokens needs --tokenizer"):
        run_data(registry, source="x.jsonl", max_tokens=10)
    with pytest.raises(ConfigError, match="Unknown data parameter 'eval_frac'"):
        run_data(registry, source="x.jsonl", eval_frac=0.1)


def test_missing_model_path_for_tokenizer(registry, tmp_path):
    src = write_jsonl(tmp_path / "d.jsonl", tiny_records(5))
    from llmops_jupyter.core.errors import NotFoundError

    with pytest.raises(NotFoundError, match="Model 'no-such-model' not found.*%llmops models"):
        run_data(registry, source=str(src), tokenizer="no-such-model")
    with pytest.raises(Exception, match="is not a model folder"):
        run_data(registry, source=str(src), tokenizer=str(tmp_path))
    nothing_half_written(registry)
