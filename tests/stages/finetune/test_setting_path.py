"""One setting, followed from the magic to the library call: `--rank` (alias `--lora-r`) reaches peft's LoraConfig
through few files, each entered once, and the registry stores it under the config field's name."""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[3] / "llmops_jupyter"


@pytest.mark.parametrize("flag", ["--rank", "--lora-r"])
def test_rank_reaches_loraconfig_through_at_most_seven_files(shell, registry, tiny_model, tiny_dataset, monkeypatch,
                                                             flag):
    import peft

    seen: list[tuple[int, list[str]]] = []
    original = peft.LoraConfig.__post_init__

    def spy(self):
        stack = [Path(f.filename).resolve() for f in inspect.stack()[1:]]
        ours = [str(p.relative_to(PKG)) for p in reversed(stack) if PKG in p.parents]
        seen.append((self.r, ours))
        original(self)

    monkeypatch.setattr(peft.LoraConfig, "__post_init__", spy)
    res = shell.run_line_magic("llmops", f"finetune --model {tiny_model} --data {tiny_dataset.hash} {flag} 3 "
                                         "--max-steps 1 --batch-size 4 --checkpoint-every 0")
    assert res.status == "finished"
    r, files = seen[0]
    assert r == 3
    assert files[0] == "frontends/magics.py" and files[-1].startswith("stages/finetune/")
    blocks = [f for i, f in enumerate(files) if i == 0 or files[i - 1] != f]  # consecutive frames of one file
    assert len(blocks) == len(set(blocks)), f"a file is entered twice: {blocks}"
    assert len(blocks) <= 7, blocks
    assert registry.get_run(res.run_id)["params"]["rank"] == 3
    assert "lora_r" not in registry.get_run(res.run_id)["params"]


def test_alias_and_name_together_is_refused():
    from llmops_jupyter.core.errors import ConfigError
    from llmops_jupyter.stages.finetune.config import FinetuneConfig

    assert FinetuneConfig.from_dict({"lora_r": 4}).rank == 4
    with pytest.raises(ConfigError, match="name the same setting"):
        FinetuneConfig.from_dict({"lora_r": 4, "rank": 8})


def test_help_shows_the_alias(shell):
    from llmops_jupyter.frontends.argparsing import build_parser
    from llmops_jupyter.stages.finetune.config import FinetuneConfig

    text = build_parser(FinetuneConfig, "finetune", "", {}).format_help()
    assert "--rank RANK, --lora-r RANK" in text
