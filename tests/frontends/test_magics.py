"""The notebook front door through a real IPython InteractiveShell."""

import json

import pytest
from IPython.core.error import UsageError

from llmops_jupyter.testing import tiny_records


@pytest.fixture()
def jsonl(tmp_path):
    p = tmp_path / "train.jsonl"
    p.write_text("\n".join(json.dumps(r) for r in tiny_records(30)))
    return p


def test_help_lists_commands(shell, capsys):
    shell.run_line_magic("llmops", "")
    out = capsys.readouterr().out
    for name in ("data", "plan", "models", "runs", "show", "lineage"):
        assert f"  {name}" in out
    rows = [ln for ln in out.splitlines() if ln.startswith("  ") and (" stage " in ln or " view " in ln)]
    assert len({ln.index(" stage ") if " stage " in ln else ln.index(" view ") for ln in rows}) == 1  # one column
    shell.run_line_magic("llmops", "data --help")
    out = capsys.readouterr().out
    assert "--eval-fraction" in out and "fraction held out for evaluation" in out
    from llmops_jupyter.frontends.magics import LlmopsMagics

    assert "Commands:" in LlmopsMagics.llmops.__doc__  # what `%llmops?` shows


def test_unknown_subcommand_and_flag_are_one_line_usage_errors(shell):
    with pytest.raises(UsageError, match="Unknown subcommand 'dtaa'.*did you mean 'data'"):
        shell.run_line_magic("llmops", "dtaa x.jsonl")
    with pytest.raises(UsageError, match="unrecognized arguments: --evl-fraction"):
        shell.run_line_magic("llmops", "data x.jsonl --evl-fraction 0.2")
    with pytest.raises(UsageError, match=r"--eval-fraction must be >= 0.0 and <= 0.9 \(got 2.0\)"):
        shell.run_line_magic("llmops", "data x.jsonl --eval-fraction 2")
    with pytest.raises(UsageError, match="--format must be one of: auto, instruction, chat"):
        shell.run_line_magic("llmops", "data x.jsonl --format xml")
    with pytest.raises(UsageError, match="eval_fraction needs a float, got 'abc'|invalid"):
        shell.run_line_magic("llmops", "data x.jsonl --eval-fraction abc")
    with pytest.raises(UsageError, match="check the quotes"):
        shell.run_line_magic("llmops", 'data "x.jsonl')


def test_data_runs_show_and_lineage(shell, jsonl, capsys):
    res = shell.run_line_magic("llmops", f"data '{jsonl}' --eval-fraction 0.2 --name arith")
    assert res.status == "finished"
    assert res.metrics["eval"] == round(res.metrics["examples"] * 0.2)
    assert res.metrics["train"] == res.metrics["examples"] - res.metrics["eval"]
    table = shell.run_line_magic("llmops", "runs")
    assert res.run_id in str(table) and "finished" in str(table)
    assert res.run_id in str(shell.run_line_magic("llmops", "runs --since 10m --stage data"))
    assert res.run_id not in str(shell.run_line_magic("llmops", "runs --since 2999-01-01"))
    with pytest.raises(UsageError, match="runs: --since 'lately' is not a duration"):
        shell.run_line_magic("llmops", "runs --since lately")
    shown = shell.run_line_magic("llmops", f"show {res.run_id[:9]}")
    text = str(shown)
    assert "eval_fraction" in text and "dataset" in text and "raw-data" in text
    lin = shell.run_line_magic("llmops", f"lineage {res.artifact.hash[:10]}")
    assert "raw-data" in str(lin) and "dataset" in str(lin)


def test_runs_shows_each_stage_key_metrics_before_sampled_resources():
    from llmops_jupyter.views.runs import key_metrics

    sampled = {"cpu_rss_mb": 900.0, "gpu_mem_mb": 1.0, "gpu12_util": 50.0, "adapter_effect": None}
    ft = {**sampled, "train_runtime_s": 3.0, "eval_loss": 1.5, "train_loss": 1.7, "peak_memory_mb": 10.0,
          "train_tokens_per_s": 99.0}
    assert [k for k, _ in key_metrics("finetune", ft)] == ["eval_loss", "train_loss", "train_tokens_per_s",
                                                           "peak_memory_mb"]
    ev = {**sampled, "base/ppl": 9.0, "ft/exact_match": 0.6, "base/exact_match": 0.0, "ft/f1": 0.7}
    assert [k for k, _ in key_metrics("eval", ev)] == ["base/exact_match", "ft/exact_match", "ft/f1", "base/ppl"]
    assert [k for k, _ in key_metrics("index", {"chunks": 3, "recall_at_3": 1.0})] == ["recall_at_3", "chunks"]
    # a view or an unknown stage: results by name, sampled resources only to fill up, None never shown
    assert key_metrics("nope", {**sampled, "zeta": 1.0}) == [("zeta", 1.0), ("cpu_rss_mb", 900.0),
                                                             ("gpu12_util", 50.0), ("gpu_mem_mb", 1.0)]


def test_notebook_variables_are_passed_as_objects(shell):
    import pandas as pd

    shell.user_ns["df"] = pd.DataFrame(tiny_records(20)).rename(columns={"instruction": "q", "response": "a"})
    res = shell.run_line_magic("llmops", "data $df --columns instruction=q response=a --eval-size 4")
    assert res.metrics["eval"] == 4
    assert res.params["source"] == {"__object__": "DataFrame(20, 2)"}
    with pytest.raises(UsageError, match=r"'\$nothing' is not defined"):
        shell.run_line_magic("llmops", "data $nothing")


def test_cell_magic_reads_yaml_parameters(shell, jsonl):
    res = shell.run_cell_magic("llmops", "data", f"source: {jsonl}\neval_size: 3\nseed: 7\n")
    assert res.metrics["eval"] == 3 and res.params["seed"] == 7
    with pytest.raises(UsageError, match="Unknown data parameter 'sed'.*did you mean 'seed'"):
        shell.run_cell_magic("llmops", "data", f"source: {jsonl}\nsed: 7\n")


def test_stage_errors_render_as_one_line(shell, tmp_path):
    from llmops_jupyter.core.errors import DataError

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "a", "response": "b"}\n{"instruction": oops}\n')
    result = shell.run_cell(f"%llmops data {bad}")
    assert isinstance(result.error_in_exec, DataError)
    rendered = result.error_in_exec._render_traceback_()
    assert len(rendered) == 1 and "bad.jsonl: line 2" in rendered[0]
