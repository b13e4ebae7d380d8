"""Templates: one parameterised notebook per stage plus the full lifecycle, executed through papermill.

A template whose stage commands are not in this build is skipped with "stage X not available".
"""

from __future__ import annotations

import re
from pathlib import Path

import nbformat
import pytest

from llmops_jupyter.core.stage import discover
from llmops_jupyter.pipelines.params import _MAGIC, notebook_parameters, parameters_cell_index

pytestmark = pytest.mark.slow  # real kernels, servers or killed processes: over ~20 s on 2 cores

TEMPLATES = sorted((Path(__file__).resolve().parents[2] / "templates").glob("*.ipynb"))
EXPECTED = {"data", "finetune", "eval", "merge_quantize", "serve_monitor", "full_lifecycle", "compress", "rl",
            "continued_pretraining"}
# test-size values for parameters (the defaults are already small; these keep every run quick)
SMALL = {"max_steps": 5, "requests": 1, "group_size": 32,
         # compress: 5 distillation steps cannot heal a 2-layer model cut to 1 layer; the gate's pass/fail is
         # tested in tests/stages/distill, here the chain only has to run end to end
         "distill_steps": 5, "gate": "perplexity<=+1000%"}


def stages_used(nb) -> list[str]:
    used = []
    for cell in nb.cells:
        for line in cell.source.splitlines() if cell.cell_type == "code" else []:
            m = _MAGIC.match(line)
            if m:
                name = m.group(1).split()[0]
                if name not in used:
                    used.append(name)
    return used


def test_every_template_is_a_pipeline_notebook():
    assert {t.stem for t in TEMPLATES} == EXPECTED
    for path in TEMPLATES:
        nb = nbformat.read(path, as_version=4)
        assert parameters_cell_index(nb) >= 0, f"{path.name}: no cell tagged 'parameters'"
        params = notebook_parameters(nb, path.name)
        assert params and all(p.type is not None for p in params.values()), path.name  # literal, typed defaults
        if "model" in params:
            assert params["model"].default == "tiny-llama", path.name
        assert sum(c.cell_type == "markdown" for c in nb.cells) >= 2, f"{path.name}: explain each step"
        code = "\n".join(c.source for c in nb.cells if c.cell_type == "code")
        for var in set(re.findall(r"\$([A-Za-z_]\w*)", code)):
            assert var in params, f"{path.name}: ${var} is not a parameter"


@pytest.mark.parametrize("template", TEMPLATES, ids=[t.stem for t in TEMPLATES])
def test_template_runs_on_the_tiny_model(template, home, tmp_path, model_cache):
    from llmops_jupyter.pipelines import run_pipeline

    nb = nbformat.read(template, as_version=4)
    available = discover()
    code = "\n".join(c.source for c in nb.cells if c.cell_type == "code")
    needs = stages_used(nb) + [s for s in re.findall(r"([a-z]+)@latest", code) if s != "data"]  # data: fixture
    for stage in needs:
        if stage not in available:
            pytest.skip(f"stage {stage} not available")
    params = {k: v for k, v in SMALL.items() if k in notebook_parameters(nb)}
    used = stages_used(nb)
    needs_data = "data" not in used and ("data@latest" in code or "finetune@latest" in code)
    if needs_data:  # inputs a template takes from earlier stages: a dataset, and an adapter to merge
        from llmops_jupyter.registry import Registry
        from llmops_jupyter.testing import build_tiny_model, write_tiny_dataset

        data = write_tiny_dataset(Registry(home), model := build_tiny_model(model_cache / "tiny-llama"))
        if "finetune" not in used and "finetune@latest" in code:
            from llmops_jupyter.core.runner import Runner

            Runner(Registry(home)).run("finetune", model=str(model), data=data.hash, max_steps=3)
    res = run_pipeline(template, params, cwd=tmp_path, cache=False)
    assert str(res.status) == "finished"
    if template.stem == "full_lifecycle":  # the seed pipeline's lineage is one queryable chain
        from llmops_jupyter.registry import Registry

        reg = Registry(home)
        (deployment,) = reg.list_artifacts("deployment")
        kinds = [a.kind for a in reg.lineage_chain(deployment)]
        for earlier, later in zip(["dataset", "adapter", "merged", "quantized"],
                                  ["adapter", "merged", "quantized", "deployment"]):
            assert kinds.index(earlier) < kinds.index(later), kinds
    assert res.summary["children"] and all(c["status"] == "finished" for c in res.summary["children"])
