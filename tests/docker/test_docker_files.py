"""Docker files read without Docker: the build context is an allowlist (.dockerignore),
only what the Dockerfile copies; compose keeps each database on its party's network."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_the_build_context_holds_only_what_the_dockerfile_copies() -> None:
    lines = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert lines[0] == "*"  # everything is excluded first
    allowed = {line[1:].rstrip("/") for line in lines if line.startswith("!")}
    copied: set[str] = set()
    for line in (ROOT / "docker" / "Dockerfile").read_text().splitlines():
        words = line.split()
        if words[:1] == ["COPY"] and not any(w.startswith("--from") for w in words):
            copied.update(w.rstrip("/") for w in words[1:-1])
    assert copied == {"pyproject.toml", "README.md", "src"}
    assert allowed == copied


def test_each_database_is_on_its_partys_network_only() -> None:
    import yaml

    spec = yaml.safe_load((ROOT / "docker" / "compose.yaml").read_text())
    services, networks = spec["services"], spec["networks"]
    for party in ("lao", "kor"):
        assert services[f"{party}-db"]["networks"] == [f"{party}-db"]
        assert networks[f"{party}-db"]["internal"] is True
        assert set(services[party]["networks"]) == {f"{party}-db", "partners"}
    pgpass_line = (ROOT / "docker" / "setup.sh").read_text()
    assert "'%s-db:5432:itmolink:itmolink:%s\\n'" in pgpass_line  # no wildcard host
