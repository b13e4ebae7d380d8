"""Governance: model cards, the append-only audit log (through a real kernel), doctor, MLflow and bundle export,
resource sampling. The model lifecycle behind the card and export tests is made by running the real stages on the
tiny model; only the tests of cards over missing records and of the audit log shape records by hand."""

from __future__ import annotations

import json
import shutil
import sqlite3
import sys
import textwrap
from importlib import metadata
from pathlib import Path

import pytest

from llmops_jupyter.testing import sliced_kernel_manager

ROOT = Path(__file__).resolve().parents[2]


def _folder(registry, prefix: str, files: dict[str, str], copy_from: Path | None = None) -> Path:
    folder = registry.staging_dir(prefix)
    if copy_from is not None:
        shutil.copytree(copy_from, folder, dirs_exist_ok=True)
    for name, text in files.items():
        (folder / name).write_text(text)
    return folder


EVAL = {"limit": 4, "max_new_tokens": 4, "metrics": ["exact_match", "f1", "ppl"]}


@pytest.fixture(scope="module")
def lifecycle(tiny_model, tmp_path_factory):
    """data → finetune (adapter) → merge (merged) → evals → quantize (bnb-4bit), every record made by the real
    stages in a registry of its own, shared by the module's card and export tests.

    Evals: the base model (the baseline), the merged model gated against it (passes) and gated with a rule no model
    can meet (fails with a GateError after storing everything), and another model on the same dataset only.
    """
    from llmops_jupyter.core.errors import GateError
    from llmops_jupyter.core.runner import Runner
    from llmops_jupyter.registry import Registry
    from llmops_jupyter.testing import build_tiny_model, tiny_records

    root = tmp_path_factory.mktemp("governance")
    home = root / ".llmops"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LLMOPS_HOME", str(home))
        mp.chdir(root)
        reg = Registry(home)
        runner = Runner(reg)
        data = runner.run("data", {"source": tiny_records(48), "tokenizer": str(tiny_model), "eval_fraction": 0.25,
                                   "name": "tiny"})
        mp.setenv("LLMOPS_NOTEBOOK", "train.ipynb")  # what the papermill glue / a kernel records
        ft = runner.run("finetune", {"model": str(tiny_model), "data": data.run_id, "rank": 8, "alpha": 16,
                                     "lr": 1e-2, "max_steps": 8, "batch_size": 4, "seq_len": 64, "log_every": 2,
                                     "checkpoint_every": 0})
        mp.delenv("LLMOPS_NOTEBOOK")
        mg = runner.run("merge", {"adapter": ft.run_id})
        base_eval = runner.run("eval", {"model": [str(tiny_model)], "data": data.run_id, **EVAL})
        ev = runner.run("eval", {"model": [mg.run_id], "data": data.run_id, "baseline": base_eval.run_id,
                                 "gate": "ppl<=+5%", **EVAL})  # fine-tuning lowered the perplexity: passes
        with pytest.raises(GateError):
            runner.run("eval", {"model": [mg.run_id], "data": data.run_id, "baseline": base_eval.run_id,
                                "gate": "exact_match>=1.01", **EVAL})  # a delta above 1 is impossible
        failed = reg.list_runs(stage="eval", limit=1)[0]["id"]
        other_model = build_tiny_model(root / "tiny-other", seed=1)
        other = runner.run("eval", {"model": [str(other_model)], "data": data.run_id, **EVAL})
        qt = runner.run("quantize", {"model": mg.run_id, "method": "bnb-4bit", "eval_samples": 4,
                                     "generate_tokens": 4, "compare_eval": False})
    base = reg.get_artifact(ft.artifact.meta["base_model_hash"])
    return {"registry": reg, "home": home, "base": base, "adapter": ft.artifact, "merged": mg.artifact,
            "quantized": qt.artifact, "dataset": data.artifact,
            "results": {"finetune": ft, "merge": mg, "eval": ev, "base_eval": base_eval, "quantize": qt},
            "runs": {"data": data.run_id, "finetune": ft.run_id, "merge": mg.run_id, "base_eval": base_eval.run_id,
                     "eval": ev.run_id, "failed_eval": failed, "other_eval": other.run_id, "quantize": qt.run_id}}


def test_model_card_of_merged_model(lifecycle, shell, tmp_path, monkeypatch):
    from llmops_jupyter.governance.cards import _cell, build_model_card, save_model_card
    from llmops_jupyter.governance.export import export_bundle

    registry, runs, results = lifecycle["registry"], lifecycle["runs"], lifecycle["results"]
    monkeypatch.setenv("LLMOPS_HOME", str(lifecycle["home"]))  # the magics below read the lifecycle's registry
    ds, merged = lifecycle["dataset"], lifecycle["merged"]
    manifest = json.loads((ds.path / "manifest.json").read_text())
    card = build_model_card(registry, runs["merge"])  # a run ref picks its model output
    md = card.markdown
    assert card.data["model"]["hash"] == merged.hash
    # data version: hash, manifest version, counts; the data stage's PII scrub found nothing in the tiny records
    assert ds.hash in md and manifest["version"] in md
    assert card.data["datasets"][0]["counts"] == manifest["counts"] and f"train={manifest['counts']['train']}" in md
    assert card.data["datasets"][0]["pii"] == {} and "none found" in md
    # training config of the finetune run that made the adapter, with its final metrics
    (train,) = card.data["training"]
    ft = results["finetune"]
    assert train["run_id"] == runs["finetune"] and train["params"]["lr"] == 1e-2 and train["params"]["rank"] == 8
    assert "| rank | 8 |" in md and "| alpha | 16 |" in md and "| lr | 0.01 |" in md
    assert f"| train_loss | {_cell(ft.metrics['train_loss'])} |" in md
    # eval numbers and gates of the evals on this model (and the upstream base model); the eval of another model
    # that shares only the dataset is not listed
    evals = {e["run_id"]: e for e in card.data["evaluations"]}
    assert list(evals) == [runs["base_eval"], runs["eval"], runs["failed_eval"]]
    assert evals[runs["base_eval"]]["artifact"] == lifecycle["base"].hash and "upstream base-model" in md
    ev = evals[runs["eval"]]
    assert ev["artifact"] == merged.hash and ev["metrics"]["ppl"] == pytest.approx(results["eval"].metrics["ppl"])
    assert f"| ppl | {_cell(results['eval'].metrics['ppl'])} |" in md
    # the gate results the eval stage recorded (summary["gate"]) show on the card: one pass, one failure
    ((rule, verdict, detail),) = ev["gates"]
    assert (rule, verdict) == ("ppl<=+5%", "pass") and detail["delta"] < 0.05 and detail["model"]
    assert "| ppl<=+5% | pass |" in md
    bad = evals[runs["failed_eval"]]
    assert bad["status"] == "failed" and [g[:2] for g in bad["gates"]] == [["exact_match>=1.01", "FAIL"]]
    assert "| exact_match>=1.01 | FAIL |" in md and "Run failed: Regression gate failed" in md
    assert runs["other_eval"] not in md
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
    delta = results["quantize"].metrics["perplexity_delta"]
    assert q["method"] == "bnb-4bit" and q["bits"] == 4 and q["quality"]["perplexity_delta"] == pytest.approx(delta)
    assert f"| perplexity_delta | {_cell(delta)} |" in qcard.markdown
    assert {e["artifact"] for e in qcard.data["evaluations"]} == {lifecycle["base"].hash, merged.hash}
    assert "upstream merged" in qcard.markdown  # upstream evals, labelled as such

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
    NotebookClient(nb, kernel_name="python3", timeout=120, resources={"metadata": {"path": str(tmp_path)}},
                   kernel_manager_class=sliced_kernel_manager()).execute()

    (run,) = registry.list_runs(stage="audit-copy")
    assert run["status"] == "finished" and run["notebook"] == str(nb_path)
    rows = registry.audit_rows(run_id=run["id"], limit=None)
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
        with registry._transaction() as con:
            con.execute("UPDATE audit_log SET user='mallory' WHERE run_id=?", (run["id"],))
    raw = sqlite3.connect(registry.db_path)
    with pytest.raises(sqlite3.IntegrityError, match="append-only"):
        raw.execute("DELETE FROM audit_log")
    raw.close()
    assert len(registry.audit_rows(run_id=run["id"])) == 4

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
    spec = checks["kernel spec"]
    assert (spec.status == "ok" and not spec.fix) or (
        spec.status == "warn" and spec.fix.startswith("python -m ipykernel install")), spec
    assert "lab extension" in checks
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


def test_mlflow_export_reads_back(lifecycle, tmp_path, shell, monkeypatch):
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    from llmops_jupyter.governance.cards import build_model_card, save_model_card
    from llmops_jupyter.governance.export import _flat_params, export_mlflow

    registry, runs = lifecycle["registry"], lifecycle["runs"]
    monkeypatch.setenv("LLMOPS_HOME", str(lifecycle["home"]))  # the magic below reads the lifecycle's registry
    run, failed, adapter = runs["finetune"], runs["failed_eval"], lifecycle["adapter"]
    card = save_model_card(registry, build_model_card(registry, adapter.hash))
    reg_run, reg_failed = registry.get_run(run), registry.get_run(failed)
    assert reg_failed["status"] == "failed" and reg_failed["error"].startswith("Regression gate failed")

    uri = (tmp_path / "mlruns").as_uri()
    rows = export_mlflow(registry, uri, experiment="governance-test", runs=[run, failed])
    assert [r["status"] for r in rows] == ["exported", "exported"]
    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("governance-test")
    by_id = {r.data.tags["llmops.run_id"]: r for r in client.search_runs([exp.experiment_id])}
    assert set(by_id) == {run, failed}
    m = by_id[run]
    assert m.data.params == _flat_params(reg_run["params"])  # every stage parameter, as the stage recorded it
    assert m.data.params["lr"] == "0.01" and m.data.params["rank"] == "8" and m.data.params["target_modules"] == \
        '["auto"]'
    assert m.data.tags["llmops.stage"] == "finetune" and m.data.tags["mlflow.source.name"] == "train.ipynb"
    assert m.data.tags["summary.steps"] == json.dumps(reg_run["summary"]["steps"]) and m.info.status == "FINISHED"
    assert m.info.start_time == int(reg_run["started_at"] * 1000)
    hist = sorted((x.step, x.value) for x in client.get_metric_history(m.info.run_id, "loss"))
    losses = [(h["step"], h["value"]) for h in registry.metric_history(run, "loss")]
    assert hist == losses and [s for s, _ in losses] == [2, 4, 6, 8]  # --log-every 2, --max-steps 8
    assert m.data.metrics == registry.metrics(run)
    paths = {a.path for a in client.list_artifacts(m.info.run_id)}
    assert {"model-card", "lineage.json"} <= paths  # the adapter is the run's only output: its card travels
    assert f"adapter-{adapter.short}" not in paths  # model folders only with --include-models
    assert m.data.tags[f"llmops.artifact.adapter.{adapter.short}"].startswith(adapter.hash)
    card_files = {a.path for a in client.list_artifacts(m.info.run_id, "model-card")}
    assert "model-card/README.md" in card_files
    local = client.download_artifacts(m.info.run_id, "model-card/README.md", str(tmp_path / "dl"))
    assert Path(local).read_text() == (card.path / "README.md").read_text()
    f = by_id[failed]
    assert f.info.status == "FAILED" and f.data.tags["llmops.error"] == reg_failed["error"]
    results = registry.run_artifacts(failed, "output")[0]  # stored before the gate failed; small, so uploaded
    assert results.kind == "eval-results" and f"eval-results-{results.short}" in {
        a.path for a in client.list_artifacts(f.info.run_id)}

    again = shell.run_line_magic("llmops", f"export --to mlflow --tracking-uri {uri} --experiment governance-test "
                                           f"--run {run} --run {failed}")
    assert "already exported" in str(again) and len(client.search_runs([exp.experiment_id])) == 2
    assert sys.modules.get("mlflow") is not None


def test_gguf_options_of_export_are_refused_for_other_destinations(shell, home):
    """`export --to dir --quant q8_0` would silently drop --quant: one line naming it instead, nothing written."""
    from IPython.core.error import UsageError

    for flags, name in (("--quant q8_0", "--quant"), ("--parity-min 0.5", "--parity-min"), ("--no-parity", "--parity")):
        with pytest.raises(UsageError) as info:
            shell.run_line_magic("llmops", f"export --to dir --model tiny-llama --out {home / 'b'} {flags}")
        msg = str(info.value)
        assert msg.startswith(f"export: {name} applies only with --to gguf (this export is --to dir)")
        assert "\n" not in msg
        assert not (home / "b").exists()
