"""Deploy to testbed nodes over SSH: copy the project, install each role, start, check and stop."""

from __future__ import annotations

import shlex
import subprocess
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from .. import config
from ..errors import ConfigError, ImgclassError
from .inventory import BALANCER_PORT, SERVER_PORT, read_cluster

ROOT = Path(__file__).resolve().parents[2]  # the checkout: imgclass/testbed/deploy.py
EXCLUDES = (".git", ".venv", "models", "results", "test-artifacts", "__pycache__", "*.egg-info", ".pytest_cache",
            ".ruff_cache")  # fmt: skip


class DeployError(ImgclassError):
    code = "deploy_error"


@dataclass(frozen=True)
class Target:
    """One node as deploy sees it."""

    name: str
    role: str
    host: str
    port: int
    user: str
    directory: str  # on the node, relative to the login's home unless absolute
    service_port: int
    data_ip: str | None

    @property
    def login(self) -> str:
        return f"{self.user}@{self.host}"


@dataclass(frozen=True)
class Connection:
    user: str | None
    key: str | None
    known_hosts: str | None
    dry_run: bool

    def ssh(self, target: Target) -> list[str]:
        cmd = ["ssh", "-p", str(target.port), "-o", "BatchMode=yes", "-o", "ConnectTimeout=15",
               "-o", "StrictHostKeyChecking=accept-new"]  # fmt: skip
        if self.known_hosts:
            cmd += ["-o", f"UserKnownHostsFile={self.known_hosts}"]
        if self.key:
            cmd += ["-i", self.key, "-o", "IdentitiesOnly=yes"]
        return [*cmd, target.login]


def targets_from_cluster(path: str, user: str | None, remote_dir: str) -> list[Target]:
    doc = read_cluster(path)
    targets = []
    for node in doc.get("nodes", []):
        if node.get("role") not in ("server", "balancer", "client"):
            continue
        login = user or node.get("user")
        if not login:
            raise ConfigError(f"node {node.get('name')} has no user in {path}; pass --user.")
        default_port = SERVER_PORT if node["role"] == "server" else BALANCER_PORT
        targets.append(Target(
            name=node["name"], role=node["role"], host=node["control_host"], port=int(node.get("control_port", 22)),
            user=login, directory=node.get("remote_dir", remote_dir),
            service_port=int(node.get("service_port", default_port)), data_ip=node.get("data_ip"),
        ))  # fmt: skip
    if not targets:
        raise ConfigError(f"{path} lists no server, balancer or client node.")
    return targets


class Deployer:
    def __init__(self, targets: list[Target], conn: Connection, out: Callable[[str], None] = print) -> None:
        self.targets = targets
        self.conn = conn
        self.out = out

    def _remote(self, target: Target, script: str, timeout: float = 1800, stdin: bytes | None = None) -> str:
        cmd = [*self.conn.ssh(target), "bash -lc " + shlex.quote(script)]
        if self.conn.dry_run:
            self.out(f"[{target.name}] {shlex.join(cmd)}")
            return ""
        proc = subprocess.run(cmd, input=stdin, capture_output=True, timeout=timeout)
        if proc.returncode != 0:
            tail = (proc.stderr or proc.stdout).decode(errors="replace").strip().splitlines()[-8:]
            raise DeployError(f"{target.name} ({target.login}): '{script[:80]}' failed: " + " / ".join(tail))
        return proc.stdout.decode(errors="replace")

    def _each(self, targets: list[Target], action: Callable[[Target], object]) -> None:
        """Run on every target in parallel; report every failure, not just the first."""
        with ThreadPoolExecutor(max(1, min(16, len(targets)))) as pool:
            futures = {t.name: pool.submit(action, t) for t in targets}
        errors = []
        for name, future in futures.items():
            try:
                future.result()
            except (DeployError, subprocess.TimeoutExpired) as exc:
                errors.append(f"{name}: {exc}")
        if errors:
            raise DeployError("; ".join(errors))

    def copy(self, target: Target) -> None:
        excludes = [f"--exclude={e}" for e in EXCLUDES]
        archive = ["tar", "-czf", "-", *excludes, "-C", str(ROOT), "."]
        unpack = f"mkdir -p {shlex.quote(target.directory)} && tar -xzf - -C {shlex.quote(target.directory)}"
        if self.conn.dry_run:
            self.out(f"[{target.name}] {shlex.join(archive)} | {shlex.join([*self.conn.ssh(target), unpack])}")
            return
        data = subprocess.run(archive, capture_output=True, check=True, timeout=120).stdout
        self._remote(target, unpack, timeout=300, stdin=data)

    def install(self, target: Target, model_dir: str | None, systemd: bool) -> None:
        env = f"IMGCLASS_MODEL_DIR={shlex.quote(model_dir)} " if model_dir else ""
        flags = f"--role {target.role}" + (" --systemd" if systemd else "")
        self._remote(target, f"cd {shlex.quote(target.directory)} && {env}./install_script.sh {flags}")

    def start_systemd(self, target: Target, env: dict[str, str]) -> None:
        """Write the unit's environment file and (re)start it: systemd restarts it on failure and at boot."""
        role = "server" if target.role == "server" else "balancer"
        lines = "".join(f"{k}={v}\n" for k, v in env.items())
        self._remote(target, f"printf {shlex.quote(lines)} | sudo tee /etc/default/imgclass-{role} > /dev/null && "
                             f"sudo systemctl restart imgclass-{role}", timeout=120)  # fmt: skip
        self.wait_ready(target, "/readyz" if role == "server" else "/healthz")

    def start(self, target: Target, args: list[str], model_dir: str | None) -> None:
        role = "server" if target.role == "server" else "balancer"
        env = f"IMGCLASS_MODEL_DIR={shlex.quote(model_dir)} " if model_dir else ""
        command = shlex.join([".venv/bin/imgclass", "serve" if role == "server" else "balance", *args])
        script = (
            f"cd {shlex.quote(target.directory)} && "
            f"if [ -f imgclass-{role}.pid ] && kill -0 $(cat imgclass-{role}.pid) 2>/dev/null; then "
            f"kill $(cat imgclass-{role}.pid); sleep 1; fi; "
            f"{env}nohup {command} > imgclass-{role}.log 2>&1 < /dev/null & echo $! > imgclass-{role}.pid"
        )
        self._remote(target, script, timeout=60)
        self.wait_ready(target, "/readyz" if role == "server" else "/healthz")

    def probe(self, target: Target, path: str) -> str:
        code = (f"import urllib.request,sys\ntry:\n urllib.request.urlopen('http://127.0.0.1:{target.service_port}{path}',"
                f" timeout=3); print('up')\nexcept Exception as e: print('down', type(e).__name__)")  # fmt: skip
        return self._remote(target, f"cd {shlex.quote(target.directory)} && .venv/bin/python -c {shlex.quote(code)}",
                            timeout=60).strip()  # fmt: skip

    def wait_ready(self, target: Target, path: str, timeout: float = 120) -> None:
        if self.conn.dry_run:
            self.probe(target, path)
            return
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.probe(target, path) == "up":
                self.out(f"[{target.name}] up on port {target.service_port}")
                return
            time.sleep(1)
        raise DeployError(f"{target.name} did not answer {path} within {timeout:.0f} s; see imgclass-*.log there.")

    def deploy(self, model_dir: str | None, backend: str, systemd: bool) -> None:
        self.out(f"copying the project to {len(self.targets)} node(s)")
        self._each(self.targets, self.copy)
        self.out("installing each node's role")
        self._each(self.targets, lambda t: self.install(t, model_dir, systemd))
        servers = [t for t in self.targets if t.role == "server"]
        balancers = [t for t in self.targets if t.role == "balancer"]
        backends = ",".join(f"http://{t.data_ip or t.host}:{t.service_port}" for t in servers)
        if systemd:

            def env(t: Target, **extra: str) -> dict[str, str]:
                base = {"IMGCLASS_HOST": "0.0.0.0", "IMGCLASS_PORT": str(t.service_port), "IMGCLASS_NAME": t.name}
                return {**base, **extra}

            server_env = {"IMGCLASS_BACKEND": backend, **({"IMGCLASS_MODEL_DIR": model_dir} if model_dir else {})}
            self._each(servers, lambda t: self.start_systemd(t, env(t, **server_env)))
            self._each(balancers, lambda t: self.start_systemd(t, env(t, IMGCLASS_BACKENDS=backends)))
        else:
            self._each(servers, lambda t: self.start(
                t, ["--host", "0.0.0.0", "--port", str(t.service_port), "--name", t.name, "--backend", backend],
                model_dir,
            ))  # fmt: skip
            self._each(balancers, lambda t: self.start(
                t, ["--host", "0.0.0.0", "--port", str(t.service_port), "--name", t.name, "--backends", backends],
                None,
            ))  # fmt: skip
        for t in balancers:
            self.out(f"the page: http://{t.host}:{t.service_port}/")

    def status(self) -> list[tuple[str, str, str]]:
        rows: list[tuple[str, str, str]] = []

        def one(t: Target) -> None:
            if t.role == "client":
                rows.append((t.name, t.role, "-"))
                return
            rows.append((t.name, t.role, self.probe(t, "/readyz" if t.role == "server" else "/healthz")))

        self._each(self.targets, one)
        return sorted(rows)

    def stop(self) -> None:
        def one(t: Target) -> None:
            role = "server" if t.role == "server" else "balancer"
            self._remote(t, (
                f"cd {shlex.quote(t.directory)} 2>/dev/null || exit 0; f=imgclass-{role}.pid; [ -f $f ] || exit 0; "
                f"p=$(cat $f); kill $p 2>/dev/null; for i in $(seq 1 100); do kill -0 $p 2>/dev/null || break; "
                f"sleep 0.1; done; kill -9 $p 2>/dev/null; rm -f $f; true"
            ), timeout=60)  # fmt: skip

        # the balancer first, so it stops sending before the servers go
        self._each([t for t in self.targets if t.role == "balancer"], one)
        self._each([t for t in self.targets if t.role == "server"], one)


def main(command: str, argv: Sequence[str]) -> int:
    parser = config.make_parser(f"imgclass testbed {command}", f"{command.capitalize()} the roles on testbed nodes.")
    parser.add_argument("--cluster", required=True, help="cluster.json from 'imgclass testbed hosts'")
    parser.add_argument("--user", help="SSH user [default: each node's user in cluster.json]")
    parser.add_argument("--key", help="SSH private key file")
    parser.add_argument("--known-hosts", help="known_hosts file for the nodes' host keys [default ~/.ssh/known_hosts]")
    parser.add_argument("--remote-dir", default="imgclass", help="project folder on each node [default ~/imgclass]")
    parser.add_argument("--dry-run", action="store_true", help="print every command instead of running it")
    if command == "deploy":
        parser.add_argument("--model-dir", help="model folder on the nodes (else install_script.sh downloads it)")
        config.add_options(parser, ["backend"], config.SERVE)
        parser.add_argument("--systemd", action="store_true", help="also install systemd units (restart on failure)")
    args = parser.parse_args(argv)
    targets = targets_from_cluster(args.cluster, args.user, args.remote_dir)
    deployer = Deployer(targets, Connection(args.user, args.key, args.known_hosts, args.dry_run))
    if command == "deploy":
        deployer.deploy(args.model_dir, args.backend, args.systemd)
    elif command == "status":
        rows = deployer.status()
        if not args.dry_run:
            for name, role, state in rows:
                print(f"{name:<12} {role:<9} {state}")
            return 0 if all(state in ("up", "-") for _, _, state in rows) else 1
    else:
        deployer.stop()
    return 0
