"""Shared fixtures: model files, the shared photos, and real server processes on ephemeral ports."""

from __future__ import annotations

import getpass
import json
import os
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from email.message import Message
from pathlib import Path

import pytest

from imgclass.process import Child, stop_all
from imgclass.serving import modelfiles
from imgclass.web.server import ServerOptions

ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = ROOT / "test-artifacts"

# ../shared/README.md: photo -> top-1 Keras index after a plain 224x224 bilinear resize
PHOTOS = {
    "cat.bmp": 285,
    "cat_720p.jpg": 285,
    "bird.bmp": 19,
    "dragonfly.bmp": 319,
    "grace_hopper.bmp": 652,
    "parrot.jpg": 88,
    "sunflower.bmp": 985,
    "missvickie_potato_chips.bmp": 692,
}
CAT_CLASSES = {281, 282, 283, 284, 285, 287}  # tabby, tiger, Persian, Siamese, Egyptian, lynx


def _model_dir() -> Path:
    candidates = [os.environ.get("IMGCLASS_MODEL_DIR"), ROOT.parent / "shared" / "models", ROOT / "models"]
    for candidate in candidates:
        if candidate and modelfiles.is_valid(candidate):
            return Path(candidate).resolve()
    pytest.fail("no verified model files: set IMGCLASS_MODEL_DIR=../shared/models or run ./install_script.sh")


@pytest.fixture(scope="session")
def model_dir() -> Path:
    return _model_dir()


@pytest.fixture(scope="session")
def images_dir() -> Path:
    for candidate in (ROOT.parent / "shared" / "images", ROOT / "tests" / "images"):
        if candidate.is_dir():
            return candidate
    pytest.fail("../shared/images is missing; the tests need the shared photos beside the checkout")


@pytest.fixture(scope="session")
def artifacts() -> Path:
    ARTIFACTS.mkdir(exist_ok=True)
    return ARTIFACTS


@pytest.fixture(scope="session")
def spawn(model_dir: Path) -> Iterator[Callable[..., Child]]:
    """spawn('serve', '--backend', 'sleep', ...) -> a started Child with .url; all stopped at the end."""
    children: list[Child] = []

    def start(*args: str, env: dict[str, str] | None = None, wait: bool = True) -> Child:
        child = Child([*args], env={"IMGCLASS_MODEL_DIR": str(model_dir), **(env or {})})
        children.append(child)
        if wait:
            child.wait_url()
        return child

    yield start
    stop_all(children)


@pytest.fixture(scope="session")
def litert_server(spawn: Callable[..., Child]) -> str:
    # a queue that does not shed: the tests that use it send bursts to check answers, not shedding
    return spawn("serve", "--port", "0", "--max-upload-mb", "20", "--max-queue", "128",
                 "--max-wait-ms", "0").url  # type: ignore[return-value]  # fmt: skip


def http(
    method: str, url: str, body: bytes | None = None, headers: dict[str, str] | None = None, timeout: float = 30
) -> tuple[int, Message, bytes]:
    """One plain HTTP call; 4xx/5xx come back as values, not exceptions. Header names are
    case-insensitive, as in HTTP (uvicorn sends them lower-cased, aiohttp capitalised)."""
    request = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.headers, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers, exc.read()


def multipart(fields: dict[str, tuple[str, bytes, str] | str]) -> tuple[bytes, str]:
    boundary = "----imgclass-test-boundary-7d93"
    out = bytearray()
    for name, value in fields.items():
        out += f"--{boundary}\r\n".encode()
        if isinstance(value, tuple):
            filename, data, ctype = value
            out += f'Content-Disposition: form-data; name="{name}"; filename="{filename}"\r\n'.encode()
            out += f"Content-Type: {ctype}\r\n\r\n".encode() + data + b"\r\n"
        else:
            out += f'Content-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode()
    out += f"--{boundary}--\r\n".encode()
    return bytes(out), f"multipart/form-data; boundary={boundary}"


def post_image(url: str, data: bytes, filename: str = "x.jpg", **extra: str) -> tuple[int, Message, dict]:
    body, ctype = multipart({"image": (filename, data, "application/octet-stream"), **extra})
    status, headers, raw = http("POST", url, body, {"Content-Type": ctype})
    return status, headers, json.loads(raw)


def post_json(url: str, doc: object) -> tuple[int, Message, dict]:
    status, headers, raw = http("POST", url, json.dumps(doc).encode(), {"Content-Type": "application/json"})
    return status, headers, json.loads(raw)


def descendants(pid: int) -> set[int]:
    """Every process below `pid`, from /proc."""
    out: set[int] = set()
    stack = [pid]
    while stack:
        p = stack.pop()
        for task in Path(f"/proc/{p}/task").glob("*"):
            try:
                kids = (task / "children").read_text().split()
            except OSError:
                continue
            for kid in map(int, kids):
                if kid not in out:
                    out.add(kid)
                    stack.append(kid)
    return out


class ServedApp:
    """An ASGI app served by a real uvicorn, configured as `imgclass serve` configures it, on an
    ephemeral port, in a thread of its own (so no signal handling); `stop()` drains it as SIGTERM does."""

    def __init__(self, app: object, options: ServerOptions | None = None, **changes: object) -> None:
        import asyncio
        import dataclasses
        import threading

        import uvicorn

        from imgclass.web.server import ServerOptions, bind_socket, socket_url, uvicorn_config

        options = dataclasses.replace(options or ServerOptions(), **changes)  # type: ignore[arg-type]
        self.sock = bind_socket("127.0.0.1", 0)
        self.url = socket_url(self.sock)
        self.port = self.sock.getsockname()[1]
        self.server = uvicorn.Server(uvicorn_config(app, options))
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(
            target=self.loop.run_until_complete, args=(self.server.serve(sockets=[self.sock]),), daemon=True
        )
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started and time.monotonic() < deadline:
            time.sleep(0.01)
        assert self.server.started, "uvicorn did not start"

    def stop(self, timeout: float = 10) -> None:
        self.server.should_exit = True
        self.thread.join(timeout)
        self.loop.close()


SSHD = shutil.which("sshd") or "/usr/sbin/sshd"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def sshd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """A real OpenSSH server on 127.0.0.1 that lets this user in with a key of its own: the 'nodes'
    of deploy tests are folders reached through it."""
    if not (Path(SSHD).exists() and shutil.which("ssh") and shutil.which("ssh-keygen")):
        pytest.skip("needs OpenSSH: install Debian openssh-server (./install_script.sh --dev)")
    d = tmp_path_factory.mktemp("sshd")
    for name in ("host_key", "client_key"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(d / name)], check=True, timeout=30)
    (d / "authorized_keys").write_text((d / "client_key.pub").read_text())
    os.chmod(d / "authorized_keys", 0o600)
    port = free_port()
    config = d / "sshd_config"
    config.write_text(f"""Port {port}
ListenAddress 127.0.0.1
HostKey {d}/host_key
PidFile {d}/sshd.pid
AuthorizedKeysFile {d}/authorized_keys
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
PermitRootLogin prohibit-password
StrictModes no
UsePAM no
LogLevel ERROR
""")
    Path("/run/sshd").mkdir(exist_ok=True)  # sshd's privilege-separation directory
    proc = subprocess.Popen([SSHD, "-D", "-e", "-f", str(config)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", port), 0.2).close()
                break
            except OSError:
                if proc.poll() is not None:
                    pytest.fail(f"sshd exited: {proc.stderr.read().decode() if proc.stderr else ''}")
                time.sleep(0.1)
        yield {"port": str(port), "key": str(d / "client_key"), "known_hosts": str(d / "known_hosts"),
               "user": getpass.getuser()}  # fmt: skip
    finally:
        proc.terminate()
        proc.wait(10)
        if proc.stderr:
            proc.stderr.close()
