"""A depth-pruned model converts to GGUF with llama.cpp's converter: the file has the new block count and only the
kept layers' tensors (runs in every suite; no llama.cpp runtime needed)."""

from __future__ import annotations

import pytest

pytest.importorskip("transformers")
gguf = pytest.importorskip("gguf")
pytest.importorskip("sentencepiece")


@pytest.mark.slow  # a 49k-vocabulary model through prune and the converter: minutes on a shared 2-core box
def test_depth_pruned_model_converts_to_gguf(registry, smollm_tok_model, tmp_path):
    from llmops_jupyter.core.runner import Runner
    from llmops_jupyter.stages.export.convert import convert, read_metadata
    from llmops_jupyter.testing import write_tiny_dataset

    data = write_tiny_dataset(registry, smollm_tok_model)
    res = Runner(registry).run("prune", model=str(smollm_tok_model), data=data.hash, layers=1,
                               calibration_samples=4, eval_samples=0, generate_tokens=0)
    out = convert(res.artifact.path, tmp_path / "pruned-f16.gguf", outtype="f16")
    reader = gguf.GGUFReader(str(out))
    field = reader.fields["llama.block_count"]
    assert int(field.parts[field.data[0]][0]) == 1
    blocks = {t.name.split(".")[1] for t in reader.tensors if t.name.startswith("blk.")}
    assert blocks == {"0"}
    assert read_metadata(out)["general.architecture"] == "llama"
