"""The artifact store on shared storage: any fsspec URL (``s3://``, ``gs://``, ``memory://``) or a shared folder.

By default artifacts live in the registry home (``<home>/artifacts``, renamed in from ``<home>/tmp``). A team whose
registry is on PostgreSQL also needs the files where every machine sees them: ``LLMOPS_ARTIFACTS`` (or ``llmops
--artifacts``) names that root. A plain path (an NFS mount) is used as ``file://`` through fsspec too, so both go
through the same three rules:

* **Written temp-then-move, committed last.** An artifact's files are uploaded under ``<root>/tmp/<uuid>/``, moved to
  ``<root>/<ab>/<hash>/`` file by file (a rename on a filesystem; copy-then-delete on an object store), and only
  then is the commit object ``<root>/<ab>/<hash>.json`` written: one object, whose put is atomic on every store,
  written to a temp key and moved on filesystems. An artifact without its commit object does not exist, so a writer killed
  half-way leaves nothing that a reader would take for the artifact.
* **Verified by hash on read.** A process that uses an artifact's files gets them in its own home's cache
  (``<home>/cache/artifacts/<ab>/<hash>``): downloaded to a temp folder, re-hashed (the same
  :func:`~llmops_jupyter.core.files.hash_tree` that named it), and renamed into the cache only when it matches;
  otherwise the read is refused in one line. The registry records the artifact's URL, so any machine (and a
  ``registry copy``) finds it.
* **Checked in place.** :meth:`ArtifactStore.verify` re-hashes the stored files where they are (streamed, nothing
  cached), which is what ``registry copy`` uses.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

from llmops_jupyter.core.errors import RegistryError
from llmops_jupyter.core.files import hash_tree

#: the commit object beside each artifact's folder in the store
COMMIT_SUFFIX = ".json"


def is_url(text: str | None) -> bool:
    return bool(text) and "://" in str(text)


def normalise_root(root: str) -> str:
    """A store root as a URL: a plain (shared) path becomes an absolute ``file://`` URL."""
    root = str(root).strip()
    if is_url(root):
        return root.rstrip("/")
    return "file://" + str(Path(root).expanduser().resolve())


def _fsspec() -> Any:
    try:
        import fsspec
    except ImportError:
        from llmops_jupyter.core.errors import MissingDependencyError

        raise MissingDependencyError("LLMOPS_ARTIFACTS names a shared artifact store, but fsspec is not installed.",
                                     fix="pip install 'llmops-jupyter[team]'") from None
    return fsspec


def _split(url: str) -> tuple[Any, str]:
    """The fsspec filesystem and the path inside it for ``url``."""
    fs, path = _fsspec().core.url_to_fs(url)
    return fs, path.rstrip("/")


def _join(url: str, *parts: str) -> str:
    return "/".join([url.rstrip("/"), *parts])


def _files(src: Path) -> list[tuple[str, Path]]:
    """``(relative posix name, file)`` in :func:`hash_tree`'s order (by path parts)."""
    if src.is_file():
        return [(src.name, src)]
    found = [f for f in src.rglob("*") if f.is_file()]
    return [(f.relative_to(src).as_posix(), f) for f in sorted(found)]


class ArtifactStore:
    """Artifacts under one root URL (see the module docstring). Reads go through ``cache_dir`` on this machine."""

    def __init__(self, root: str, cache_dir: Path):
        self.root = normalise_root(root)
        self.cache_dir = cache_dir
        self.fs, self.base = _split(self.root)

    def url(self, digest: str) -> str:
        """Where the artifact ``digest`` is stored (what the registry records as its path)."""
        return _join(self.root, digest[:2], digest)

    def cached(self, digest: str) -> Path:
        return self.cache_dir / digest[:2] / digest

    def exists(self, digest: str) -> bool:
        fs, path = _split(self.url(digest))
        return fs.exists(path + COMMIT_SUFFIX)

    def put(self, staging: Path, digest: str) -> str:
        """Upload the verified folder ``staging`` as ``digest`` (no-op when already committed); returns its URL.
        Then ``staging`` becomes this machine's cached copy (or is removed when one is already there)."""
        url = self.url(digest)
        if not self.exists(digest):
            files = _files(staging)
            tmp = _join(self.base, "tmp", uuid.uuid4().hex)
            final = _join(self.base, digest[:2], digest)
            try:
                for rel, f in files:
                    self.fs.makedirs(os.path.dirname(_join(tmp, rel)), exist_ok=True)
                    self.fs.put_file(str(f), _join(tmp, rel))
                if self.fs.exists(final):  # a writer killed before its commit: what it left is not the artifact
                    self.fs.rm(final, recursive=True)
                for rel, _ in files:  # file by file: an object store has no folders to rename (s3fs cannot mv one)
                    self.fs.makedirs(os.path.dirname(_join(final, rel)), exist_ok=True)
                    self.fs.mv(_join(tmp, rel), _join(final, rel))
                if self.fs.exists(tmp):
                    self.fs.rm(tmp, recursive=True)
                commit = json.dumps({"hash": digest, "files": [rel for rel, _ in files]}).encode()
                tmp_commit = _join(self.base, "tmp", uuid.uuid4().hex + COMMIT_SUFFIX)
                self.fs.pipe_file(tmp_commit, commit)
                self.fs.mv(tmp_commit, final + COMMIT_SUFFIX)
            except BaseException:
                if self.fs.exists(tmp):
                    self.fs.rm(tmp, recursive=True)
                raise
        self._keep(staging, digest)
        return url

    def _keep(self, staging: Path, digest: str) -> None:
        target = self.cached(digest)
        if target.exists():
            shutil.rmtree(staging, ignore_errors=True)
            return
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.replace(staging, target)
        except OSError:  # another process cached it first, or the cache is on another filesystem
            shutil.rmtree(staging, ignore_errors=True)

    def fetch(self, url: str, digest: str) -> Path:
        """The artifact's files on this machine: the cached copy, else downloaded, re-hashed and cached. A copy that
        does not hash to ``digest`` is refused (:class:`RegistryError`, one line) and nothing is cached."""
        target = self.cached(digest)
        if target.exists():
            return target
        fs, path = _split(url)
        files = self._committed(fs, path, url, digest)
        tmp = self.cache_dir / "tmp" / uuid.uuid4().hex
        tmp.mkdir(parents=True)
        try:
            for rel in files:
                dest = tmp / rel
                dest.parent.mkdir(parents=True, exist_ok=True)
                fs.get_file(_join(path, rel), str(dest))
            got = hash_tree(tmp)
            if got != digest:
                raise RegistryError(
                    f"Artifact {digest[:12]} at {url} does not match its hash (its files hash to {got[:12]}): it "
                    "was changed or damaged in the store, so it was not used.",
                    fix="re-run the stage that made it, or restore its files in the store")
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.replace(tmp, target)
            except OSError:  # another process of this machine cached it meanwhile
                pass
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return target

    @staticmethod
    def _committed(fs: Any, path: str, url: str, digest: str) -> list[str]:
        try:
            commit = json.loads(fs.cat_file(path + COMMIT_SUFFIX))
        except FileNotFoundError:
            raise RegistryError(f"Artifact {digest[:12]} is missing from the store ({url}).",
                                fix="check LLMOPS_ARTIFACTS names the team's store and it is reachable") from None
        return list(commit["files"])

    @staticmethod
    def verify(url: str, digest: str) -> str | None:
        """Re-hash the stored files in place (streamed); ``None`` when they match, else the problem in words."""
        fs, path = _split(url)
        if not fs.exists(path + COMMIT_SUFFIX):
            return f"missing {url}"
        stored = sorted((p[len(path) + 1:] for p in fs.find(path)), key=lambda rel: rel.split("/"))
        h = hashlib.sha256(b"tree\0")
        for rel in stored:
            fh = hashlib.sha256()
            with fs.open(_join(path, rel), "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    fh.update(block)
            h.update(rel.encode() + b"\0" + fh.hexdigest().encode() + b"\n")
        if h.hexdigest() != digest:
            return f"content changed at {url}"
        return None
