"""Config forms (``%llmops <command> --form``): generated from every config, validated as the magic validates,
run through the same front door, and the line they write parses back to the same config."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import nbformat
import pytest
from IPython.core.error import UsageError
from IPython.utils.process import arg_split

from llmops_jupyter.core.stage import discover, get_command
from llmops_jupyter.frontends.argparsing import option_groups, parse_config
from llmops_jupyter.frontends.forms import ConfigForm, build_form
from llmops_jupyter.testing import sliced_kernel_manager, tiny_records

pytest.importorskip("ipywidgets")


def parse_line(line: str):
    """What the magic builds from a form's line (a ``%llmops`` line, or a ``%%llmops`` cell)."""
    head, _, cell = line.partition("\n")
    tokens = arg_split(head.split(" ", 1)[1], posix=True)
    cmd = get_command(tokens[0])
    return parse_config(cmd.config_cls, tokens[1:], prog=f"%llmops {cmd.name}", cell=cell or None)


@pytest.fixture()
def jsonl(home):
    p = home.parent / "train.jsonl"
    p.write_text("\n".join(json.dumps(r) for r in tiny_records(30)))
    return p


def test_every_command_builds_a_form(registry):
    for name, cmd in discover().items():
        form = build_form(name, registry=registry)
        fields = dataclasses.fields(cmd.config_cls)
        assert set(form.fields) == {f.name for f in fields}, name
        for f in fields:
            widget = form.fields[f.name]
            assert widget.tooltip.startswith(f.metadata.get("help", "")), (name, f.name)  # help as the tooltip
        # grouped as --help groups them: positionals first, in the parser's order
        order = [f.name for _, group in option_groups(cmd.config_cls) for f in group]
        assert [s.name for s in form.specs if s.kind != "cell"] == order
        if not form.errors:  # a command with all defaults: the line is just the command
            assert form.line() == f"%llmops {name}"


def test_field_widgets_follow_types_choices_and_defaults(registry):
    import ipywidgets as w

    form = build_form("finetune", registry=registry)
    f = form.fields
    assert isinstance(f["method"], w.Dropdown) and [v for _, v in f["method"].options] == ["lora", "qlora", "dpo"]
    assert f["method"].value == "lora"
    assert isinstance(f["packing"], w.Checkbox) and f["packing"].value is True
    assert isinstance(f["rank"], w.Text) and f["rank"].value == "16"
    assert isinstance(f["model"], w.Combobox) and isinstance(f["data"], w.Combobox)
    assert f["resume"].value == ""
    hints = {s.name: s.hint() for s in form.specs}
    assert hints["rank"].startswith("int") and "default 16" in hints["rank"]


def test_reference_fields_offer_what_the_registry_holds(shell, jsonl, registry):
    shell.run_line_magic("llmops", f"data {jsonl.name} --name refs")
    data_run = registry.list_runs(stage="data")[0]["id"]
    form = build_form("finetune", registry=registry)
    assert form.fields["data"].options[:2] == ("data@latest", data_run)
    assert {"tiny-llama", "smollm2-135m"} <= set(form.fields["model"].options)
    assert "finetune@latest" not in getattr(form.fields["resume"], "options", ())  # no fine-tune yet: nothing offered
    evalform = build_form("eval", registry=registry)
    assert "data@latest" in evalform.fields["data"].options


def test_bad_values_show_the_magic_message_beside_the_field(shell, registry):
    form = build_form("finetune", registry=registry)
    for field, value, line in [("rank", "0", "finetune --rank 0"), ("rank", "abc", "finetune --rank abc"),
                               ("lr", "5", "finetune --lr 5"), ("num_processes", "2", "finetune --num-processes 2")]:
        form.set(**{"rank": "16", "lr": "0.0002", "num_processes": "1"})
        form.fields[field].value = value  # as typed: validation runs on every change
        with pytest.raises(UsageError) as magic:
            shell.run_line_magic("llmops", line)
        assert form.errors == {field: str(magic.value)}
        assert str(magic.value).split(" (got")[0].split(":")[-1].strip()[:10] in form.messages[field].value
    form.fields["num_processes"].value = "1"
    assert form.errors == {}
    # two bad fields at once: both flagged
    form.fields["rank"].value = "0"
    form.fields["dropout"].value = "2"
    assert set(form.errors) == {"rank", "dropout"}
    assert form.run() is None and registry.list_runs() == []  # Run refuses while a field is red


def test_form_line_round_trips_to_the_same_config(registry):
    form = build_form("finetune", registry=registry)
    form.set(rank=8, method="qlora", packing=False, gradient_checkpointing=True, target_modules="q_proj, v_proj",
             adapter_name="it's a \"lora\" $x", lr="2e-4", epochs="2", model="./my model", warmup_steps="-0")
    line = form.line()
    assert line == ("%llmops finetune --model './my model' --method qlora --rank 8 --target-modules q_proj v_proj "
                    "--epochs 2 --gradient-checkpointing --no-packing --adapter-name 'it'\"'\"'s a \"lora\" $x'")
    assert parse_line(line) == form.config()  # lr 2e-4 == the default 0.0002 and warmup -0 == 0: not in the line

    data = build_form("data", registry=registry)
    data.set(source="my data.jsonl", columns={"instruction": "question", "response": "answer"}, decontaminate="",
             near_dup="0.85", system="Be terse.\nAnswer in English.", dedup=False)
    line = data.line()
    assert line.startswith("%%llmops data 'my data.jsonl' --columns instruction=question response=answer "
                           "--no-dedup --near-dup 0.85 --no-decontaminate\n")
    cfg = parse_line(line)
    assert cfg == data.config() and cfg.decontaminate is None and cfg.system == "Be terse.\nAnswer in English."

    for name, values in [("eval", {"model": "tiny-llama, finetune@latest", "limit": "4", "do_sample": True}),
                         ("runs", {"since": "-3600", "status": "failed"}),
                         ("pipeline", {"action": "run", "notebook": "nb.ipynb", "param": "lr=0.1, name=a b"}),
                         ("serve", {"model": "tiny-llama", "foreground": False}),
                         ("prompt", {"name": "support", "template": "system: be brief\nuser: {{ question }}"})]:
        form = build_form(name, registry=registry, **values)
        assert form.errors == {}, (name, form.errors)
        assert parse_line(form.line()) == form.config(), (name, form.line())


def test_magic_form_flag_prefills_and_help_lists_it(shell, capsys):
    form = shell.run_line_magic("llmops", "finetune --rank 8 --data $ds --form")
    assert isinstance(form, ConfigForm)
    assert form.fields["rank"].value == "8" and form.fields["data"].value == "$ds"
    shell.run_line_magic("llmops", "plan --help")
    assert "--form" in capsys.readouterr().out
    import llmops_jupyter

    assert isinstance(llmops_jupyter.form("plan", model="tiny-llama"), ConfigForm)


def test_run_goes_through_the_front_door_and_writes_the_line(shell, jsonl, registry):
    form = shell.run_line_magic("llmops", "data --form")
    form.fields["source"].value = jsonl.name
    form.fields["eval_fraction"].value = "0.2"
    form.fields["name"].value = "from form"
    shell.rl_next_input = None
    form.run_button.click()
    assert form.error is None, form.error
    run = registry.list_runs(stage="data")[0]
    assert run["params"]["name"] == "from form" and run["status"] == "finished" and run["params"]["eval_fraction"] == 0.2
    # a terminal shell keeps the next input here; a kernel sends it as the set_next_input payload (next test)
    assert shell.rl_next_input == f"%llmops data {jsonl.name} --eval-fraction 0.2 --name 'from form'"
    assert form.last_line == shell.rl_next_input and parse_line(form.last_line) == form.config()
    shell.rl_next_input = None


def test_import_stays_stdlib_only():
    code = ("import sys, llmops_jupyter; llmops_jupyter.form; "
            "print([m for m in ('ipywidgets', 'torch', 'plotly') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


NOTEBOOK_FORM_CELL = """\
form = llmops_jupyter.form("data")
form.fields["source"].value = "train.jsonl"
form.fields["eval_fraction"].value = "0.25"
form.fields["min_chars"].value = "-1"
print("ERRORS", json.dumps(form.errors))
form.fields["min_chars"].value = "1"
form.fields["name"].value = "kernel form"
form.run_button.click()
print("ERROR", form.error)
"""


def test_form_in_a_real_kernel(home, jsonl):
    """nbclient executes a notebook that builds a form, fills it, clicks Run; the reply carries the line."""
    from nbclient import NotebookClient

    from llmops_jupyter.registry import Registry

    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell("import json, llmops_jupyter\n%load_ext llmops_jupyter"),
                nbformat.v4.new_code_cell(NOTEBOOK_FORM_CELL)]
    replies: list[dict] = []
    client = NotebookClient(nb, kernel_name="python3", timeout=300, resources={"metadata": {"path": str(home.parent)}},
                            on_cell_executed=lambda cell, cell_index, execute_reply: replies.append(execute_reply),
                            kernel_manager_class=sliced_kernel_manager())
    client.execute()
    text = "".join(o.get("text", "") for o in nb.cells[1].outputs)
    errors = json.loads(text.split("ERRORS ", 1)[1].splitlines()[0])
    assert list(errors) == ["min_chars"] and "--min-chars must be >= 0" in errors["min_chars"]
    assert "ERROR None" in text, text
    runs = Registry.open(home).list_runs(stage="data")
    assert [r["params"]["name"] for r in runs] == ["kernel form"] and runs[0]["status"] == "finished"
    payload = replies[1]["content"]["payload"]
    assert [p["text"] for p in payload if p["source"] == "set_next_input"] == [
        "%llmops data train.jsonl --eval-fraction 0.25 --name 'kernel form'"]
