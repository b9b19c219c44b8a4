"""Image bytes to a 224x224 RGB uint8 array: format checks, bomb checks, fast JPEG draft decoding."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from ..errors import EmptyBody, NotAnImage, TooManyPixels, TruncatedImage, UnsupportedFormat

INPUT_SIZE = (224, 224)
ORIENTATION_TAG = 0x0112  # EXIF Orientation

# An allow-list keeps Pillow's rarer decoders (and their CVE history) away from the network.
READ_FORMATS = frozenset({"JPEG", "MPO", "PNG", "GIF", "BMP", "WEBP", "TIFF"})

# Signatures of real image formats we do not decode, so they get 415 rather than 400.
_OTHER_IMAGE_SIGNATURES: list[tuple[int, bytes, str]] = [
    (4, b"ftypheic", "HEIC"),
    (4, b"ftypheix", "HEIC"),
    (4, b"ftypmif1", "HEIF"),
    (4, b"ftypavif", "AVIF"),
    (0, b"\x00\x00\x00\x0cjP  ", "JPEG 2000"),
    (0, b"\xff\x4f\xff\x51", "JPEG 2000"),
    (0, b"8BPS", "PSD"),
    (0, b"\x00\x00\x01\x00", "ICO"),
    (0, b"\xff\x0a", "JPEG XL"),
    (0, b"\x00\x00\x00\x0cJXL ", "JPEG XL"),
]


# Signatures of the formats we read: an upload that starts like one but cannot be opened was cut short.
_READ_SIGNATURES: list[tuple[int, bytes, str]] = [
    (0, b"\xff\xd8\xff", "JPEG"),
    (0, b"\x89PNG\r\n\x1a\n", "PNG"),
    (0, b"GIF87a", "GIF"),
    (0, b"GIF89a", "GIF"),
    (8, b"WEBP", "WebP"),
    (0, b"II*\x00", "TIFF"),
    (0, b"MM\x00*", "TIFF"),
]


_BMP_INFO_SIZES = {12, 40, 52, 56, 64, 108, 124}  # "BM" alone is too common in text to mean BMP


def _sniff_read_format(data: bytes) -> str | None:
    for offset, magic, name in _READ_SIGNATURES:
        if data[offset : offset + len(magic)] == magic:
            return name
    if data[:2] == b"BM" and (len(data) < 18 or int.from_bytes(data[14:18], "little") in _BMP_INFO_SIZES):
        return "BMP"
    return None


def _sniff_other_format(data: bytes) -> str | None:
    for offset, magic, name in _OTHER_IMAGE_SIGNATURES:
        if data[offset : offset + len(magic)] == magic:
            return name
    head = data[:512].lstrip().lower()
    if head.startswith(b"<svg") or (head.startswith(b"<?xml") and b"<svg" in head):
        return "SVG"
    return None


def _to_rgb(im: Image.Image) -> Image.Image:
    if im.mode in ("I;16", "I;16B", "I;16L", "I"):
        # Pillow's I->L conversion clips at 255 instead of scaling 16-bit samples down.
        arr = np.asarray(im, dtype=np.uint32)
        shift = 8 if arr.max(initial=0) > 255 else 0
        im = Image.fromarray((arr >> shift).astype(np.uint8), mode="L")
    if im.mode == "P":
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        # Transparent pixels often hide black; composite on white as a browser shows them.
        rgba = im.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        im = Image.alpha_composite(background, rgba)
    return im if im.mode == "RGB" else im.convert("RGB")


def decode(data: bytes, max_pixels: int) -> np.ndarray:
    """Decode `data` and return a (224, 224, 3) uint8 RGB array, or raise a RequestError."""
    if not data:
        raise EmptyBody("The image is empty; send the bytes of a JPEG, PNG, GIF, BMP or WebP file.")
    try:
        im = Image.open(io.BytesIO(data), formats=None)
    except UnidentifiedImageError:
        ours = _sniff_read_format(data)
        if ours:
            raise TruncatedImage(
                f"The upload starts like a {ours} file but its header is incomplete; upload the complete file."
            ) from None
        other = _sniff_other_format(data)
        if other:
            raise UnsupportedFormat(
                f"{other} images are not supported; send JPEG, PNG, GIF, BMP, WebP or TIFF."
            ) from None
        raise NotAnImage(
            "The upload is not an image we can recognise; send a JPEG, PNG, GIF, BMP or WebP file."
        ) from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise TooManyPixels(f"The image has more than {max_pixels} pixels; send a smaller image.") from None
    except (OSError, ValueError, SyntaxError) as exc:
        ours = _sniff_read_format(data)
        if ours:
            raise TruncatedImage(
                f"The {ours} header is damaged or incomplete ({exc}); upload the complete file."
            ) from None
        raise NotAnImage(f"The image header cannot be read ({exc}).") from None
    with im:
        if im.format not in READ_FORMATS:
            raise UnsupportedFormat(f"{im.format} images are not supported; send JPEG, PNG, GIF, BMP, WebP or TIFF.")
        width, height = im.size
        if width * height > max_pixels:
            raise TooManyPixels(
                f"The image is {width}x{height} = {width * height} pixels, over the limit of {max_pixels}; send a smaller image."
            )
        if width < 1 or height < 1:
            raise NotAnImage("The image has no pixels.")
        try:
            if im.format in ("JPEG", "MPO"):
                # Let libjpeg decode at 1/2, 1/4 or 1/8 scale: a 12 MP photo decodes ~30x faster.
                im.draft("RGB", INPUT_SIZE)
            im.load()
            # exif_transpose copies the image even when there is nothing to turn; most uploads have no tag.
            turned = im.getexif().get(ORIENTATION_TAG, 1) not in (0, 1)
            oriented = (ImageOps.exif_transpose(im) or im) if turned else im
            rgb = _to_rgb(oriented)
        except (Image.DecompressionBombError, Image.DecompressionBombWarning):
            raise TooManyPixels(f"The image has more than {max_pixels} pixels; send a smaller image.") from None
        except OSError as exc:
            if "truncated" in str(exc).lower() or "broken data stream" in str(exc).lower():
                raise TruncatedImage("The image data is truncated; upload the complete file.") from None
            raise NotAnImage(f"The image data cannot be decoded ({exc}).") from None
        except (ValueError, SyntaxError, EOFError, IndexError) as exc:
            raise TruncatedImage(f"The image data is damaged or incomplete ({exc}).") from None
        if rgb.size != INPUT_SIZE:
            rgb = rgb.resize(INPUT_SIZE, Image.Resampling.BILINEAR)
        return np.asarray(rgb, dtype=np.uint8)
