"""What `gguf` checks before converting (no llama.cpp needed): the --chat-template value, and the held-out
conversations the parity gate uses."""

from __future__ import annotations

import pytest

from llmops_jupyter.core.errors import ConfigError


def test_a_chat_template_path_that_does_not_exist_is_one_line_naming_it(tmp_path):
    from llmops_jupyter.stages.export.stage import GGUFConfig, _source_dir

    missing = tmp_path / "templates" / "chatml.jinja"
    with pytest.raises(ConfigError) as err:
        GGUFConfig.from_dict({"model": "merge@latest", "chat_template": str(missing)})
    text = str(err.value)
    assert str(missing) in text and "not found" in text and "\n" not in text and err.value.field == "chat_template"
    # a path is a path whatever its suffix; the text itself is recognised by its Jinja tags
    with pytest.raises(ConfigError):
        GGUFConfig.from_dict({"model": "m", "chat_template": str(tmp_path / "chatml.txt")})
    inline = "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}{% endfor %}"
    assert GGUFConfig.from_dict({"model": "m", "chat_template": inline}).chat_template == inline
    # an existing file's text is what the converter's source folder carries
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    (model / "tokenizer_config.json").write_text('{"chat_template": "old"}')
    path = tmp_path / "my.j2"
    path.write_text(inline)
    cfg = GGUFConfig.from_dict({"model": "m", "chat_template": str(path)})
    (tmp_path / "w").mkdir()
    src = _source_dir(model, tmp_path / "w", cfg.chat_template)
    assert (src / "chat_template.jinja").read_text() == inline
    (tmp_path / "w2").mkdir()
    assert (_source_dir(model, tmp_path / "w2", inline) / "chat_template.jinja").read_text() == inline


def test_the_cli_refuses_a_missing_template_path_in_one_line(home, tmp_path, capsys):
    from llmops_jupyter.frontends.cli import main as cli

    rc = cli(["gguf", "--model", "merge@latest", "--chat-template", str(tmp_path / "nope.jinja")])
    out = capsys.readouterr()
    assert rc not in (0, None)
    assert str(tmp_path / "nope.jinja") in out.err + out.out


def _dataset(registry, tiny_model, eval_size):
    from llmops_jupyter.core.runner import Runner
    from llmops_jupyter.testing import tiny_records

    return Runner(registry, defaults=False).run("data", {
        "source": tiny_records(12), "tokenizer": str(tiny_model), "eval_size": eval_size, "seed": 0,
        "scrub_pii": False, "dedup": False, "name": f"parity-{eval_size}"}).artifact


def test_parity_prompts_come_from_the_held_out_split_only(registry, tiny_model):
    from llmops_jupyter.models.refs import resolve_model
    from llmops_jupyter.stages.data.format import load_dataset
    from llmops_jupyter.stages.export.stage import conversations

    model = resolve_model(str(tiny_model), registry)
    data = _dataset(registry, tiny_model, 3)
    ds = load_dataset(data.hash, registry)
    held_out = [[m["content"] for m in r["messages"][:-1]] for r in ds.split("eval")]
    convs = conversations(registry, model, data.hash, 8)
    assert len(convs) == 3  # 8 asked, 3 held out: never topped up from the training rows
    assert [[m["content"] for m in c] for c in convs] == held_out
    # a dataset without a held-out split is refused, naming it
    no_eval = _dataset(registry, tiny_model, 0)
    with pytest.raises(ConfigError) as err:
        conversations(registry, model, no_eval.hash, 8)
    assert "no held-out (eval) split" in str(err.value) and err.value.field == "data"


def test_parity_cell_shows_no_library_progress_bars(shell, home, tiny_model, capfd):
    """`parity` of two transformers versions: transformers' `Loading weights` bars go to the log, not the cell."""
    from pathlib import Path

    capfd.readouterr()
    report = shell.run_line_magic("llmops", f"parity --model {tiny_model} --model {tiny_model} --samples 2 "
                                            "--tokens 2")
    out = capfd.readouterr()
    assert "agreement" in str(report).lower()
    assert "Loading weights" not in out.out + out.err, out.err[-2000:]
    from llmops_jupyter.stages.export.stage import PARITY_LOG

    log = Path(home) / "logs" / PARITY_LOG
    assert "progress bar (not shown): Loading weights" in log.read_text()
