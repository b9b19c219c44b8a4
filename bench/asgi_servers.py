#!/usr/bin/env python3
"""Which maintained ASGI server to stand on: CPU per request and hardening, from one run.

    .venv/bin/python bench/asgi_servers.py [--seconds 8]

Two apps run under each candidate: uvicorn with httptools and uvloop, uvicorn with h11, and granian
(when it is installed; `pip install granian`):
- echo (bench/asgi_echo.py): read the body, answer 80 bytes of JSON; the baseline is nginx
  answering `return 200` after discarding the same body;
- forward (bench/asgi_proxy.py): the balancer's job, stripped bare: forward the body with aiohttp to
  one of two sleep model servers (const:2ms) and relay the answer; the baseline is nginx as a proxy
  (`random; keepalive 64`) to the same servers. This is the figure the balancer's choice rests on.
Each gets a 40 KB POST from wrk (-t1 -c16) at saturation; the figure is the server's CPU ms per
request, from /proc, and its ratio to nginx's, over --rounds interleaved rounds (median). Then each is probed for what a server facing clients must
do on its own, before any app code runs:
- head limit: the server's RSS after a client sends a 20 MB header line (bounded, or not);
- slow head: whether a connection that sends half a request head and stalls is closed within 70 s
  (--slow-head-seconds; off by default because it is slow);
- malformed request: the status it answers to bytes that are not HTTP.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from common import ROOT, Nginx, cpu_seconds, find_nginx  # noqa: E402

from imgclass.measure.experiment import jpeg_of  # noqa: E402
from imgclass.process import Child, stop_all  # noqa: E402

VENV_BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, proc: subprocess.Popen[bytes], timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return
        except OSError:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited with {proc.returncode}") from None
            time.sleep(0.05)
    raise RuntimeError("server did not listen")


CANDIDATES = ("uvicorn-httptools", "uvicorn-h11", "granian")


def command_for(name: str, port: int, module: str) -> list[str]:
    if name.startswith("uvicorn"):
        return [str(VENV_BIN / "python"), "-m", "uvicorn", module, "--port", str(port), "--http",
                name.removeprefix("uvicorn-"), "--loop", "uvloop", "--log-level", "warning", "--no-access-log",
                "--no-proxy-headers"]  # fmt: skip
    return [str(VENV_BIN / "granian"), "--interface", "asgi", "--port", str(port), "--loop", "uvloop",
            "--workers", "1", "--runtime-threads", "1", "--log-level", "warning", "--no-ws", module]  # fmt: skip


NGINX_PROXY_HTTP = """
    client_body_buffer_size 128k;
    client_max_body_size 25m;
    upstream backends {{
        random;
{servers}
        keepalive 64;
    }}"""
NGINX_PROXY_SERVER = """
        location / {
            proxy_pass http://backends/predict;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }"""


def wrk(url: str, body_file: Path, seconds: float, tmp: Path) -> int:
    script = tmp / "post.lua"
    script.write_text(
        'wrk.method = "POST"\nwrk.headers["Content-Type"] = "image/jpeg"\n'
        f'local f = io.open("{body_file}", "rb")\nwrk.body = f:read("*a")\nf:close()\n'
    )
    out = subprocess.run(["wrk", "-t1", "-c16", f"-d{seconds:.0f}s", "-s", str(script), url],
                         capture_output=True, text=True, timeout=seconds + 60).stdout  # fmt: skip
    if "Non-2xx" in out:
        print("# warning: non-2xx answers:", re.search(r"Non-2xx.*", out).group(0))  # type: ignore[union-attr]
    return int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]


def rss_kb(pid: int) -> int:
    return int(Path(f"/proc/{pid}/status").read_text().split("VmRSS:")[1].split()[0])


def probe_head_limit(port: int, pids: list[int], megabytes: int = 20) -> str:
    before = sum(rss_kb(p) for p in pids)
    sent = 0
    with socket.create_connection(("127.0.0.1", port), 5) as s:
        s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: ")
        try:
            for _ in range(megabytes):
                s.sendall(b"a" * 1_000_000)
                sent += 1
        except OSError:
            pass
        time.sleep(0.3)
        grown = sum(rss_kb(p) for p in pids) - before
        s.settimeout(1)
        try:
            answer = s.recv(64).split(b"\r\n")[0].decode(errors="replace") or "closed"
        except OSError as exc:
            answer = type(exc).__name__
    verdict = "bounded" if grown < 10_000 else "UNBOUNDED"
    return f"{verdict}: {sent} MB accepted, RSS +{grown / 1000:.0f} MB, answer {answer!r}"


def probe_malformed(port: int) -> str:
    with socket.create_connection(("127.0.0.1", port), 5) as s:
        s.sendall(b"NOT HTTP AT ALL\r\n\r\n")
        s.settimeout(3)
        try:
            return s.recv(200).split(b"\r\n")[0].decode(errors="replace") or "closed"
        except OSError as exc:
            return type(exc).__name__


def probe_slow_head(port: int, seconds: float) -> str:
    with socket.create_connection(("127.0.0.1", port), 5) as s:
        s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n")
        start = time.monotonic()
        s.settimeout(seconds)
        try:
            data = s.recv(200)
        except TimeoutError:
            return f"STILL OPEN after {seconds:.0f} s"
        except OSError as exc:
            return f"reset after {time.monotonic() - start:.1f} s ({type(exc).__name__})"
        first = data.split(b"\r\n")[0].decode(errors="replace")
        return f"closed after {time.monotonic() - start:.1f} s" + (f" with {first!r}" if first else "")


def cpu_per_request(url: str, pids: list[int], body: Path, seconds: float, tmp: Path) -> float:
    c0 = cpu_seconds(pids)
    n = wrk(url, body, seconds, tmp)
    return (cpu_seconds(pids) - c0) / n * 1000


def child_pids(proc: subprocess.Popen[bytes]) -> list[int]:
    return [proc.pid, *map(int, Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split())]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=6.0, help="seconds of wrk per measurement")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds; the figure is their median")
    parser.add_argument("--slow-head-seconds", type=float, default=0, help="probe slow heads for this long (0: skip)")
    args = parser.parse_args()
    if not shutil.which("wrk"):
        print("SKIP: wrk is not installed (apt-get install wrk)")
        return 0
    binary = find_nginx()
    if binary is None:
        print("SKIP: nginx is not installed (apt-get install nginx); it is the baseline")
        return 0
    tmp = Path(tempfile.mkdtemp(prefix="imgclass-asgi-"))
    body = tmp / "body.bin"
    body.write_bytes(os.urandom(40_000))
    photo = tmp / "photo.jpg"
    photo.write_bytes(jpeg_of(ROOT.parent / "shared" / "images" / "parrot.jpg", 224, quality=97))
    print(f"# bench/asgi_servers.py  {time.strftime('%Y-%m-%d %H:%M')}  cores={os.cpu_count()}  "
          f"40 KB POST, wrk -t1 -c16, {args.seconds:g} s x {args.rounds} rounds")  # fmt: skip
    names = [n for n in CANDIDATES if n != "granian" or (VENV_BIN / "granian").exists()]
    if "granian" not in names:
        print("# granian is not installed (pip install granian): left out")
    env = {"IMGCLASS_LOG_LEVEL": "WARNING"}
    backends = [Child(["serve", "--port", "0", "--backend", "sleep", "--service-time", "const:2ms", "--threads", "16",
                       "--max-queue", "4096"], env=env) for _ in range(2)]  # fmt: skip
    procs: list[subprocess.Popen[bytes]] = []
    nginx_echo = nginx_proxy = None
    results: dict[tuple[str, str], list[float]] = {}
    probes: dict[str, list[str]] = {}
    try:
        urls = [b.wait_url() for b in backends]
        nginx_echo = Nginx(binary, "    client_body_buffer_size 128k;\n    client_max_body_size 25m;",
                           "        location / { return 200 '{\"ok\":1}'; }")  # fmt: skip
        servers = "\n".join(f"        server {u.removeprefix('http://')};" for u in urls)
        nginx_proxy = Nginx(binary, NGINX_PROXY_HTTP.format(servers=servers), NGINX_PROXY_SERVER)
        targets: dict[tuple[str, str], tuple[str, list[int], Path]] = {
            ("nginx", "echo"): (nginx_echo.url + "/", nginx_echo.pids(), body),
            ("nginx", "forward"): (nginx_proxy.url + "/", nginx_proxy.pids(), photo),
        }
        for name in names:
            for app, module in (("echo", "asgi_echo:app"), ("forward", "asgi_proxy:app")):
                port = free_port()
                proc = subprocess.Popen(command_for(name, port, module), cwd=HERE, env={**os.environ,
                                        "BACKENDS": ",".join(urls)}, stdout=subprocess.DEVNULL,
                                        stderr=subprocess.DEVNULL)  # fmt: skip
                procs.append(proc)
                wait_port(port, proc)
                targets[(name, app)] = (f"http://127.0.0.1:{port}/", child_pids(proc), photo if app == "forward" else body)
        for url, _, payload in targets.values():
            wrk(url, payload, 2, tmp)  # warm up every one before measuring any
        for r in range(args.rounds):
            for key, (url, pids, payload) in targets.items():
                results.setdefault(key, []).append(cpu_per_request(url, pids, payload, args.seconds, tmp))
            print(f"# round {r + 1}/{args.rounds} done", flush=True)
        for name in names:
            url, pids, _ = targets[(name, "echo")]
            port = int(url.rsplit(":", 1)[1].strip("/"))
            probes[name] = [probe_head_limit(port, pids), probe_malformed(port)]
            if args.slow_head_seconds:
                probes[name].append(probe_slow_head(port, args.slow_head_seconds))
    finally:
        for proc in procs:
            proc.terminate()
            proc.wait(10)
        for ng in (nginx_echo, nginx_proxy):
            if ng is not None:
                ng.stop()
        stop_all(backends)
    median = {k: statistics.median(v) for k, v in results.items()}
    print(f"\n{'server':20}{'echo CPU ms':>12}{'x nginx':>9}{'forward CPU ms':>16}{'x nginx':>9}")
    for name in ["nginx", *names]:
        echo, fwd = median[(name, "echo")], median[(name, "forward")]
        print(f"{name:20}{echo:>12.3f}{echo / median[('nginx', 'echo')]:>9.2f}"
              f"{fwd:>16.3f}{fwd / median[('nginx', 'forward')]:>9.2f}")  # fmt: skip
    print()
    for name, lines in probes.items():
        print(f"{name}:\n  head limit: {lines[0]}\n  malformed: {lines[1]}"
              + (f"\n  slow head: {lines[2]}" if len(lines) > 2 else ""))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
