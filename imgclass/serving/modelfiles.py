"""Where the model and labels live, their published sha256, and loading them with clear errors."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from ..errors import ModelFileError

SOURCE_URL = "https://raw.githubusercontent.com/google-coral/test_data/master/"
MODEL_FILE = "mobilenet_v2_1.0_224_quant.tflite"
LABELS_FILE = "imagenet_labels.txt"
SHA256 = {
    MODEL_FILE: "7aad0c74c5e3c06e5eb3c827e13304fdd68a83da6087d92ee169c24ff9fd4776",
    LABELS_FILE: "b8aaeb5630c62626a7d124a05c0e14230a7ffdd2136a31d0190a4fb71c1d82f1",
}
FIX = "run ./install_script.sh to download it, or point --model-dir / IMGCLASS_MODEL_DIR at a folder that has it"


@dataclass(frozen=True)
class ModelFiles:
    model: Path
    labels: list[str]  # 1000 ImageNet class names, Keras index order (no 'background')


def _checked(folder: Path, name: str) -> Path:
    path = folder / name
    if not path.is_file():
        raise ModelFileError(f"{path} is missing; {FIX}.")
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if digest != SHA256[name]:
        raise ModelFileError(f"{path} is corrupt (sha256 {digest[:12]}... does not match); delete it and {FIX}.")
    return path


def load_labels(model_dir: str | Path) -> list[str]:
    path = _checked(Path(model_dir), LABELS_FILE)
    lines = path.read_text(encoding="utf-8").splitlines()
    return lines[1:1001]  # line 0 is 'background'


def locate(model_dir: str | Path, need_model: bool = True) -> ModelFiles:
    folder = Path(model_dir)
    model = _checked(folder, MODEL_FILE) if need_model else folder / MODEL_FILE
    return ModelFiles(model=model, labels=load_labels(folder))


def is_valid(folder: str | Path) -> bool:
    try:
        for name in SHA256:
            _checked(Path(folder), name)
    except ModelFileError:
        return False
    return True


def download(dest: str | Path, base_url: str = SOURCE_URL, timeout: float = 60.0) -> list[Path]:
    """Fetch the model and labels into `dest`, keeping a file only if its sha256 matches."""
    import urllib.request

    folder = Path(dest)
    folder.mkdir(parents=True, exist_ok=True)
    fetched = []
    for name, expected in SHA256.items():
        target = folder / name
        if target.is_file() and hashlib.sha256(target.read_bytes()).hexdigest() == expected:
            continue
        try:
            with urllib.request.urlopen(base_url + name, timeout=timeout) as response:
                data = response.read()
        except OSError as exc:
            raise ModelFileError(
                f"cannot download {base_url + name} ({exc}); with no internet, set IMGCLASS_MODEL_DIR to a folder "
                "that already holds the model files."
            ) from exc
        digest = hashlib.sha256(data).hexdigest()
        if digest != expected:
            raise ModelFileError(f"{base_url + name} has sha256 {digest}, expected {expected}; nothing was saved.")
        partial = target.with_suffix(target.suffix + ".part")
        partial.write_bytes(data)
        partial.replace(target)
        fetched.append(target)
    return fetched
