"""The README stays true: its defaults table, its two Quick start commands, and CI running them; ruff clean."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from imgclass.config import OPTIONS

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def test_config_table_matches_options() -> None:
    rows = re.findall(r"^\| `(--[a-z-]+)` \| `(IMGCLASS_[A-Z_]+)` \| (.+?) \| (.+?) \|$", README, re.M)
    documented = {flag: (env, default) for flag, env, default, _ in rows}
    expected = {o.flag: (o.env, "(none)" if o.default is None else f"`{o.default}`") for o in OPTIONS.values()}
    assert documented == expected


def test_quick_start_has_two_commands_and_ci_runs_the_second() -> None:
    section = README.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```sh\n(.*?)```", section, re.S)
    assert block is not None
    # comment lines (the offline hint) are not commands
    commands = [line for line in block.group(1).splitlines() if line.strip() and not line.lstrip().startswith("#")]
    assert len(commands) == 2
    ci = (ROOT / ".ci" / "run").read_text()
    assert commands[1] in ci.splitlines()


def test_ruff_is_clean() -> None:
    ruff = shutil.which("ruff") or str(Path(__file__).resolve().parent.parent / ".venv" / "bin" / "ruff")
    if not Path(ruff).exists():
        pytest.skip("ruff is not installed: ./install_script.sh --dev")
    result = subprocess.run([ruff, "check", str(ROOT)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout
