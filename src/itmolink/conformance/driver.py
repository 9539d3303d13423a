"""Driver commands: how the kit makes the target act.

Some tests need the target to do something a partner cannot ask for over the
protocol (authorise, issue, propose a transfer): in the ITL's initialisation
test plan, "the registry operator performs action X". The kit's configuration
gives, for each action, a shell command with placeholders in braces; the kit
fills them in and runs the command. Any implementation can be driven this way:
its own command line, a script calling its administration API, or a person
(a command that waits for the operator; ``[kit] driver_timeout_seconds`` says
how long the kit waits).

Placeholders: the values the kit passes for the action (``{authorisation_id}``,
``{vintage}``, ...; see ``ACTIONS``), ``{kit_party}``, ``{target_party}``,
``{kit_endpoint}`` (all of these shell-quoted), and every entry of
``[driver.vars]`` (e.g. ``{node_config}``, used as written). A command that
exits with 0 performed the action; any other exit status is a refusal.

A command runs in a session of its own; when it runs out of time, or the test
that ran it is cancelled, the kit kills its whole process group.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shlex
import signal
import string
from dataclasses import dataclass

# Each action and the placeholders the kit fills in for it (besides the common ones).
ACTIONS: dict[str, tuple[str, ...]] = {
    "authorise": ("activity_id", "cooperative_approach_id", "vintage_from", "vintage_to", "cap"),
    "issue": ("authorisation_id", "vintage", "quantity"),
    "propose_transfer": ("authorisation_id", "vintage", "quantity", "timeout_seconds"),
    # Optional: without it, the host-role test of batched transfers is not run.
    "propose_batch": ("authorisation_id", "vintage", "quantities", "timeout_seconds"),
    # Optional: without it, the host-role test of first-transfer notices is not run.
    "authorise_oimp_at_use": (
        "activity_id",
        "cooperative_approach_id",
        "vintage_from",
        "vintage_to",
        "cap",
        "oimp_detail",
    ),
}
# Actions a host-role run can do without (their tests are reported as not run).
OPTIONAL_ACTIONS = frozenset({"propose_batch", "authorise_oimp_at_use"})

DEFAULT_TIMEOUT_SECONDS = 60.0


class DriverError(Exception):
    """A driver command is missing or names an unknown placeholder."""


@dataclass(frozen=True)
class DriverResult:
    action: str
    command: str
    returncode: int
    output: str
    # The command as reports show it: [driver.vars] values masked (they may hold tokens).
    shown: str = ""

    @property
    def ok(self) -> bool:
        return self.returncode == 0


class Driver:
    def __init__(
        self,
        commands: dict[str, str],
        variables: dict[str, str],
        kit_values: dict[str, str] | None = None,
        *,
        timeout: float = DEFAULT_TIMEOUT_SECONDS,
    ) -> None:
        self.commands = commands
        self.variables = variables  # the operator's own text, used as written
        self.kit_values = dict(kit_values or {})  # the kit's, shell-quoted like the actions'
        self.timeout = timeout
        self.log: list[DriverResult] = []

    def render(self, action: str, values: dict[str, object], *, masked: bool = False) -> str:
        template = self.commands.get(action)
        if template is None:
            raise DriverError(f"no [driver] {action} command in the kit configuration")
        kit = {**self.kit_values, **{k: str(v) for k, v in values.items()}}
        names = {name for _, name, _, _ in string.Formatter().parse(template) if name}
        unknown = sorted(names - set(self.variables) - set(kit))
        if unknown:
            raise DriverError(f"[driver] {action}: unknown placeholder(s) {', '.join(unknown)}")
        operator = {k: f"<{k}>" if masked else v for k, v in self.variables.items()}
        quoted = {k: shlex.quote(v) for k, v in kit.items()}
        return template.format(**{**operator, **quoted})

    async def run(self, action: str, **values: object) -> DriverResult:
        command = self.render(action, values)
        shown = self.render(action, values, masked=True)
        process = await asyncio.create_subprocess_shell(
            command,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            out, _ = await asyncio.wait_for(process.communicate(), self.timeout)
        except TimeoutError:
            await _kill_group(process)
            result = DriverResult(action, command, -1, f"timed out after {self.timeout:g} s", shown)
        except BaseException:  # cancelled (the test timed out): leave nothing running
            await asyncio.shield(_kill_group(process))
            raise
        else:
            code = process.returncode if process.returncode is not None else -1
            result = DriverResult(action, command, code, out.decode(errors="replace"), shown)
        self.log.append(result)
        return result


async def _kill_group(process: asyncio.subprocess.Process) -> None:
    """Kill the command's process group (the shell and whatever it started)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)
    with contextlib.suppress(ProcessLookupError):
        process.kill()
    await process.wait()
