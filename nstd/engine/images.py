"""Image decoding, checking and encoding: the only place nstd touches image files.

Every way a user's file can be unusable raises `ImageError` with a sentence a user understands;
the CLI prints it and the daemon quarantines the job with it.
"""
from __future__ import annotations

import io
import os
import struct
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from nstd.errors import NstdError
from nstd.engine.options import DEFAULT_MAX_PIXELS  # noqa: F401 (re-exported)
from nstd.fsutil import atomic_write_bytes

if TYPE_CHECKING:
    import torch

#: Formats nstd reads (Pillow's names); the JPEG opener also takes the multi-picture JPEGs (MPO) cameras write.
READ_FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "TIFF")
#: Output formats: the job's `output.format` -> (Pillow format, save options).
WRITE_FORMATS = {
    "png": ("PNG", {"optimize": False, "compress_level": 6}),
    "jpg": ("JPEG", {"quality": 95, "subsampling": 0}),
    "webp": ("WEBP", {"quality": 95, "method": 4}),
    "tiff": ("TIFF", {"compression": "tiff_deflate"}),
}

ImageFile.LOAD_TRUNCATED_IMAGES = False


class ImageError(NstdError, ValueError):
    """A user's image cannot be used: missing, empty, not an image, corrupt, truncated, too big."""

    def __init__(self, path: Path | str, reason: str):
        self.path = Path(path)
        self.reason = reason
        super().__init__(f"{self.path.name}: {reason}")


def open_image(path: Path | str, max_pixels: int = DEFAULT_MAX_PIXELS, fileobj: BinaryIO | None = None,
               within: int | None = None) -> Image.Image:
    """Decode an image file fully and return it as 8-bit RGB, EXIF orientation applied.

    Dimensions are checked from the header before any pixel is decoded, so a decompression
    bomb costs nothing. Animated files give their first frame. Alpha is composited over white.
    With `fileobj` (an open file, e.g. one pinned in the inbox) that is read and `path` only
    names it in messages. `within` (a thumbnail's edge): the picture is scaled down to fit it
    while it is decoded (JPEG's draft mode) or right after, before any conversion, so that a
    big picture costs one decode of itself, not several copies.
    """
    path = Path(path)
    try:
        size = os.fstat(fileobj.fileno()).st_size if fileobj is not None else path.stat().st_size
    except FileNotFoundError:
        raise ImageError(path, "file not found") from None
    except OSError as exc:
        raise ImageError(path, f"cannot be read ({exc.strerror or exc})") from None
    if size == 0:
        raise ImageError(path, "the file is empty (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(fileobj if fileobj is not None else path, formats=READ_FORMATS)
            w, h = img.size
            if w * h > max_pixels:
                raise ImageError(
                    path, f"{w}x{h} is {w * h:,} pixels, over the limit of {max_pixels:,} (limits.max_pixels)"
                )
            if w < 1 or h < 1:
                raise ImageError(path, f"has no pixels ({w}x{h})")
            if within:
                img.draft(img.mode, (within, within))  # JPEG: decoded at 1/2 .. 1/8 of its size
            img.load()
            if within:
                try:
                    img.thumbnail((within, within))
                except ValueError:  # a mode Pillow cannot resize (16-bit): converted first, below
                    pass
    except ImageError:
        raise
    except Image.DecompressionBombError:
        raise ImageError(path, f"over the limit of {max_pixels:,} pixels (limits.max_pixels)") from None
    except UnidentifiedImageError:
        raise ImageError(
            path, "not an image nstd can read (JPEG, PNG, WebP, BMP or TIFF expected)"
        ) from None
    except PermissionError:
        raise ImageError(path, "permission denied") from None
    except (OSError, SyntaxError, ValueError, EOFError, IndexError, struct.error) as exc:
        raise ImageError(path, f"the image is corrupt or truncated ({exc})") from None
    return _to_rgb(path, img)


def _to_rgb(path: Path, img: Image.Image) -> Image.Image:
    try:
        img = ImageOps.exif_transpose(img)
    except Exception:  # a broken EXIF block must not lose the picture
        pass
    mode = img.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        # 16-bit grey: scale 0..65535 to 0..255 instead of clipping at 255 as convert() would.
        img = img.convert("I")
        sixteen_bit = mode.startswith("I;16") or img.getextrema()[1] > 255
        if sixteen_bit:
            img = img.point(lambda v: v * (255.0 / 65535.0))
        img = img.convert("L")
    elif mode == "F":
        # 32-bit float grey: 0..1 as floats mean it (1.0 is white, a mask's full weight), 0..255 as
        # 8-bit levels; any other range is stretched from its least to its most.
        lo, hi = img.getextrema()
        if lo >= 0 and hi <= 1:
            img = img.point(lambda v: v * 255.0).convert("L")
        elif lo >= 0 and hi <= 255:
            img = img.convert("L")
        else:
            img = img.point(lambda v: (v - lo) * 255.0 / ((hi - lo) or 1.0)).convert("L")
    if see_through(img):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, rgba)
    try:
        return img.convert("RGB")
    except (OSError, ValueError) as exc:
        raise ImageError(path, f"colour mode {mode} cannot be converted to RGB ({exc})") from None


def see_through(img: Image.Image) -> bool:
    """Whether `img` has transparency the readers paint over white (an alpha channel, or a
    palette's transparent entry)."""
    return img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info)


def fit_long_edge(size: tuple[int, int], long_edge: int) -> tuple[int, int]:
    """(w, h) scaled so that max(w, h) == long_edge, aspect kept, each side at least 1."""
    w, h = size
    if w >= h:
        return long_edge, max(1, round(h * long_edge / w))
    return max(1, round(w * long_edge / h)), long_edge


def resize_long_edge(img: Image.Image, long_edge: int) -> Image.Image:
    target = fit_long_edge(img.size, long_edge)
    if target == img.size:
        return img
    return img.resize(target, Image.Resampling.LANCZOS)


def to_tensor(img: Image.Image) -> "torch.Tensor":
    """8-bit RGB PIL image -> float32 tensor (1, 3, H, W) in 0..1."""
    import torch  # here, not at the top: decoding and checking images needs no torch (the status page)

    data = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8)
    return data.view(img.height, img.width, 3).permute(2, 0, 1).unsqueeze(0).float().div_(255.0).contiguous()


def to_uint8_hwc(t: "torch.Tensor") -> "torch.Tensor":
    """Tensor (1, 3, H, W) in 0..1 -> uint8 (H, W, 3) on the same device, values clamped."""
    import torch

    return t.detach().squeeze(0).clamp(0, 1).mul(255.0).round_().to(torch.uint8).permute(1, 2, 0).contiguous()


def to_uint16_hwc(t: "torch.Tensor"):
    """Tensor (1, 3, H, W) in 0..1 -> (H, W, 3) uint16 numpy array on the host, values clamped:
    the optimised picture without the 8-bit rounding (prints of smooth gradients)."""
    import numpy as np

    arr = t.detach().squeeze(0).clamp(0, 1).mul(65535.0).round_().permute(1, 2, 0).float().cpu().numpy()
    return arr.astype(np.uint16)


def from_uint8_hwc(arr: "torch.Tensor") -> Image.Image:
    """uint8 (H, W, 3) on the host -> RGB PIL image."""
    return Image.frombytes("RGB", (arr.shape[1], arr.shape[0]), arr.numpy().tobytes())


def to_pil(t: "torch.Tensor") -> Image.Image:
    """Tensor (1, 3, H, W) in 0..1 (any device) -> 8-bit RGB PIL image, values clamped."""
    return from_uint8_hwc(to_uint8_hwc(t).cpu())


def encode(img: Image.Image, fmt: str, quality: int | None = None, image16=None) -> bytes:
    """Encode to `png`, `jpg`, `webp` or `tiff` bytes; `quality` for jpg and webp (default 95);
    `image16` (to_uint16_hwc's array) makes a tiff of 16 bits per channel, written by tifffile
    (Pillow writes no 16-bit RGB), deflate-compressed."""
    try:
        pil_format, options = WRITE_FORMATS[fmt]
    except KeyError:
        raise ValueError(f"unknown output format {fmt!r} (expected one of {', '.join(WRITE_FORMATS)})") from None
    buf = io.BytesIO()
    if image16 is not None:
        if fmt != "tiff":
            raise ValueError(f"16 bits per channel are written as tiff only, not {fmt}")
        import tifffile

        tifffile.imwrite(buf, image16, photometric="rgb", compression="zlib")
        return buf.getvalue()
    if quality is not None and "quality" in options:
        options = {**options, "quality": quality}
    img.save(buf, format=pil_format, **options)
    return buf.getvalue()


def save(img: Image.Image, path: Path | str, fmt: str | None = None, quality: int | None = None,
         image16=None) -> None:
    """Write atomically; the format comes from `fmt` or the file's suffix."""
    path = Path(path)
    fmt = fmt or format_for_suffix(path)
    atomic_write_bytes(path, encode(img, fmt, quality, image16))


def format_for_suffix(path: Path) -> str:
    suffix = path.suffix.lower().lstrip(".")
    fmt = {"jpeg": "jpg", "tif": "tiff"}.get(suffix, suffix)
    if fmt not in WRITE_FORMATS:
        raise ValueError(f"{path.name}: cannot tell the output format from the suffix (use .png, .jpg, .webp or .tif)")
    return fmt


def save_gif_to(frames: list[Image.Image], fh: io.BytesIO, fps: float) -> None:
    """Encode an animated GIF that loops forever and holds the last frame longer."""
    if not frames:
        raise ValueError("no frames to write")
    duration = max(20, round(1000.0 / fps))
    durations = [duration] * len(frames)
    durations[-1] = max(duration, 1500)
    # Pillow's default median-cut palette costs ~0.25 s a 512 px frame; the fast octree is 36x
    # quicker for the same file size and a picture that looks the same (checked by eye).
    paletted = [f.quantize(256, method=Image.Quantize.FASTOCTREE, dither=Image.Dither.FLOYDSTEINBERG) for f in frames]
    paletted[0].save(fh, format="GIF", save_all=True, append_images=paletted[1:], duration=durations, loop=0)


def save_gif(frames: list[Image.Image], path: Path | str, fps: float) -> None:
    """Write an animated GIF atomically."""
    buf = io.BytesIO()
    save_gif_to(frames, buf, fps)
    atomic_write_bytes(path, buf.getvalue())
