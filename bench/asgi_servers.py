#!/usr/bin/env python3
"""Which maintained ASGI server to stand on: CPU per request and hardening, from one run.

    .venv/bin/python bench/asgi_servers.py [--seconds 8]

The same bare ASGI app (bench/asgi_echo.py: read the body, answer 80 bytes of JSON) runs under
each candidate: uvicorn with httptools and uvloop, uvicorn with h11, and granian (when it is
installed). nginx answering `return 200` after discarding the same body is the baseline. Each
gets a 40 KB POST from wrk (-t1 -c16) at saturation; the figure is server CPU ms per request,
from /proc, and its ratio to nginx's. Then each is probed for what a server facing clients must
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
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from common import Nginx, cpu_seconds, find_nginx  # noqa: E402

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


CANDIDATES = {
    "uvicorn-httptools": lambda port: [str(VENV_BIN / "python"), "-m", "uvicorn", "asgi_echo:app", "--port", str(port),
                                       "--http", "httptools", "--loop", "uvloop", "--log-level", "warning",
                                       "--no-access-log"],
    "uvicorn-h11": lambda port: [str(VENV_BIN / "python"), "-m", "uvicorn", "asgi_echo:app", "--port", str(port),
                                 "--http", "h11", "--loop", "uvloop", "--log-level", "warning", "--no-access-log"],
    "granian": lambda port: [str(VENV_BIN / "granian"), "--interface", "asgi", "--port", str(port), "--loop", "uvloop",
                             "--workers", "1", "--runtime-threads", "1", "--log-level", "warning", "--no-ws",
                             "asgi_echo:app"],
}  # fmt: skip


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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--slow-head-seconds", type=float, default=0, help="probe slow heads for this long (0: skip)")
    args = parser.parse_args()
    if not shutil.which("wrk"):
        print("SKIP: wrk is not installed (apt-get install wrk)")
        return 0
    tmp = Path(tempfile.mkdtemp(prefix="imgclass-asgi-"))
    body = tmp / "body.bin"
    body.write_bytes(os.urandom(40_000))
    print(f"# bench/asgi_servers.py  {time.strftime('%Y-%m-%d %H:%M')}  cores={os.cpu_count()}  "
          f"40 KB POST, wrk -t1 -c16, {args.seconds:g} s")  # fmt: skip
    results: dict[str, float] = {}
    probes: dict[str, list[str]] = {}
    binary = find_nginx()
    if binary:
        nginx = Nginx(binary, "    client_body_buffer_size 128k;\n    client_max_body_size 25m;",
                      "        location / { return 200 '{\"ok\":1}'; }")  # fmt: skip
        try:
            wrk(nginx.url + "/", body, 2, tmp)
            c0 = cpu_seconds(nginx.pids())
            n = wrk(nginx.url + "/", body, args.seconds, tmp)
            results["nginx"] = (cpu_seconds(nginx.pids()) - c0) / n * 1000
        finally:
            nginx.stop()
    for name, command in CANDIDATES.items():
        if name == "granian" and not (VENV_BIN / "granian").exists():
            print("# granian is not installed (pip install granian): left out")
            continue
        port = free_port()
        proc = subprocess.Popen(command(port), cwd=HERE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            wait_port(port, proc)
            pids = [proc.pid, *map(int, Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split())]
            url = f"http://127.0.0.1:{port}/"
            wrk(url, body, 2, tmp)
            c0 = cpu_seconds(pids)
            n = wrk(url, body, args.seconds, tmp)
            results[name] = (cpu_seconds(pids) - c0) / n * 1000
            probes[name] = [probe_head_limit(port, pids), probe_malformed(port)]
            if args.slow_head_seconds:
                probes[name].append(probe_slow_head(port, args.slow_head_seconds))
        finally:
            proc.terminate()
            proc.wait(10)
    base = results.get("nginx")
    print(f"\n{'server':20}{'CPU ms/request':>16}{'x nginx':>9}")
    for name, cpu in results.items():
        print(f"{name:20}{cpu:>16.3f}{(cpu / base if base else float('nan')):>9.2f}")
    print()
    for name, lines in probes.items():
        print(f"{name}:\n  head limit: {lines[0]}\n  malformed: {lines[1]}"
              + (f"\n  slow head: {lines[2]}" if len(lines) > 2 else ""))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
