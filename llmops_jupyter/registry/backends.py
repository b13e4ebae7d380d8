"""The two database backends behind :class:`~llmops_jupyter.registry.core.Registry`: what differs, and only that.

The typed methods write one SQL text for both (``?`` placeholders, ``INSERT ... ON CONFLICT``, ``RETURNING``, the
implicit ``rowid`` of SQLite that the PostgreSQL schema adds as a column). A backend opens connections, starts a
write transaction with the same guarantee on both (writers queue, one at a time: ``BEGIN IMMEDIATE`` on SQLite, a
transaction-scoped advisory lock on PostgreSQL), translates the SQL text where the dialects differ, and answers the
few questions whose SQL is not portable (columns of a table, the integrity check, the append-only trigger).

* SQLite (default): ``<home>/registry.db`` in WAL mode, for one person on one machine (or several processes there).
* PostgreSQL: selected by ``LLMOPS_REGISTRY=postgresql://...`` (or ``--registry``), for a team or a cluster; one
  connection per thread, reconnecting after the server went away.
"""

from __future__ import annotations

import os
import re
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from llmops_jupyter.core.errors import RegistryError

#: filesystem types (``/proc/mounts``) on which SQLite's WAL mode, and its locking, are not safe
NETWORK_FS = ("nfs", "nfs4", "cifs", "smbfs", "smb3", "fuse.sshfs", "sshfs", "9p", "afs", "ceph", "glusterfs",
              "fuse.glusterfs", "lustre", "gpfs", "fuse.s3fs", "fuse.gcsfuse", "fuse.rclone", "davfs", "fuse.davfs2")

#: how long a lost PostgreSQL connection is retried before a write gives up (seconds; ``LLMOPS_REGISTRY_RETRY_S``)
RECONNECT_S = 30.0


def is_postgres_url(url: str | None) -> bool:
    return bool(url) and str(url).split(":", 1)[0].lower() in ("postgresql", "postgres")


def describe_url(url: str) -> str:
    """A database URL without its password (what messages and ``runs`` titles show)."""
    return re.sub(r"(://[^:/@]*):[^@/]*@", r"\1:***@", url)


def mount_fs_type(path: Path) -> str | None:
    """The filesystem type of the mount holding ``path`` (longest matching mount point in ``/proc/mounts``)."""
    try:
        lines = Path("/proc/mounts").read_text().splitlines()
    except OSError:
        return None
    target = str(path.resolve())
    best, fstype = "", None
    for line in lines:
        parts = line.split()
        if len(parts) < 3:
            continue
        point = parts[1].replace("\\040", " ")
        if (target == point or target.startswith(point.rstrip("/") + "/")) and len(point) >= len(best):
            best, fstype = point, parts[2]
    return fstype


def network_fs_warning(path: Path) -> str | None:
    """One line with the fix when the SQLite registry at ``path`` sits on a network filesystem, else None."""
    fstype = mount_fs_type(path)
    if fstype is None or fstype.lower() not in NETWORK_FS:
        return None
    return (f"warning: the SQLite registry '{path}' is on a network filesystem ({fstype}); SQLite's WAL mode does not "
            "work there and writers on two hosts can lose data. Fix: set LLMOPS_REGISTRY=postgresql://... for a "
            "shared registry, or LLMOPS_HOME to a local disk")


class Backend:
    """What a database backend provides to the registry (see the module docstring)."""

    name = "?"
    #: exception classes of the driver, for callers that must tell a database error from others
    Error: type[Exception] = Exception
    IntegrityError: type[Exception] = Exception

    def connect(self) -> Any: ...

    def begin(self, con: Any) -> None: ...

    def alive(self, con: Any) -> bool:
        return True

    def columns(self, con: Any, table: str) -> list[str]: ...

    def integrity_check(self, con: Any) -> list[str]:
        return []

    def ddl(self, script: str) -> list[str]:
        """The statements of a schema script (written for SQLite) in this dialect."""
        return [s.strip() + ";" for s in _split_script(script) if s.strip()]

    def append_only(self, table: str) -> list[str]:
        """Statements that make ``table`` refuse UPDATE and DELETE with an 'append-only' error."""
        raise NotImplementedError

    def describe(self) -> str:
        return self.name


def _split_script(script: str) -> list[str]:
    """Split a DDL script on ``;`` outside ``BEGIN ... END`` trigger bodies and ``$$`` quoted bodies."""
    out, buf, depth = [], [], 0
    for line in script.splitlines():
        stripped = line.strip().upper()
        buf.append(line)
        if re.search(r"\bBEGIN\b", stripped) and "TRIGGER" in " ".join(buf).upper():
            depth = 1
        if depth and re.search(r"\bEND;\s*$", stripped):
            depth = 0
            out.append("\n".join(buf).rstrip().rstrip(";"))
            buf = []
            continue
        if not depth and stripped.endswith(";"):
            out.append("\n".join(buf).rstrip().rstrip(";"))
            buf = []
    if "".join(buf).strip():
        out.append("\n".join(buf))
    return out


# -- SQLite -------------------------------------------------------------------------------------------------------
class SqliteBackend(Backend):
    name = "sqlite"
    Error = sqlite3.Error
    IntegrityError = sqlite3.IntegrityError

    def __init__(self, path: Path):
        self.path = path

    def describe(self) -> str:
        return str(self.path)

    def connect(self) -> sqlite3.Connection:
        try:
            con = sqlite3.connect(self.path, timeout=60, isolation_level=None, check_same_thread=False)
            con.row_factory = sqlite3.Row
            con.execute("PRAGMA busy_timeout=60000")
            mode = con.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if mode.lower() != "wal":  # pragma: no cover - filesystems without shared memory
                con.execute("PRAGMA journal_mode=DELETE")
            con.execute("PRAGMA synchronous=NORMAL")
            con.execute("PRAGMA foreign_keys=OFF")
        except sqlite3.Error as exc:
            raise RegistryError(
                f"Cannot open registry database '{self.path}': {exc}.",
                fix="check the folder is writable and not on a network filesystem without locking",
            ) from None
        return con

    def begin(self, con: sqlite3.Connection) -> None:
        for attempt in range(50):
            try:
                con.execute("BEGIN IMMEDIATE")
                return
            except sqlite3.OperationalError as exc:  # busy beyond busy_timeout: keep queueing
                if "locked" not in str(exc) and "busy" not in str(exc):
                    raise
                time.sleep(0.05 * (attempt + 1))
        raise RegistryError(f"Registry '{self.path}' stayed locked.", fix="close the process holding it")  # pragma: no cover

    def columns(self, con: sqlite3.Connection, table: str) -> list[str]:
        return [r["name"] for r in con.execute(f"PRAGMA table_info({table})").fetchall()]

    def integrity_check(self, con: sqlite3.Connection) -> list[str]:
        rows = [r[0] for r in con.execute("PRAGMA integrity_check").fetchall()]
        return [] if rows == ["ok"] else rows

    def append_only(self, table: str) -> list[str]:
        return [
            f"CREATE TRIGGER IF NOT EXISTS {table}_no_update BEFORE UPDATE ON {table} "
            f"BEGIN SELECT RAISE(ABORT, '{table} is append-only: rows cannot be updated'); END;",
            f"CREATE TRIGGER IF NOT EXISTS {table}_no_delete BEFORE DELETE ON {table} "
            f"BEGIN SELECT RAISE(ABORT, '{table} is append-only: rows cannot be deleted'); END;",
        ]

    def backup(self, con: sqlite3.Connection, dest: Path) -> None:
        """A consistent copy of the database file (SQLite's online backup), e.g. before a migration."""
        out = sqlite3.connect(dest)
        try:
            con.backup(out)
        finally:
            out.close()


# -- PostgreSQL ---------------------------------------------------------------------------------------------------
_PG_TYPES = [
    (re.compile(r"\bINTEGER PRIMARY KEY AUTOINCREMENT\b"), "BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY"),
    (re.compile(r"\bREAL\b"), "DOUBLE PRECISION"),  # PostgreSQL's REAL is 4 bytes: timestamps would lose seconds
    (re.compile(r"\bINTEGER\b"), "BIGINT"),
]
#: any advisory lock key will do, as long as every llmops process uses the same one
_WRITE_LOCK = 0x6C6C6D6F7073  # "llmops"


class PgRow:
    """A row that reads like ``sqlite3.Row``: by name or position, ``dict(row)``; the emulated ``rowid`` column is
    readable by name but left out of ``keys()``, as SQLite leaves its implicit rowid out of ``SELECT *``."""

    __slots__ = ("_names", "_values", "_index")

    def __init__(self, names: Sequence[str], index: dict[str, int], values: Sequence[Any]):
        self._names, self._index, self._values = names, index, values

    def __getitem__(self, key: int | str) -> Any:
        return self._values[key] if isinstance(key, int) else self._values[self._index[key]]

    def keys(self) -> list[str]:
        return [n for n in self._names if n != "rowid"]

    def __iter__(self) -> Iterator[Any]:
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)


def _pg_row_factory(cursor: Any) -> Any:
    names = [c.name for c in cursor.description or ()]
    index = {n: i for i, n in enumerate(names)}
    return lambda values: PgRow(names, index, values)


def pg_sql(sql: str) -> str:
    """SQLite-flavoured SQL text → PostgreSQL's: ``?`` → ``%s`` (``%`` escaped); the SQL in this package keeps to
    the common subset otherwise."""
    return sql.replace("%", "%%").replace("?", "%s")


def _pg_params(params: Iterable[Any]) -> tuple[Any, ...]:
    return tuple(int(p) if isinstance(p, bool) else p for p in params)  # SQLite stores bools as 0/1 integers


class PgCursor:
    def __init__(self, cur: Any):
        self._cur = cur

    def fetchone(self) -> PgRow | None:
        return self._cur.fetchone() if self._cur.description else None

    def fetchall(self) -> list[PgRow]:
        return self._cur.fetchall() if self._cur.description else []

    @property
    def rowcount(self) -> int:
        return self._cur.rowcount


class PgConnection:
    """A psycopg connection that takes the registry's SQL text (``execute``/``executemany`` as on sqlite3)."""

    def __init__(self, raw: Any):
        self.raw = raw

    def execute(self, sql: str, params: Iterable[Any] = ()) -> PgCursor:
        return PgCursor(self.raw.execute(pg_sql(sql), _pg_params(params)))

    def executemany(self, sql: str, seq: Iterable[Iterable[Any]]) -> PgCursor:
        cur = self.raw.cursor()
        rows = [_pg_params(p) for p in seq]
        if rows:
            cur.executemany(pg_sql(sql), rows)
        return PgCursor(cur)

    @property
    def in_transaction(self) -> bool:
        from psycopg.pq import TransactionStatus

        return self.raw.info.transaction_status != TransactionStatus.IDLE

    def close(self) -> None:
        self.raw.close()


class PostgresBackend(Backend):
    name = "postgresql"

    def __init__(self, url: str):
        try:
            import psycopg
        except ImportError:
            from llmops_jupyter.core.errors import MissingDependencyError

            raise MissingDependencyError(
                "LLMOPS_REGISTRY names a PostgreSQL database, but psycopg is not installed.",
                fix="pip install 'llmops-jupyter[team]'",
            ) from None
        self.url = url
        self._psycopg = psycopg
        self.Error = psycopg.Error
        self.IntegrityError = psycopg.IntegrityError
        self.retry_s = float(os.environ.get("LLMOPS_REGISTRY_RETRY_S") or RECONNECT_S)
        self._lock = threading.Lock()

    def describe(self) -> str:
        return describe_url(self.url)

    def connect(self) -> PgConnection:
        deadline = time.monotonic() + self.retry_s
        delay = 0.1
        while True:
            try:
                raw = self._psycopg.connect(self.url, autocommit=True, row_factory=_pg_row_factory,
                                            connect_timeout=10, application_name="llmops-jupyter")
                return PgConnection(raw)
            except self._psycopg.OperationalError as exc:
                if time.monotonic() > deadline:
                    reason = " ".join(str(exc).split())
                    raise RegistryError(f"Cannot reach the registry database {self.describe()}: {reason}.",
                                        fix="check the server is up and LLMOPS_REGISTRY is right") from None
                time.sleep(delay)  # the server is restarting: retry until the deadline
                delay = min(delay * 2, 2.0)
            except self._psycopg.Error as exc:
                raise RegistryError(f"Cannot open the registry database {self.describe()}: "
                                    f"{' '.join(str(exc).split())}.",
                                    fix="check the URL in LLMOPS_REGISTRY (user, database, password)") from None

    def alive(self, con: PgConnection) -> bool:
        return not (con.raw.closed or con.raw.broken)

    def begin(self, con: PgConnection) -> None:
        con.raw.execute("BEGIN")
        con.raw.execute("SELECT pg_advisory_xact_lock(%s)", (_WRITE_LOCK,))  # writers queue, as BEGIN IMMEDIATE

    def columns(self, con: PgConnection, table: str) -> list[str]:
        rows = con.execute("SELECT column_name FROM information_schema.columns WHERE table_schema = current_schema()"
                           " AND table_name = ? ORDER BY ordinal_position", (table,)).fetchall()
        return [r[0] for r in rows]

    def ddl(self, script: str) -> list[str]:
        out = []
        for stmt in super().ddl(script):
            for pattern, repl in _PG_TYPES:
                stmt = pattern.sub(repl, stmt)
            if stmt.upper().startswith("CREATE TABLE") and "GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY" not in stmt:
                # SQLite's implicit rowid (insertion order, a poller's cursor), made explicit and last, so positional
                # INSERTs of the declared columns still line up
                stmt = re.sub(r"\)\s*;$", ",\n    rowid BIGINT GENERATED BY DEFAULT AS IDENTITY\n);", stmt)
            if stmt.upper().startswith("ALTER TABLE") and " ADD COLUMN " in stmt.upper():
                stmt = re.sub(r"(?i)ADD COLUMN (?!IF NOT EXISTS)", "ADD COLUMN IF NOT EXISTS ", stmt)
            out.append(stmt)
        return out

    def append_only(self, table: str) -> list[str]:
        return [
            f"CREATE OR REPLACE FUNCTION {table}_append_only() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
            f"RAISE EXCEPTION '{table} is append-only: rows cannot be %', "
            "CASE TG_OP WHEN 'UPDATE' THEN 'updated' ELSE 'deleted' END "
            "USING ERRCODE = 'integrity_constraint_violation'; END $$;",
            f"CREATE OR REPLACE TRIGGER {table}_no_change BEFORE UPDATE OR DELETE ON {table} "
            f"FOR EACH ROW EXECUTE FUNCTION {table}_append_only();",
            f"CREATE OR REPLACE TRIGGER {table}_no_truncate BEFORE TRUNCATE ON {table} "
            f"FOR EACH STATEMENT EXECUTE FUNCTION {table}_append_only();",
        ]


def make_backend(home: Path, database: str | None) -> Backend:
    """The backend for a registry home: PostgreSQL when ``database`` (or ``LLMOPS_REGISTRY``) is a postgresql:// URL,
    else SQLite in ``<home>/registry.db``."""
    url = database if database is not None else (os.environ.get("LLMOPS_REGISTRY") or "").strip()
    if not url or url.lower() == "sqlite":
        return SqliteBackend(home / "registry.db")
    if is_postgres_url(url):
        return PostgresBackend(url)
    raise RegistryError(f"LLMOPS_REGISTRY='{describe_url(url)}' is not a database URL this registry can use.",
                        fix="set it to postgresql://user@host/dbname, or unset it for the SQLite registry in "
                            "LLMOPS_HOME")
