"""The `imgclass` command: serve, balance, up, and the other subcommands."""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence

from . import __version__, config
from .errors import ImgclassError


def _serve(argv: Sequence[str]) -> int:
    from .serving import app, settings

    parser = config.make_parser("imgclass serve", "Run one model server.")
    settings.add_arguments(parser)
    app.main(settings.ServerSettings.from_namespace(parser.parse_args(argv)))
    return 0


def _balance(argv: Sequence[str]) -> int:
    from .balancing import engines, settings

    parser = config.make_parser(
        "imgclass balance", "Run the load balancer in front of model servers, or (--dispatch queue) the queue's front."
    )
    settings.add_arguments(parser)
    resolved = settings.BalancerSettings.from_namespace(parser.parse_args(argv))
    if resolved.dispatch == "queue":
        from .queue import front

        front.main(resolved)
    else:
        engines.ENGINES[resolved.engine]().run(resolved)
    return 0


def _worker(argv: Sequence[str]) -> int:
    from .queue import settings, worker

    parser = config.make_parser("imgclass worker", "Run one queue worker: pull jobs from Redis, classify them.")
    settings.add_arguments(parser)
    worker.main(settings.WorkerSettings.from_namespace(parser.parse_args(argv)))
    return 0


def _redis(argv: Sequence[str]) -> int:
    from .queue import redis_server

    parser = config.make_parser("imgclass redis", "Run the queue's redis-server (append-only file, every second).")
    config.add_role_options(parser, config.REDIS)
    ns = parser.parse_args(argv)
    redis_server.main(ns.host, ns.port, ns.redis_dir, ns.log_level)
    return 0


def _autoscale(argv: Sequence[str]) -> int:
    from .autoscale import service

    parser = config.make_parser("imgclass autoscale", "Size a pool of queue workers or model servers to the load.")
    config.add_role_options(parser, config.AUTOSCALE)
    service.main(service.AutoscaleSettings.from_namespace(parser.parse_args(argv)))
    return 0


def _up(argv: Sequence[str]) -> int:
    from . import local

    return local.up(argv)


def _testbed(argv: Sequence[str]) -> int:
    from .testbed import cli

    return cli.main(argv)


def _fetch_model(argv: Sequence[str]) -> int:
    import os

    from .serving import modelfiles

    parser = config.make_parser("imgclass fetch-model", "Download the model and labels and check their sha256.")
    parser.add_argument("--dest", default="models", help="folder to store them in [default models]")
    args = parser.parse_args(argv)
    env_dir = os.environ.get("IMGCLASS_MODEL_DIR")
    if env_dir and modelfiles.is_valid(env_dir):
        print(f"model files present and verified in IMGCLASS_MODEL_DIR={env_dir}")
        return 0
    fetched = modelfiles.download(args.dest)
    print(f"model files verified in {args.dest}" + (f" (downloaded {len(fetched)})" if fetched else ""))
    return 0


COMMANDS: dict[str, tuple[str, Callable[[Sequence[str]], int]]] = {
    "serve": ("run one model server (POST /predict)", _serve),
    "balance": ("run the load balancer (POST /submit, the web page), or the queue's front", _balance),
    "worker": ("run one queue worker (pulls jobs from Redis Streams)", _worker),
    "redis": ("run the queue's redis-server, with its append-only file", _redis),
    "autoscale": ("size a pool of workers or servers to the load (queue depth, target tracking, an SLO)", _autoscale),
    "up": ("start N model servers and a balancer on this machine", _up),
    "testbed": ("testbed tools: rspec, hosts, emulate (see 'imgclass testbed --help')", _testbed),
    "fetch-model": ("download the model files and check their sha256", _fetch_model),
}


def register(name: str, summary: str) -> Callable[[Callable[[Sequence[str]], int]], Callable[[Sequence[str]], int]]:
    def wrap(fn: Callable[[Sequence[str]], int]) -> Callable[[Sequence[str]], int]:
        COMMANDS[name] = (summary, fn)
        return fn

    return wrap


def usage() -> str:
    lines = [f"imgclass {__version__}: image classification as a distributed web service", "", "commands:"]
    lines += [f"  {name:<10} {summary}" for name, (summary, _) in COMMANDS.items()]
    lines += ["", "Run 'imgclass COMMAND --help' for a command's options."]
    return "\n".join(lines)


def run(command: str, argv: Sequence[str]) -> int:
    """Run one subcommand; a named error becomes one sentence on stderr and exit status 2."""
    try:
        return COMMANDS[command][1](argv)
    except ImgclassError as exc:  # named errors at startup: one sentence, no traceback
        print(f"imgclass {command}: error: {exc.message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    if argv[0] == "--version":
        print(__version__)
        return 0
    if argv[0] not in COMMANDS:
        print(f"imgclass: unknown command {argv[0]!r}\n\n{usage()}", file=sys.stderr)
        return 2
    return run(argv[0], argv[1:])
