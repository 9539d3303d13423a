"""Every `itmolink` command line shown in a fenced code block of the README, docker/README.md
and docs/ (also as run in a container, `docker compose exec SERVICE itmolink ...`) parses
with the CLI as it is:
the subcommands and options the README and the guides tell an operator to type exist.

A shown line may elide with ``...`` (then only missing required arguments are forgiven),
offer alternatives as ``a|b`` (each is checked) and optional parts in ``[...]``.
"""

from __future__ import annotations

import contextlib
import io
import itertools
import re
import shlex
from pathlib import Path

import pytest

from itmolink.cli.main import build_parser

ROOT = Path(__file__).resolve().parents[2]
DOCUMENTS = sorted(
    [ROOT / "README.md", ROOT / "docker" / "README.md", *(ROOT / "docs").glob("*.md")]
)


def shown_commands() -> list[tuple[str, str]]:
    """(where, command line) for each `itmolink` line in a fenced code block."""
    found = []
    for document in DOCUMENTS:
        fenced = False
        pending = ""
        for number, line in enumerate(document.read_text().splitlines(), 1):
            if line.lstrip().startswith("```"):
                fenced = not fenced
                continue
            if not fenced:
                continue
            text = pending + " " + line.strip() if pending else line.strip()
            text = text.removeprefix("$ ")
            # As run in a container: docker compose exec [-T] SERVICE itmolink ...
            text = re.sub(r"^docker compose exec (?:-T )?\S+ (?=itmolink )", "", text)
            if not pending and not text.startswith("itmolink "):
                continue
            if text.endswith("\\"):
                pending = text[:-1].strip()
                continue
            pending = ""
            found.append((f"{document.relative_to(ROOT)}:{number}", text))
    return found


def variants(line: str) -> list[list[str]]:
    line = re.sub(r"\s#.*$", "", line)  # a comment
    line = re.sub(r"\$\([^)]*\)", "X", line)  # a shell substitution
    line = line.replace("[", " ").replace("]", " ")  # optional parts: shown, so checked
    words = shlex.split(line)[1:]
    choices = [w.split("|") if "|" in w and not w.startswith("-") else [w] for w in words]
    return [list(combination) for combination in itertools.product(*choices)]


COMMANDS = shown_commands()


def test_the_documents_show_commands() -> None:
    assert len(COMMANDS) >= 25, COMMANDS  # the collector finds them (it is not silently empty)


@pytest.mark.parametrize(("where", "line"), COMMANDS, ids=[w for w, _ in COMMANDS])
def test_a_shown_command_parses(where: str, line: str) -> None:
    elided = "..." in line.split("#")[0]
    for argv in variants(line):
        # "..." stands for a value after an option, else for arguments left out.
        argv = [a for i, a in enumerate(argv) if a != "..." or argv[i - 1].startswith("-")]
        stderr = io.StringIO()
        with contextlib.redirect_stderr(stderr), contextlib.suppress(SystemExit):
            build_parser().parse_args(argv)
            continue
        message = stderr.getvalue()
        if elided and "the following arguments are required" in message:
            continue
        pytest.fail(f"{where}: `itmolink {' '.join(argv)}` does not parse: {message}")
