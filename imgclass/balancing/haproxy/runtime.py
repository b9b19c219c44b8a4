"""HAProxy's runtime API over its stats socket: membership commands, and its counters read back."""

from __future__ import annotations

import asyncio
import csv
import io
import re
from collections.abc import Sequence
from pathlib import Path

from ...errors import EngineCommandFailed, EngineRestarting

# With `set severity-output number`, each reply is prefixed by its syslog severity: 0 to 3 are
# errors ("[3]: No such server."), higher ones are notices ("[4]: IP changed from ...").
_ERROR = re.compile(r"^\[[0-3]\]: (.*)$", re.M)
_UNKNOWN = "Unknown command"
# Commands per connection: the CLI reads one line into one buffer (tune.bufsize), so a long batch
# is split. 64 commands of ~80 characters stay well within it.
BATCH = 64


class RuntimeAPI:
    """One connection per batch of commands, as `socat` would do; HAProxy runs them in order."""

    def __init__(self, socket: Path, timeout: float = 5.0) -> None:
        self.socket = socket
        self.timeout = timeout

    async def call(self, command: str) -> str:
        """The raw reply to one command (or several, ';'-separated)."""
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_unix_connection(str(self.socket)), self.timeout)
        except (OSError, asyncio.TimeoutError) as exc:
            raise EngineRestarting("HAProxy's runtime API does not answer (it is restarting); retry shortly.",
                                   retry_after=1) from exc  # fmt: skip
        try:
            writer.write(command.encode() + b"\n")
            await writer.drain()
            return (await asyncio.wait_for(reader.read(), self.timeout)).decode("utf-8", "replace")
        except (OSError, asyncio.TimeoutError) as exc:
            raise EngineRestarting("HAProxy's runtime API stopped answering; retry shortly.", retry_after=1) from exc
        finally:
            writer.close()

    async def run(self, commands: Sequence[str]) -> None:
        """Run every command, in order; EngineCommandFailed names the first one HAProxy refused."""
        for start in range(0, len(commands), BATCH):
            batch = list(commands[start : start + BATCH])
            for command in batch:
                # ';' separates commands and a newline ends them: a value holding one would run something else
                if ";" in command or "\n" in command:
                    raise EngineCommandFailed(f"refusing to send a runtime command with ';' or a newline: {command!r}")
            reply = await self.call("; ".join(["set severity-output number", *batch]))
            failed = _ERROR.search(reply)
            if failed or _UNKNOWN in reply:
                detail = failed.group(1) if failed else _UNKNOWN
                raise EngineCommandFailed(f"HAProxy refused a runtime command ({detail}) in: {'; '.join(batch)}")

    async def ready(self) -> bool:
        try:
            return "Name: HAProxy" in await self.call("show info")
        except EngineRestarting:
            return False

    async def stats(self, proxy: str | None = None, servers_only: bool = False) -> list[dict[str, str]]:
        """`show stat` as dicts keyed by its CSV header (pxname, svname, scur, status, ...).

        proxy: one backend, else every proxy; servers_only: only the server rows (not FRONTEND/BACKEND).
        """
        scope = f" {proxy if proxy else -1} {4 if servers_only else -1} -1" if proxy or servers_only else ""
        return parse_csv(await self.call(f"show stat{scope}"))

    async def counter(self, name: str) -> int:
        """A process-wide variable holding a count (`get var proc.NAME`); 0 before it is first set."""
        found = re.search(r"value=<(-?\d+)>", await self.call(f"get var proc.{name}"))
        return int(found.group(1)) if found else 0

    async def maps(self, path: Path) -> dict[str, str]:
        """`show map`: the live entries of one map file, key to value."""
        entries: dict[str, str] = {}
        for line in (await self.call(f"show map {path}")).splitlines():
            parts = line.split(" ", 2)
            if len(parts) == 3:
                entries[parts[1]] = parts[2]
        return entries


def parse_csv(text: str) -> list[dict[str, str]]:
    """HAProxy's stats CSV: a header line that starts with '# ', then one row per proxy or server."""
    body = text.lstrip()
    if not body.startswith("# "):
        return []
    return list(csv.DictReader(io.StringIO(body[2:])))
