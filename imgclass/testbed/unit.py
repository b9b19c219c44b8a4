"""The systemd unit a testbed node runs its role under: restarted on failure and at boot."""

from __future__ import annotations

# The processes a node may run, each under a unit of its own: a model server or a queue worker on a
# server node; the balancer (or the queue's front) and the queue's Redis on the balancer node.
COMMANDS = {"server": "serve", "worker": "worker", "balancer": "balance", "redis": "redis"}
UNITS_OF_ROLE = {"server": ("server", "worker"), "balancer": ("balancer", "redis")}


def systemd_unit(role: str, directory: str) -> str:
    """A unit that restarts the process on failure and at boot; options come from IMGCLASS_* variables."""
    command = COMMANDS[role]
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
# SIGTERM to imgclass alone, which stops its children in order (engine mode's HAProxy drains first);
# SIGKILL to whatever is left after the timeout
KillMode=mixed
TimeoutStopSec=40

[Install]
WantedBy=multi-user.target
"""
