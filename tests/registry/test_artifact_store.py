"""The artifact store on shared storage (``LLMOPS_ARTIFACTS``): fsspec's ``memory://`` and a ``file://`` folder.

Real stages write and read through it (data → fine-tune → eval); a file changed in the store is refused on read
and reported by ``registry copy``'s verification; a second machine (another home: its own cache) reads what the
first wrote through the shared PostgreSQL registry.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import pytest

from llmops_jupyter.core.errors import RegistryError
from llmops_jupyter.frontends.cli import main as cli
from llmops_jupyter.registry import Registry
from llmops_jupyter.testing import tiny_records

fsspec = pytest.importorskip("fsspec")


def _stored_files(url: str) -> list[str]:
    fs, path = fsspec.core.url_to_fs(url)
    return sorted(fs.find(path))


def _damage(url: str, rel: str) -> None:
    """Change one stored file of an artifact in place, as a bad disk or a careless `aws s3 cp` would."""
    fs, path = fsspec.core.url_to_fs(url)
    target = f"{path}/{rel}"
    fs.pipe_file(target, fs.cat_file(target) + b"\n")


def test_stage_chain_writes_and_reads_through_a_memory_store(home, tiny_model, monkeypatch):
    """data → finetune → eval with every artifact in ``memory://``: nothing lands in the home's artifacts folder,
    the stored artifacts re-hash to their ids, a cleared local cache is refilled from the store, and an adapter
    damaged in the store makes the eval that loads it fail in one line naming it."""
    from llmops_jupyter.core.runner import Runner
    from llmops_jupyter.testing import write_tiny_dataset

    root = f"memory://team-{uuid.uuid4().hex[:8]}/artifacts"
    monkeypatch.setenv("LLMOPS_ARTIFACTS", root)
    reg = Registry(home)
    assert reg.artifact_root == root
    data = write_tiny_dataset(reg, tiny_model, n=24)
    runner = Runner(reg, defaults=False)
    ft = runner.run("finetune", {"model": str(tiny_model), "data": data.hash, "max_steps": 3, "batch_size": 4,
                                 "checkpoint_every": 0})
    (adapter,) = reg.run_artifacts(ft.run_id, "output")
    assert adapter.location.startswith(root + "/") and data.location.startswith(root + "/")
    assert not any((home / "artifacts").rglob("*")), "an artifact was written to the home instead of the store"
    stored = _stored_files(root)
    assert not [p for p in stored if "/tmp/" in p], "temp uploads left in the store"
    assert any(p.endswith(adapter.hash + ".json") for p in stored), "no commit object for the adapter"
    assert reg.verify_artifacts() == []

    # another process on this machine after the cache was cleared: the eval loads the adapter from the store
    import shutil

    shutil.rmtree(reg.cache_dir)
    ev = runner.run("eval", {"model": [ft.run_id], "data": data.hash, "limit": 4, "max_new_tokens": 4})
    assert ev.status == "finished"
    assert (reg.cache_dir / adapter.hash[:2] / adapter.hash).is_dir()

    # damaged in the store, read by a machine without a cached copy: refused, nothing cached
    shutil.rmtree(reg.cache_dir)
    weights = next(p for p in _stored_files(adapter.location) if p.endswith(".safetensors"))
    _damage(adapter.location, weights.rsplit(adapter.hash + "/", 1)[1])
    assert reg.verify_artifacts() == [f"{adapter.short}: content changed at {adapter.location}"]
    with pytest.raises(Exception) as err:
        runner.run("eval", {"model": [ft.run_id], "data": data.hash, "limit": 4, "max_new_tokens": 4})
    message = str(err.value)
    assert f"Artifact {adapter.short}" in message and "does not match its hash" in message
    assert len(message.splitlines()) == 1
    assert not (reg.cache_dir / adapter.hash[:2] / adapter.hash).exists()


@pytest.fixture()
def file_store(tmp_path, monkeypatch) -> str:
    """A shared folder as a file:// store; LLMOPS_ARTIFACTS (which the CLI's --artifacts sets) is restored after."""
    monkeypatch.setenv("LLMOPS_ARTIFACTS", "")
    return (tmp_path / "shared-artifacts").as_uri()


def _data_cli(home: Path, store: str, src: Path, *extra: str) -> None:
    assert cli(["--home", str(home), "--artifacts", store, "data", str(src), "--no-dedup", *extra]) == 0


def test_two_machines_share_a_file_store_through_postgresql(tmp_path, file_store, pg_url, monkeypatch):
    """Machine A (its home) records a dataset into the shared folder; machine B (another home, the same database)
    reads it through its own cache, verified; after a file changes in the store, machine C refuses it."""
    src = tmp_path / "records.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in tiny_records(24)))
    a_home, b_home, c_home = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    _data_cli(a_home, file_store, src, "--name", "shared")
    b = Registry(b_home, database=pg_url, artifacts=file_store)
    art = b.get_artifact("data@latest", kind="dataset")
    assert art.location.startswith(file_store + "/") and art.store is not None
    files = sorted(p.relative_to(art.path).as_posix() for p in art.path.rglob("*") if p.is_file())
    assert art.path.is_relative_to(b_home) and files, "B did not get its own verified copy"
    assert b.verify_artifacts() == []
    assert not list((tmp_path / "shared-artifacts" / "tmp").iterdir()), "temp uploads left in the store"

    _damage(art.location, files[0])
    c = Registry(c_home, database=pg_url, artifacts=file_store)
    with pytest.raises(RegistryError) as err:
        c.get_artifact(art.hash).path  # noqa: B018 - reading the files is the point
    assert "does not match its hash" in str(err.value) and art.short in str(err.value)
    assert art.path.exists(), "B's verified copy stays usable"
    assert c.verify_artifacts() == [f"{art.short}: content changed at {art.location}"]


def test_registry_copy_verifies_the_artifacts_on_the_store(tmp_path, home, file_store, pg_url, monkeypatch, capsys):
    """``registry copy`` of a SQLite registry whose artifacts are on a file:// store re-hashes them there: a clean
    copy to PostgreSQL and back says so; after a stored file changed, a copy is refused naming the artifact."""
    monkeypatch.delenv("LLMOPS_REGISTRY")
    src = tmp_path / "records.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in tiny_records(24)))
    _data_cli(home, file_store, src, "--name", "a")
    monkeypatch.setenv("LLMOPS_ARTIFACTS", file_store)
    capsys.readouterr()
    assert cli(["registry", "copy", "--to", pg_url]) == 0
    assert "artifacts all re-hash" in capsys.readouterr().out
    # from here on the source is the PostgreSQL copy (--registry sets LLMOPS_REGISTRY for the process)
    assert cli(["--registry", pg_url, "registry", "info"]) == 0
    assert file_store in capsys.readouterr().out  # where the artifacts are, beside where the records are
    assert cli(["registry", "copy", "--to", "sqlite", "--to-home", str(tmp_path / "back")]) == 0  # and back
    assert "row counts equal" in capsys.readouterr().out
    pg = Registry(home, database=pg_url)
    (art,) = pg.list_artifacts("dataset")
    assert art.location.startswith(file_store + "/") and pg.verify_artifacts() == []

    rel = next(p for p in _stored_files(art.location) if not p.endswith(".json")).rsplit(art.hash + "/", 1)[1]
    _damage(art.location, rel)
    assert cli(["registry", "copy", "--to", "sqlite", "--to-home", str(tmp_path / "again")]) == 1
    err = capsys.readouterr().err
    assert f"{art.short}: content changed at {art.location}" in err and len(err.strip().splitlines()) == 1


def test_an_upload_killed_before_its_commit_is_not_an_artifact(tmp_path, home, file_store, monkeypatch):
    """Files a writer left in the store without a commit object are not read as the artifact; the next writer of
    the same content replaces them and commits."""
    src = tmp_path / "folder"
    src.mkdir()
    (src / "a.txt").write_text("hello")
    reg = Registry(home, artifacts=file_store)
    art = reg.add_artifact(src, "dataset")
    store = reg.store
    fs, path = fsspec.core.url_to_fs(art.location)
    fs.rm(path + ".json")  # as if the writer died between the move and the commit
    fs.pipe_file(path + "/a.txt", b"half")
    import shutil

    shutil.rmtree(reg.cache_dir)
    assert not store.exists(art.hash)
    with pytest.raises(RegistryError, match="missing from the store"):
        reg.get_artifact(art.hash).path  # noqa: B018
    again = reg.add_artifact(src, "dataset")
    assert again.hash == art.hash and reg.verify_artifacts() == []
    shutil.rmtree(reg.cache_dir)
    assert (again.path / "a.txt").read_text() == "hello"


@pytest.fixture()
def s3_store(monkeypatch):
    """A bucket on a real S3 endpoint served locally by moto's server mode, reached through fsspec's s3fs."""
    pytest.importorskip("s3fs")
    moto_server = pytest.importorskip("moto.server")
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        for key, value in (("AWS_ACCESS_KEY_ID", "testing"), ("AWS_SECRET_ACCESS_KEY", "testing"),
                           ("AWS_DEFAULT_REGION", "us-east-1")):
            monkeypatch.setenv(key, value)
        monkeypatch.setitem(fsspec.config.conf, "s3", {"endpoint_url": f"http://{host}:{port}"})
        bucket = f"team-{uuid.uuid4().hex[:8]}"
        fs = fsspec.filesystem("s3", skip_instance_cache=True)
        fs.mkdir(bucket)
        yield f"s3://{bucket}/llmops"
    finally:
        fsspec.filesystem("s3").clear_instance_cache()
        server.stop()


def test_an_s3_store_on_a_real_s3_endpoint(tmp_path, home, s3_store):
    """The same contract on ``s3://`` (moto's S3 server, s3fs): written under tmp/ then moved and committed, read
    back verified into another home's cache, a changed object refused on read and reported by the check."""
    src = tmp_path / "folder"
    (src / "sub").mkdir(parents=True)
    (src / "a.txt").write_text("hello")
    (src / "sub" / "b.bin").write_bytes(bytes(range(256)) * 64)
    reg = Registry(home, artifacts=s3_store)
    art = reg.add_artifact(src, "dataset")
    assert art.location == f"{s3_store}/{art.hash[:2]}/{art.hash}"
    stored = _stored_files(s3_store)
    assert not [p for p in stored if "/tmp/" in p] and any(p.endswith(art.hash + ".json") for p in stored)
    assert reg.verify_artifacts() == []
    other = Registry(tmp_path / "other-home", database="", artifacts=s3_store)  # another machine's cache
    copy = other._artifact(reg._query("SELECT * FROM artifacts")[0]).path
    assert copy.is_relative_to(tmp_path / "other-home") and (copy / "sub" / "b.bin").read_bytes() == \
        (src / "sub" / "b.bin").read_bytes()
    _damage(art.location, "a.txt")
    assert reg.verify_artifacts() == [f"{art.short}: content changed at {art.location}"]
    third = Registry(tmp_path / "third-home", database="", artifacts=s3_store)
    with pytest.raises(RegistryError, match="does not match its hash"):
        third._artifact(reg._query("SELECT * FROM artifacts")[0]).path  # noqa: B018
