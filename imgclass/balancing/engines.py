"""The balancer's engines behind one interface: the Python data plane, or HAProxy driven by a Python control plane."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # config reads ENGINES to parse --engine: keep this module light to import
    from .settings import BalancerSettings


class Engine(ABC):
    """What forwards the requests; everything else (flags, admin API, page, /backends) stays the same."""

    name = ""

    @abstractmethod
    def run(self, settings: BalancerSettings) -> None:
        """Serve until SIGTERM, then drain and stop."""


class PythonEngine(Engine):
    """The readable reference: uvicorn and aiohttp, a policy is a small class (balancing.policies)."""

    name = "python"

    def run(self, settings: BalancerSettings) -> None:
        from .app import main

        main(settings)


class HaproxyEngine(Engine):
    """HAProxy forwards; this process renders its configuration, supervises it and changes it at run time."""

    name = "haproxy"

    def run(self, settings: BalancerSettings) -> None:
        from .haproxy.app import main

        main(settings)


ENGINES: dict[str, type[Engine]] = {e.name: e for e in (PythonEngine, HaproxyEngine)}
