"""A notebook executed through a real kernel (papermill) drives the magics; its saved outputs show the results."""

import json

import nbformat
import pytest

from llmops_jupyter.testing import sliced_kernel_manager, tiny_records

papermill = pytest.importorskip("papermill")


def outputs_text(nb) -> str:
    parts = []
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            if "text" in out:
                parts.append(out["text"])
            for mime, data in out.get("data", {}).items():
                parts.append(mime)
                parts.append(data if isinstance(data, str) else json.dumps(data))
    return "\n".join(parts)


def test_notebook_runs_data_and_runs_magics(tmp_path):
    data = tmp_path / "train.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in tiny_records(30)))
    nb = nbformat.v4.new_notebook()
    nb.cells = [
        nbformat.v4.new_code_cell("%load_ext llmops_jupyter"),
        nbformat.v4.new_code_cell(f"%llmops data {data.name} --eval-fraction 0.2 --name quickstart"),
        nbformat.v4.new_code_cell("%llmops runs"),
    ]
    src = tmp_path / "quickstart.ipynb"
    nbformat.write(nb, src)
    out = tmp_path / "quickstart.out.ipynb"
    papermill.execute_notebook(str(src), str(out), cwd=str(tmp_path), kernel_name="python3", progress_bar=False,
                               log_output=False, kernel_manager_class=sliced_kernel_manager())
    text = outputs_text(nbformat.read(out, as_version=4))
    assert "Data report" in text and "dataset version" in text  # the data report (HTML + text)
    assert "application/vnd.plotly.v1+json" in text and "Example length" in text  # static length histogram
    assert "Runs in" in text and "finished" in text and "data-" in text  # the run table
    assert (tmp_path / ".llmops" / "registry.db").exists()
