"""Every common real-world image format, generated from a real photo, classified by the real server."""

from __future__ import annotations

import io
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from imgclass.serving.images import decode

from ..conftest import CAT_CLASSES, post_image


def _cat(images_dir: Path) -> Image.Image:
    return Image.open(images_dir / "cat_720p.jpg").convert("RGB")


def _save(im: Image.Image, fmt: str, **kw: object) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def progressive_jpeg(cat: Image.Image) -> bytes:
    return _save(cat, "JPEG", quality=90, progressive=True)


def cmyk_jpeg(cat: Image.Image) -> bytes:
    return _save(cat.convert("CMYK"), "JPEG", quality=92)


def exif_rotated_jpeg(cat: Image.Image) -> bytes:
    # Store the pixels turned 90 degrees and an Orientation tag (6 = rotate 90 CW to view) that undoes it.
    exif = Image.Exif()
    exif[0x0112] = 6
    return _save(cat.transpose(Image.Transpose.ROTATE_90), "JPEG", quality=90, exif=exif)


def grayscale_jpeg(cat: Image.Image) -> bytes:
    return _save(cat.convert("L"), "JPEG", quality=90)


def png_rgb(cat: Image.Image) -> bytes:
    return _save(cat, "PNG")


def png_palette_transparent(cat: Image.Image) -> bytes:
    pal = cat.convert("P", palette=Image.Palette.ADAPTIVE, colors=255)
    pal.info["transparency"] = 0
    return _save(pal, "PNG", transparency=0)


def png_rgba(cat: Image.Image) -> bytes:
    rgba = cat.convert("RGBA")
    alpha = Image.new("L", cat.size, 255)
    alpha.paste(0, (0, 0, 40, 40))  # a transparent corner
    rgba.putalpha(alpha)
    return _save(rgba, "PNG")


def png_16bit_gray(cat: Image.Image) -> bytes:
    arr = (np.asarray(cat.convert("L"), dtype=np.uint16) * 257).astype(np.uint16)
    return _save(Image.fromarray(arr), "PNG")


def gif_animated(cat: Image.Image) -> bytes:
    first = cat.convert("P", palette=Image.Palette.ADAPTIVE)
    second = Image.new("RGB", cat.size, (0, 90, 200)).convert("P")
    return _save(first, "GIF", save_all=True, append_images=[second], duration=100, loop=0)


def bmp(cat: Image.Image) -> bytes:
    return _save(cat, "BMP")


def webp(cat: Image.Image) -> bytes:
    return _save(cat, "WEBP", quality=90)


def tiff(cat: Image.Image) -> bytes:
    return _save(cat, "TIFF")


FORMATS: list[Callable[[Image.Image], bytes]] = [
    progressive_jpeg, cmyk_jpeg, exif_rotated_jpeg, grayscale_jpeg, png_rgb, png_palette_transparent,
    png_rgba, png_16bit_gray, gif_animated, bmp, webp, tiff,
]  # fmt: skip


@pytest.mark.parametrize("make", FORMATS, ids=[f.__name__ for f in FORMATS])
def test_decode_gives_224_rgb(images_dir: Path, make: Callable[[Image.Image], bytes]) -> None:
    arr = decode(make(_cat(images_dir)), max_pixels=50_000_000)
    assert arr.shape == (224, 224, 3) and arr.dtype == np.uint8
    assert arr.std() > 20  # a real picture, not a flat fill


def test_exif_orientation_is_applied(images_dir: Path) -> None:
    upright = decode(_save(_cat(images_dir), "JPEG", quality=90), 50_000_000).astype(int)
    rotated = decode(exif_rotated_jpeg(_cat(images_dir)), 50_000_000).astype(int)
    assert np.abs(upright - rotated).mean() < 6


def test_16bit_png_is_scaled_not_clipped(images_dir: Path) -> None:
    arr = decode(png_16bit_gray(_cat(images_dir)), 50_000_000).astype(int)
    gray8 = decode(_save(_cat(images_dir).convert("L"), "PNG"), 50_000_000).astype(int)
    assert np.abs(arr - gray8).max() <= 1  # clipping would saturate almost every pixel to 255


def test_transparent_pixels_become_white(images_dir: Path) -> None:
    rgba = Image.new("RGBA", (300, 300), (0, 0, 0, 0))
    arr = decode(_save(rgba, "PNG"), 50_000_000)
    assert arr.min() == 255


@pytest.mark.integration
@pytest.mark.parametrize("make", FORMATS, ids=[f.__name__ for f in FORMATS])
def test_format_classified_as_cat(litert_server: str, images_dir: Path, make: Callable[[Image.Image], bytes]) -> None:
    status, _, doc = post_image(litert_server + "/predict", make(_cat(images_dir)), "upload")
    assert status == 200, doc
    assert doc["predictions"][0]["index"] in CAT_CLASSES, doc["predictions"]
