"""A throw-away PostgreSQL server for the tests: Debian's binaries, a temporary data directory, a Unix socket only.

PostgreSQL refuses to run as root, so as root the server runs as the ``postgres`` account (``nobody`` where there
is none), which owns the temporary directory. No TCP port is opened: the socket lives in that directory.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import subprocess
import tempfile
from pathlib import Path


def bin_dir() -> Path | None:
    """Where ``initdb``/``pg_ctl`` are: the newest ``/usr/lib/postgresql/<v>/bin`` (Debian), else the PATH."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(Path(p).parts[-3]))
    if found:
        return Path(found[-1]).parent
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb else None


class PgServer:
    def __init__(self, root: Path, user: str | None, bindir: Path):
        self.root, self.user, self.bindir = root, user, bindir
        self.data = root / "data"
        self.log = root / "server.log"

    @property
    def url(self) -> str:
        return f"postgresql://llmops@/postgres?host={self.root}"

    def _run(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run([str(self.bindir / args[0]), *args[1:]], capture_output=True, text=True,
                              timeout=timeout, user=self.user, cwd=self.root)

    def init(self) -> None:
        done = self._run("initdb", "-D", str(self.data), "-U", "llmops", "-A", "trust", "-E", "UTF8",
                         "--locale=C", "--no-sync")
        if done.returncode:
            raise RuntimeError(f"initdb failed: {done.stderr.strip() or done.stdout.strip()}")

    def start(self) -> None:
        # fsync and full-page writes off for speed (the OS does not crash under a test); synchronous_commit stays
        # on: with it off, an immediate stop loses the last ~200 ms of *committed* transactions, which the restart
        # fault test would read as the registry losing a write.
        opts = (f"-k {self.root} -c listen_addresses='' -c max_connections=400 -c fsync=off "
                "-c full_page_writes=off")
        done = self._run("pg_ctl", "-D", str(self.data), "-l", str(self.log), "-w", "-t", "60", "-o", opts, "start")
        if done.returncode:
            tail = self.log.read_text()[-2000:] if self.log.exists() else ""
            raise RuntimeError(f"pg_ctl start failed: {done.stderr.strip()} {tail}")

    def stop(self, mode: str = "fast") -> None:
        self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "stop")

    def restart(self) -> None:
        """Stop (immediate: connections are cut as a crash would) and start again."""
        self.stop("immediate")
        self.start()

    def remove(self) -> None:
        self.stop("immediate")
        shutil.rmtree(self.root, ignore_errors=True)


def start_server() -> PgServer:
    """Initialise and start a server; raises ``FileNotFoundError`` when PostgreSQL is not installed."""
    bindir = bin_dir()
    if bindir is None:
        raise FileNotFoundError("PostgreSQL's initdb/pg_ctl not found (Debian: apt-get install postgresql)")
    user = None
    if os.geteuid() == 0:
        try:
            user = pwd.getpwnam("postgres").pw_name
        except KeyError:
            user = "nobody"
    root = Path(tempfile.mkdtemp(prefix="llmops-pg-"))  # short: a Unix socket path has a ~100 character limit
    if user:
        entry = pwd.getpwnam(user)
        os.chown(root, entry.pw_uid, entry.pw_gid)
    server = PgServer(root, user, bindir)
    try:
        server.init()
        server.start()
    except BaseException:
        shutil.rmtree(root, ignore_errors=True)
        raise
    return server
