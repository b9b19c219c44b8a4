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
from .unit import COMMANDS, UNITS_OF_ROLE

AS_ROOT = 'if [ "$(id -u)" = 0 ]; then S=; else S="sudo -n"; fi; '  # root on a testbed node, sudo elsewhere

ROOT = Path(__file__).resolve().parents[2]  # the checkout: imgclass/testbed/deploy.py
EXCLUDES = (".git", ".venv", "models", "results", "runs", "var", "test-artifacts", "__pycache__", "*.egg-info",
            ".pytest_cache", ".ruff_cache", ".peer-venvs")  # fmt: skip
REDIS_PORT = 6379
# What to wait for before a process counts as started: a model server once its model is loaded.
READY = {"server": "/readyz", "worker": "/healthz", "balancer": "/healthz"}


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
    data_ips: tuple[str, ...] = ()
    redis_port: int = REDIS_PORT  # queue mode, on the balancer node

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
            data_ips=tuple(node.get("data_ips") or ()), redis_port=int(node.get("redis_port", REDIS_PORT)),
        ))  # fmt: skip
    if not targets:
        raise ConfigError(f"{path} lists no server, balancer or client node.")
    return targets


class Deployer:
    def __init__(
        self, targets: list[Target], conn: Connection, out: Callable[[str], None] = print, dispatch: str = "push",
        engine: str = "python",
    ) -> None:
        self.targets = targets
        self.conn = conn
        self.out = out
        self.dispatch = dispatch
        self.engine = engine  # the balancer's data plane (push mode): python, or haproxy

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

    def start_systemd(self, target: Target, process: str, env: dict[str, str], port: int | None = None) -> None:
        """Write the unit's environment file, enable it and (re)start it: systemd restarts it on failure
        and at boot. The other units the node has but does not use now (push or queue) are disabled."""
        lines = "".join(f"{k}={v}\n" for k, v in env.items())
        unused = [u for u in UNITS_OF_ROLE[target.role] if u != process and u not in self._queue_extras(target)]
        disable = "".join(f"$S systemctl disable --now imgclass-{u} 2>/dev/null || true; " for u in unused)
        self._remote(target, f"{AS_ROOT}printf {shlex.quote(lines)} | $S tee /etc/default/imgclass-{process} > /dev/null && "
                             f"{disable}$S systemctl enable imgclass-{process} && $S systemctl restart imgclass-{process}",
                     timeout=120)  # fmt: skip
        self.wait_ready(target, process, port)

    def _queue_extras(self, target: Target) -> tuple[str, ...]:
        return ("redis",) if self.dispatch == "queue" and target.role == "balancer" else ()

    def start(self, target: Target, process: str, args: list[str], model_dir: str | None = None,
              port: int | None = None) -> None:  # fmt: skip
        """Start one process of a node in the background (nohup), after stopping an earlier one."""
        env = f"IMGCLASS_MODEL_DIR={shlex.quote(model_dir)} " if model_dir else ""
        command = shlex.join([".venv/bin/imgclass", COMMANDS[process], *args])
        # what held this port before goes first: the same process, or the other kind (server <-> worker)
        rivals = [process] if process == "redis" else [u for u in UNITS_OF_ROLE[target.role] if u != "redis"]
        stop_rivals = "".join(
            f"if [ -f imgclass-{r}.pid ] && kill -0 $(cat imgclass-{r}.pid) 2>/dev/null; then "
            f"kill $(cat imgclass-{r}.pid); for i in $(seq 1 100); do kill -0 $(cat imgclass-{r}.pid) 2>/dev/null "
            f"|| break; sleep 0.1; done; rm -f imgclass-{r}.pid; fi; "
            for r in rivals
        )
        script = (
            f"cd {shlex.quote(target.directory)} && {stop_rivals}"
            f"{env}nohup {command} > imgclass-{process}.log 2>&1 < /dev/null & echo $! > imgclass-{process}.pid"
        )
        self._remote(target, script, timeout=60)
        self.wait_ready(target, process, port)

    def probe(self, target: Target, path: str, port: int | None = None) -> str:
        """'up' or 'down ...' for an HTTP path on the node, or (path 'redis') a Redis PING."""
        port = port or target.service_port
        if path == "redis":
            code = (f"import socket\ntry:\n s=socket.create_connection(('127.0.0.1',{port}),3); s.sendall(b'PING\\r\\n')\n"
                    f" print('up' if s.recv(16).startswith(b'+PONG') else 'down')\nexcept Exception as e: "
                    f"print('down', type(e).__name__)")  # fmt: skip
        else:
            code = (f"import urllib.request,sys\ntry:\n urllib.request.urlopen('http://127.0.0.1:{port}{path}',"
                    f" timeout=3); print('up')\nexcept Exception as e: print('down', type(e).__name__)")  # fmt: skip
        return self._remote(target, f"cd {shlex.quote(target.directory)} && .venv/bin/python -c {shlex.quote(code)}",
                            timeout=60).strip()  # fmt: skip

    def wait_ready(self, target: Target, process: str, port: int | None = None, timeout: float = 120) -> None:
        path = READY.get(process, "redis")
        if self.conn.dry_run:
            self.probe(target, path, port)
            return
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.probe(target, path, port) == "up":
                self.out(f"[{target.name}] {process} up on port {port or target.service_port}")
                return
            time.sleep(1)
        raise DeployError(f"{target.name}: {process} did not answer within {timeout:.0f} s; see imgclass-{process}.log "
                          "there (or journalctl -u imgclass-*).")  # fmt: skip

    def deploy(self, model_dir: str | None, backend: str, systemd: bool) -> None:
        self.out(f"copying the project to {len(self.targets)} node(s)")
        self._each(self.targets, self.copy)
        self.out("installing each node's role")
        self._each(self.targets, lambda t: self.install(t, model_dir, systemd))
        servers = [t for t in self.targets if t.role == "server"]
        balancers = [t for t in self.targets if t.role == "balancer"]
        model = ["--backend", backend]
        if self.dispatch == "queue":
            # Redis (with its append-only file) and the front on the balancer node; a worker on each
            # server node, reaching Redis over its own link to the balancer.
            if len(balancers) != 1:
                raise DeployError("queue mode needs exactly one balancer node, for the queue's Redis and the front.")
            hub = balancers[0]
            bind = ",".join(dict.fromkeys(["127.0.0.1", *hub.data_ips]))
            port = hub.redis_port
            self.launch(hub, "redis", ["--host", bind, "--port", str(port), "--redis-dir", "var/redis"],
                        systemd, port=port)  # fmt: skip
            self.launch(hub, "balancer", ["--dispatch", "queue", "--redis", f"redis://127.0.0.1:{port}/0",
                                          *self._listen(hub)], systemd)  # fmt: skip
            self._each(servers, lambda t: self.launch(t, "worker", [
                "--redis", f"redis://{peer_address(t, hub)}:{port}/0", *self._listen(t), *model,
            ], systemd, model_dir))  # fmt: skip
        else:
            backends = ",".join(f"http://{t.data_ip or t.host}:{t.service_port}" for t in servers)
            self._each(servers, lambda t: self.launch(t, "server", [*self._listen(t), *model], systemd, model_dir))
            engine = ["--engine", self.engine] if self.engine != "python" else []
            self._each(balancers, lambda t: self.launch(t, "balancer", [*self._listen(t), "--backends", backends,
                                                                        *engine], systemd))  # fmt: skip
        for t in balancers:
            self.out(f"the page: http://{t.host}:{t.service_port}/")

    @staticmethod
    def _listen(t: Target) -> list[str]:
        return ["--host", "0.0.0.0", "--port", str(t.service_port), "--name", t.name]

    def launch(self, t: Target, process: str, args: list[str], systemd: bool, model_dir: str | None = None,
               port: int | None = None) -> None:  # fmt: skip
        """Start `process` with `args`, under its systemd unit (its flags as IMGCLASS_* variables) or nohup."""
        if not systemd:
            self.start(t, process, args, model_dir, port)
            return
        env = {"IMGCLASS_" + flag.lstrip("-").replace("-", "_").upper(): value
               for flag, value in zip(args[::2], args[1::2], strict=True)}  # fmt: skip
        if model_dir:
            env["IMGCLASS_MODEL_DIR"] = model_dir
        self.start_systemd(t, process, env, port)

    def status(self) -> list[tuple[str, str, str]]:
        rows: list[tuple[str, str, str]] = []

        def one(t: Target) -> None:
            if t.role == "client":
                rows.append((t.name, t.role, "-"))
                return
            # a model server or a worker answers /healthz on the node's service port, as a balancer does
            state = self.probe(t, "/healthz")
            if self.dispatch == "queue" and t.role == "balancer":
                redis_state = self.probe(t, "redis", t.redis_port)
                state = state if redis_state == "up" else f"{state}, redis {redis_state}"
            rows.append((t.name, t.role, state))

        self._each(self.targets, one)
        return sorted(rows)

    def installed(self, target: Target) -> bool:
        """Whether the node already has the project and its venv (a node deploy has set up)."""
        script = f"test -x {shlex.quote(target.directory)}/.venv/bin/imgclass && echo yes || echo no"
        return self.conn.dry_run or self._remote(target, script, timeout=60).strip() == "yes"

    def stop_process(self, t: Target, process: str, wait_s: float = 10) -> None:
        """Stop one process of a node: its systemd unit if it has one, else the nohup'd PID, with
        SIGTERM and `wait_s` to finish what it holds before SIGKILL."""
        tries = max(1, round(wait_s * 10))
        self._remote(t, (
            f"{AS_ROOT}if command -v systemctl >/dev/null && [ -f /etc/systemd/system/imgclass-{process}.service ]"
            f"; then $S systemctl stop imgclass-{process} 2>/dev/null || true; fi; "
            f"cd {shlex.quote(t.directory)} 2>/dev/null || exit 0; f=imgclass-{process}.pid; [ -f $f ] || "
            f"exit 0; p=$(cat $f); kill $p 2>/dev/null; for i in $(seq 1 {tries}); do kill -0 $p 2>/dev/null || "
            # the file may name a newer process by now (started meanwhile): only ours is forgotten
            f"break; sleep 0.1; done; kill -9 $p 2>/dev/null; [ \"$(cat $f 2>/dev/null)\" = \"$p\" ] && rm -f $f; true"
        ), timeout=wait_s + 80)  # fmt: skip

    def running(self, t: Target, process: str) -> bool:
        """Whether `process` runs on the node: its systemd unit is active, or its nohup PID is alive."""
        script = (f"if systemctl is-active --quiet imgclass-{process} 2>/dev/null; then echo yes; exit 0; fi; "
                  f"cd {shlex.quote(t.directory)} 2>/dev/null && [ -f imgclass-{process}.pid ] && "
                  f"kill -0 $(cat imgclass-{process}.pid) 2>/dev/null && echo yes || echo no")  # fmt: skip
        return self._remote(t, script, timeout=60).strip() == "yes"

    def stop(self) -> None:
        def one(t: Target, processes: tuple[str, ...]) -> None:
            for process in processes:
                self.stop_process(t, process)

        # the balancer (or the front) first, so it stops sending; then servers and workers; Redis last
        balancers = [t for t in self.targets if t.role == "balancer"]
        self._each(balancers, lambda t: one(t, ("balancer",)))
        self._each([t for t in self.targets if t.role == "server"], lambda t: one(t, ("server", "worker")))
        self._each(balancers, lambda t: one(t, ("redis",)))


def peer_address(server: Target, hub: Target) -> str:
    """The hub's address on the server's own link (the same /24), else the hub's control host."""
    if server.data_ip:
        prefix = server.data_ip.rsplit(".", 1)[0] + "."
        for address in hub.data_ips:
            if address.startswith(prefix) and address != server.data_ip:
                return address
        if server.data_ip.startswith("127."):
            return server.data_ip  # a rehearsal on one machine
    return hub.host


def main(command: str, argv: Sequence[str]) -> int:
    parser = config.make_parser(f"imgclass testbed {command}", f"{command.capitalize()} the roles on testbed nodes.")
    parser.add_argument("--cluster", required=True, help="cluster.json from 'imgclass testbed hosts'")
    parser.add_argument("--user", help="SSH user [default: each node's user in cluster.json]")
    parser.add_argument("--key", help="SSH private key file")
    parser.add_argument("--known-hosts", help="known_hosts file for the nodes' host keys [default ~/.ssh/known_hosts]")
    parser.add_argument("--remote-dir", default="imgclass", help="project folder on each node [default ~/imgclass]")
    parser.add_argument("--dry-run", action="store_true", help="print every command instead of running it")
    config.add_options(parser, ["dispatch", "engine"], config.BALANCE)
    if command == "deploy":
        parser.add_argument("--model-dir", help="model folder on the nodes (else install_script.sh downloads it)")
        config.add_options(parser, ["backend"], config.SERVE)
        parser.add_argument("--systemd", action="store_true", help="also install systemd units (restart on failure)")
    args = parser.parse_args(argv)
    targets = targets_from_cluster(args.cluster, args.user, args.remote_dir)
    deployer = Deployer(targets, Connection(args.user, args.key, args.known_hosts, args.dry_run), dispatch=args.dispatch,
                        engine=args.engine)
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
