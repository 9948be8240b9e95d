"""A real PostgreSQL server for the tests: ``pg_server``, one per test session.

Debian's ``postgresql`` package (``make test`` installs it with ``make system-deps``) provides the
binaries; the fixture makes its own cluster with ``initdb`` in a fresh temp folder, starts
``postgres`` on 127.0.0.1 and a free port with password (SCRAM) authentication, and at the end
stops exactly that process, by its pid, and removes the folder. The server refuses to run as
root, so under root (CI, this machine) both run as the ``postgres`` system user, which then owns
the folder. Tests get a database of their own from :meth:`PgServer.create_database`.

    from pgserver import PgServer
    with PgServer.start() as pg:            # also usable outside pytest, e.g. for a benchmark
        print(pg.url("optuna"))
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from probes import free_port

__all__ = ["PgServer", "find_postgres", "pg_server"]

USER = "tuner"
"""The cluster's superuser (not ``postgres``: a URL that names it is visibly the test's own)."""


def find_postgres() -> Path | None:
    """The directory of ``initdb`` and ``postgres``: on PATH, else Debian's newest version."""
    on_path = shutil.which("initdb")
    if on_path and shutil.which("postgres"):
        return Path(on_path).parent
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/postgres"), key=lambda p: int(p.split("/")[4]))
    return Path(found[-1]).parent if found else None


@dataclass
class PgServer:
    """A running server: where it listens and its superuser's password."""

    host: str
    port: int
    user: str
    password: str
    process: subprocess.Popen
    folder: Path

    def url(self, database: str, *, password: bool = True, driver: str = "postgresql+psycopg") -> str:
        secret = f":{self.password}" if password else ""
        return f"{driver}://{self.user}{secret}@{self.host}:{self.port}/{database}"

    def connect(self, database: str = "postgres"):
        import psycopg

        return psycopg.connect(
            host=self.host, port=self.port, user=self.user, password=self.password, dbname=database,
            autocommit=True, connect_timeout=5,
        )  # fmt: skip

    def create_database(self, name: str) -> str:
        """Create database ``name`` (dropping one left by an earlier run) and return its URL."""
        with self.connect() as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    @classmethod
    @contextlib.contextmanager
    def start(cls, *, durable: bool = False) -> Iterator[PgServer]:
        """Start a server in a temp folder; stop it and remove the folder on exit. ``durable``
        keeps fsync on (for measurements); tests run without it."""
        bindir = find_postgres()
        if bindir is None:
            raise FileNotFoundError("PostgreSQL is not installed (Debian: apt-get install postgresql)")
        as_root = os.geteuid() == 0
        owner = pwd.getpwnam("postgres") if as_root else pwd.getpwuid(os.geteuid())
        run_as = {"user": owner.pw_uid, "group": owner.pw_gid} if as_root else {}
        folder = Path(tempfile.mkdtemp(prefix="cliplung-pg-"))
        proc = None
        try:
            os.chown(folder, owner.pw_uid, owner.pw_gid)
            password = "pg-" + secrets.token_hex(12)
            pwfile = folder / "pwfile"
            pwfile.write_text(password + "\n")
            os.chown(pwfile, owner.pw_uid, owner.pw_gid)
            data = folder / "data"
            env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C.UTF-8", "HOME": str(folder)}
            subprocess.run(
                [str(bindir / "initdb"), "-D", str(data), "-U", USER, f"--pwfile={pwfile}",
                 "--auth=scram-sha-256", "-E", "UTF8", "--no-sync"],
                check=True, capture_output=True, env=env, cwd=folder, **run_as,
            )  # fmt: skip
            pwfile.unlink()
            settings = ["-c", "unix_socket_directories=" + str(folder), "-c", "max_connections=200"]
            if not durable:
                settings += ["-c", "fsync=off", "-c", "synchronous_commit=off", "-c", "full_page_writes=off"]
            for _attempt in range(5):
                port = free_port()
                log = (folder / "server.log").open("ab")
                proc = subprocess.Popen(
                    [str(bindir / "postgres"), "-D", str(data), "-h", "127.0.0.1", "-p", str(port), *settings],
                    stdout=log, stderr=subprocess.STDOUT, env=env, cwd=folder, start_new_session=True,
                    **run_as,
                )  # fmt: skip
                log.close()
                server = cls("127.0.0.1", port, USER, password, proc, folder)
                if server._wait_ready():
                    break
                _stop(proc)
                proc = None  # lost the port to someone else: try another one
            if proc is None:
                raise RuntimeError(
                    f"PostgreSQL did not start:\n{(folder / 'server.log').read_text()[-2000:]}"
                )
            yield server
        finally:
            if proc is not None:
                _stop(proc)
            shutil.rmtree(folder, ignore_errors=True)

    def _wait_ready(self, timeout: float = 60) -> bool:
        import psycopg

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.process.poll() is None:
            try:
                self.connect().close()
                return True
            except psycopg.OperationalError:
                time.sleep(0.2)
        return False


def _stop(proc: subprocess.Popen) -> None:
    """Fast shutdown of exactly this postmaster (SIGINT), then SIGKILL of its process group."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=30)
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PgServer]:
    """The suite's PostgreSQL server (skips where PostgreSQL is not installed)."""
    if find_postgres() is None:
        pytest.skip("PostgreSQL is not installed (`make system-deps` installs Debian's postgresql)")
    with PgServer.start() as server:
        yield server
