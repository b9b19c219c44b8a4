"""The model download path, for real, against a local HTTP server holding the shared files."""

from __future__ import annotations

import functools
import http.server
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from imgclass import config, errors
from imgclass.serving import modelfiles


@pytest.fixture()
def file_server(tmp_path: Path, model_dir: Path) -> Iterator[tuple[str, Path]]:
    root = tmp_path / "served"
    root.mkdir()
    for name in modelfiles.SHA256:
        shutil.copy(model_dir / name, root / name)
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    handler.log_message = lambda *a, **k: None  # type: ignore[attr-defined]
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}/", root
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(5)


def test_download_verifies_and_is_idempotent(file_server: tuple[str, Path], tmp_path: Path) -> None:
    base, _ = file_server
    dest = tmp_path / "models"
    fetched = modelfiles.download(dest, base_url=base)
    assert sorted(p.name for p in fetched) == sorted(modelfiles.SHA256)
    assert modelfiles.is_valid(dest)
    assert modelfiles.download(dest, base_url=base) == []  # already there and verified


def test_download_refuses_a_bad_checksum(file_server: tuple[str, Path], tmp_path: Path) -> None:
    base, root = file_server
    (root / modelfiles.MODEL_FILE).write_bytes(b"tampered")
    dest = tmp_path / "models"
    with pytest.raises(errors.ModelFileError, match="expected"):
        modelfiles.download(dest, base_url=base)
    assert not (dest / modelfiles.MODEL_FILE).exists()


def test_download_offline_says_what_to_do(tmp_path: Path) -> None:
    with pytest.raises(errors.ModelFileError, match="IMGCLASS_MODEL_DIR"):
        modelfiles.download(tmp_path, base_url="http://127.0.0.1:9/", timeout=2)


def test_backends_file(tmp_path: Path) -> None:
    path = tmp_path / "backends.txt"
    path.write_text("# servers\nhttp://10.10.1.1:5000\n\nhttp://10.10.2.1:5000/  # second\n")
    assert config.read_backends_file(str(path)) == ["http://10.10.1.1:5000", "http://10.10.2.1:5000"]
    path.write_text("10.10.1.1:5000\n")
    with pytest.raises(errors.ConfigError, match="one URL per line"):
        config.read_backends_file(str(path))
