"""Admin operators: who may use a node's admin interface, and who did what.

Each operator has a random bearer token in its own file (mode 0600), which the
``itmolink`` command line presents; the node keeps only SHA-256 digests of the
tokens, in ``operators.toml`` beside the node's other key material::

    [operators]
    admin = "9f86d08..."   # hex SHA-256 of the token

There is no default token: ``itmolink pki init`` creates an ``admin``
operator with a fresh random token, and ``itmolink operator add`` adds more.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import tomllib
from pathlib import Path

from itmolink.crypto.keys import write_private_file

OPERATOR_NAME = re.compile(r"[a-z][a-z0-9_-]{0,31}")


def token_digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def operators_file(directory: Path) -> Path:
    return directory / "operators.toml"


def token_file(directory: Path, name: str) -> Path:
    return directory / "operators" / f"{name}.token"


def add_operator(directory: Path, name: str) -> Path:
    """Create operator ``name`` with a fresh token; returns the token file."""
    if not OPERATOR_NAME.fullmatch(name):
        raise ValueError(
            f"operator name {name!r} must be 1-32 lower-case letters, digits, '_' or '-', "
            "starting with a letter"
        )
    known = load_operators(directory)
    if name in known.values():
        raise FileExistsError(f"operator {name!r} already exists in {operators_file(directory)}")
    token = secrets.token_urlsafe(32)
    path = token_file(directory, name)
    path.parent.mkdir(mode=0o700, exist_ok=True)
    write_private_file(path, (token + "\n").encode())
    entries = {**{n: d for d, n in known.items()}, name: token_digest(token)}
    lines = ["# itmolink admin operators: SHA-256 digests of their tokens.", "[operators]"]
    lines += [f'{n} = "{d}"' for n, d in sorted(entries.items())]
    operators_file(directory).write_text("\n".join(lines) + "\n")
    return path


def load_operators(directory: Path) -> dict[str, str]:
    """Token digest -> operator name (empty when no operator exists)."""
    path = operators_file(directory)
    if not path.exists():
        return {}
    try:
        data = tomllib.loads(path.read_text()).get("operators", {})
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(f"{path}: not valid TOML: {exc}") from None
    found: dict[str, str] = {}
    for name, digest in data.items():
        if not OPERATOR_NAME.fullmatch(name) or not re.fullmatch(r"[0-9a-f]{64}", str(digest)):
            raise ValueError(f"{path}: operator {name!r} needs a 64-digit hex SHA-256 digest")
        found[str(digest)] = name
    return found


def operator_for(token: str, operators: dict[str, str]) -> str | None:
    """The operator whose token this is, compared in constant time."""
    presented = token_digest(token)
    match = None
    for digest, name in operators.items():
        if hmac.compare_digest(presented, digest):
            match = name
    return match


def read_token(path: Path) -> str:
    from itmolink.crypto.keys import check_private_file

    check_private_file(path)
    return path.read_text().strip()
