"""Encoded image bytes -> a uint8 (3, size, size) tensor: torchvision's decoders where they are exact, PIL elsewhere.

PIL reads the header first (cheap: format, mode and size, no pixels), which keeps its refusal of decompression
bombs (more than twice `Image.MAX_IMAGE_PIXELS`, about 179 M pixels) before anything allocates the pixels.
JPEG (gray or RGB), PNG (every 8- and 16-bit mode) and still WebP then decode with `torchvision.io.decode_image`
(libjpeg-turbo, libpng, libwebp; about 1.2x PIL's speed for a 224 px JPEG, 1.9x for a 500 x 375 one resized to
258 px), which gives the same pixels as PIL for those modes; 16-bit PNGs are scaled by 1/256. Everything else
(CMYK JPEGs, GIF, BMP, TIFF, 16- and 32-bit integer and float images) takes PIL and `as_rgb`. The shorter side
is then resized to `size` with antialiasing and the centre cropped.
"""

from __future__ import annotations

import io
import re
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

# PIL's (format, mode)s that torchvision decodes to the same RGB pixels (checked in tests/test_data_sources.py)
# How files become pixels (decoder and resize). It is part of the teacher-cache key of file-backed data: a
# change here may move pixels by one level, and opens new cache entries instead of refusing the old ones.
DECODING = "torchvision-decode_image+antialias-1"

TORCHVISION_MODES = {
    "JPEG": {"L", "RGB"},
    "PNG": {"1", "L", "LA", "P", "RGB", "RGBA", "I;16", "I;16B"},
    "WEBP": {"RGB", "RGBA"},
}
DECODE_ERRORS = (OSError, ValueError, SyntaxError, RuntimeError)  # what PIL and torchvision raise for a bad file
_CPP_PREFIX = re.compile(r"^\w+, [^,]*\.cpp:\d+, ")  # torchvision's errors start with "decode_png, /path.cpp:79, "


@dataclass(frozen=True)
class BadImage:
    """Stands in for an image file that could not be decoded."""

    path: str
    reason: str


def read_image(data: bytes | Tensor, where: str, size: int) -> Tensor | BadImage:
    """Encoded bytes -> uint8 (3, size, size), or a `BadImage` naming `where` and why it could not be read."""
    from PIL import Image

    try:
        return decode_resized(as_bytes_tensor(data), size)
    except (Image.DecompressionBombError, *DECODE_ERRORS) as e:  # the bomb error is not an OSError
        return BadImage(where, error_reason(e))


def as_bytes_tensor(data: bytes | bytearray | memoryview | Tensor) -> Tensor:
    """Encoded bytes as the 1-D uint8 tensor torchvision's decoders read (bytes are copied: tensors are writable)."""
    if isinstance(data, Tensor):
        return data
    return torch.frombuffer(bytearray(data), dtype=torch.uint8) if len(data) else torch.empty(0, dtype=torch.uint8)


def decode_resized(data: Tensor, size: int) -> Tensor:
    """Encoded bytes (1-D uint8) -> uint8 (3, size, size). Raises PIL's `DecompressionBombError`, `OSError`
    (including `UnidentifiedImageError`), `ValueError` or torchvision's `RuntimeError` for a file it cannot read."""
    from PIL import Image
    from torchvision.io import ImageReadMode, decode_image
    from torchvision.transforms.v2 import functional as TF

    if data.numel() == 0:
        raise OSError("empty file")
    with Image.open(io.BytesIO(data.numpy())) as img:  # the header only
        fast = img.mode in TORCHVISION_MODES.get(img.format, ()) and not getattr(img, "is_animated", False)
        pixels = None if fast else TF.pil_to_tensor(as_rgb(img))
    if pixels is None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # a PNG's harmless "iCCP: known incorrect sRGB profile"
            # torchvision 0.29 marks its decoders deprecated (superseded by TorchCodec); they are what we pin
            warnings.simplefilter("ignore", DeprecationWarning)
            pixels = decode_image(data, mode=ImageReadMode.RGB)
        if pixels.dtype == torch.uint16:  # 16-bit PNG: 0..65535 -> 0..255, as as_rgb does
            pixels = (pixels.to(torch.int32) >> 8).to(torch.uint8)
    pixels = TF.resize(pixels, size, antialias=True)
    return TF.center_crop(pixels, [size, size])


def error_reason(error: BaseException) -> str:
    """A short, readable reason for a file that could not be decoded."""
    from PIL import Image

    first = (str(error).splitlines() or [""])[0]
    if isinstance(error, Image.DecompressionBombError):
        return f"decompression bomb: {first[:160]}"
    if isinstance(error, Image.UnidentifiedImageError):  # its text names a BytesIO object, not the file
        return "not a readable image (no image format recognised)"
    return _CPP_PREFIX.sub("", first)[:200] or type(error).__name__


def as_rgb(img):
    """Any PIL image as 8-bit RGB. 16- and 32-bit integer images (PNG / TIFF "I;16", "I") are scaled by
    1/256 (their 0..65535 range to 0..255), float images ("F") from 0..1 when they lie in it, else clipped
    to 0..255; PIL's own convert("RGB") would clip 16-bit values, turning most of an image white. Palette,
    CMYK, gray + alpha and RGBA images take PIL's conversion (alpha dropped)."""
    from PIL import Image

    if img.mode.startswith("I") or img.mode == "F":
        values = np.asarray(img, dtype=np.float64)
        if img.mode == "F":
            values = values * 255.0 if values.size and 0.0 <= values.min() and values.max() <= 1.0 else values
        else:
            values = np.floor(np.clip(values, 0, 65535) / 256.0)
        img = Image.fromarray(np.clip(values, 0, 255).astype(np.uint8), mode="L")
    return img.convert("RGB")
