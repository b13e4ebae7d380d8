"""SQLite registry implementation (see the package docstring for the layout)."""

from __future__ import annotations

import dataclasses
import enum
import json
import os
import secrets
import shutil
import sqlite3
import sys
import threading
import time
import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from llmops_jupyter.core.env import process_gone, process_start, who
from llmops_jupyter.core.errors import NotFoundError, RegistryError
from llmops_jupyter.core.files import hash_tree, tree_size
from llmops_jupyter.registry import schema
from llmops_jupyter.registry.audit import AuditTables
from llmops_jupyter.registry.backends import Backend, SqliteBackend, make_backend, network_fs_warning
from llmops_jupyter.registry.evals import EvalTables
from llmops_jupyter.registry.prompts import PromptTables
from llmops_jupyter.registry.schema import CORE as SCHEMA  # noqa: F401 - runs, metrics, artifacts, lineage DDL
from llmops_jupyter.registry.store import ArtifactStore, is_url
from llmops_jupyter.registry.traffic import TrafficTables


class RunStatus(str, enum.Enum):
    RUNNING = "running"
    FINISHED = "finished"
    FAILED = "failed"
    INTERRUPTED = "interrupted"
    CACHED = "cached"
    PRUNED = "pruned"  # stopped early on purpose (a search's pruner): what it logged is valid, it did not fail

    def __str__(self) -> str:
        return self.value



def default_home() -> Path:
    return Path(os.environ.get("LLMOPS_HOME") or ".llmops").expanduser()


@dataclasses.dataclass
class Artifact:
    hash: str
    kind: str
    name: str | None
    #: where the files are: a folder on this machine, or a URL in the shared store (:mod:`.store`)
    location: str
    size: int
    created_at: float
    run_id: str | None
    meta: dict[str, Any]
    store: ArtifactStore | None = dataclasses.field(default=None, compare=False, repr=False)

    @property
    def short(self) -> str:
        return self.hash[:12]

    @property
    def path(self) -> Path:
        """The files on this machine. An artifact in a shared store is fetched into this home's cache on first use
        and re-hashed; a copy that does not match its hash is refused (:meth:`.store.ArtifactStore.fetch`)."""
        if self.store is not None:
            return self.store.fetch(self.location, self.hash)
        return Path(self.location)

    def file(self, name: str | None = None) -> Path:
        """The artifact's directory, or a named file inside it."""
        return self.path / name if name else self.path

    def __fspath__(self) -> str:
        return str(self.path)


def _json(value: Any) -> str:
    from llmops_jupyter.core.config import jsonable

    return json.dumps(jsonable(value), sort_keys=True)


class Registry(EvalTables, TrafficTables, PromptTables, AuditTables):
    """Handle on one registry home. Cheap to create; connections are per thread.

    The database is SQLite in ``<home>/registry.db`` unless ``database`` (default: ``$LLMOPS_REGISTRY``) is a
    ``postgresql://`` URL. New artifacts go to ``<home>/artifacts`` unless ``artifacts`` (default:
    ``$LLMOPS_ARTIFACTS``) names a shared store, an fsspec URL or a shared folder (:mod:`.store`); logs, checkpoints,
    staging and the shared store's local cache live under ``home`` either way."""

    _instances: dict[tuple[Path, str, str], Registry] = {}
    _warned: set[Path] = set()

    def __init__(self, home: str | os.PathLike | None = None, *, database: str | None = None,
                 artifacts: str | None = None):
        self.home = Path(home).expanduser() if home is not None else default_home()
        self.db_path = self.home / "registry.db"
        self.artifacts_dir = self.home / "artifacts"
        self.tmp_dir = self.home / "tmp"
        self.cache_dir = self.home / "cache" / "artifacts"
        self._local = threading.local()
        self.backend: Backend = make_backend(self.home, database)
        root = artifacts if artifacts is not None else (os.environ.get("LLMOPS_ARTIFACTS") or "").strip()
        #: the shared store new artifacts are written to; None: ``<home>/artifacts``
        self.store: ArtifactStore | None = ArtifactStore(root, self.cache_dir) if root else None
        self._stores: dict[str, ArtifactStore] = {}
        self._prepare()

    @classmethod
    def open(cls, home: str | os.PathLike | None = None, *, database: str | None = None,
             artifacts: str | None = None) -> Registry:
        path = (Path(home).expanduser() if home is not None else default_home()).resolve()
        url = database if database is not None else (os.environ.get("LLMOPS_REGISTRY") or "").strip()
        root = artifacts if artifacts is not None else (os.environ.get("LLMOPS_ARTIFACTS") or "").strip()
        inst = cls._instances.get((path, url, root))
        if inst is None or (isinstance(inst.backend, SqliteBackend) and not inst.db_path.exists()):
            inst = cls._instances[(path, url, root)] = cls(path, database=url, artifacts=root)
        return inst

    @property
    def artifact_root(self) -> str:
        """Where new artifacts are stored: the shared store's URL, or ``<home>/artifacts``."""
        return self.store.root if self.store is not None else str(self.artifacts_dir)

    def _store_for(self, url: str) -> ArtifactStore:
        """The store an artifact URL is in (this registry's, or the one another writer recorded), cached here."""
        if self.store is not None and url.startswith(self.store.root + "/"):
            return self.store
        root = url.rsplit("/", 2)[0]
        if root not in self._stores:
            self._stores[root] = ArtifactStore(root, self.cache_dir)
        return self._stores[root]

    @property
    def location(self) -> str:
        """Where the records are: the SQLite file, or the PostgreSQL URL without its password."""
        return self.backend.describe()

    # -- connection --------------------------------------------------------------------------------------------
    def _prepare(self) -> None:
        try:
            for d in (self.home, self.artifacts_dir, self.tmp_dir):
                d.mkdir(parents=True, exist_ok=True)
            probe = self.tmp_dir / f".probe-{uuid.uuid4().hex}"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as exc:
            raise RegistryError(
                f"Registry folder '{self.home}' is not writable ({exc.strerror or exc}).",
                fix="set LLMOPS_HOME (or pass --home) to a writable folder, or fix its permissions",
            ) from None
        if isinstance(self.backend, SqliteBackend):
            warning = network_fs_warning(self.home)
            if warning and self.home.resolve() not in Registry._warned:
                Registry._warned.add(self.home.resolve())
                print(warning, file=sys.stderr)
        schema.ensure(self)
        self.sweep_staging()
        self._warn_other_hosts()

    _host_warned: set[tuple[Path, str]] = set()

    def other_host_writer(self) -> tuple[str, str] | None:
        """SQLite only: ``(host, what)`` of a writer on another host that this registry's records show as live — a
        run still ``running`` or a staging folder being built, recorded (pid + host + start time) from a host that
        is not this one — else None. PostgreSQL is made for that, so it is never reported there."""
        if not isinstance(self.backend, SqliteBackend):
            return None
        me = os.uname().nodename
        rows = self._query("SELECT id, host, pid FROM runs WHERE status=? AND host IS NOT NULL AND host<>?"
                           " ORDER BY created_at DESC LIMIT 1", (RunStatus.RUNNING.value, me))
        if rows:
            return rows[0]["host"], f"run {rows[0]['id']}, pid {rows[0]['pid']}"
        for marker in sorted(self.tmp_dir.glob("*.owner")):
            try:
                owner = json.loads(marker.read_text())
            except (OSError, ValueError):
                continue
            if owner.get("host") and owner["host"] != me:
                return owner["host"], f"an artifact being written, pid {owner.get('pid')}"
        return None

    def _warn_other_hosts(self) -> None:
        """One line with the fix, once per process and host, when a SQLite registry is written from two hosts."""
        found = self.other_host_writer()
        if found is None or (self.home.resolve(), found[0]) in Registry._host_warned:
            return
        Registry._host_warned.add((self.home.resolve(), found[0]))
        print(f"warning: the SQLite registry '{self.db_path}' is also being written from host '{found[0]}' "
              f"({found[1]}); SQLite cannot be shared between hosts and records can be lost. Fix: set "
              "LLMOPS_REGISTRY=postgresql://... on every host for a shared registry, or give each host its own "
              "LLMOPS_HOME", file=sys.stderr)

    def migrate(self) -> str | None:
        """Upgrade this registry's schema to the current version (``llmops registry migrate``); a note, or None."""
        return schema.ensure(self, migrate=True)

    def schema_version(self) -> int | None:
        """The schema version stored in this registry (:data:`llmops_jupyter.registry.schema.VERSION` once open)."""
        return schema.read_version(self.backend, self._connect())

    def _connect(self) -> Any:
        con = getattr(self._local, "con", None)
        if con is not None and not self.backend.alive(con):  # the server went away (restart): a new connection
            self.close()
            con = None
        if con is None:
            con = self._local.con = self.backend.connect()
        return con

    @contextmanager
    def _transaction(self) -> Iterator[Any]:
        """One atomic write. Writers queue for the write lock up front (``BEGIN IMMEDIATE`` / an advisory lock),
        so they never fail for being concurrent. A connection lost before the write began is re-opened."""
        con = self._connect()
        try:
            try:
                self.backend.begin(con)
            except self.backend.Error:
                if self.backend.alive(con):
                    raise
                con = self._connect()  # lost since its last use (e.g. the server restarted): retry once, fresh
                self.backend.begin(con)
            yield con
            con.execute("COMMIT")
        except BaseException:
            # A signal handler can raise (KeyboardInterrupt, the runner's SIGTERM) just after BEGIN or just after
            # COMMIT returned. The first leaves the transaction open on this thread's connection, so it is rolled
            # back here; the second leaves nothing to roll back. Either way the interrupt, not a failed ROLLBACK,
            # is what the caller sees.
            self._undo(con)
            raise

    def _undo(self, con: Any) -> None:
        """Roll back ``con``'s open transaction, if it has one; a failure here never hides the error being raised."""
        try:
            if self.backend.alive(con) and con.in_transaction:
                con.execute("ROLLBACK")
        except self.backend.Error:
            pass

    def _write_retrying(self, body: Any) -> Any:
        """``body(con)`` in one :meth:`_transaction`, run again once on a fresh connection when the connection died
        inside the transaction (a PostgreSQL restart or failover cuts it mid-write: nothing of it was committed,
        except when COMMIT itself was cut, where the outcome is unknown and the rows may be written twice). For
        writes that are harmless to repeat (metric rows), so a restart loses none of them."""
        for attempt in (0, 1):
            con = None
            try:
                with self._transaction() as con:
                    return body(con)
            except self.backend.Error:
                if attempt or con is None or self.backend.alive(con):
                    raise

    def _query(self, sql: str, params: Iterable[Any] = ()) -> list[Any]:
        con = self._connect()
        try:
            return con.execute(sql, tuple(params)).fetchall()
        except self.backend.Error:
            if self.backend.alive(con):
                raise
            return self._connect().execute(sql, tuple(params)).fetchall()  # reads are safe to retry once

    def integrity_check(self) -> list[str]:
        """The database's own check (SQLite's ``integrity_check``): ``[]`` when it is sound, else its complaints."""
        return self.backend.integrity_check(self._connect())

    def verify_artifacts(self) -> list[str]:
        """Stored artifacts whose files no longer hash to their id (or are missing): ``[]`` when every one matches.
        External references (base models registered in place) are skipped: their folders are the user's."""
        bad = []
        for art in map(self._artifact, self._query("SELECT * FROM artifacts")):
            if art.meta.get("external"):
                continue
            if art.store is not None:
                problem = art.store.verify(art.location, art.hash)
                if problem:
                    bad.append(f"{art.short}: {problem}")
            elif not art.path.exists():
                bad.append(f"{art.short}: missing {art.path}")
            elif hash_tree(art.path) != art.hash:
                bad.append(f"{art.short}: content changed at {art.path}")
        return bad

    def cached_runs(self, stage: str, cache_key: str) -> list[dict[str, Any]]:
        """Finished runs of ``stage`` with this cache key, newest first (``id`` and decoded ``summary``)."""
        rows = self._query("SELECT id, summary FROM runs WHERE stage=? AND cache_key=? AND status='finished'"
                           " ORDER BY created_at DESC", (stage, cache_key))
        return [{"id": r["id"], "summary": json.loads(r["summary"] or "{}")} for r in rows]

    def link_outputs(self, run_id: str, hashes: list[str]) -> None:
        """Record existing artifacts as outputs of ``run_id`` too (a cached run shares its source's outputs)."""
        with self._transaction() as con:
            con.executemany("INSERT INTO run_artifacts (run_id, artifact, role) VALUES (?,?,?) ON CONFLICT DO NOTHING",
                            [(run_id, h, "output") for h in hashes])

    def metric_rows_after(self, run_id: str, after_rowid: int = 0) -> list[dict[str, Any]]:
        """Metric rows of a run logged after ``after_rowid`` (a poller's cursor), in logging order."""
        rows = self._query("SELECT rowid, key, value, step, ts FROM metrics WHERE run_id=? AND rowid>? ORDER BY rowid",
                           (run_id, after_rowid))
        return [{"rowid": r["rowid"], "key": r["key"], "value": r["value"], "step": r["step"], "ts": r["ts"]}
                for r in rows]

    def close(self) -> None:
        con = getattr(self._local, "con", None)
        if con is not None:
            con.close()
            self._local.con = None

    # -- runs -----------------------------------------------------------------------------------------------------
    def create_run(
        self,
        stage: str,
        params: dict[str, Any] | None = None,
        *,
        name: str | None = None,
        notebook: str | None = None,
        git_commit: str | None = None,
        env: dict[str, Any] | None = None,
        parent_id: str | None = None,
        tags: list[str] | None = None,
        status: RunStatus = RunStatus.RUNNING,
        run_id: str | None = None,
    ) -> str:
        run_id = run_id or f"{stage}-{secrets.token_hex(4)}"
        self._warn_other_hosts()
        now = time.time()
        with self._transaction() as con:
            con.execute(
                "INSERT INTO runs (id, stage, name, status, params, created_at, started_at, notebook, git_commit, env,"
                " parent_id, \"user\", host, pid, tags, proc_start) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                (
                    run_id,
                    stage,
                    name,
                    str(status),
                    _json(params or {}),
                    now,
                    now,
                    notebook,
                    git_commit,
                    _json(env or {}),
                    parent_id,
                    _user(),
                    os.uname().nodename,
                    os.getpid(),
                    _json(tags or []),
                    process_start(),
                ),
            )
        return run_id

    def finish_run(
        self, run_id: str, status: RunStatus, *, error: str | None = None, summary: dict | None = None
    ) -> None:
        now = time.time()
        with self._transaction() as con:
            row = con.execute("SELECT started_at FROM runs WHERE id=?", (run_id,)).fetchone()
            started = row["started_at"] if row else now
            con.execute(
                "UPDATE runs SET status=?, finished_at=?, duration_s=?, error=?,"
                " summary=COALESCE(?, summary) WHERE id=?",
                (str(status), now, now - (started or now), error, _json(summary) if summary else None, run_id),
            )

    def update_run(self, run_id: str, **fields: Any) -> None:
        allowed = {"name", "status", "params", "summary", "notebook", "error", "tags", "parent_id", "pid", "cache_key",
                   "proc_start", "host"}
        bad = set(fields) - allowed
        if bad:
            raise ValueError(f"cannot update run fields {sorted(bad)}")
        cols = ", ".join(f"{k}=?" for k in fields)
        vals = [_json(v) if k in ("params", "summary", "tags") else (str(v) if k == "status" else v)
                for k, v in fields.items()]
        with self._transaction() as con:
            con.execute(f"UPDATE runs SET {cols} WHERE id=?", (*vals, run_id))

    def resolve_run(self, ref: str) -> str:
        """Resolve a run reference: full id, unique prefix, ``latest`` or ``<stage>@latest`` / ``<stage>:latest``."""
        ref = str(ref).strip()
        if not ref:
            raise NotFoundError("Empty run reference.", fix="pass a run id from `%llmops runs`")
        if ref == "latest" or ref.endswith(("@latest", ":latest")):
            stage = None if ref == "latest" else ref.rsplit("@", 1)[0].rsplit(":", 1)[0]
            sql = "SELECT id FROM runs" + (" WHERE stage=?" if stage else "") + " ORDER BY created_at DESC LIMIT 1"
            rows = self._query(sql, (stage,) if stage else ())
            if not rows:
                raise NotFoundError(f"No {stage + ' ' if stage else ''}runs in the registry at '{self.home}'.",
                                    fix="run that stage first, or check LLMOPS_HOME")
            return rows[0]["id"]
        rows = self._query("SELECT id FROM runs WHERE id=? OR id LIKE ? OR name=? ORDER BY created_at DESC LIMIT 3",
                          (ref, ref.replace("%", "") + "%", ref))
        exact = [r["id"] for r in rows if r["id"] == ref]
        if exact:
            return exact[0]
        if len(rows) == 1:
            return rows[0]["id"]
        if not rows:
            raise NotFoundError(f"No run '{ref}' in the registry at '{self.home}'.",
                                fix="list runs with `%llmops runs` (or `llmops runs`)")
        raise NotFoundError(f"Run reference '{ref}' is ambiguous ({', '.join(r['id'] for r in rows)}).",
                            fix="give more characters of the run id")

    def get_run(self, ref: str, *, check: bool = True) -> dict[str, Any]:
        """One run. ``check`` (default) first marks it failed if it says 'running' but its process is gone."""
        run_id = self.resolve_run(ref)
        row = self._query("SELECT * FROM runs WHERE id=?", (run_id,))[0]
        run = _run_dict(row)
        return self._checked([run])[0] if check else run

    def adopt_run(self, run_id: str, pid: int | None = None) -> None:
        """Hand a running run to another process (a detached worker): its pid and start time become the run's."""
        pid = pid or os.getpid()
        with self._transaction() as con:
            con.execute("UPDATE runs SET pid=?, host=?, proc_start=? WHERE id=?",
                        (pid, os.uname().nodename, process_start(pid), run_id))

    def _checked(self, runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Every reader's truth check: a run still 'running' whose process on this host is gone (killed, OOM,
        machine reboot; a recycled pid does not count as alive) is marked 'failed' with why, in place."""
        for run in runs:
            if run["status"] == RunStatus.RUNNING.value and process_gone(run["pid"], run["host"],
                                                                          run.get("proc_start")):
                error = f"process gone: pid {run['pid']} on {run['host']} ended without recording an end"
                with self._transaction() as con:  # only if nobody recorded an end meanwhile
                    cur = con.execute("UPDATE runs SET status=?, error=?, finished_at=? WHERE id=? AND status=?",
                                      (RunStatus.FAILED.value, error, time.time(), run["id"],
                                       RunStatus.RUNNING.value))
                if cur.rowcount:
                    run.update(status=RunStatus.FAILED.value, error=error)
                else:
                    run.update(_run_dict(self._query("SELECT * FROM runs WHERE id=?", (run["id"],))[0]))
        return runs

    def list_runs(
        self, *, stage: str | None = None, status: str | None = None, limit: int | None = 50, since: float = 0.0,
        user: str | None = None,
    ) -> list[dict[str, Any]]:
        sql = "SELECT * FROM runs WHERE created_at >= ?"
        args: list[Any] = [since]
        if user:
            sql += ' AND "user"=?'
            args.append(user)
        if stage:
            sql += " AND stage=?"
            args.append(stage)
        if status:
            sql += " AND status=?"
            args.append(str(status))
        sql += " ORDER BY created_at DESC, rowid DESC"
        if limit:
            sql += " LIMIT ?"
            args.append(int(limit))
        return self._checked([_run_dict(r) for r in self._query(sql, args)])

    def run_users(self) -> list[str]:
        """Every user that recorded a run, sorted (what the Lab sidebar's user filter offers)."""
        # sorted here, not by ORDER BY: PostgreSQL's collation would order them unlike SQLite's bytes
        return sorted(r[0] for r in self._query('SELECT DISTINCT "user" FROM runs WHERE "user" IS NOT NULL'))

    def child_runs(
        self, parent_id: str, stage: str | None = None, *, newest_first: bool = False
    ) -> list[dict[str, Any]]:
        """Runs whose ``parent_id`` is ``parent_id`` (optionally of one stage), oldest first unless ``newest_first``."""
        sql = "SELECT * FROM runs WHERE parent_id=?"
        args: list[Any] = [parent_id]
        if stage:
            sql += " AND stage=?"
            args.append(stage)
        sql += " ORDER BY created_at DESC, rowid DESC" if newest_first else " ORDER BY created_at, rowid"
        return self._checked([_run_dict(r) for r in self._query(sql, args)])

    # -- metrics --------------------------------------------------------------------------------------------------
    def log_metrics(self, run_id: str, values: dict[str, float], step: int | None = None) -> None:
        now = time.time()
        rows = [(run_id, k, _num(v), step, now) for k, v in values.items()]
        self._write_retrying(lambda con: con.executemany(
            "INSERT INTO metrics (run_id, key, value, step, ts) VALUES (?,?,?,?,?)", rows))

    def log_metric(self, run_id: str, key: str, value: float, step: int | None = None) -> None:
        self.log_metrics(run_id, {key: value}, step)

    def metrics(self, run_id: str) -> dict[str, float]:
        """Latest value of every metric of a run."""
        rows = self._query(
            "SELECT key, value FROM metrics WHERE run_id=? ORDER BY ts, rowid", (self.resolve_run(run_id),)
        )
        return {r["key"]: r["value"] for r in rows}

    def metric_history(self, run_id: str, key: str | None = None) -> list[dict[str, Any]]:
        sql = "SELECT key, value, step, ts FROM metrics WHERE run_id=?"
        args: list[Any] = [self.resolve_run(run_id)]
        if key:
            sql += " AND key=?"
            args.append(key)
        return [dict(r) for r in self._query(sql + " ORDER BY ts, rowid", args)]

    # -- artifacts ------------------------------------------------------------------------------------------------
    def staging_dir(self, prefix: str = "stage") -> Path:
        """A fresh folder inside the registry to build an artifact in (same filesystem → atomic rename).

        A sibling ``<name>.owner`` file names the process building it, so a folder left by a killed process is
        removed by the next registry that opens (:meth:`sweep_staging`) instead of staying behind."""
        path = self.tmp_dir / f"{prefix}-{uuid.uuid4().hex}"
        owner = {"pid": os.getpid(), "host": os.uname().nodename, "start": process_start()}
        path.with_name(path.name + ".owner").write_text(json.dumps(owner))
        path.mkdir(parents=True)
        return path

    def release_staging(self, path: Path) -> None:
        """Remove a staging folder (whatever is left of it after its artifact was stored) and its owner file."""
        shutil.rmtree(path, ignore_errors=True)
        path.with_name(path.name + ".owner").unlink(missing_ok=True)

    def sweep_staging(self) -> list[Path]:
        """Remove staging folders whose building process is gone (killed mid-stage); returns what was removed."""
        removed = []
        for marker in self.tmp_dir.glob("*.owner"):
            folder = marker.with_name(marker.name[: -len(".owner")])
            try:
                owner = json.loads(marker.read_text())
            except (OSError, ValueError):
                continue
            if folder.exists() and not process_gone(owner.get("pid"), owner.get("host"), owner.get("start")):
                continue
            shutil.rmtree(folder, ignore_errors=True)
            marker.unlink(missing_ok=True)
            removed.append(folder)
        return removed

    def add_artifact(
        self,
        source: str | os.PathLike,
        kind: str,
        *,
        name: str | None = None,
        run_id: str | None = None,
        meta: dict[str, Any] | None = None,
        move: bool = False,
        inputs: Iterable[str] = (),
        relation: str = "derived",
    ) -> Artifact:
        """Store a file or folder by content hash. Identical content is stored once.

        ``move=True`` renames a staging folder made by :meth:`staging_dir` instead of copying it. The object is
        built under ``tmp/`` and renamed into ``artifacts/`` only when complete, so readers never see half of it.
        """
        src = Path(source)
        if not src.exists():
            raise RegistryError(f"Artifact source '{src}' does not exist.", fix="check the path the stage wrote")
        staging = self.tmp_dir / f"ingest-{uuid.uuid4().hex}"
        marker = staging.with_name(staging.name + ".owner")
        marker.write_text(json.dumps({"pid": os.getpid(), "host": os.uname().nodename, "start": process_start()}))
        try:
            if move and src.is_dir() and src.resolve().parent == self.tmp_dir.resolve():
                os.replace(src, staging)
                src.with_name(src.name + ".owner").unlink(missing_ok=True)
            elif src.is_dir():
                shutil.copytree(src, staging, symlinks=False)
            else:
                staging.mkdir()
                shutil.copy2(src, staging / src.name)
                if move:
                    src.unlink()
            digest = hash_tree(staging)
            size = tree_size(staging)
            if self.store is not None:  # the shared store: uploaded, committed; staging becomes the local cache
                rel = self.store.put(staging, digest)
            else:
                final = self.artifacts_dir / digest[:2] / digest
                final.parent.mkdir(parents=True, exist_ok=True)
                if final.exists():
                    shutil.rmtree(staging)
                else:
                    try:
                        os.replace(staging, final)
                    except OSError:  # another process won the race with identical content
                        shutil.rmtree(staging, ignore_errors=True)
                rel = final.relative_to(self.home).as_posix()
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        finally:
            marker.unlink(missing_ok=True)
        now = time.time()
        with self._transaction() as con:
            con.execute(
                "INSERT INTO artifacts (hash, kind, name, path, size, created_at, run_id, meta)"
                " VALUES (?,?,?,?,?,?,?,?) ON CONFLICT DO NOTHING",
                (digest, kind, name, rel, size, now, run_id, _json(meta or {})),
            )
            if run_id:
                con.execute(_LINK, (run_id, digest, "output"))
            for src_hash in inputs:
                if src_hash != digest:
                    con.execute(_EDGE, (src_hash, digest, relation, run_id))
        return self.get_artifact(digest)

    def add_reference(
        self, path: str | os.PathLike, kind: str, *, name: str | None = None, meta: dict[str, Any] | None = None
    ) -> Artifact:
        """Register a folder outside the store by reference (e.g. a 14 GB base model): hashed, not copied.

        The hash is cached against the files' sizes and mtimes, so re-using a base model costs a ``stat`` walk.
        """
        src = Path(path).expanduser().resolve()
        files = sorted(f for f in src.rglob("*") if f.is_file()) if src.is_dir() else [src]
        sig = json.dumps([(f.relative_to(src).as_posix() if src.is_dir() else f.name, f.stat().st_size,
                           f.stat().st_mtime_ns) for f in files])
        rows = self._query("SELECT sig, hash FROM path_hashes WHERE path=?", (str(src),))
        if rows and rows[0]["sig"] == sig:
            digest = rows[0]["hash"]
        else:
            digest = hash_tree(src)
            with self._transaction() as con:
                con.execute("INSERT INTO path_hashes (path, sig, hash) VALUES (?,?,?) ON CONFLICT (path)"
                            " DO UPDATE SET sig=excluded.sig, hash=excluded.hash", (str(src), sig, digest))
        with self._transaction() as con:
            con.execute(
                "INSERT INTO artifacts (hash, kind, name, path, size, created_at, run_id, meta)"
                " VALUES (?,?,?,?,?,?,?,?) ON CONFLICT DO NOTHING",
                (digest, kind, name or src.name, str(src), tree_size(src), time.time(), None,
                 _json({"external": True, **(meta or {})})),
            )
        return self.get_artifact(digest)

    def get_artifact(self, ref: str | Artifact, kind: str | None = None) -> Artifact:
        """Resolve an artifact: hash or unique hash prefix, ``<run>`` (its main output) or ``<run>:<kind>``.

        ``kind`` picks which output a bare run reference means (``data@latest`` with ``kind="dataset"``).
        """
        if isinstance(ref, Artifact):
            return ref
        ref = str(ref).strip()
        rows = []
        if len(ref) >= 6 and all(c in "0123456789abcdef" for c in ref.lower()):
            rows = self._query("SELECT * FROM artifacts WHERE hash LIKE ? LIMIT 2", (ref.lower() + "%",))
            if len(rows) > 1:
                raise NotFoundError(f"Artifact prefix '{ref}' is ambiguous.", fix="give more characters of the hash")
        if not rows:
            run_ref = ref
            if ":" in ref and not ref.endswith(":latest"):
                run_ref, kind = ref.split(":", 1)
            try:
                run_id = self.resolve_run(run_ref)
            except NotFoundError:
                raise NotFoundError(f"No artifact or run '{ref}' in the registry at '{self.home}'.",
                                    fix="see `%llmops runs` / `%llmops show <run>` for artifact hashes") from None
            sql = ("SELECT a.* FROM artifacts a JOIN run_artifacts ra ON ra.artifact=a.hash"
                   " WHERE ra.run_id=? AND ra.role='output'")
            args: list[Any] = [run_id]
            if kind:
                sql += " AND a.kind=?"
                args.append(kind)
            rows = self._query(sql + " ORDER BY a.created_at DESC, a.rowid DESC LIMIT 1", args)
            if not rows:
                raise NotFoundError(f"Run '{run_id}' has no {kind + ' ' if kind else ''}output artifact.",
                                    fix="check the run finished (`%llmops show " + run_id + "`)")
        return self._artifact(rows[0])

    def _artifact(self, row: sqlite3.Row) -> Artifact:
        where = row["path"]
        store = self._store_for(where) if is_url(where) else None
        return Artifact(
            hash=row["hash"], kind=row["kind"], name=row["name"], location=where if store else str(self.home / where),
            size=row["size"], created_at=row["created_at"], run_id=row["run_id"], meta=json.loads(row["meta"] or "{}"),
            store=store,
        )

    def list_artifacts(self, kind: str | None = None, limit: int = 200) -> list[Artifact]:
        sql = "SELECT * FROM artifacts" + (" WHERE kind=?" if kind else "") + " ORDER BY created_at DESC LIMIT ?"
        return [self._artifact(r) for r in self._query(sql, ((kind, limit) if kind else (limit,)))]

    def run_artifacts(self, run_id: str, role: str = "output") -> list[Artifact]:
        rows = self._query(
            "SELECT a.* FROM artifacts a JOIN run_artifacts ra ON ra.artifact=a.hash WHERE ra.run_id=? AND ra.role=?"
            " ORDER BY a.created_at", (run_id, role))
        return [self._artifact(r) for r in rows]

    def derived_artifacts(self, src: str, kind: str | None = None, limit: int | None = None) -> list[Artifact]:
        """Artifacts at the end of a lineage edge from ``src`` (optionally of one kind), newest first."""
        sql = "SELECT a.* FROM edges e JOIN artifacts a ON a.hash=e.dst WHERE e.src=?"
        args: list[Any] = [src]
        if kind:
            sql += " AND a.kind=?"
            args.append(kind)
        sql += " ORDER BY a.created_at DESC"
        if limit:
            sql += " LIMIT ?"
            args.append(int(limit))
        return [self._artifact(r) for r in self._query(sql, args)]

    def input_links(self, hashes: Iterable[str]) -> list[tuple[str, str]]:
        """Distinct (run id, artifact hash) pairs of runs that took one of ``hashes`` as input, oldest run first."""
        hashes = list(hashes)
        if not hashes:
            return []
        rows = self._query(
            "SELECT ra.run_id, ra.artifact, MIN(r.created_at) AS t FROM run_artifacts ra JOIN runs r ON r.id = ra.run_id"
            f" WHERE ra.role='input' AND ra.artifact IN ({','.join('?' * len(hashes))})"
            " GROUP BY ra.run_id, ra.artifact ORDER BY t", hashes)
        return [(r["run_id"], r["artifact"]) for r in rows]

    def link_input(self, run_id: str, artifact: str | Artifact) -> Artifact:
        art = self.get_artifact(artifact)
        with self._transaction() as con:
            con.execute(_LINK, (run_id, art.hash, "input"))
        return art

    def add_edge(self, src: str, dst: str, relation: str = "derived", run_id: str | None = None) -> None:
        with self._transaction() as con:
            con.execute(_EDGE, (src, dst, relation, run_id))

    def lineage(self, ref: str | Artifact, direction: str = "both") -> dict[str, Any]:
        """Artifacts upstream and/or downstream of ``ref`` with the edges between them (recursive CTE)."""
        root = self.get_artifact(ref)
        nodes: dict[str, Artifact] = {root.hash: root}
        edges: set[tuple[str, str, str, str | None]] = set()
        queries = []
        if direction in ("both", "up"):
            queries.append("WITH RECURSIVE up(h) AS (SELECT CAST(? AS TEXT) UNION SELECT e.src FROM edges e JOIN up ON e.dst=up.h)"
                            " SELECT e.* FROM edges e WHERE e.dst IN (SELECT h FROM up)")
        if direction in ("both", "down"):
            queries.append("WITH RECURSIVE dn(h) AS (SELECT CAST(? AS TEXT) UNION SELECT e.dst FROM edges e JOIN dn ON e.src=dn.h)"
                            " SELECT e.* FROM edges e WHERE e.src IN (SELECT h FROM dn)")
        for sql in queries:
            for row in self._query(sql, (root.hash,)):
                edges.add((row["src"], row["dst"], row["relation"], row["run_id"]))
        for src, dst, _, _ in sorted(edges, key=str):  # sorted: a set's order changes with each process's hash seed
            for h in (src, dst):
                if h not in nodes:
                    rows = self._query("SELECT * FROM artifacts WHERE hash=?", (h,))
                    if rows:
                        nodes[h] = self._artifact(rows[0])
        return {
            "root": root.hash,
            "nodes": [
                {"hash": a.hash, "kind": a.kind, "name": a.name, "run_id": a.run_id, "size": a.size}
                for a in nodes.values()
            ],
            "edges": [{"src": s, "dst": d, "relation": r, "run_id": rid} for s, d, r, rid in sorted(edges, key=str)],
        }

    def lineage_chain(self, ref: str | Artifact) -> list[Artifact]:
        """The upstream chain ending at ``ref`` in dependency order (dataset first)."""
        graph = self.lineage(ref, "up")
        by_hash = {n["hash"]: n for n in graph["nodes"]}
        parents: dict[str, list[str]] = {}
        for e in graph["edges"]:
            parents.setdefault(e["dst"], []).append(e["src"])
        order: list[str] = []

        def visit(h: str) -> None:
            for p in sorted(parents.get(h, [])):
                visit(p)
            if h not in order and h in by_hash:
                order.append(h)

        visit(graph["root"])
        return [self.get_artifact(h) for h in order]


def _run_dict(row: sqlite3.Row) -> dict[str, Any]:
    d = dict(row)
    for key in ("params", "summary", "env", "tags"):
        d[key] = json.loads(d.get(key) or ("[]" if key == "tags" else "{}"))
    return d


def _num(v: Any) -> float | None:
    try:
        return float(v)
    except (TypeError, ValueError):
        return None


_LINK = "INSERT INTO run_artifacts (run_id, artifact, role) VALUES (?,?,?) ON CONFLICT DO NOTHING"
_EDGE = "INSERT INTO edges (src, dst, relation, run_id) VALUES (?,?,?,?) ON CONFLICT DO NOTHING"

_user = who  # the one "who is the user" rule (core.env.who), also used by the audit log and ratings
