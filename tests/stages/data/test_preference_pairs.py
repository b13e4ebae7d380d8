"""The data stage reads preference pairs (prompt, chosen, rejected) into the dataset format DPO and the reward model
train on, and ``--split-by`` keeps every example of a group (a problem with several wrong answers) in one split."""

import json

import pytest

from llmops_jupyter.core.errors import DataError
from llmops_jupyter.core.runner import Runner
from llmops_jupyter.stages.data.format import load_dataset


def write_jsonl(path, rows):
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def addition_pairs(wrong_per_problem=3):
    rows = []
    for a in range(10):
        for b in range(10):
            for k in range(1, wrong_per_problem + 1):
                rows.append({"problem": f"{a}+{b}", "prompt": f"What is {a} + {b}?",
                             "chosen": f"<answer>{a + b}</answer>", "rejected": f"<answer>{a + b + k}</answer>"})
    return rows


def test_pairs_are_detected_templated_and_split_by_problem(registry, tmp_path, tiny_model):
    src = write_jsonl(tmp_path / "pairs.jsonl", addition_pairs())
    res = Runner(registry).run("data", source=str(src), tokenizer=str(tiny_model), split_by="problem",
                               eval_fraction=0.2)
    ds = load_dataset(res.run_id, registry)
    assert ds.manifest["layout"] == "preference" and ds.manifest["format"] == "preference"
    assert len(ds.train) + len(ds.eval) == 300 and res.metrics["dropped"] == 0
    ex = ds.train[0]
    assert ex["prompt"].startswith("<|im_start|>user\nWhat is ") and ex["prompt"].endswith("<|im_start|>assistant\n")
    assert ex["chosen"].startswith("<answer>") and ex["rejected"] != ex["chosen"]
    assert ex["text"] == ex["prompt"] + ex["completion"] and ex["completion"].startswith(ex["chosen"])

    def problems(rows):
        return {r["prompt"] for r in rows}

    assert not problems(ds.train) & problems(ds.eval)  # no held-out problem is seen in training
    assert len(ds.eval) % 3 == 0 and 45 <= len(ds.eval) <= 75  # whole problems, about a fifth
    # Without --split-by, pairs are split one by one and the same problems land on both sides.
    loose = load_dataset(Runner(registry).run("data", source=str(src), eval_fraction=0.2, decontaminate=None).run_id,
                         registry)
    assert problems(loose.train) & problems(loose.eval)


def test_pair_cleaning_and_errors(registry, tmp_path):
    rows = addition_pairs(1)[:20]
    rows[3]["rejected"] = rows[3]["chosen"]  # not a preference
    rows[4]["rejected"] = "  "
    rows.append(dict(rows[5]))  # exact duplicate pair
    src = write_jsonl(tmp_path / "p.jsonl", rows)
    res = Runner(registry).run("data", source=str(src), eval_fraction=0.2, split_by="problem")
    assert res.summary["dropped"] == {"chosen equals rejected": 1, "empty rejected answer": 1, "exact duplicate": 1}
    with pytest.raises(DataError, match=r"--split-by column 'puzzle' is not in the data; found columns: chosen, "
                                        r"problem, prompt, rejected"):
        Runner(registry).run("data", source=str(src), split_by="puzzle")
    no_rejected = write_jsonl(tmp_path / "c.jsonl", [{"prompt": "q", "chosen": "a"}])
    with pytest.raises(DataError, match=r"Missing rejected column\(s\) for preference pairs"):
        Runner(registry).run("data", source=str(no_rejected), format="preference")
    gap = [dict(r) for r in rows[:4]]
    gap[2]["problem"] = ""
    with pytest.raises(DataError, match=r"line 3: --split-by column 'problem' is empty"):
        Runner(registry).run("data", source=str(write_jsonl(tmp_path / "g.jsonl", gap)), split_by="problem")
