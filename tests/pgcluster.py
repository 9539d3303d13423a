"""A throwaway PostgreSQL cluster for the tests (docs/POSTGRES.md, "The test cluster").

The cluster lives in a temporary directory and listens on a unix socket there only
(``listen_addresses = ''``): no shared server, no TCP port. It is tuned for speed
and NOT for durability (``fsync = off``, ``synchronous_commit = off``,
``full_page_writes = off``): a crash may lose it, which is fine for tests and
never fine for a ledger. PostgreSQL refuses to run as root; when the tests run
as root (CI does), the server runs as an unprivileged user (``itmolink-test``,
created with ``useradd`` if missing) through ``runuser``.

The binaries are found in ``$ITMOLINK_PG_BINDIR``, else the newest
``/usr/lib/postgresql/*/bin``, else on ``PATH``.
"""

from __future__ import annotations

import atexit
import glob
import itertools
import os
import pwd
import shutil
import subprocess
import tempfile
from pathlib import Path
from urllib.parse import quote

TEST_USER = "itmolink-test"
SKIP_ENV = "ITMOLINK_SKIP_POSTGRES"


class PostgresMissing(RuntimeError):
    """No PostgreSQL server binaries on this machine."""


def find_bindir() -> Path:
    configured = os.environ.get("ITMOLINK_PG_BINDIR")
    if configured:
        if not (Path(configured) / "initdb").exists():
            raise PostgresMissing(f"ITMOLINK_PG_BINDIR={configured} holds no initdb")
        return Path(configured)

    def version(path: str) -> tuple[int, ...]:
        name = Path(path).parent.parent.name
        return tuple(int(p) for p in name.split(".") if p.isdigit())

    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=version)
    if found:
        return Path(found[-1]).parent
    on_path = shutil.which("initdb")
    if on_path:
        return Path(on_path).parent
    raise PostgresMissing(
        "PostgreSQL server binaries (initdb, pg_ctl) not found: install Debian's "
        "'postgresql' package (.ci/run does), or set ITMOLINK_PG_BINDIR"
    )


class Cluster:
    """A running throwaway cluster; :meth:`new_database` makes a fresh database."""

    def __init__(self) -> None:
        self.bindir = find_bindir()
        self.root = Path(tempfile.mkdtemp(prefix="itmolink-pg-", dir=_base_directory()))
        self.data = self.root / "data"
        self.socket_dir = self.root / "socket"
        self._as: list[str] = []
        if os.geteuid() == 0:
            self._as = ["runuser", "-u", _unprivileged_user(), "--"]
            os.chown(self.root, pwd.getpwnam(TEST_USER).pw_uid, -1)
        os.chmod(self.root, 0o700)
        self._run(["mkdir", "-m", "0700", str(self.socket_dir)])
        self._run(
            [
                str(self.bindir / "initdb"), "-D", str(self.data), "-U", "postgres",
                "--auth=trust", "--encoding=UTF8", "--no-locale", "--no-sync",
            ]
        )  # fmt: skip
        self.start()
        self._names = itertools.count(1)
        # An interrupted run (Ctrl-C, a failed session) must not leave a server behind.
        atexit.register(self.stop)

    def start(self) -> None:
        """Start the server (again, after :meth:`stop_server`)."""
        options = " ".join(
            [
                "-c listen_addresses=''",
                f"-c unix_socket_directories='{self.socket_dir}'",
                # Only the server's user (and root) may reach the socket: its
                # directory and the cluster's are 0700 (the cluster trusts any
                # local connection that reaches it).
                "-c unix_socket_permissions=0700",
                # Tests only: speed over durability (see the module docstring).
                "-c fsync=off",
                "-c synchronous_commit=off",
                "-c full_page_writes=off",
                "-c max_connections=300",
                "-c shared_buffers=32MB",
            ]
        )
        self._run(
            [
                str(self.bindir / "pg_ctl"), "-D", str(self.data), "-l",
                str(self.root / "server.log"), "-o", options, "-w", "-t", "60", "start",
            ]
        )  # fmt: skip

    def stop_server(self) -> None:
        """Stop the server, keeping its data (an outage; :meth:`start` again)."""
        self._run([str(self.bindir / "pg_ctl"), "-D", str(self.data), "-m", "fast", "-w",
                   "stop"])  # fmt: skip

    def _run(self, command: list[str]) -> None:
        result = subprocess.run(
            [*self._as, *command], capture_output=True, text=True, check=False, cwd=self.root
        )
        if result.returncode != 0:
            log = self.root / "server.log"
            raise RuntimeError(
                f"{' '.join(command)} failed ({result.returncode}):\n{result.stdout}"
                f"{result.stderr}{log.read_text() if log.exists() else ''}"
            )

    def url(self, database: str) -> str:
        return f"postgresql:///{database}?host={quote(str(self.socket_dir))}&user=postgres"

    def new_database(self, prefix: str = "t") -> str:
        """Create an empty database; returns its URL."""
        import psycopg

        name = f"{prefix}_{os.getpid()}_{next(self._names)}"
        with psycopg.connect(self.url("postgres"), autocommit=True) as conn:
            try:  # FILE_COPY (PostgreSQL 15+) is twice as fast here as the default
                conn.execute(f'CREATE DATABASE "{name}" STRATEGY FILE_COPY')
            except psycopg.errors.SyntaxError:
                conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def stop(self) -> None:
        """Stop the server and remove the cluster (idempotent)."""
        if not self.root.exists():
            return
        try:
            self._run([str(self.bindir / "pg_ctl"), "-D", str(self.data), "-m", "immediate",
                       "stop"])  # fmt: skip
        finally:
            shutil.rmtree(self.root, ignore_errors=True)


def _base_directory() -> str | None:
    """Where to make the cluster's directory: the usual temporary directory, unless
    running as root and the unprivileged server user could not reach it."""
    if os.geteuid() != 0:
        return None
    base = Path(tempfile.gettempdir()).resolve()
    for directory in (base, *base.parents):
        if not os.stat(directory).st_mode & 0o001:
            return "/tmp"  # a fresh mkdtemp directory inside it
    return None


def _unprivileged_user() -> str:
    """The user the server runs as when the tests run as root (created if missing)."""
    try:
        pwd.getpwnam(TEST_USER)
    except KeyError:
        subprocess.run(
            ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin",
             TEST_USER],
            check=True, capture_output=True,
        )  # fmt: skip
    return TEST_USER
