"""The routes: the page, /status.json, /metrics, the running job's picture, and the files of the
outbox and the quarantine. GET and HEAD only; nothing can change anything.

Files are opened through the folder's descriptor without following any link (safefs), so a link
planted in a group-writable outbox or quarantine leads nowhere; `..`, hidden names and anything
but a regular file are refused with a 404 that says no more."""
from __future__ import annotations

import base64
import hmac
import io
import json
import math
import os
import stat
import threading
import time
from collections import OrderedDict
from pathlib import Path

from flask import Flask, Response, abort, render_template, request, send_file

from nstd import __version__
from nstd.state import safefs
from nstd.timetext import duration
from nstd.web.metrics import render_metrics
from nstd.web.view import View

THUMB_EDGE = 192
#: nstd's results are at most 8192 px on the long edge; anything bigger was not made by nstd.
THUMB_MAX_PIXELS = 8192 * 8192
#: What one thumbnail may cost to decode (pixels x bytes a pixel, twice with alpha: Pillow scales
#: such a picture premultiplied, a second copy): a 5600 x 5600 RGB result fits (peak about 1.3x
#: this); a 7000 x 7000 RGBA picture dropped as an input (392 MiB) or an 8192 px print gets no
#: thumbnail (the page links the file itself). One is made at a time, so this bounds what
#: thumbnails add to the page's memory, whatever clients ask at once.
THUMB_MAX_DECODE_BYTES = 100 << 20
MAX_PREVIEW_BYTES = 16 << 20
THUMBS_KEPT = 128
CONTENT_TYPES = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".webp": "image/webp",
                 ".gif": "image/gif", ".json": "application/json", ".yaml": "text/plain", ".log": "text/plain"}
#: No script, no frame, no form, nothing from elsewhere.
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; img-src 'self'; style-src 'unsafe-inline'; base-uri 'none'; "
                               "form-action 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}


#: The page, status.json and /metrics are made at most once in this many seconds, however many ask
#: (status.json itself changes once a second).
RENDER_SECONDS = 1.0


def _carries(authorization: str, token: str) -> bool:
    """`Bearer TOKEN`, or basic auth with TOKEN as the password (any user name), compared in
    constant time."""
    scheme, _, value = authorization.partition(" ")
    if scheme.lower() == "basic":
        try:
            value = base64.b64decode(value, validate=True).decode("utf-8").partition(":")[2]
        except (ValueError, UnicodeDecodeError):
            return False
    elif scheme.lower() != "bearer":
        return False
    return hmac.compare_digest(value.encode("utf-8"), token.encode("utf-8"))


def create_app(view: View, refresh_seconds: int = 3) -> Flask:
    """app.config["NSTD_HOSTS"]: the Host headers accepted (None: any); a page bound to the
    loopback answers only to its own names, so a web page elsewhere cannot read it through DNS
    rebinding (server.py sets them once the port is known)."""
    app = Flask("nstd.web", template_folder=str(Path(__file__).with_name("templates")))
    app.url_map.merge_slashes = False  # no redirect that echoes the Host header
    thumbs = _Thumbs()
    made = Recent(RENDER_SECONDS)

    app.config["NSTD_HOSTS"] = None
    app.config["NSTD_TOKEN"] = None

    @app.before_request
    def known_host():
        allowed = app.config["NSTD_HOSTS"]
        if allowed is not None and request.host.lower() not in allowed:
            abort(421)  # Misdirected Request: not a name of this page (DNS rebinding)
        token = app.config["NSTD_TOKEN"]
        if token and not _carries(request.headers.get("Authorization", ""), token):
            return Response("this page needs its token (web.token)\n", 401, mimetype="text/plain",
                            headers={"WWW-Authenticate": 'Basic realm="nstd", charset="UTF-8"'})

    @app.after_request
    def headers(resp: Response) -> Response:
        resp.headers.update(SECURITY_HEADERS)
        return resp

    def render_page() -> bytes:
        data = view.data()
        live = data["live"]
        return render_template(
            "index.html", d=data, job=live.get("job"), picture_step=live.get("picture_step"),
            plot=loss_plot(live["losses"]), now=time.time(), version=__version__, refresh=refresh_seconds,
            ago=_ago, duration=duration,
        ).encode()

    @app.get("/", provide_automatic_options=False)
    def page():
        return Response(made.get("/", render_page), mimetype="text/html")

    @app.get("/status.json", provide_automatic_options=False)
    def status_json():
        return Response(made.get("/status.json", lambda: json.dumps(view.data()).encode()), mimetype="application/json")

    @app.get("/metrics", provide_automatic_options=False)
    def metrics():
        return Response(made.get("/metrics", lambda: render_metrics(view)), mimetype="text/plain; version=0.0.4")

    @app.get("/preview.jpg", provide_automatic_options=False)
    def preview():
        """The running job's picture, as the worker last published it."""
        if not (view.status().get("live") or {}).get("job"):
            abort(404)
        try:
            fd = os.open(view.preview, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError:
            abort(404)
        with os.fdopen(fd, "rb") as fh:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                abort(404)
            data = fh.read(MAX_PREVIEW_BYTES)
        resp = Response(data, mimetype="image/jpeg")
        resp.headers["Cache-Control"] = "no-store"
        return resp

    @app.get("/files/<area>/<path:rel>", provide_automatic_options=False)
    def files(area: str, rel: str):
        fh, st = _open(view, area, rel)
        kind = CONTENT_TYPES.get(os.path.splitext(rel)[1].lower(), "application/octet-stream")
        return send_file(fh, mimetype=kind, last_modified=st.st_mtime, max_age=60, conditional=True,
                         download_name=os.path.basename(rel))

    @app.get("/thumbs/<area>/<path:rel>", provide_automatic_options=False)
    def thumb(area: str, rel: str):
        fh, st = _open(view, area, rel)
        with fh:
            data = thumbs.get((area, rel, st.st_ino, st.st_mtime_ns), fh)
        if data is None:
            abort(404)
        resp = Response(data, mimetype="image/jpeg")
        resp.headers["Cache-Control"] = "max-age=300"
        return resp

    return app


def _open(view: View, area: str, rel: str):
    """A regular file inside the outbox or the quarantine, opened without following a link."""
    folder = view.areas().get(area)
    parts = rel.split("/")
    if folder is None or not rel or any(p in ("", ".", "..") or p.startswith(".") for p in parts):
        abort(404)
    try:
        fd = safefs.open_inbox(folder)
        try:
            pin = safefs.pin(fd, folder, rel)
        finally:
            os.close(fd)
    except (safefs.Refused, OSError, UnicodeEncodeError, ValueError):
        abort(404)
    try:
        fh = pin.reader()
    finally:
        pin.close()
    return fh, os.fstat(fh.fileno())


class Recent:
    """What `make()` made, reused for `seconds` (a page, status.json): a flood of requests costs a
    dictionary lookup each."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self._lock = threading.Lock()
        self._made: dict[str, tuple[float, object]] = {}

    def get(self, key: str, make):
        now = time.monotonic()
        with self._lock:
            hit = self._made.get(key)
            if hit is not None and now - hit[0] < self.seconds:
                return hit[1]
            data = make()  # under the lock: one maker at a time, the others wait and reuse it
            self._made[key] = (now, data)
            return data


class _Thumbs:
    """Small JPEGs of results, made once each and one at a time (a 4096 px PNG takes a while to
    decode; a planted decompression bomb must not be decoded twice at once)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._kept: "OrderedDict[tuple, bytes]" = OrderedDict()

    def get(self, key: tuple, fh) -> bytes | None:
        from nstd.engine.images import ImageError, open_image  # torch-free: Pillow's checks

        with self._lock:
            if key in self._kept:
                self._kept.move_to_end(key)
                return self._kept[key]
            if _decode_bytes(fh) > THUMB_MAX_DECODE_BYTES:
                return None
            try:
                img = open_image(key[1], THUMB_MAX_PIXELS, fileobj=fh, within=THUMB_EDGE)
            except ImageError:
                return None
            img.thumbnail((THUMB_EDGE, THUMB_EDGE))
            buf = io.BytesIO()
            img.convert("RGB").save(buf, "JPEG", quality=80)
            self._kept[key] = buf.getvalue()
            while len(self._kept) > THUMBS_KEPT:
                self._kept.popitem(last=False)
            return buf.getvalue()


def _decode_bytes(fh) -> int:
    """What decoding the picture in `fh` would take, from its header alone (rewinds `fh`)."""
    from PIL import Image, UnidentifiedImageError

    from nstd.engine.images import READ_FORMATS

    try:
        with Image.open(fh, formats=READ_FORMATS) as img:
            w, h = img.size
            # Pillow holds a pixel in 1 byte (1, L, P), 2 (I;16) or 4 (everything else, RGB
            # included); any mode but RGB and L is converted, a second picture of 4 bytes a pixel.
            # (Counting I and F as 2 let a 7200 px float TIFF take the page to 243 MiB.)
            size = 1 if img.mode in ("1", "L", "P") else 2 if img.mode.startswith("I;16") else 4
            cost = w * h * size + (0 if img.mode in ("RGB", "L") else w * h * 4)
            if img.format == "JPEG":
                cost //= 64  # decoded at an eighth of its size (draft): a thumbnail needs no more
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        cost = 0  # open_image says what is wrong with it
    fh.seek(0)
    return cost


def loss_plot(losses: list[tuple[int, float]], width: int = 320, height: int = 120) -> dict | None:
    """An SVG polyline of the total loss (log scale) against the step, for the template."""
    points = [(s, v) for s, v in losses if v > 0 and math.isfinite(v)]
    if len(points) < 2:
        return None
    s0, s1 = points[0][0], points[-1][0]
    logs = [math.log10(v) for _, v in points]
    lo, hi = min(logs), max(logs)
    span_s, span_v = max(1, s1 - s0), max(1e-9, hi - lo)
    coords = " ".join(f"{(s - s0) / span_s * (width - 10) + 5:.1f},{(hi - lv) / span_v * (height - 20) + 10:.1f}"
                      for (s, _), lv in zip(points, logs))
    return {"points": coords, "width": width, "height": height, "first": points[0], "last": points[-1],
            "low": 10 ** lo, "high": 10 ** hi}


def _ago(t: float, now: float) -> str:
    return duration(now - t) + " ago"
