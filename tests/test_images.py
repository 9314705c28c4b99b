"""Every way an image can be unusable raises ImageError; every odd-but-valid image becomes RGB."""
import io
import struct
import zlib

import pytest
from PIL import Image

from nstd.engine import ImageError, open_image
from nstd.engine.images import fit_long_edge, to_pil, to_tensor


def _png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _jpeg_bytes(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", **kw)
    return buf.getvalue()


def _huge_png_header(width: int, height: int) -> bytes:
    """A tiny file whose header claims a huge picture (a decompression bomb's signature)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = lambda t, d: struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


@pytest.mark.parametrize(
    "name, data, reason",
    [
        ("empty.jpg", b"", "empty"),
        ("notes.jpg", b"these are my holiday notes, not a picture\n" * 20, "not an image"),
        ("junk.png", b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4, "corrupt|not an image"),
        ("anim.gif", None, "not an image nstd can read"),
    ],
)
def test_unusable_files_raise_image_error(tmp_path, name, data, reason):
    path = tmp_path / name
    if data is None:
        Image.new("RGB", (8, 8)).save(path, format="GIF")
    else:
        path.write_bytes(data)
    with pytest.raises(ImageError, match=reason) as info:
        open_image(path)
    assert name in str(info.value)


def test_missing_file(tmp_path):
    with pytest.raises(ImageError, match="file not found"):
        open_image(tmp_path / "nope.png")


def test_truncated_jpeg(tmp_path, images_dir):
    data = (images_dir / "tubingen.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageError, match="corrupt or truncated"):
        open_image(tmp_path / "cut.jpg")


def test_too_many_pixels_refused_before_decoding(tmp_path):
    (tmp_path / "bomb.png").write_bytes(_huge_png_header(100_000, 100_000))
    with pytest.raises(ImageError, match="over the limit"):
        open_image(tmp_path / "bomb.png", max_pixels=50_000_000)
    Image.new("RGB", (300, 200)).save(tmp_path / "big.png")
    with pytest.raises(ImageError, match=r"300x200 is 60,000 pixels, over the limit of 50,000"):
        open_image(tmp_path / "big.png", max_pixels=50_000)


@pytest.mark.parametrize(
    "make",
    [
        lambda: Image.new("L", (20, 10), 128),
        lambda: Image.new("P", (20, 10), 3),
        lambda: Image.new("CMYK", (20, 10), (0, 255, 0, 0)),
        lambda: Image.new("I;16", (20, 10), 40000),
        lambda: Image.new("LA", (20, 10), (10, 255)),
    ],
    ids=["grey", "palette", "cmyk", "16bit", "grey-alpha"],
)
def test_modes_become_rgb(tmp_path, make):
    img = make()
    fmt = "JPEG" if img.mode == "CMYK" else ("TIFF" if img.mode == "LA" else "PNG")
    path = tmp_path / f"x.{fmt.lower()}"
    img.save(path, format=fmt)
    out = open_image(path)
    assert out.mode == "RGB" and out.size == (20, 10)


def test_16bit_is_scaled_not_clipped(tmp_path):
    Image.new("I;16", (4, 4), 32768).save(tmp_path / "half.png")
    r, g, b = open_image(tmp_path / "half.png").getpixel((0, 0))
    assert 120 <= r <= 135 and r == g == b


def test_alpha_is_composited_over_white(tmp_path):
    Image.new("RGBA", (4, 4), (0, 0, 0, 0)).save(tmp_path / "clear.png")
    assert open_image(tmp_path / "clear.png").getpixel((1, 1)) == (255, 255, 255)


def test_exif_orientation_is_applied(tmp_path):
    img = Image.new("RGB", (40, 20), (200, 10, 10))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    (tmp_path / "phone.jpg").write_bytes(_jpeg_bytes(img, exif=exif.tobytes()))
    assert open_image(tmp_path / "phone.jpg").size == (20, 40)


@pytest.mark.parametrize("fmt", ["PNG", "WEBP", "BMP", "TIFF", "JPEG"])
def test_supported_formats(tmp_path, fmt):
    path = tmp_path / f"img.{fmt.lower()}"
    Image.new("RGB", (12, 9), (10, 20, 30)).save(path, format=fmt)
    assert open_image(path).size == (12, 9)


def test_tensor_round_trip_and_fit():
    img = Image.new("RGB", (7, 5), (255, 0, 128))
    t = to_tensor(img)
    assert t.shape == (1, 3, 5, 7) and t.is_contiguous() and float(t.max()) == 1.0
    assert to_pil(t).tobytes() == img.tobytes()
    assert fit_long_edge((1024, 768), 512) == (512, 384)
    assert fit_long_edge((591, 800), 64) == (47, 64)
