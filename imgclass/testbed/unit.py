"""The systemd unit a testbed node runs its role under: restarted on failure and at boot."""

from __future__ import annotations


def systemd_unit(role: str, directory: str) -> str:
    """A unit that restarts the role on failure and at boot; options come from IMGCLASS_* variables."""
    command = "serve" if role == "server" else "balance"
    return f"""[Unit]
Description=imgclass {role}
After=network-online.target
Wants=network-online.target

[Service]
Type=simple
WorkingDirectory={directory}
# IMGCLASS_* settings (port, backends, model dir...) written by 'imgclass testbed deploy --systemd'
EnvironmentFile=-/etc/default/imgclass-{role}
ExecStart={directory}/.venv/bin/imgclass {command}
Restart=on-failure
RestartSec=2
KillSignal=SIGTERM
TimeoutStopSec=40

[Install]
WantedBy=multi-user.target
"""
