"""Driver commands: how the kit makes the target act.

Some tests need the target to do something a partner cannot ask for over the
protocol (authorise, issue, propose a transfer): in the ITL's initialisation
test plan, "the registry operator performs action X". The kit's configuration
gives, for each action, a shell command with placeholders in braces; the kit
fills them in and runs the command. Any implementation can be driven this way:
its own command line, a script calling its administration API, or a person
(a command that waits for the operator).

Placeholders: the values the kit passes for the action (``{authorisation_id}``,
``{vintage}``, ...; see ``ACTIONS``), ``{kit_party}``, ``{target_party}``, and
every entry of ``[driver.vars]`` (e.g. ``{node_config}``). A command that
exits with 0 performed the action; any other exit status is a refusal.
"""

from __future__ import annotations

import asyncio
import shlex
import string
from dataclasses import dataclass

# Each action and the placeholders the kit fills in for it (besides the common ones).
ACTIONS: dict[str, tuple[str, ...]] = {
    "authorise": ("activity_id", "cooperative_approach_id", "vintage_from", "vintage_to", "cap"),
    "issue": ("authorisation_id", "vintage", "quantity"),
    "propose_transfer": ("authorisation_id", "vintage", "quantity", "timeout_seconds"),
}

DRIVER_TIMEOUT_SECONDS = 60.0


class DriverError(Exception):
    """A driver command is missing or names an unknown placeholder."""


@dataclass(frozen=True)
class DriverResult:
    action: str
    command: str
    returncode: int
    output: str

    @property
    def ok(self) -> bool:
        return self.returncode == 0


class Driver:
    def __init__(self, commands: dict[str, str], variables: dict[str, str]) -> None:
        self.commands = commands
        self.variables = variables
        self.log: list[DriverResult] = []

    def missing(self, actions: tuple[str, ...]) -> list[str]:
        return [a for a in actions if a not in self.commands]

    def render(self, action: str, values: dict[str, object]) -> str:
        template = self.commands.get(action)
        if template is None:
            raise DriverError(f"no [driver] {action} command in the kit configuration")
        fields = {**self.variables, **{k: str(v) for k, v in values.items()}}
        names = {name for _, name, _, _ in string.Formatter().parse(template) if name}
        unknown = sorted(names - set(fields))
        if unknown:
            raise DriverError(f"[driver] {action}: unknown placeholder(s) {', '.join(unknown)}")
        # Values the kit chose are quoted; [driver.vars] are the operator's own text.
        quoted = {k: shlex.quote(v) if k in values else v for k, v in fields.items()}
        return template.format(**quoted)

    async def run(self, action: str, **values: object) -> DriverResult:
        command = self.render(action, values)
        process = await asyncio.create_subprocess_shell(
            command, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
        )
        try:
            out, _ = await asyncio.wait_for(process.communicate(), DRIVER_TIMEOUT_SECONDS)
        except TimeoutError:
            process.kill()
            await process.wait()
            result = DriverResult(action, command, -1, "timed out")
        else:
            code = process.returncode if process.returncode is not None else -1
            result = DriverResult(action, command, code, out.decode(errors="replace"))
        self.log.append(result)
        return result
