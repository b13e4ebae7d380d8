"""A SQLite registry on a network filesystem gets a one-line warning with the fix (WAL does not work there)."""

from __future__ import annotations

from pathlib import Path

import pytest

from llmops_jupyter.registry import Registry, backends


def _fake_mounts(monkeypatch, tmp_path: Path, fstype: str) -> None:
    """``/proc/mounts`` as on a machine whose ``tmp_path`` is an NFS mount (a boundary: no NFS server here)."""
    mounts = tmp_path / "mounts"
    mounts.write_text(f"/dev/root / ext4 rw 0 0\nserver:/export {tmp_path} {fstype} rw,vers=4.2 0 0\n")
    real = Path.read_text
    monkeypatch.setattr(Path, "read_text", lambda self, *a, **k: real(mounts if str(self) == "/proc/mounts" else self,
                                                                        *a, **k))


@pytest.mark.parametrize("fstype", ["nfs4", "cifs", "fuse.sshfs"])
def test_sqlite_registry_on_a_network_filesystem_warns_once_with_the_fix(tmp_path, monkeypatch, capsys, fstype):
    monkeypatch.delenv("LLMOPS_REGISTRY", raising=False)
    _fake_mounts(monkeypatch, tmp_path, fstype)
    assert backends.mount_fs_type(tmp_path / "x" / ".llmops") == fstype
    Registry(tmp_path / "x" / ".llmops")
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and f"network filesystem ({fstype})" in err
    assert "LLMOPS_REGISTRY=postgresql://" in err and "Fix:" in err
    Registry(tmp_path / "x" / ".llmops")
    assert capsys.readouterr().err == ""  # once per registry per process


def test_local_disk_and_postgresql_do_not_warn(tmp_path, monkeypatch, capsys, pg_url):
    _fake_mounts(monkeypatch, tmp_path, "nfs4")
    Registry(tmp_path / "pg" / ".llmops")  # LLMOPS_REGISTRY is PostgreSQL: the home only holds files
    assert capsys.readouterr().err == ""
    assert backends.network_fs_warning(Path("/")) is None
