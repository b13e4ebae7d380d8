"""Governance: model cards, the append-only audit log (through a real kernel), doctor, MLflow and bundle export,
resource sampling. Registry state is built through the Registry API, as the stages would write it."""

from __future__ import annotations

import json
import shutil
import sqlite3
import sys
import textwrap
from importlib import metadata
from pathlib import Path

import pytest

from llmops_jupyter.registry import RunStatus

ROOT = Path(__file__).resolve().parents[1]


def _folder(registry, prefix: str, files: dict[str, str], copy_from: Path | None = None) -> Path:
    folder = registry.staging_dir(prefix)
    if copy_from is not None:
        shutil.copytree(copy_from, folder, dirs_exist_ok=True)
    for name, text in files.items():
        (folder / name).write_text(text)
    return folder


@pytest.fixture()
def lifecycle(registry, tiny_model, tiny_dataset):
    """base → finetune (adapter) → merge (merged) → eval (on merged) → quantize (quantized), as stages record it."""
    base = registry.add_reference(tiny_model, "base-model", name="tiny-llama")
    ft = registry.create_run("finetune", {"learning_rate": 2e-4, "epochs": 2, "lora": {"r": 8, "alpha": 16},
                                          "model": str(tiny_model)})
    for art in (tiny_dataset, base):
        registry.link_input(ft, art)
    registry.log_metrics(ft, {"train_loss": 2.5}, step=1)
    registry.log_metrics(ft, {"train_loss": 1.25, "eval_loss": 1.5}, step=2)
    adapter = registry.add_artifact(
        _folder(registry, "adapter", {"adapter_config.json": json.dumps(
            {"base_model_name_or_path": str(tiny_model), "r": 8, "peft_type": "LORA"})}),
        "adapter", name="tiny-lora", run_id=ft, move=True, inputs=[tiny_dataset.hash, base.hash], relation="finetune")
    registry.finish_run(ft, RunStatus.FINISHED)

    mg = registry.create_run("merge", {"adapter": adapter.hash, "dtype": "float32"})
    registry.link_input(mg, adapter)
    registry.link_input(mg, base)
    merged = registry.add_artifact(_folder(registry, "merged", {"merge_info.json": json.dumps({"adapter": adapter.hash})},
                                           copy_from=tiny_model),
                                   "merged", name="tiny-merged", run_id=mg, move=True,
                                   inputs=[adapter.hash, base.hash], relation="merge")
    registry.finish_run(mg, RunStatus.FINISHED)

    ev = registry.create_run("eval", {"model": merged.hash, "metrics": ["exact_match", "rouge_l"]})
    registry.link_input(ev, merged)
    registry.link_input(ev, tiny_dataset)
    registry.log_metrics(ev, {"exact_match": 0.625, "rouge_l": 0.71})
    registry.add_artifact(_folder(registry, "eval", {"results.jsonl": "{}\n"}), "eval-results", run_id=ev, move=True,
                          inputs=[merged.hash, tiny_dataset.hash], relation="eval")
    registry.finish_run(ev, RunStatus.FINISHED, summary={"gates": [
        {"name": "exact_match >= 0.5", "passed": True, "value": 0.625}]})

    other = registry.create_run("eval", {"model": "someone-else"})  # shares only the dataset: must not be listed
    registry.link_input(other, tiny_dataset)
    registry.log_metrics(other, {"exact_match": 0.01})
    registry.finish_run(other, RunStatus.FINISHED)

    qt = registry.create_run("quantize", {"method": "gptq", "bits": 4, "group_size": 32})
    registry.link_input(qt, merged)
    registry.log_metrics(qt, {"ppl_before": 12.0, "ppl_after": 12.6, "ppl_delta": 0.6})
    quantized = registry.add_artifact(_folder(registry, "quant", {"quantize_config.json": '{"bits": 4}'},
                                              copy_from=tiny_model), "quantized", run_id=qt, move=True,
                                      inputs=[merged.hash], relation="quantize")
    registry.finish_run(qt, RunStatus.FINISHED)
    return {"base": base, "adapter": adapter, "merged": merged, "quantized": quantized, "dataset": tiny_dataset,
            "runs": {"finetune": ft, "merge": mg, "eval": ev, "other_eval": other, "quantize": qt}}


def test_model_card_of_merged_model(registry, lifecycle, shell, tmp_path):
    from llmops_jupyter.governance.cards import build_model_card, save_model_card
    from llmops_jupyter.governance.export import export_bundle

    ds, merged = lifecycle["dataset"], lifecycle["merged"]
    manifest = json.loads((ds.path / "manifest.json").read_text())
    card = build_model_card(registry, lifecycle["runs"]["merge"])  # a run ref picks its model output
    md = card.markdown
    assert card.data["model"]["hash"] == merged.hash
    # data version: hash, manifest version, counts; PII not recorded by the fixture's manifest
    assert ds.hash in md and manifest["version"] in md
    assert card.data["datasets"][0]["counts"] == manifest["counts"] and "train=36" in md
    assert card.data["datasets"][0]["pii"] is None and "not recorded" in md
    # training config of the finetune run that made the adapter, with its final metrics
    (train,) = card.data["training"]
    assert train["run_id"] == lifecycle["runs"]["finetune"] and train["params"]["learning_rate"] == 2e-4
    assert "| lora.r | 8 |" in md and "| learning_rate | 0.0002 |" in md and "| train_loss | 1.25 |" in md
    # eval numbers and gates of the eval on this model; the unrelated eval sharing the dataset is not listed
    assert [e["run_id"] for e in card.data["evaluations"]] == [lifecycle["runs"]["eval"]]
    assert card.data["evaluations"][0]["metrics"] == {"exact_match": 0.625, "rouge_l": 0.71}
    assert "| exact_match | 0.625 |" in md and "| exact_match >= 0.5 | pass |" in md
    assert lifecycle["runs"]["other_eval"] not in md
    # base model and licence from the base folder's llmops_model.json; placeholders for the human fields
    assert card.data["base_model"]["licence"] == "Apache-2.0" and "license: apache-2.0" in md
    assert "_Not filled in._" in md and "Quantization" not in md  # quantize is downstream of the merged model
    assert "```mermaid" in md and lifecycle["adapter"].hash[:12] in md
    html = card._repr_html_()
    assert "<table>" in html and ds.hash in html

    saved = save_model_card(registry, card)
    assert saved.kind == "model-card" and (saved.path / "README.md").read_text() == md
    assert (saved.path / "model_card.html").exists()
    down = registry.lineage(merged, "down")
    assert {"src": merged.hash, "dst": saved.hash, "relation": "model-card", "run_id": None} in down["edges"]

    # the magic: fields a person fills in are kept for the next card of the same model
    shown = shell.run_line_magic("llmops", f'card {merged.hash[:10]} --intended-use "Demo answers about colours"')
    assert "Demo answers about colours" in shown.markdown and shown.artifact is not None
    again = shell.run_line_magic("llmops", f"card {merged.hash} --no-save")
    assert again.data["intended_use"] == "Demo answers about colours" and again.artifact is None

    qcard = build_model_card(registry, lifecycle["quantized"])
    (q,) = qcard.data["quantization"]
    assert q["method"] == "gptq" and q["quality"]["ppl_delta"] == 0.6 and "| ppl_delta | 0.6 |" in qcard.markdown
    assert qcard.data["evaluations"][0]["artifact"] == merged.hash  # upstream eval, labelled as such
    assert "upstream merged" in qcard.markdown

    # a bundle that transformers loads as is, with the card as README and the lineage
    from transformers import AutoModelForCausalLM, AutoTokenizer

    info = export_bundle(registry, merged.hash, tmp_path / "bundle")
    out = Path(info["out"])
    assert {"README.md", "model_card.html", "lineage.json", "llmops_bundle.json", "config.json"} <= set(info["files"])
    assert AutoModelForCausalLM.from_pretrained(out).config.hidden_size == 64
    assert AutoTokenizer.from_pretrained(out).chat_template
    assert json.loads((out / "lineage.json").read_text())["root"] == merged.hash
    with pytest.raises(Exception, match="not empty"):
        export_bundle(registry, merged.hash, out)


def test_card_reads_pii_counts_and_survives_missing_records(registry):
    from llmops_jupyter.governance.cards import build_model_card
    from llmops_jupyter.stages.data.format import write_dataset_dir

    folder = registry.staging_dir("data")
    row = {"id": "1", "messages": [], "prompt": "p", "completion": "c", "text": "pc", "n_tokens": 2}
    write_dataset_dir(folder, [row], [row], {"pii": {"EMAIL": 3, "PHONE": 1}, "dropped": {"empty": 2}})
    ds = registry.add_artifact(folder, "dataset", move=True)
    model = registry.add_artifact(_folder(registry, "m", {"config.json": "{}"}), "merged", move=True,
                                  inputs=[ds.hash])  # no runs, no base, no evals: everything "not recorded"
    md = build_model_card(registry, model.hash).markdown
    assert "EMAIL: 3, PHONE: 1" in md and "empty: 2" in md
    assert "unknown — fill in" in md and "No evaluation run recorded" in md and "No training run" in md


NOTEBOOK_STAGE = '''
import dataclasses
from llmops_jupyter.core.config import StageConfig, option
from llmops_jupyter.core.stage import Stage, register_stage

@dataclasses.dataclass
class CopyConfig(StageConfig):
    source: str = option(help="artifact to read", positional=True)
    note: str = option("", "text to append")

@register_stage
class CopyStage(Stage):
    """Copy a text artifact (a stand-in for any stage that reads and writes artifacts)."""
    name = "audit-copy"
    config_cls = CopyConfig
    resource_sampling = True

    def run(self, ctx):
        art = ctx.use(ctx.config.source)
        out = ctx.staging_dir() / "copy.txt"
        out.write_text((art.path / "data.txt").read_text() + ctx.config.note)
        ctx.save_artifact(out, "report", name="copy")
'''


def test_audit_log_from_a_real_kernel(registry, home, tmp_path, monkeypatch, shell):
    nbformat = pytest.importorskip("nbformat")
    from nbclient import NotebookClient

    src = registry.add_artifact(_folder(registry, "src", {"data.txt": "hello"}), "dataset", move=True)
    nb_path = tmp_path / "audited.ipynb"
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell("%load_ext llmops_jupyter"),
                nbformat.v4.new_code_cell(textwrap.dedent(NOTEBOOK_STAGE)),
                nbformat.v4.new_code_cell(f"r = %llmops audit-copy {src.hash} --note ' world'")]
    nbformat.write(nb, nb_path)
    monkeypatch.setenv("LLMOPS_NOTEBOOK", str(nb_path))  # the papermill glue sets this on main
    monkeypatch.setenv("LLMOPS_SAMPLE_S", "0.05")
    monkeypatch.setenv("JUPYTERHUB_USER", "ada")
    monkeypatch.setenv("PYTHONPATH", str(ROOT))
    NotebookClient(nb, kernel_name="python3", timeout=120, resources={"metadata": {"path": str(tmp_path)}}).execute()

    (run,) = registry.list_runs(stage="audit-copy")
    assert run["status"] == "finished" and run["notebook"] == str(nb_path)
    rows = registry.query("SELECT * FROM audit_log WHERE run_id=? ORDER BY id", (run["id"],))
    assert [r["event"] for r in rows] == ["started", "input", "artifact", "finished"]
    out = registry.run_artifacts(run["id"], "output")[0]
    for r in rows:
        assert r["notebook"] == str(nb_path) and r["cell"] == 3 and r["user"] == "ada" and r["front_end"] == "magic"
        assert r["source"] == f"r = %llmops audit-copy {src.hash} --note ' world'"
        assert r["command"] == f"llmops audit-copy {src.hash} --note ' world'"
    assert (rows[1]["artifact"], rows[1]["kind"]) == (src.hash, "dataset")
    assert (rows[2]["artifact"], rows[2]["kind"]) == (out.hash, "report")
    # the resource sampler ran during the long-flagged stage (CPU here: process RSS), before and after at least
    assert len(registry.metric_history(run["id"], "cpu_rss_mb")) >= 2

    # append-only: the triggers refuse UPDATE and DELETE, through the registry or a raw connection
    with pytest.raises(sqlite3.IntegrityError, match="append-only"):
        with registry.transaction() as con:
            con.execute("UPDATE audit_log SET user='mallory' WHERE run_id=?", (run["id"],))
    raw = sqlite3.connect(registry.db_path)
    with pytest.raises(sqlite3.IntegrityError, match="append-only"):
        raw.execute("DELETE FROM audit_log")
    raw.close()
    assert len(registry.query("SELECT * FROM audit_log WHERE run_id=?", (run["id"],))) == 4

    table = shell.run_line_magic("llmops", f"audit --run {run['id']} --user ada --since 1h")
    assert len(table) == 4 and "audited.ipynb [cell 3]" in str(table)
    assert len(shell.run_line_magic("llmops", "audit --user nobody")) == 0
    with pytest.raises(Exception, match="audit: --since 'yesterday-ish' is not a duration, a time or a date"):
        shell.run_line_magic("llmops", "audit --since yesterday-ish")


def test_since_and_until_mean_the_same_in_every_command():
    import datetime as dt

    from llmops_jupyter.core.errors import ConfigError
    from llmops_jupyter.core.timeparse import parse_when

    now = 1_800_000_000.0
    for text, expected in [("30m", now - 1800), ("-30m", now - 1800), ("2h", now - 7200), ("1.5d", now - 129600),
                           ("-3600", now - 3600), (-60, now - 60), ("1700000000", 1.7e9), (1.7e9, 1.7e9),
                           ("2026-11-01", dt.datetime(2026, 11, 1).timestamp()),
                           ("2026-11-01T09:30+00:00", dt.datetime(2026, 11, 1, 9, 30, tzinfo=dt.timezone.utc)
                            .timestamp()), (None, None), ("  ", None)]:
        assert parse_when(text, now=now) == pytest.approx(expected), text
    with pytest.raises(ConfigError, match=r"monitor: --until 'soon' is not a duration.*use e.g. 30m") as exc:
        parse_when("soon", field="until", command="monitor")
    assert exc.value.field == "until"


def test_resource_sampler_in_process(registry):
    from llmops_jupyter.core.runner import EventType, Runner
    from llmops_jupyter.core.stage import Stage
    from llmops_jupyter.governance.gpu import GpuSampler, sample_once, sample_resources

    class Sleepy(Stage):
        name = "sleepy"

        def run(self, ctx):
            with sample_resources(ctx, interval=0.05) as sampler:
                pass
            ctx.set_summary(samples=sampler.samples, backend=sampler.backend)

    seen = []
    runner = Runner(registry, listeners=[lambda e: seen.append(e) if e.type is EventType.METRIC else None])
    result = runner.run(Sleepy())
    assert result.summary["samples"] >= 2 and "cpu_rss_mb" in result.metrics  # CPU path on this machine
    assert any("cpu_rss_mb" in e.data["values"] for e in seen)  # live views get the samples as METRIC events
    assert sample_once()["cpu_rss_mb"] > 1
    with pytest.raises(ValueError):
        GpuSampler()


def test_automatic_card_for_merged_output(registry, tiny_model, monkeypatch):
    import llmops_jupyter.governance.hooks  # noqa: F401 - what the front door imports
    from llmops_jupyter.core.runner import Runner
    from llmops_jupyter.core.stage import Stage

    class FakeMerge(Stage):  # writes a merged artifact the way the merge stage does
        name = "merge-like"

        def run(self, ctx):
            out = ctx.staging_dir()
            shutil.copytree(tiny_model, out / "m")
            ctx.save_artifact(out / "m", "merged", name="auto")

    merged = Runner(registry).run(FakeMerge()).artifact
    (card,) = [a for a in registry.list_artifacts("model-card") if a.meta["model"] == merged.hash]
    assert merged.hash in (card.path / "README.md").read_text()
    monkeypatch.setenv("LLMOPS_AUTO_CARD", "0")
    Runner(registry).run(FakeMerge())
    assert len(registry.list_artifacts("model-card")) == 1


def test_automatic_sampling_policy(registry, monkeypatch):
    """The Runner listener samples long stages on GPU machines; on CPU only when asked (stage flag or env)."""
    import llmops_jupyter.governance.hooks  # noqa: F401 - what the front door imports
    from llmops_jupyter.core.runner import Runner
    from llmops_jupyter.core.stage import Stage
    from llmops_jupyter.governance import gpu

    class FakeLong(Stage):  # named like a long stage; not registered, so nothing else sees it
        name = "finetune"

        def run(self, ctx):
            ctx.log_metrics({"loss": 1.0}, step=1)

    monkeypatch.setattr(gpu, "_nvml", lambda: None)  # the CPU machine this test runs on, stated explicitly
    monkeypatch.setenv("LLMOPS_SAMPLE_S", "0.05")
    assert Runner(registry).run(FakeLong()).metrics == {"loss": 1.0}  # auto on CPU: the stage's metrics only
    monkeypatch.setenv("LLMOPS_RESOURCE_SAMPLING", "on")
    assert "cpu_rss_mb" in Runner(registry).run(FakeLong()).metrics
    monkeypatch.setenv("LLMOPS_RESOURCE_SAMPLING", "off")
    assert Runner(registry).run(FakeLong()).metrics == {"loss": 1.0}


def test_doctor_reports_missing_extra_with_install_command(monkeypatch, shell):
    from llmops_jupyter.governance import doctor

    real = metadata.version

    def fake_version(name):
        if name in ("papermill", "peft"):
            raise metadata.PackageNotFoundError(name)
        return real(name)

    monkeypatch.setattr(metadata, "version", fake_version)
    checks = {c.check: c for c in doctor.run_checks(cuda=False)}
    assert checks["extra [batch]"].status == "missing" and "papermill" in checks["extra [batch]"].detail
    assert checks["extra [batch]"].fix == "pip install 'llmops-jupyter[batch]'"
    assert checks["peft"].status == "missing" and checks["peft"].fix == "pip install 'llmops-jupyter[finetune]'"
    assert checks["python"].status == "ok" and checks["transformers"].status == "ok"
    assert checks["kernel spec"].status in ("ok", "warn") and checks["kernel spec"].fix.startswith(
        ("python -m ipykernel install", "")) and "lab extension" in checks
    table = shell.run_line_magic("llmops", "doctor --no-cuda")
    assert "pip install 'llmops-jupyter[batch]'" in str(table) and "need attention" in table.note
    monkeypatch.undo()
    cuda = {c.check: c for c in doctor.check_torch_cuda()}  # imports torch (and bitsandbytes): last, and real
    import torch

    assert torch.__version__ in cuda["torch build"].detail
    assert cuda["cuda available"].status == ("ok" if torch.cuda.is_available() else cuda["cuda available"].status)
    if "bitsandbytes backend" in cuda:
        assert cuda["bitsandbytes backend"].status == "ok"


def test_doctor_tested_ranges_match_pyproject():
    tomllib = pytest.importorskip("tomllib")
    from llmops_jupyter.governance.doctor import TESTED

    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    for dists, (spec, extra) in TESTED.items():
        reqs = [r.replace(" ", "") for r in extras[extra]]
        assert any(r.split("[")[0].startswith(tuple(dists.split("|"))) for r in reqs), (dists, extra)
        assert any(r.endswith(spec) or spec in r for r in reqs), (dists, spec, reqs)


def test_mlflow_export_reads_back(registry, tmp_path, shell, monkeypatch):
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    from llmops_jupyter.governance.cards import build_model_card, save_model_card
    from llmops_jupyter.governance.export import export_mlflow

    run = registry.create_run("finetune", {"learning_rate": 1e-3, "lora": {"r": 4}, "targets": ["q_proj", "v_proj"]},
                              notebook="train.ipynb")
    for step, loss in enumerate([3.0, 2.0, 1.5], 1):
        registry.log_metrics(run, {"loss": loss}, step=step)
    registry.log_metrics(run, {"final_score": 0.5})
    report = registry.add_artifact(_folder(registry, "rep", {"report.json": '{"ok": true}'}), "report", run_id=run,
                                   move=True)
    adapter = registry.add_artifact(_folder(registry, "ad", {"adapter_config.json": "{}"}), "adapter", run_id=run,
                                    move=True)
    registry.finish_run(run, RunStatus.FINISHED, summary={"best_step": 3})
    card = save_model_card(registry, build_model_card(registry, adapter.hash))
    failed = registry.create_run("eval", {"model": adapter.hash})
    registry.finish_run(failed, RunStatus.FAILED, error="GateError: exact_match 0.1 < 0.5")

    uri = (tmp_path / "mlruns").as_uri()
    rows = export_mlflow(registry, uri, experiment="governance-test")
    assert [r["status"] for r in rows] == ["exported", "exported"]
    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("governance-test")
    by_id = {r.data.tags["llmops.run_id"]: r for r in client.search_runs([exp.experiment_id])}
    assert set(by_id) == {run, failed}
    m = by_id[run]
    reg_run = registry.get_run(run)
    assert m.data.params == {"learning_rate": "0.001", "lora.r": "4", "targets": '["q_proj", "v_proj"]'}
    assert m.data.tags["llmops.stage"] == "finetune" and m.data.tags["mlflow.source.name"] == "train.ipynb"
    assert m.data.tags["summary.best_step"] == "3" and m.info.status == "FINISHED"
    assert m.info.start_time == int(reg_run["started_at"] * 1000)
    hist = sorted((x.step, x.value) for x in client.get_metric_history(m.info.run_id, "loss"))
    assert hist == [(h["step"], h["value"]) for h in registry.metric_history(run, "loss")] == [
        (1, 3.0), (2, 2.0), (3, 1.5)]
    assert m.data.metrics == registry.metrics(run)
    paths = {a.path for a in client.list_artifacts(m.info.run_id)}
    assert {f"report-{report.short}", f"model-card-{adapter.short}", "lineage.json"} <= paths
    assert f"adapter-{adapter.short}" not in paths  # model folders only with --include-models
    card_files = {a.path for a in client.list_artifacts(m.info.run_id, f"model-card-{adapter.short}")}
    assert f"model-card-{adapter.short}/README.md" in card_files
    local = client.download_artifacts(m.info.run_id, f"model-card-{adapter.short}/README.md", str(tmp_path / "dl"))
    assert Path(local).read_text() == (card.path / "README.md").read_text()
    assert by_id[failed].info.status == "FAILED" and "GateError" in by_id[failed].data.tags["llmops.error"]

    again = shell.run_line_magic("llmops", f"export --to mlflow --tracking-uri {uri} --experiment governance-test")
    assert "already exported" in str(again) and len(client.search_runs([exp.experiment_id])) == 2
    assert sys.modules.get("mlflow") is not None
