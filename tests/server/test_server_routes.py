"""The /llmops REST routes on a real JupyterLab server: auth, validation, path confinement, run-as-pipeline."""

from __future__ import annotations

import httpx
import pytest

from llmops_jupyter.testing import wait_until

pytestmark = pytest.mark.slow  # real kernels, servers or killed processes: over ~20 s on 2 cores


def get(lab, path: str, **kw) -> httpx.Response:
    return httpx.get(f"{lab.url}/llmops/{path}", headers=lab.headers(), timeout=30, **kw)


def post(lab, path: str, body, **kw) -> httpx.Response:
    content = body if isinstance(body, (str, bytes)) else None
    return httpx.post(f"{lab.url}/llmops/{path}", headers=lab.headers(), timeout=30, content=content,
                      json=None if content is not None else body, **kw)


def n_jobs(lab) -> int:
    return len(get(lab, "pipeline").json()["jobs"])


@pytest.mark.parametrize("path", ["runs", "resources", "lineage/abc", "parameters?path=template.ipynb", "pipeline"])
def test_routes_require_jupyter_auth(lab_server, path):
    assert httpx.get(f"{lab_server.url}/llmops/{path}", timeout=30).status_code in (401, 403)
    bad = {"Authorization": "token not-the-token"}
    assert httpx.get(f"{lab_server.url}/llmops/{path}", headers=bad, timeout=30).status_code in (401, 403)


def test_post_requires_auth(lab_server):
    before = n_jobs(lab_server)
    r = httpx.post(f"{lab_server.url}/llmops/pipeline", json={"notebook": "template.ipynb"}, timeout=30)
    assert r.status_code in (401, 403)
    assert n_jobs(lab_server) == before


# what the real stages leave around the fine-tune's adapter: the raw file the data stage read, the eval of the
# adapter, and the model card saved for every adapter / merged / quantized / deployment version
CHAIN = {"raw-data", "dataset", "base-model", "adapter", "merged", "quantized", "deployment"}
LINEAGE = CHAIN | {"eval-results", "model-card"}


def test_runs_list_and_detail_with_lineage(lab_server):
    ids = lab_server.ids
    r = get(lab_server, "runs")
    assert r.status_code == 200
    runs = {x["id"]: x for x in r.json()["runs"]}
    assert {ids["data"], ids["finetune"], ids["merge"], ids["quantize"], ids["serve"], ids["eval"]} <= set(runs)
    detail = get(lab_server, f"runs/{ids['finetune']}").json()
    assert runs[ids["finetune"]]["metrics"]["loss"] == pytest.approx(detail["metrics"]["loss"])
    # most telling first (the sidebar shows the head): the stage's key metrics, then by name, sampled resources last
    names = list(runs[ids["finetune"]]["metrics"])
    assert names[:4] == ["eval_loss", "train_loss", "train_tokens_per_s", "peak_memory_mb"]
    assert names[-1] == "cpu_rss_mb" and names[4:-1] == sorted(names[4:-1]) and "loss" in names
    assert runs[ids["eval"]]["status"] == "failed"

    assert detail["params"]["rank"] == 8
    assert detail["notebook_path"] == "template.ipynb"
    assert [a["kind"] for a in detail["outputs"]] == ["adapter"]
    assert sorted(a["kind"] for a in detail["inputs"]) == ["base-model", "dataset"]
    kinds = {n["kind"] for n in detail["lineage"]["nodes"]}
    assert kinds == LINEAGE
    by_hash = {n["hash"]: n["kind"] for n in detail["lineage"]["nodes"]}
    edges = {(by_hash[e["src"]], by_hash[e["dst"]]) for e in detail["lineage"]["edges"]}
    assert {("raw-data", "dataset"), ("dataset", "adapter"), ("adapter", "merged"), ("merged", "quantized"),
            ("quantized", "deployment"), ("adapter", "eval-results"), ("adapter", "model-card")} <= edges

    up = get(lab_server, f"lineage/{ids['serve']}:deployment", params={"direction": "up"}).json()
    assert {n["kind"] for n in up["nodes"]} == CHAIN


def test_resources_report_memory_and_running_runs(lab_server):
    res = get(lab_server, "resources").json()
    assert res["gpus"] or res["host"]["memory_total_mb"] > 0
    running = {r["id"]: r for r in res["running"]}
    assert lab_server.ids["running"] in running
    run = running[lab_server.ids["running"]]
    assert run["total_steps"] == get(lab_server, f"runs/{run['id']}").json()["params"]["max_steps"] == 100_000
    assert 1 <= run["step"] < run["total_steps"] and "loss" in run["metrics"] and not run["stale"]


def test_notebook_parameters_are_typed(lab_server):
    r = get(lab_server, "parameters", params={"path": "template.ipynb"})
    assert r.status_code == 200
    types = {p["name"]: (p["type"], p["default"]) for p in r.json()["parameters"]}
    assert types == {"lr": ("float", 0.001), "steps": ("int", 3), "use_lora": ("bool", True),
                     "run_name": ("str", "demo"), "layers": ("list", [1, 2])}


@pytest.mark.parametrize(("path", "field"), [
    ("runs?limit=abc", "limit"), ("runs?limit=0", "limit"), ("runs?status=exploded", "status"),
    ("lineage/abcdef?direction=sideways", "direction"), ("parameters", "path"),
    ("parameters?path=README.txt", "path"),
])
def test_bad_query_input_is_one_json_error(lab_server, path, field):
    (lab_server.root / "README.txt").write_text("not a notebook")
    r = get(lab_server, path)
    assert r.status_code == 400, r.text
    body = r.json()
    assert body["field"] == field and body["error"]


def test_unknown_run_is_404_json(lab_server):
    r = get(lab_server, "runs/no-such-run")
    assert r.status_code == 404
    assert "no-such-run" in r.json()["error"]


@pytest.mark.parametrize(("body", "field"), [
    ("{not json", "body"),
    ("[1, 2]", "body"),
    ({"notebook": "template.ipynb", "parameters": {"epochs": 3}}, "epochs"),
    ({"notebook": "template.ipynb", "parameters": {"steps": "three"}}, "steps"),
    ({"notebook": "template.ipynb", "parameters": {"steps": 2.5}}, "steps"),
    ({"notebook": "template.ipynb", "parameters": {"use_lora": "yes"}}, "use_lora"),
    ({"notebook": "template.ipynb", "parameters": [1]}, "parameters"),
    ({"notebook": "template.ipynb", "cmd": "rm -rf /"}, "cmd"),
    ({"notebook": 42}, "notebook"),
])
def test_bad_pipeline_input_is_rejected_before_running(lab_server, body, field):
    before = n_jobs(lab_server)
    r = post(lab_server, "pipeline", body)
    assert r.status_code == 400, r.text
    assert r.json()["field"] == field
    assert n_jobs(lab_server) == before


def test_path_traversal_is_refused(lab_server, tmp_path):
    outside = tmp_path / "secret.ipynb"
    outside.write_text("{}")
    (lab_server.root / "escape").symlink_to(tmp_path, target_is_directory=True)
    for path in ["../secret.ipynb", f"../../{tmp_path.name}/secret.ipynb", str(outside), "escape/secret.ipynb",
                 "sub/../../secret.ipynb", "~/secret.ipynb"]:
        r = get(lab_server, "parameters", params={"path": path})
        assert r.status_code == 403, (path, r.text)
        r = post(lab_server, "pipeline", {"notebook": path})
        assert r.status_code == 403, (path, r.text)
        assert r.json()["field"] == "notebook"


def test_run_as_pipeline_records_runs(lab_server):
    r = post(lab_server, "pipeline", {"notebook": "template.ipynb", "parameters": {"steps": 2, "lr": 0.01}})
    assert r.status_code == 202, r.text
    job_id = r.json()["id"]
    job = wait_until(lambda: (j := get(lab_server, f"pipeline/{job_id}").json())["status"] != "running" and j, 180,
                     what=f"pipeline job {job_id} to end", details=lambda: lab_server.log.read_text()[-3000:])
    assert job["status"] == "finished", job
    assert job["total"] and job["done"] == job["total"]
    assert (lab_server.root / job["output"]).is_file()
    pipeline_run = get(lab_server, f"runs/{job['run_id']}").json()
    assert pipeline_run["stage"] == "pipeline"
    assert pipeline_run["params"]["parameters"] == {"steps": 2, "lr": 0.01}
    assert pipeline_run["notebook_path"] == "template.ipynb"  # "Open notebook" opens the source notebook
    assert "notebook" in [a["kind"] for a in pipeline_run["outputs"]]
    (child,) = job["stage_runs"]
    toy = get(lab_server, f"runs/{child}").json()
    assert toy["stage"] == "toy-train" and toy["status"] == "finished"
    assert toy["params"]["steps"] == 2 and toy["notebook_path"] == "template.ipynb"
    assert toy["metrics"]["loss"] == pytest.approx(0.5)


def test_parse_nvidia_smi_real_output():
    """Output captured from `nvidia-smi --query-gpu=index,name,memory.used,memory.total,utilization.gpu
    --format=csv,noheader,nounits` on an H100 host, plus a board that reports [N/A]."""
    from llmops_jupyter.server.resources import parse_nvidia_smi

    gpus = parse_nvidia_smi("0, NVIDIA H100 80GB HBM3, 0, 81559, 0\n1, NVIDIA A10G, 1200, 23028, [N/A]\n")
    assert gpus[0] == {"index": 0, "name": "NVIDIA H100 80GB HBM3", "memory_used_mb": 0.0,
                       "memory_total_mb": 81559.0, "utilization_pct": 0.0, "source": "nvidia-smi"}
    assert gpus[1]["utilization_pct"] is None and gpus[1]["memory_used_mb"] == 1200.0


def test_selection_route_gives_the_select_views_rows(lab_server):
    from llmops_jupyter.registry import Registry
    from llmops_jupyter.views.select import selection_rows

    ev = lab_server.ids["eval"]
    r = get(lab_server, f"selection?runs={ev}&quality=f1")
    assert r.status_code == 200
    body = r.json()
    expected = selection_rows(Registry(lab_server.home), [ev], "f1")
    assert body["rows"] == json_round(expected) and body["columns"][0] == "version" and body["rows"]
    # the fixture's local versions have no price: cost unknown (null, never 0) and so never on the front
    assert all(x["cost_usd"] is None and not x["pareto"] and x["why"] == "cost unknown" for x in body["rows"])
    assert get(lab_server, "selection?runs=no-such-run").status_code == 404


def json_round(rows):
    import json

    return json.loads(json.dumps(rows))
