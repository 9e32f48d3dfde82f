"""A real PostgreSQL server for the tests: Debian's package, started by the tests themselves.

`.ci/run` installs the `postgresql` package; the server runs from a temporary data directory on
127.0.0.1 and a private port, as the `postgres` user when the tests run as root (initdb refuses
root). Each pytest-xdist worker starts its own (the fixture is session-scoped, and a session is
per worker), on its own free port and socket directory. Nothing here is a stand-in: it is the
same server a seller runs. Durability to the disk is off (fsync, full-page writes): those only
matter when the machine itself loses power, which no test does; a killed or immediately stopped
server still recovers every commit from its WAL, which the restart tests check. Autovacuum is
off too: its launcher visited each of a session's hundreds of databases for nothing.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import subprocess
import tempfile
import time
import uuid
from pathlib import Path


def bindir() -> Path | None:
    """The newest installed server's binaries (Debian keeps them out of PATH)."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=_version)
    if found:
        return Path(found[-1]).parent
    initdb = shutil.which("initdb")
    return Path(initdb).resolve().parent if initdb else None


def _version(path: str) -> int:
    part = path.split("/")[4]
    return int(part) if part.isdigit() else 0


def _free_port() -> int:
    from tests.helpers import free_port  # the worker's own block: see there

    return free_port()


class PgServer:
    """One cluster in a temporary directory; `stop`/`start` keep its data (restart tests)."""

    def __init__(self) -> None:
        bins = bindir()
        if bins is None:
            raise RuntimeError(
                "PostgreSQL server binaries not found: install Debian's `postgresql` package "
                "(.ci/run does)"
            )
        self.bin = bins
        self.root = Path(tempfile.mkdtemp(prefix="sidecar-pg-"))
        self.data = self.root / "data"
        self.port = _free_port()
        self._user: str | None = None
        if os.geteuid() == 0:
            self._user = "postgres"
            entry = pwd.getpwnam(self._user)
            os.chown(self.root, entry.pw_uid, entry.pw_gid)
        self._run(
            "initdb", "-N", "-D", str(self.data), "-A", "trust", "-U", "postgres", "-E", "UTF8"
        )
        with open(self.data / "postgresql.conf", "a") as conf:
            conf.write(
                "listen_addresses = '127.0.0.1'\n"
                f"unix_socket_directories = '{self.root}'\n"
                "max_connections = 200\nshared_buffers = 32MB\n"
                "fsync = off\nfull_page_writes = off\nautovacuum = off\n"
            )
        for attempt in range(5):
            try:
                self.start()
                break
            except subprocess.CalledProcessError:
                # Another test worker (or anyone) took the free port between our look and
                # PostgreSQL's bind: take another one.
                if attempt == 4:
                    raise
                self.port = _free_port()

    def _run(self, tool: str, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        argv = [str(self.bin / tool), *args]
        if self._user is not None:
            argv = ["runuser", "-u", self._user, "--", *argv]
        return subprocess.run(argv, capture_output=True, text=True, check=check, timeout=120)

    def start(self) -> None:
        log, port = str(self.root / "log"), f"-p {self.port}"
        self._run("pg_ctl", "-D", str(self.data), "-l", log, "-o", port, "-w", "start")

    def stop(self, mode: str = "fast") -> None:
        self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "stop", check=False)

    def restart(self, down_seconds: float = 0.0) -> None:
        self.stop("immediate")
        time.sleep(down_seconds)
        self.start()

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def new_database(self) -> str:
        """A fresh, empty database for one test; its URL."""
        import psycopg

        name = "t_" + uuid.uuid4().hex[:12]
        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def close(self) -> None:
        """Stop the server, then leave its directory to a detached `rm`: a session's databases
        and WAL are hundreds of MB, and waiting for the disk to delete them held each worker's
        exit (the suite's tail) for up to 14 s on a busy machine."""
        self.stop("immediate")
        subprocess.run(["sh", "-c", 'rm -rf -- "$1" >/dev/null 2>&1 &', "rm", str(self.root)])
