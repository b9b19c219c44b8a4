"""The testbed actuator: the server or worker role on a cluster's server nodes, started and stopped over SSH.

This is the testbed's counterpart of launching instances from a machine image. The reserved nodes
are the cluster.json's server nodes; the pool grows onto the ones not in service and shrinks off the
ones it started last. It runs with the same deploy code as `imgclass testbed deploy`, so a node the
autoscaler starts runs exactly what deploy would have started there.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from .. import log
from ..testbed.deploy import READY, Deployer, Target
from .actuators import Actuator, BalancerAdmin


class TestbedNodes(Actuator):
    """Servers (push mode) or workers (queue mode) on reserved testbed nodes.

    Nodes already serving when the controller starts (deploy started them) are adopted, so the pool
    starts at its true size. A node without the project gets it copied and installed first, once.
    When the controller stops, the nodes serving stay up: stopping the autoscaler does not take
    capacity away from a running service.
    """

    __test__ = False  # not a pytest class, despite the name
    stop_timeout = 60.0

    def __init__(
        self, deployer: Deployer, nodes: list[Target], process: str, args_of: Callable[[Target], list[str]],
        logger: log.EventLogger, model_dir: str | None = None, admin: BalancerAdmin | None = None,
    ) -> None:  # fmt: skip
        if process not in ("server", "worker"):
            raise ValueError(f"the testbed actuator starts servers or workers, not {process!r}")
        self.deployer = deployer
        self.nodes = list(nodes)
        self.process = process
        self.args_of = args_of
        self.logger = logger
        self.model_dir = model_dir
        self.admin = admin  # push mode: servers join and leave the balancer through it
        self.serving: list[Target] = []  # in the order they joined; the last to join leaves first
        self.adopted = False
        self.draining: set[str] = set()  # names of nodes being stopped in the background
        self.stopping: set[asyncio.Future[None]] = set()

    @property
    def ready(self) -> int:
        return len(self.serving)

    @staticmethod
    def url_of(node: Target) -> str:
        """Where the balancer reaches a node's server: its data-plane address, as deploy registers it."""
        return f"http://{node.data_ip or node.host}:{node.service_port}"

    async def adopt(self) -> None:
        if self.adopted:
            return

        async def serving(node: Target) -> bool:
            # the role itself must run there (its unit or its PID), not only something on its port:
            # a node serving the other role (server vs worker) answers /healthz too
            try:
                up = await asyncio.to_thread(self.deployer.probe, node, READY[self.process])
                return up == "up" and await asyncio.to_thread(self.deployer.running, node, self.process)
            except Exception as exc:  # an unreachable node is simply not serving
                self.logger.warning("probe_failed", node=node.name, message=str(exc)[:300])
                return False

        states = await asyncio.gather(*(serving(n) for n in self.nodes))
        for node, up in zip(self.nodes, states, strict=True):
            if up and (self.admin is None or await self.admin.add(self.url_of(node))):
                self.serving.append(node)
                self.logger.info("adopted", node=node.name, role=self.process)
        self.adopted = True

    def _start(self, node: Target) -> None:
        if not self.deployer.installed(node):
            self.logger.info("installing", node=node.name, role=self.process)
            self.deployer.copy(node)
            self.deployer.install(node, self.model_dir, systemd=False)
        self.deployer.start(node, self.process, self.args_of(node), self.model_dir)

    async def _stop(self, node: Target) -> None:
        """Out of service, then stopped; a failure is logged, never raised into the controller's loop."""
        self.draining.add(node.name)
        try:
            if self.admin is not None:
                # out of the balancer first: nothing new reaches it; then SIGTERM lets it answer what it holds
                await self.admin.remove(self.url_of(node))
            await asyncio.to_thread(self.deployer.stop_process, node, self.process, self.stop_timeout)
            self.logger.info("stopped", node=node.name, role=self.process)
        except Exception as exc:
            self.logger.error("stop_failed", node=node.name, role=self.process, message=str(exc)[:500])
        finally:
            self.draining.discard(node.name)

    async def scale_to(self, count: int) -> None:
        await self.adopt()
        # a node still draining is not spare: started again now, its late stop would kill the new process
        taken = {n.name for n in self.serving} | self.draining
        spare = [n for n in self.nodes if n.name not in taken]
        new = spare[: max(0, count - len(self.serving))]
        if len(self.serving) + len(new) < count:
            self.logger.warning("too_few_nodes", wanted=count, serving=len(self.serving), spare=len(spare),
                                draining=len(self.draining))  # fmt: skip
        started = await asyncio.gather(*(asyncio.to_thread(self._start, n) for n in new), return_exceptions=True)
        for node, result in zip(new, started, strict=True):
            admitted = not isinstance(result, BaseException) and (
                self.admin is None or await self.admin.add(self.url_of(node)))  # fmt: skip
            if not admitted:
                self.logger.error("start_failed", node=node.name, role=self.process, message=str(result)[:500])
                await self._stop(node)
                continue
            self.serving.append(node)
            self.logger.info("started", node=node.name, role=self.process, url=self.url_of(node))
        if len(self.serving) > count:
            surplus, self.serving = self.serving[count:], self.serving[:count]
            for node in surplus:
                self.draining.add(node.name)  # at once: the next call must not see it as spare
                task = asyncio.ensure_future(self._stop(node))
                self.stopping.add(task)
                task.add_done_callback(self.stopping.discard)
            self.logger.info("stopping", role=self.process, nodes=",".join(n.name for n in surplus))

    async def close(self) -> None:
        if self.stopping:
            await asyncio.gather(*self.stopping, return_exceptions=True)
        if self.serving:
            self.logger.info("left_serving", nodes=",".join(n.name for n in self.serving))
        if self.admin is not None:
            await self.admin.close()
