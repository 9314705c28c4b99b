"""Hostile and odd input: every case gets the right verdict, and the daemon runs on."""
import hashlib
import io
import os

from harness import IMAGES, Daemon

GOOD = "content: hoovertowernight.jpg\nstyle: starry_night.jpg\n"
BOMB = "\n".join(
    ["a0: &a0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    + [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]" for i in range(1, 10)]
)

#: name -> (sidecar text, files to write into the inbox {name: bytes}, expected kind, words in the message)
CASES = {
    "broken-yaml": ("content: [unclosed\n", {}, "invalid job file", "not valid YAML"),
    "unknown-key": (GOOD + "colour: red\n", {}, "invalid job file", "colour: unknown key"),
    "wrong-type": (GOOD + "steps: lots\n", {}, "invalid job file", "steps: expected an integer"),
    "out-of-range": (GOOD + "size: 100000\n", {}, "invalid job file", "size: expected an integer from 32 to 8192"),
    "bad-choice": (GOOD + "optimizer: sgd\n", {}, "invalid job file", "optimizer: expected one of lbfgs, adam"),
    "top-level-list": ("- a\n- b\n", {}, "invalid job file", "expected a mapping"),
    "dotdot": ("content: ../outside/fifo.jpg\nstyle: starry_night.jpg\n", {}, "path outside inbox", "'..' is not allowed"),
    "absolute": ("content: OUTSIDE\nstyle: starry_night.jpg\n", {}, "path outside inbox", "absolute path"),
    "symlink-out": ("content: sneaky.jpg\nstyle: starry_night.jpg\n", {}, "path outside inbox", "link that leads out"),
    "corrupt": ("content: corrupt.jpg\nstyle: starry_night.jpg\n", {"corrupt.jpg": b"\xff\xd8\xff\xe0" + os.urandom(3000)},
                "bad image", "corrupt.jpg"),
    "zero-byte": ("content: empty.png\nstyle: starry_night.jpg\n", {"empty.png": b""}, "bad image", "empty (0 bytes)"),
    "non-image": ("content: notes.jpg\nstyle: starry_night.jpg\n", {"notes.jpg": b"dear diary\n" * 50}, "bad image",
                  "not an image"),
    "oversized": ("content: the_scream.jpg\nstyle: starry_night.jpg\n", {}, "bad image", "over the limit"),
    "truncated": ("content: half.jpg\nstyle: starry_night.jpg\n", {"half.jpg": None}, "bad image", "truncated"),
    "missing": ("content: never-comes.jpg\nstyle: starry_night.jpg\n", {}, "missing input", "never-comes.jpg"),
    "alias-bomb": (BOMB, {}, "invalid job file", "anchors and aliases"),
    "python-tag": ("content: !!python/object/apply:os.system ['touch PWNED']\nstyle: s.jpg\n", {}, "invalid job file",
                   "not valid YAML"),
    # every job key with a wrong type or value
    "size-string": (GOOD + "size: big\n", {}, "invalid job file", "size: expected an integer"),
    "steps-float": (GOOD + "steps: 2.5\n", {}, "invalid job file", "steps: expected an integer"),
    "steps-zero": (GOOD + "steps: 0\n", {}, "invalid job file", "steps: expected an integer from 1"),
    "optimizer-int": (GOOD + "optimizer: 3\n", {}, "invalid job file", "optimizer: expected one of"),
    "content-weight-str": (GOOD + "content_weight: heavy\n", {}, "invalid job file", "content_weight: expected a number"),
    "style-weight-neg": (GOOD + "style_weight: -1\n", {}, "invalid job file", "style_weight: expected a number from 0"),
    "tv-weight-list": (GOOD + "tv_weight: [1]\n", {}, "invalid job file", "tv_weight: expected a number"),
    "nan-weight": (GOOD + "style_weight: .nan\n", {}, "invalid job file", "style_weight: expected a number"),
    "init-number": (GOOD + "init: 5\n", {}, "invalid job file", "init: expected a non-empty string"),
    "init-missing-file": (GOOD + "init: nowhere.png\n", {}, "missing input", "nowhere.png"),
    "pooling-min": (GOOD + "pooling: min\n", {}, "invalid job file", "pooling: expected one of avg, max"),
    "layers-empty": (GOOD + "content_layers: []\n", {}, "invalid job file", "content_layers: expected a list with at least 1"),
    "layers-string": (GOOD + "style_layers: conv1_1\n", {}, "invalid job file", "style_layers: expected a list"),
    "layer-unknown": (GOOD + "style_layers: [conv1_1, fc7]\n", {}, "invalid job file", "style_layers[1]: expected one of"),
    "seed-negative": (GOOD + "seed: -1\n", {}, "invalid job file", "seed: expected an integer from 0"),
    "style-scale-big": (GOOD + "style_scale: 10\n", {}, "invalid job file", "style_scale: expected a number from 0.1 to 4"),
    "gif-yes-string": (GOOD + "gif: 'yes'\n", {}, "invalid job file", "gif: expected false or a mapping"),
    "gif-every-zero": (GOOD + "gif: {every: 0}\n", {}, "invalid job file", "gif.every: expected an integer from 1"),
    "gif-unknown-key": (GOOD + "gif: {loop: 3}\n", {}, "invalid job file", "gif.loop: unknown key"),
    "output-gif": (GOOD + "output: {format: gif}\n", {}, "invalid job file", "output.format: expected one of png, jpg, webp"),
    "priority-word": (GOOD + "priority: high\n", {}, "invalid job file", "priority: expected an integer"),
    "top-level-scalar": ("just some words\n", {}, "invalid job file", "expected a mapping"),
    "style-blend-zero": ("content: hoovertowernight.jpg\nstyle: [{path: starry_night.jpg, weight: 0}]\n", {},
                         "invalid job file", "blend weights add up to 0"),
    "style-blend-bad-item": ("content: hoovertowernight.jpg\nstyle: [{file: starry_night.jpg}]\n", {},
                             "invalid job file", "style[0]: expected a file name or"),
    "style-number": ("content: hoovertowernight.jpg\nstyle: 42\n", {}, "invalid job file", "style: expected a file name"),
    "not-utf8": ("\udcff", {}, "invalid job file", "not UTF-8"),
    "huge-sidecar": (GOOD + "# " + "x" * 70000 + "\n", {}, "invalid job file", "larger than 65,536 bytes"),
    "empty-by-convention": ("", {}, "missing input", "empty-by-convention.content.jpg"),
    "dotdot-in-blend": ("content: hoovertowernight.jpg\nstyle: [{path: ../outside/fifo.jpg, weight: 1}]\n", {},
                        "path outside inbox", "'..' is not allowed"),
    # images that cannot be used
    "huge-dims": ("content: bomb.png\nstyle: starry_night.jpg\n", {"bomb.png": "BOMB"}, "bad image", "over the limit"),
    # a picture every layer cannot take is refused at intake with the reason, not crashed on by the engine
    "too-thin": ("content: thin.png\nstyle: starry_night.jpg\nsize: 64\n", {"thin.png": "THIN"}, "bad image",
                 "under the 16 px that conv5_1 needs"),
    "gif-format": ("content: anim.gif\nstyle: starry_night.jpg\n", {"anim.gif": "GIF"}, "bad image",
                   "not an image nstd can read"),
    "pdf-as-jpg": ("content: doc.jpg\nstyle: starry_night.jpg\n", {"doc.jpg": b"%PDF-1.4\n" + b"0" * 500}, "bad image",
                   "not an image"),
}

#: Odd but valid input: each of these must land (name in the outbox -> sidecar, files to write).
LANDS = {
    "cmyk": ("content: cmyk.jpg\nstyle: starry_night.jpg\nsteps: 1\n", {"cmyk.jpg": ("CMYK", "JPEG")}),
    "sixteen-bit": ("content: deep.png\nstyle: starry_night.jpg\nsteps: 1\n", {"deep.png": ("I;16", "PNG")}),
    "alpha": ("content: clear.png\nstyle: starry_night.jpg\nsteps: 1\n", {"clear.png": ("RGBA", "PNG")}),
    "palette": ("content: pal.png\nstyle: starry_night.jpg\nsteps: 1\n", {"pal.png": ("P", "PNG")}),
    "grey-tiff": ("content: grey.tif\nstyle: starry_night.jpg\nsteps: 1\n", {"grey.tif": ("L", "TIFF")}),
    "animated-png": ("content: moving.png\nstyle: starry_night.jpg\nsteps: 1\n", {"moving.png": ("ANIM", "PNG")}),
    "animated-webp": ("content: moving.webp\nstyle: starry_night.jpg\nsteps: 1\n", {"moving.webp": ("ANIM", "WEBP")}),
    "exif-rotated": ("content: phone.jpg\nstyle: starry_night.jpg\nsteps: 1\n", {"phone.jpg": ("EXIF", "JPEG")}),
    "my job with spaces": (GOOD + "steps: 1\n", {}),
    "ünïcødé 星夜": (GOOD + "steps: 1\n", {}),
    "new\nline": (GOOD + "steps: 1\n", {}),
    "L" * 240: (GOOD + "steps: 1\n", {}),
    "Case": (GOOD + "steps: 1\n", {}),
    "case": (GOOD + "steps: 1\n", {}),
    "yml-suffix": (GOOD + "steps: 1\n", {}),
}


def _odd_image(kind: str, fmt: str) -> bytes:
    from PIL import Image

    base = Image.open(IMAGES / "hoovertowernight.jpg").convert("RGB").resize((76, 40))
    buf = io.BytesIO()
    if kind == "ANIM":
        frames = [base, base.transpose(Image.Transpose.FLIP_LEFT_RIGHT)]
        frames[0].save(buf, format=fmt, save_all=True, append_images=frames[1:], duration=100, loop=0)
    elif kind == "EXIF":
        exif = Image.Exif()
        exif[0x0112] = 6
        base.save(buf, format=fmt, exif=exif.tobytes())
    elif kind == "I;16":
        base.convert("L").convert("I").point(lambda v: v * 256).convert("I;16").save(buf, format=fmt)
    else:
        base.convert(kind).save(buf, format=fmt)
    return buf.getvalue()


def _bomb() -> bytes:
    import struct
    import zlib

    chunk = lambda t, d: struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d))
    ihdr = struct.pack(">IIBBBBB", 60000, 60000, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def _thin() -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (60000, 1), (90, 120, 200)).save(buf, format="PNG")
    return buf.getvalue()


def _gif() -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, format="GIF")
    return buf.getvalue()


def test_bad_input_is_quarantined_and_the_daemon_runs_on(tmp_path):
    d = Daemon(tmp_path, watch={"missing_timeout": 4.0}, limits={"max_pixels": 1_500_000}, defaults={"gif": False})
    d.inbox.mkdir(parents=True)
    outside = tmp_path / "outside"
    outside.mkdir()
    os.mkfifo(outside / "fifo.jpg")  # opening this would block the daemon: it must never be read
    os.symlink(outside / "fifo.jpg", d.inbox / "sneaky.jpg")
    os.mkfifo(outside / "job.yaml")
    os.symlink(outside / "job.yaml", d.inbox / "linked-sidecar.yaml")  # the job file itself leads out
    d.image("hoovertowernight.jpg")
    d.image("starry_night.jpg")
    d.image("the_scream.jpg")  # 1200x1528 = 1.8 M pixels, over the 1.5 M limit
    half = (IMAGES / "tubingen.jpg").read_bytes()
    d.start()
    special = {None: half[: len(half) // 2], "BOMB": _bomb(), "GIF": _gif(), "THIN": _thin()}
    for name, (text, files, _, _) in CASES.items():
        for fname, data in files.items():
            (d.inbox / fname).write_bytes(special.get(data, data) if not isinstance(data, bytes) else data)
        if text == "\udcff":
            (d.inbox / f".{name}.tmp").write_bytes(b"content: \xff\xfe broken\n")
            d.dropped[f"{name}.yaml"] = {f"{name}.yaml": hashlib.sha256(b"content: \xff\xfe broken\n").hexdigest()}
            os.rename(d.inbox / f".{name}.tmp", d.inbox / f"{name}.yaml")
            continue
        d.drop(name, text.replace("OUTSIDE", str(outside / "fifo.jpg")), images=False)
    for name, (text, files) in LANDS.items():
        for fname, (kind, fmt) in files.items():
            (d.inbox / fname).write_bytes(_odd_image(kind, fmt))
        if name == "yml-suffix":
            (d.inbox / "yml-suffix.yml").write_text(text)
            continue
        d.drop(name, text, images=False)
    d.drop("good-after", GOOD + "steps: 1\n", images=False)
    d.wait_quarantined(*CASES, "linked-sidecar", timeout=120)
    landed_as = {n: n.replace("\n", "_")[:180] for n in LANDS}
    d.wait_landed(*landed_as.values(), timeout=180)
    assert len(CASES) + 1 + len(LANDS) >= 50
    assert d.error("linked-sidecar")["kind"] == "path outside inbox"
    # no link ever leaves the inbox: the job file that is one is renamed aside there, never followed
    assert sorted(os.listdir(d.quarantine / "linked-sidecar")) == ["error.yaml", "job.log"]
    assert (d.inbox / ".nstd-refused-linked-sidecar.yaml").is_symlink()
    assert "left in the inbox as .nstd-refused-linked-sidecar.yaml" in (d.quarantine / "linked-sidecar" / "job.log").read_text()
    assert not any(p.is_symlink() for p in d.root.rglob("*") if d.inbox not in p.parents)
    d.wait_landed("good-after", timeout=60)
    assert d.alive()
    for name, (_, files, kind, words) in CASES.items():
        err = d.error(name)
        assert err["kind"] == kind, (name, err)
        assert words in err["message"], (name, err)
        assert err["stage"] == "intake" and err["job"] == name
        folder = d.quarantine / name
        assert f"{name}.yaml" in os.listdir(folder), name  # the sidecar as dropped
        assert "job.log" in os.listdir(folder)
        for fname in files:
            assert fname in os.listdir(folder), (name, fname)
    assert (outside / "fifo.jpg").exists() and not (tmp_path / "PWNED").exists() and not os.path.exists("PWNED")
    assert (d.inbox / "sneaky.jpg").is_symlink()  # a link the daemon refused stays where the user put it
    counts = (len(CASES) + 1, 1 + len(LANDS))  # counted just after each move: wait, don't race
    d.wait(lambda: (d.status()["failed"], d.status()["done"]) == counts, 10, f"failed/done == {counts}")
    assert d.stop() == 0
    problems = [p for p in d.audit() if "linked-sidecar" not in p]  # that job file was a link, not a file
    assert problems == []


def test_nested_folders_refuse_to_start(tmp_path):
    d = Daemon(tmp_path, paths={"outbox": str(tmp_path / "var" / "inbox" / "out")})
    d.start(wait=False)
    d.proc.wait(60)
    assert d.proc.returncode == 2
    assert "lies inside the inbox" in d.logs()
