"""docker/compose.yaml, run without Docker: every service's command on loopback.

No Docker engine runs here, so this test plays the engine's part as literally as it
can: it runs docker/setup.sh, parses compose.yaml, gives each service a directory
standing for its container's file system with the service's configs, secrets and
bind mounts placed at their container paths (the compose files' own paths, under
that directory), maps service names and container ports to 127.0.0.1 and free
ports, and starts the services in depends_on order:

* each PostgreSQL service as a throwaway cluster, initialised the way the postgres
  image does it from POSTGRES_USER, POSTGRES_DB and POSTGRES_PASSWORD_FILE
  (password authentication over TCP), with the service's ``command`` options, and
  then the scripts the service mounts in /docker-entrypoint-initdb.d, in name
  order, with the service's environment and the server on a local socket;
* each node service with the Dockerfile's ENTRYPOINT and the service's
  ``command``, reading the node.toml the compose file mounts.

Each service's healthcheck must pass before its dependants start. Then LAO
transfers to KOR through the CLI, the metrics show it, and SIGTERM stops both
nodes with exit code 0.
"""

from __future__ import annotations

import json
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from itmolink.cli.main import main

from ..pgcluster import SKIP_ENV, TEST_USER, PostgresMissing, _unprivileged_user, find_bindir

DOCKER = Path(__file__).resolve().parents[2] / "docker"
COMMITTED = (
    "Dockerfile", "compose.yaml", "setup.sh", "lao/node.toml", "kor/node.toml",
    "initdb/10-itmolink-role.sh",
)  # fmt: skip
INITDB = "/docker-entrypoint-initdb.d/"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def dockerfile_instruction(name: str) -> Any:
    """The JSON (exec form) argument of the Dockerfile's last ``name`` instruction."""
    text = (DOCKER / "Dockerfile").read_text().replace("\\\n", " ")
    found = re.findall(rf"^{name}\s+(?:--\S+\s+)*(?:CMD\s+)?(\[.*\])\s*$", text, flags=re.M)
    assert found, f"no {name} in exec form in docker/Dockerfile"
    return json.loads(found[-1])


class Engine:
    """Plays Docker's part for the services of one compose file."""

    def __init__(self, compose_dir: Path, root: Path) -> None:
        self.dir = compose_dir
        self.root = root
        self.spec = yaml.safe_load((compose_dir / "compose.yaml").read_text())
        self.services: dict[str, dict[str, Any]] = self.spec["services"]
        self.ports: dict[tuple[str, int], int] = {}
        self.processes: dict[str, subprocess.Popen[bytes]] = {}
        self.clusters: dict[str, Path] = {}
        self.as_postgres: list[str] = []
        if os.geteuid() == 0:  # PostgreSQL refuses to run as root
            self.as_postgres = ["runuser", "-u", _unprivileged_user(), "--"]

    # -- the containers' file systems ----------------------------------------------------

    def fs(self, service: str) -> Path:
        return self.root / service

    def host_port(self, service: str, port: int) -> int:
        if (service, port) not in self.ports:
            self.ports[(service, port)] = free_port()
        return self.ports[(service, port)]

    def mounts(self, service: str) -> dict[str, Path]:
        """Container path -> host path for the service's configs, secrets and binds."""
        spec = self.services[service]
        found: dict[str, Path] = {}
        for entry in spec.get("configs", []):
            source = self.dir / self.spec["configs"][entry["source"]]["file"]
            found[entry.get("target", f"/{entry['source']}")] = source
        for entry in spec.get("secrets", []):
            name = entry if isinstance(entry, str) else entry["source"]
            target = name if isinstance(entry, str) else entry.get("target", name)
            if not target.startswith("/"):
                target = f"/run/secrets/{target}"
            found[target] = self.dir / self.spec["secrets"][name]["file"]
        for volume in spec.get("volumes", []):
            source, target = volume.split(":")[:2]
            if source.startswith("."):  # a bind mount; named volumes are the engine's
                found[target] = self.dir / source
        return found

    def place(self, service: str) -> None:
        """Mount: each config, secret and bind appears at its container path."""
        for target, source in self.mounts(service).items():
            assert source.exists(), f"{service}: {source} (mounted at {target}) does not exist"
            where = self.fs(service) / target.lstrip("/")
            where.parent.mkdir(parents=True, exist_ok=True)
            where.symlink_to(source.resolve())

    def translate(self, service: str, text: str) -> str:
        """Container paths -> the service's directory; service:port -> 127.0.0.1:port."""
        root = str(self.fs(service))
        text = re.sub(r'(?<=["=])/|(?<=unix:)/', root + "/", text)
        names = "|".join(re.escape(n) for n in self.services)

        def address(match: re.Match[str]) -> str:
            name = service if match.group(1) == "0.0.0.0" else match.group(1)
            return f"127.0.0.1:{self.host_port(name, int(match.group(2)))}"

        return re.sub(rf"\b({names}|0\.0\.0\.0):(\d+)\b", address, text)

    def node_config(self, service: str) -> Path:
        """The node.toml as the node inside the container reads it, translated."""
        mounted = self.fs(service) / "etc/itmolink/node.toml"
        text = mounted.read_text()
        mounted.unlink()  # replace the symlink with the translated copy
        mounted.write_text(self.translate(service, text))
        return mounted

    def argv(self, service: str, args: list[str]) -> list[str]:
        return [self.translate(service, f"={a}")[1:] if a.startswith("/") else a for a in args]

    # -- running services ----------------------------------------------------------------------

    def start(self, service: str) -> None:
        spec = self.services[service]
        self.place(service)
        if spec["image"].startswith("postgres:"):
            self.start_postgres(service, spec)
        else:
            self.start_node(service, spec)

    def start_postgres(self, service: str, spec: dict[str, Any]) -> None:
        bindir = find_bindir()
        env = spec["environment"]
        user = env["POSTGRES_USER"]
        database = env.get("POSTGRES_DB", user)
        password_file = self.fs(service) / env["POSTGRES_PASSWORD_FILE"].lstrip("/")
        cluster = Path(tempfile.mkdtemp(prefix=f"itmolink-{service}-"))
        self.clusters[service] = cluster
        if self.as_postgres:
            os.chown(cluster, pwd.getpwnam(TEST_USER).pw_uid, -1)
        pwfile = cluster / "pwfile"
        pwfile.write_bytes(password_file.read_bytes())  # read as the image's entrypoint does
        pwfile.chmod(0o600)
        if self.as_postgres:
            os.chown(pwfile, pwd.getpwnam(TEST_USER).pw_uid, -1)
        port = self.host_port(service, 5432)
        command = spec.get("command", ["postgres"])
        assert command[0] == "postgres"
        options = [
            "-c listen_addresses=127.0.0.1", f"-c port={port}",
            f"-c unix_socket_directories='{cluster}'",
            *(f"{a} {b}" for a, b in zip(command[1::2], command[2::2], strict=True)),
        ]  # fmt: skip
        self.run_as_postgres(
            [str(bindir / "initdb"), "-D", str(cluster / "data"), "-U", user,
             f"--pwfile={pwfile}", "--auth-host=scram-sha-256", "--auth-local=trust",
             "--encoding=UTF8", "--no-locale", "--no-sync"], cluster,
        )  # fmt: skip
        self.run_as_postgres(
            [str(bindir / "pg_ctl"), "-D", str(cluster / "data"), "-l",
             str(cluster / "server.log"), "-o", " ".join(options), "-w", "-t", "60", "start"],
            cluster,
        )  # fmt: skip
        if database != "postgres":
            self.run_as_postgres(
                [str(bindir / "createdb"), "-h", str(cluster), "-p", str(port), "-U", user,
                 database], cluster,
            )  # fmt: skip
        scripts = sorted(t for t in self.mounts(service) if t.startswith(INITDB))
        for target in scripts:  # as the image runs them: with the service's environment
            script_env = {
                name: self.translate(service, f"={value}")[1:] if value.startswith("/") else value
                for name, value in env.items()
            }
            result = subprocess.run(
                ["sh", str(self.fs(service) / target.lstrip("/"))], capture_output=True,
                text=True, check=False, cwd=cluster,
                env={**os.environ, **script_env, "PATH": f"{bindir}:{os.environ['PATH']}",
                     "PGHOST": str(cluster), "PGPORT": str(port)},
            )  # fmt: skip
            assert result.returncode == 0, f"{target}: {result.stdout}{result.stderr}"

    def psql(self, service: str, query: str, database: str = "postgres") -> str:
        """A query's rows (unaligned, tuples only) as the cluster's superuser."""
        user = self.services[service]["environment"]["POSTGRES_USER"]
        result = subprocess.run(
            [str(find_bindir() / "psql"), "-h", str(self.clusters[service]),
             "-p", str(self.host_port(service, 5432)), "-U", user, "-d", database,
             "--no-psqlrc", "-tA", "-c", query], capture_output=True, text=True, check=False,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
        return result.stdout.strip()

    def run_as_postgres(self, command: list[str], cwd: Path) -> None:
        result = subprocess.run(
            [*self.as_postgres, *command], capture_output=True, text=True, check=False, cwd=cwd
        )
        assert result.returncode == 0, f"{command}: {result.stdout}{result.stderr}"

    def start_node(self, service: str, spec: dict[str, Any]) -> None:
        config = self.node_config(service)
        for target in self.mounts(service):
            if target.endswith("pgpass"):  # host:port names the database service
                mounted = self.fs(service) / target.lstrip("/")
                text = self.translate(service, mounted.read_text())
                mounted.unlink()
                mounted.write_text(text)
                mounted.chmod(0o600)
        entrypoint = spec.get("entrypoint", dockerfile_instruction("ENTRYPOINT"))
        assert entrypoint == ["itmolink"]
        command = spec.get("command", dockerfile_instruction("CMD"))
        log = (self.root / f"{service}.log").open("wb")
        self.processes[service] = subprocess.Popen(
            [sys.executable, "-m", "itmolink.cli.main", *self.argv(service, command)],
            stdout=log, stderr=subprocess.STDOUT, cwd=config.parent,
        )  # fmt: skip

    def healthy(self, service: str) -> bool:
        """Run the service's healthcheck test once."""
        test = self.services[service]["healthcheck"]["test"]
        assert test[0] == "CMD"
        if test[1] == "pg_isready":
            port = self.host_port(service, 5432)
            command = [str(find_bindir() / "pg_isready"), *test[2:], "-h", "127.0.0.1",
                       "-p", str(port)]  # fmt: skip
        else:
            assert test[1] == "itmolink"
            process = self.processes[service]
            assert process.poll() is None, (self.root / f"{service}.log").read_text()
            command = [sys.executable, "-m", "itmolink.cli.main", *self.argv(service, test[2:])]
        return subprocess.run(command, capture_output=True, check=False).returncode == 0

    def wait_healthy(self, service: str, within: float = 60) -> None:
        deadline = time.monotonic() + within
        while not self.healthy(service):
            assert time.monotonic() < deadline, f"{service} never became healthy"
            time.sleep(0.2)

    def up(self) -> None:
        """Start every service after the services it depends on are healthy."""
        started: set[str] = set()
        while len(started) < len(self.services):
            for name, spec in self.services.items():
                needs = spec.get("depends_on", {})
                if name in started or not set(needs) <= started:
                    continue
                for dependency, condition in needs.items():
                    assert condition == {"condition": "service_healthy"}
                    self.wait_healthy(dependency)
                self.start(name)
                started.add(name)
        for name in self.services:
            self.wait_healthy(name)

    def stop_node(self, service: str) -> int:
        process = self.processes[service]
        process.send_signal(signal.SIGTERM)
        return process.wait(timeout=30)

    def down(self) -> None:
        for process in self.processes.values():
            if process.poll() is None:
                process.kill()
                process.wait()
        for cluster in self.clusters.values():
            subprocess.run(
                [*self.as_postgres, str(find_bindir() / "pg_ctl"), "-D", str(cluster / "data"),
                 "-m", "immediate", "stop"], capture_output=True, check=False, cwd=cluster,
            )  # fmt: skip
            shutil.rmtree(cluster, ignore_errors=True)


@pytest.fixture
def compose(tmp_path: Path) -> Iterator[Engine]:
    try:
        find_bindir()
    except PostgresMissing as exc:  # as for the other PostgreSQL runs (tests/conftest.py)
        if os.environ.get(SKIP_ENV):
            pytest.skip(f"{SKIP_ENV} is set: {exc}")
        pytest.fail(f"{exc} (set {SKIP_ENV}=1 to skip the PostgreSQL runs locally)")
    compose_dir = tmp_path / "docker"
    for name in COMMITTED:
        (compose_dir / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(DOCKER / name, compose_dir / name)
    itmolink = f"{sys.executable} -m itmolink.cli.main"
    subprocess.run(
        ["sh", str(compose_dir / "setup.sh")], check=True, capture_output=True,
        env={**os.environ, "ITMOLINK": itmolink},
    )  # fmt: skip
    # The containers' file systems in a short directory of their own: a node's admin
    # socket lies four levels down, and a Unix socket path holds at most 107 characters
    # (tmp_path is longer under pytest-xdist, which adds a directory per worker).
    containers = Path(tempfile.mkdtemp(prefix="itmolink-c-"))
    engine = Engine(compose_dir, containers)
    try:
        yield engine
    finally:
        engine.down()
        shutil.rmtree(containers, ignore_errors=True)


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        return str(response.read().decode())


def test_the_compose_services_run_and_lao_transfers_to_kor(
    compose: Engine, capsys: pytest.CaptureFixture[str]
) -> None:
    assert set(compose.services) == {"lao", "lao-db", "kor", "kor-db"}
    compose.up()  # every healthcheck passed
    lao = str(compose.fs("lao") / "etc/itmolink/node.toml")
    kor = str(compose.fs("kor") / "etc/itmolink/node.toml")
    # The private keys are the mounted secrets, not files in the key directory.
    assert not (compose.dir / "lao/pki/node.key").exists()
    assert not (compose.dir / "lao/pki/ca.key").exists()

    for config in (lao, kor):
        assert main(["node", "check-config", config]) == 0
    out = capsys.readouterr().out
    assert "FAIL" not in out
    assert out.count("the PostgreSQL database: schema version") == 2

    assert main(["authorise", "--config", lao, "--activity-id", "LAO-SOLAR",
                 "--cooperative-approach", "LAO-KOR-A6.2", "--acquiring-party", "KOR",
                 "--purpose", "NDC", "--vintage-from", "2021", "--vintage-to", "2030",
                 "--wait", "--quiet"]) == 0  # fmt: skip
    authorisation = capsys.readouterr().out.strip().splitlines()[-1]
    assert main(["issue", "--config", lao, "--authorisation", authorisation,
                 "--vintage", "2025", "--quantity", "1000"]) == 0  # fmt: skip
    assert main(["transfer", "--config", lao, "--to", "KOR", "--authorisation", authorisation,
                 "--vintage", "2025", "--quantity", "250", "--wait"]) == 0  # fmt: skip
    assert "COMPLETED" in capsys.readouterr().out
    assert main(["show", "holdings", "--config", kor, "--json"]) == 0
    blocks = json.loads(capsys.readouterr().out)["blocks"]
    held = sum(int(b["block"]["serial_end"]) - int(b["block"]["serial_start"]) + 1 for b in blocks)
    assert held == 250  # KOR holds exactly what it received

    metrics = scrape(compose.host_port("lao", 9464))
    assert 'itmolink_transfers{direction="out",partner="KOR",state="completed"} 1.0' in metrics
    kor_metrics = scrape(compose.host_port("kor", 9464))
    assert 'itmolink_transfers{direction="in",partner="LAO",state="completed"} 1.0' in kor_metrics

    # Each node connects as its own role, which is no superuser and owns the node's
    # database and the tables the node made there.
    for db in ("lao-db", "kor-db"):
        assert compose.psql(db, "SELECT rolsuper, rolcreaterole, rolcreatedb FROM pg_roles "
                            "WHERE rolname = 'itmolink'") == "f|f|f"  # fmt: skip
        assert compose.psql(db, "SELECT pg_get_userbyid(datdba) FROM pg_database "
                            "WHERE datname = 'itmolink'") == "itmolink"  # fmt: skip
        # Before this test connects to the node's database itself: the backend of such
        # a psql session can still be listed for a moment after it ended.
        sessions = compose.psql(db, "SELECT DISTINCT usename FROM pg_stat_activity "
                                "WHERE datname = 'itmolink'")  # fmt: skip
        assert sessions == "itmolink"
        owners = compose.psql(db, "SELECT DISTINCT tableowner FROM pg_tables "
                              "WHERE schemaname = 'public'", database="itmolink")  # fmt: skip
        assert owners == "itmolink"

    for service in ("lao", "kor"):
        assert compose.stop_node(service) == 0
        lines = (compose.root / f"{service}.log").read_text().splitlines()
        assert json.loads(lines[-1])["message"] == "stopped"
