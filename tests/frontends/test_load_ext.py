"""`%load_ext llmops_jupyter` must stay cheap: no heavy library is imported by it (nor by command discovery)."""

import json
import subprocess
import sys

HEAVY = ["torch", "transformers", "peft", "plotly", "papermill", "datasets", "trl", "bitsandbytes", "pandas",
         "gptqmodel", "fastapi", "dask", "sentence_transformers"]

SCRIPT = """
import json, sys
from IPython.testing.globalipapp import start_ipython
ip = start_ipython()
ip.run_line_magic("load_ext", "llmops_jupyter")
assert "llmops" in ip.magics_manager.magics["line"] and "llmops" in ip.magics_manager.magics["cell"]
loaded_after_load_ext = [m for m in HEAVY if m in sys.modules]
from llmops_jupyter.core.stage import discover
cmds = sorted(discover())
loaded_after_discovery = [m for m in HEAVY if m in sys.modules]
print(json.dumps({"load_ext": loaded_after_load_ext, "discovery": loaded_after_discovery, "commands": cmds}))
"""


def test_load_ext_imports_no_heavy_library(tmp_path):
    code = f"HEAVY = {HEAVY!r}\n" + SCRIPT
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["load_ext"] == [], f"%load_ext imported {result['load_ext']}"
    assert result["discovery"] == [], f"command discovery imported {result['discovery']}"
    assert {"data", "runs", "show", "lineage", "models", "plan"} <= set(result["commands"])
