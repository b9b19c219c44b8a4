"""`imgclass up`: N model servers and a balancer on this machine, supervised, stopped as one."""

from __future__ import annotations

import argparse
import secrets
import signal
import threading
from collections.abc import Sequence
from pathlib import Path
from urllib.parse import urlsplit

from . import config, log
from .errors import ConfigError
from .process import Child, ChildFailed, stop_all
from .queue.redis_server import RedisServer

REDIS_DIR = Path(__file__).resolve().parents[1] / "var" / "redis"  # the queue's AOF, kept across runs
AUTOSCALED_MAX_CONN = 2  # requests in flight per server when up --autoscale sizes the servers (push mode)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    config.add_role_options(parser, config.UP)


def _worker_args(ns: argparse.Namespace, index: int, redis_url: str) -> list[str]:
    args = ["worker", "--host", "127.0.0.1", "--port", "0", "--name", f"worker{index}", "--redis", redis_url,
            "--backend", ns.backend, "--model-dir", ns.model_dir, "--service-time", ns.service_time,
            "--max-deliveries", str(ns.max_deliveries), "--heartbeat-ttl", str(ns.heartbeat_ttl),
            "--result-ttl", str(ns.result_ttl), "--log-level", ns.log_level]  # fmt: skip
    if ns.max_batch:
        args += ["--max-batch", str(ns.max_batch)]
    if ns.seed is not None:
        args += ["--seed", str(ns.seed + index)]
    return args


def _server_args(ns: argparse.Namespace, index: int, port: int = 0) -> list[str]:
    args = ["serve", "--host", "127.0.0.1", "--port", str(port), "--name", f"server{index}",
            "--backend", ns.backend, "--model-dir", ns.model_dir, "--service-time", ns.service_time,
            "--max-queue", str(ns.max_queue), "--max-wait-ms", str(ns.max_wait_ms), "--log-level", ns.log_level,
            "--http", ns.http]  # fmt: skip
    # N servers share the machine's cores: by default each gets one inference thread.
    args += ["--threads", str(ns.threads or 1)]
    args += ["--model-name", ns.model_name]  # the /v2/models/NAME and /v1/models/NAME routes
    if ns.max_batch:
        args += ["--max-batch", str(ns.max_batch)]
    if ns.seed is not None:
        args += ["--seed", str(ns.seed + index)]
    return args


# `imgclass up` passes these to its `imgclass autoscale` child; the rest of the child's options
# (where its pool lives, its bounds) are decided by `up` itself.
_NOT_PASSED = {"host", "port", "name", "dispatch", "redis", "scale_min", "scale_max", "balancer_url", "admin_token"}


def _autoscale_args(ns: argparse.Namespace, dispatch: str, pool: list[str]) -> list[str]:
    low, high = ns.autoscale
    args = ["autoscale", "--host", "127.0.0.1", "--port", "0", "--dispatch", dispatch,
            "--min", str(low), "--max", str(high), *pool]  # fmt: skip
    for name in config.options_for(config.AUTOSCALE):
        value = getattr(ns, name, None)
        if name in _NOT_PASSED or value is None:
            continue
        args += [config.OPTIONS[name].flag_for(config.AUTOSCALE), str(value)]
    return args


class LocalCluster:
    """Starts the servers, then the balancer; restarts a server that dies; stops everything."""

    def __init__(self, ns: argparse.Namespace, echo: bool = True) -> None:
        self.ns = ns
        self.echo = echo
        self.servers: list[Child] = []
        self.workers: list[Child] = []
        self.redis: RedisServer | None = None
        self.redis_url: str | None = None
        self.balancer: Child | None = None
        self.extra: list[Child] = []  # further balancers over the same servers
        self.autoscaler: Child | None = None  # with --autoscale: it owns the workers or servers
        self.autoscaler_args: list[str] = []
        self.autoscaler_env: dict[str, str] | None = None
        self.logger = log.get_logger("up", "cluster", ns.log_level)

    def start(self) -> str:
        if getattr(self.ns, "dispatch", "push") == "queue":
            return self._start_queue()
        if getattr(self.ns, "autoscale", None):
            return self._start_autoscaled_push()
        try:
            self.servers = [Child(_server_args(self.ns, i + 1), echo=self.echo) for i in range(self.ns.servers)]
            for child in self.servers:
                child.wait_url()
            self.balancer = self._balancer(self.ns.port, self.ns.max_conn)
            return self.balancer.wait_url()
        except BaseException:
            self.stop()
            raise

    def _start_queue(self) -> str:
        """Redis (our own, with its AOF under var/redis, unless --redis names one), N workers, the front."""
        try:
            if self.ns.redis:
                self.redis_url = self.ns.redis
            else:
                directory = Path(getattr(self.ns, "redis_dir", None) or REDIS_DIR)
                self.redis = RedisServer(directory)
                self.redis_url = self.redis.start()
                self.logger.info("redis_started", url=self.redis_url, dir=str(directory))
            if getattr(self.ns, "autoscale", None):
                pool = ["--redis", self.redis_url]
                self._start_autoscaler(_autoscale_args(self.ns, "queue", pool), None)
            else:
                self.workers = [Child(_worker_args(self.ns, i + 1, self.redis_url), echo=self.echo)
                                for i in range(self.ns.workers)]  # fmt: skip
                for child in self.workers:
                    child.wait_url()
            args = ["balance", "--dispatch", "queue", "--redis", self.redis_url, "--host", self.ns.host,
                    "--port", str(self.ns.port), "--name", "front", "--log-level", self.ns.log_level,
                    "--queue-size", str(self.ns.queue_size), "--result-ttl", str(self.ns.result_ttl),
                    "--http", self.ns.http]  # fmt: skip
            self.balancer = Child(args, echo=self.echo)
            return self.balancer.wait_url()
        except BaseException:
            self.stop()
            raise

    def _start_autoscaled_push(self) -> str:
        """An empty balancer with its admin API on, and the autoscaler, which adds and removes servers."""
        try:
            # the admin API needs a token; one made here stays between the two processes
            token = self.ns.admin_token or secrets.token_urlsafe(24)
            self.ns.admin_token = token
            # Beyond a few requests per server the backlog waits in the balancer, where a server the
            # autoscaler adds takes from it; sent on at once, it would wait behind the servers it reached.
            self.balancer = self._balancer(self.ns.port, self.ns.max_conn or AUTOSCALED_MAX_CONN)
            url = self.balancer.wait_url()
            local = url.replace("0.0.0.0", "127.0.0.1").replace("[::]", "[::1]")
            pool = ["--balancer", local]
            self._start_autoscaler(_autoscale_args(self.ns, "push", pool), {"IMGCLASS_ADMIN_TOKEN": token})
            return url
        except BaseException:
            self.stop()
            raise

    def _start_autoscaler(self, args: list[str], env: dict[str, str] | None) -> None:
        self.autoscaler_args, self.autoscaler_env = args, env
        self.autoscaler = Child(args, env=env, echo=self.echo)
        self.autoscaler.wait_url()

    def add_worker(self) -> Child:
        """One more worker on the same queue (autoscaling, or a restart)."""
        assert self.redis_url is not None
        child = Child(_worker_args(self.ns, len(self.workers) + 1, self.redis_url), echo=self.echo)
        self.workers.append(child)
        child.wait_url()
        return child

    def set_workers(self, count: int) -> None:
        """Exactly `count` workers: new ones join the queue, surplus ones drain and stop (SIGTERM)."""
        while len(self.workers) < count:
            self.add_worker()
        if len(self.workers) > count:
            surplus, self.workers = self.workers[count:], self.workers[:count]
            stop_all(surplus, timeout=70)

    def another_balancer(self, max_conn: int) -> str:
        """One more balancer over the same servers, on a free port, e.g. with another --max-conn.

        Experiments use it to compare configurations without restarting the servers; it is stopped
        with the cluster.
        """
        child = self._balancer(0, max_conn, name=f"balancer{len(self.extra) + 2}")
        self.extra.append(child)
        return child.wait_url()

    def _balancer(self, port: int, max_conn: int, name: str = "balancer") -> Child:
        urls = [child.url or "" for child in self.servers]
        args = ["balance", "--host", self.ns.host, "--port", str(port), *(["--backends", ",".join(urls)] if urls else []),
                "--policy", self.ns.policy, "--name", name, "--log-level", self.ns.log_level,
                "--max-conn", str(max_conn), "--queue-size", str(self.ns.queue_size),
                "--queue-timeout", str(self.ns.queue_timeout), "--http", self.ns.http]  # fmt: skip
        args += ["--engine", getattr(self.ns, "engine", "python")]  # the data plane: Python, or HAProxy driven by it
        if getattr(self.ns, "autoscale", None):  # engine haproxy: server slots for the autoscaler's most, and churn
            args += ["--slots", str(max(8, 2 * self.ns.autoscale[1]))]
        if self.ns.seed is not None:
            args += ["--seed", str(self.ns.seed)]
        env = {"IMGCLASS_ADMIN_TOKEN": self.ns.admin_token} if self.ns.admin_token else None
        return Child(args, env=env, echo=self.echo)

    def supervise_once(self) -> None:
        """Restart any server that died, on its old port, so the balancer re-admits it; and any worker.

        A dead autoscaler is restarted too: its pool died with it, and the new one starts its minimum.
        """
        if self.autoscaler is not None and not self.autoscaler.alive():
            self.logger.warning("autoscaler_died", exit=self.autoscaler.proc.returncode)
            self.autoscaler = Child(self.autoscaler_args, env=self.autoscaler_env, echo=self.echo)
        for i, child in enumerate(self.workers):
            if not child.alive() and child.url and self.redis_url:
                self.logger.warning("worker_died", worker=f"worker{i + 1}", exit=child.proc.returncode)
                self.workers[i] = Child(_worker_args(self.ns, i + 1, self.redis_url), echo=self.echo)
        for i, child in enumerate(self.servers):
            if not child.alive() and child.url:
                port = urlsplit(child.url).port or 0
                self.logger.warning("server_died", server=f"server{i + 1}", exit=child.proc.returncode)
                replacement = Child(_server_args(self.ns, i + 1, port), echo=self.echo)
                self.servers[i] = replacement
                try:
                    replacement.wait_url(60)
                    self.logger.info("server_restarted", server=f"server{i + 1}", url=replacement.url)
                except ChildFailed as exc:
                    self.logger.error("restart_failed", server=f"server{i + 1}", message=str(exc).splitlines()[0])

    def stop(self) -> None:
        # balancer (or front) first, so nothing new is sent to servers or workers that are draining
        stop_all([*self.extra, *([self.balancer] if self.balancer is not None else [])])
        if self.autoscaler is not None:
            self.autoscaler.stop(80)  # it drains and stops its own workers or servers
        stop_all([*self.servers, *self.workers], timeout=70)  # a worker finishes its batch
        if self.redis is not None:
            self.redis.stop()


def up(argv: Sequence[str]) -> int:
    parser = config.make_parser("imgclass up", "Start N model servers and a balancer on this machine.")
    add_arguments(parser)
    ns = parser.parse_args(argv)
    if ns.servers > 64:
        raise ConfigError(f"--servers {ns.servers} is more than 64; start at most 64 servers on one machine.")
    if ns.dispatch == "queue" and ns.engine != "python":
        raise ConfigError(f"--engine {ns.engine} forwards pushed requests; leave it out with --dispatch queue.")
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    cluster = LocalCluster(ns)
    try:
        url = cluster.start()
        host = urlsplit(url).hostname or ""
        shown = url.replace("0.0.0.0", "127.0.0.1") if host == "0.0.0.0" else url
        if ns.autoscale:
            size = f"{ns.autoscale[0]} to {ns.autoscale[1]} {ns.backend}"
            pool = f"worker(s) on {cluster.redis_url}, their front at" if ns.dispatch == "queue" else "server(s) behind"
            what = f"{size} {pool}"
        elif ns.dispatch == "queue":
            what = f"{ns.workers} {ns.backend} worker(s) on {cluster.redis_url}, their front at"
        else:
            what = f"{ns.servers} {ns.backend} server(s) behind"
        print(f"imgclass is up: {what} {shown}/  (Ctrl-C stops everything)", flush=True)
        if cluster.autoscaler is not None:
            print(f"  autoscaler ({ns.autoscale_policy} policy): {cluster.autoscaler.url}/metrics", flush=True)
        print(f"  classify: curl -F image=@photo.jpg {shown}/submit", flush=True)
        while not stop.wait(0.5):
            cluster.supervise_once()
            if cluster.balancer is not None and not cluster.balancer.alive():
                cluster.logger.error("balancer_died", exit=cluster.balancer.proc.returncode)
                return 1
    except ChildFailed as exc:
        print(f"imgclass up: {exc}", flush=True)
        return 1
    finally:
        cluster.stop()
    return 0


def cluster_options(**overrides: object) -> argparse.Namespace:
    """`imgclass up` options from the defaults table, for code that starts a LocalCluster itself."""
    values = {name: config.resolved_default(name, config.UP) for name in config.options_for(config.UP)}
    values["port"] = 0
    values.update(overrides)
    return argparse.Namespace(**values)
