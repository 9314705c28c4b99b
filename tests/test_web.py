"""The status page, served by the real daemon: what it shows, what it refuses, and a browser.

Started on a free port (web.listen 127.0.0.1:0); the address is in status.json."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from io import BytesIO
from pathlib import Path

import pytest
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from harness import Daemon

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
#: One flooding client: page, JSON, picture and metrics in a loop until SIGINT; prints the codes,
#: 0 for a connection the page cut (its slow-reader defence cuts one that takes none of its output
#: for web.server.STALL_SECONDS: a client at nice 19 beside a job on two busy cores can be that slow).
FLOOD = """
import http.client, os, sys, urllib.request, urllib.error
os.nice(19)
try:
    while True:
        for path in ("", "status.json", "preview.jpg", "metrics"):
            try:
                with urllib.request.urlopen(sys.argv[1] + path, timeout=30) as r:
                    r.read(); code = r.status
            except urllib.error.HTTPError as e:
                code = e.code
            except (ConnectionError, TimeoutError, urllib.error.URLError, http.client.HTTPException):
                code = 0  # cut (a body cut short too: IncompleteRead)
            print(code, end=" ", flush=True)  # as it goes: a client killed late still tells
except KeyboardInterrupt:
    pass
"""


def told(client: subprocess.Popen) -> str:
    """What a flooding client printed; one that has not stopped a minute after SIGINT (a nice-19
    process on a busy machine) is killed and what it printed so far is taken."""
    try:
        return client.communicate(timeout=60)[0]
    except subprocess.TimeoutExpired:
        client.kill()
        return client.communicate()[0]


def get(url: str, method: str = "GET") -> tuple[int, dict, bytes]:
    req = urllib.request.Request(url, method=method)
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


@pytest.fixture
def page(tmp_path):
    """A daemon with its page, one long job running (cancelled at the end)."""
    d = Daemon(tmp_path, web={"enabled": True, "listen": "127.0.0.1:0", "refresh_seconds": 2},
               defaults={"size": 64, "steps": 100000, "gif": False}, service={"shutdown_grace_seconds": 0},
               limits={"max_steps": 100000})
    d.start()
    d.wait(lambda: (d.status() or {}).get("web"), 30, "the page's address")
    d.url = d.status()["web"]
    yield d
    d.stop()


def running(d: Daemon, name: str) -> None:
    d.wait(lambda: ((d.status() or {}).get("running") or {}).get("name") == name and
           ((d.status() or {}).get("running") or {}).get("step", 0) >= 3, 60, f"{name} to run")


def test_the_page_shows_the_running_job_and_its_picture(page):
    d = page
    d.drop("<i>neckar&x", {"content": "hoovertowernight.jpg", "style": "starry_night.jpg"})
    running(d, "<i>neckar&x")
    d.wait(lambda: get(d.url + "preview.jpg")[0] == 200, 30, "a picture")
    d.wait(lambda: len(json.loads(get(d.url + "status.json")[2])["live"]["losses"]) >= 2, 30, "two losses to plot")
    status, headers, body = get(d.url)
    html = body.decode()
    assert status == 200 and "&lt;i&gt;neckar&amp;x" in html and "<i>neckar" not in html
    assert 'id="preview" src="/preview.jpg?step=' in html and "<polyline" in html, html
    assert "script-src" not in headers["Content-Security-Policy"] and "default-src 'none'" in headers["Content-Security-Policy"]
    status, headers, body = get(d.url + "preview.jpg")
    assert headers["Content-Type"] == "image/jpeg" and Image.open(BytesIO(body)).size[0] == 64
    status, _, body = get(d.url + "status.json")
    data = json.loads(body)
    assert data["running"]["name"] == "<i>neckar&x" and data["live"]["job"] == "<i>neckar&x"
    assert {"queue", "waiting", "done", "failed", "results", "quarantine", "memory", "device"} <= set(data)
    _, _, body = get(d.url + "metrics")
    families = {f.name: f for f in text_string_to_metric_families(body.decode())}
    assert {"nstd_jobs_done", "nstd_jobs_failed", "nstd_queue_length", "nstd_step_seconds",
            "nstd_job_duration_seconds"} <= set(families)
    steps = {s.name: s.value for s in families["nstd_step_seconds"].samples}
    assert steps["nstd_step_seconds_count"] >= 2


def test_results_and_quarantine_are_listed_with_links_that_work(tmp_path):
    d = Daemon(tmp_path, web={"enabled": True, "listen": "127.0.0.1:0"})
    d.start()
    try:
        d.wait(lambda: (d.status() or {}).get("web"), 30, "the page's address")
        url = d.status()["web"]
        d.drop("good", {"content": "hoovertowernight.jpg", "style": "starry_night.jpg"})
        d.drop("bad", "steps: [", images=False)
        d.wait_landed("good")
        d.wait_quarantined("bad")
        time.sleep(3.5)  # the listings are cached for 3 s
        html = get(url)[2].decode()
        assert 'href="/files/outbox/good/good.png"' in html and 'src="/thumbs/outbox/good/good.png"' in html
        assert 'href="/files/outbox/good/good.gif"' in html and "invalid job file" in html
        assert get(url + "thumbs/outbox/good/good.png")[1]["Content-Type"] == "image/jpeg"
        assert get(url + "files/outbox/good/good.gif")[2][:6] == b"GIF89a"
        assert b"kind: invalid job file" in get(url + "files/quarantine/bad/error.yaml")[2]
        assert str(d.root) not in html  # paths relative to the root
    finally:
        d.stop()


def test_cancels_and_retried_folders_are_counted_and_listed_apart_from_failures(tmp_path):
    """A cancel is not a failure: counted as cancelled (status, metrics), shown muted; a retried
    folder goes to its own list, so it cannot push real failures off the page; failures carry
    their kind as a label; nstd_info and nstd_up say which nstd answers and whether it lives."""
    d = Daemon(tmp_path, web={"enabled": True, "listen": "127.0.0.1:0", "results": 2},
               defaults={"size": 64, "steps": 100000, "gif": False}, limits={"max_steps": 100000})
    d.start()
    try:
        d.wait(lambda: (d.status() or {}).get("web"), 30, "the page's address")
        url = d.status()["web"]
        d.drop("bad", "steps: [", images=False)
        d.wait_quarantined("bad")
        d.drop("long", {"content": "hoovertowernight.jpg", "style": "starry_night.jpg"})
        d.wait(lambda: ((d.status() or {}).get("running") or {}).get("step", 0) >= 1, 60, "long to run")
        assert subprocess.run([sys.executable, "-m", "nstd.cli", "cancel", "long", "--config", str(d.config)],
                              capture_output=True, timeout=60).returncode == 0
        for n in range(3):  # more retried folders than the page lists
            (d.quarantine / f"old{n}.retried-20260101-00000{n}").mkdir()
        time.sleep(3.5)  # the listings are cached for 3 s
        data = json.loads(get(url + "status.json")[2])
        assert data["failed"] == 1 and data["cancelled"] == 1 and data["failed_kinds"] == {"invalid job file": 1}
        assert sorted(e["name"] for e in data["quarantine"]) == ["bad", "long"]
        assert [e["cancelled"] for e in sorted(data["quarantine"], key=lambda e: e["name"])] == [False, True]
        assert len(data["retried"]) == 2 and all(".retried-" in e["name"] for e in data["retried"])
        html = get(url)[2].decode()
        assert "<h2>Retried</h2>" in html and 'class="muted">cancelled:' in html and 'class="bad">invalid job file' in html
        families = {f.name: f for f in text_string_to_metric_families(get(url + "metrics")[2].decode())}
        failed = {tuple(sorted(s.labels.items())): s.value for s in families["nstd_jobs_failed"].samples
                  if s.name == "nstd_jobs_failed_total"}
        assert failed == {(("kind", "invalid job file"),): 1.0}, failed
        assert families["nstd_jobs_cancelled"].samples[0].value == 1
        assert families["nstd_info"].samples[0].labels["version"] and families["nstd_up"].samples[0].value == 1
        out = subprocess.run([sys.executable, "-m", "nstd.cli", "status", "--config", str(d.config)],
                             capture_output=True, text=True, timeout=60).stdout
        assert "done: 0, failed: 1 (invalid job file 1), cancelled: 1" in out, out
    finally:
        d.stop()


def test_only_files_inside_the_outbox_and_quarantine_are_served(page):
    d = page
    secret = d.tmp / "secret.txt"
    secret.write_text("secret")
    (d.outbox / "planted").mkdir(parents=True)
    (d.outbox / "planted" / "link.png").symlink_to(secret)
    (d.outbox / "linkdir").symlink_to(d.tmp)
    (d.outbox / "planted" / ".hidden").write_text("x")
    os.mkfifo(d.outbox / "planted" / "fifo.png")
    (d.outbox / "planted" / "ok.json").write_text("{}")
    assert get(d.url + "files/outbox/planted/ok.json")[0] == 200
    for path in ("files/outbox/../secret.txt", "files/outbox/%2e%2e/secret.txt", "files/outbox/%2E%2E%2Fsecret.txt",
                 "files/outbox/%252e%252e%252fsecret.txt", "files/outbox/..%2fsecret.txt", "files/outbox/planted/link.png",
                 "files/outbox/linkdir/secret.txt", "files/outbox/planted/.hidden", "files/outbox/planted/fifo.png",
                 "files/state/status.json", "files/inbox/x", "files/outbox//etc/passwd", "files/outbox/planted/..%5c..%5csecret.txt",
                 "thumbs/outbox/planted/link.png", "files/quarantine/../outbox/planted/ok.json", "files/outbox/%00"):
        status, _, body = get(d.url + path)
        assert status == 404 and b"secret" not in body, path
    for method in ("POST", "PUT", "DELETE"):
        assert get(d.url, method)[0] == 405


def test_a_flood_of_requests_leaves_the_worker_at_its_pace(tmp_path):
    """Two identical jobs, the second under a flood of page, JSON and picture requests: both
    land, every request is answered, and the step times are printed side by side (timings are
    compared in bench/web_load.py, not asserted here: this machine is shared)."""
    d = Daemon(tmp_path, web={"enabled": True, "listen": "127.0.0.1:0"}, defaults={"size": 64, "steps": 150, "gif": False})
    d.start()
    try:
        d.wait(lambda: (d.status() or {}).get("web"), 30, "the page's address")
        url = d.status()["web"]
        d.drop("quiet", {"content": "hoovertowernight.jpg", "style": "starry_night.jpg"})
        d.wait_landed("quiet")
        d.drop("flooded", {"content": "hoovertowernight.jpg", "style": "starry_night.jpg"})
        running(d, "flooded")
        # The flood comes from other processes at the lowest priority, as browsers on other
        # machines would cost this one nothing: what is measured is the server's own cost.
        flood = [subprocess.Popen([sys.executable, "-c", FLOOD, url], stdout=subprocess.PIPE, text=True)
                 for _ in range(4)]
        try:
            d.wait_landed("flooded", timeout=120)
        finally:
            for f in flood:
                f.send_signal(signal.SIGINT)
            codes = [int(c) for f in flood for c in told(f).split()]
        answered = [c for c in codes if c]
        # 404: the picture between jobs; 0: cut as a stalled reader (above), never most of them
        assert len(answered) > 20 and set(codes) <= {0, 200, 404} and len(answered) > 0.9 * len(codes), codes
        per_step = {n: json.loads((d.outbox / n / "report.json").read_text())["timings"]["optimised"] / 150
                    for n in ("quiet", "flooded")}
        print(f"step time: quiet {per_step['quiet'] * 1000:.1f} ms, flooded {per_step['flooded'] * 1000:.1f} ms "
              f"({per_step['flooded'] / per_step['quiet']:.2f}x) over {len(codes)} requests, {codes.count(0)} cut")
    finally:
        d.stop()


def test_a_port_in_use_is_logged_and_the_daemon_goes_on(tmp_path):
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen()
    port = s.getsockname()[1]
    d = Daemon(tmp_path, web={"enabled": True, "listen": f"127.0.0.1:{port}"})
    d.start()
    try:
        assert "status page: error: cannot listen on" in d.logs()
        d.drop("j", {"content": "hoovertowernight.jpg", "style": "starry_night.jpg"})
        d.wait_landed("j")
    finally:
        d.stop()
        s.close()


@pytest.mark.browser
def test_a_real_browser_shows_the_running_job(page, tmp_path):
    """Headless Chromium (Debian's package) opens the page while a job runs: the job's name is in
    the rendered page, and the picture is drawn where the page puts it."""
    if CHROMIUM is None:
        if os.environ.get("NSTD_REQUIRE_BROWSER"):
            pytest.fail("chromium is not installed (.ci/run installs Debian's chromium package)")
        pytest.skip("chromium is not installed (apt-get install chromium; .ci/run does)")
    d = page
    d.drop("tübingen night", {"content": "hoovertowernight.jpg", "style": "starry_night.jpg"})
    running(d, "tübingen night")
    d.wait(lambda: get(d.url + "preview.jpg")[0] == 200, 30, "a picture")
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={tmp_path / 'chromium'}", "--hide-scrollbars", "--window-size=1000,700"]
    dom = subprocess.run([CHROMIUM, *flags, "--dump-dom", d.url], capture_output=True, text=True, timeout=120).stdout
    assert "tübingen night" in dom and 'id="preview"' in dom
    shot = tmp_path / "page.png"
    subprocess.run([CHROMIUM, *flags, f"--screenshot={shot}", d.url], capture_output=True, timeout=120)
    img = Image.open(shot).convert("RGB")
    # The picture sits at the left under "Running" (CSS: 384 px wide): many colours, not the page's grey.
    region = img.crop((22, 130, 400, 380))
    colours = region.getcolors(maxcolors=1 << 16)  # None: more than 65536, a picture for sure
    assert colours is None or len(colours) > 200, "the preview is not drawn"


def raw_request(url: str, data: bytes) -> bytes:
    import socket
    from urllib.parse import urlparse

    u = urlparse(url)
    with socket.create_connection((u.hostname, u.port), timeout=10) as s:
        s.sendall(data)
        return s.recv(4096)


def test_what_a_hostile_review_found_stays_fixed(page):
    """A name that is not valid UTF-8 (the page rendered a 500), a request body (spooled to disk),
    a foreign Host (DNS rebinding), OPTIONS, `//` (a redirect echoing the Host)."""
    d = page
    bad = os.fsencode(str(d.quarantine)) + b"/bad\xffname"
    os.makedirs(bad)
    with open(bad + b"/error.yaml", "w") as fh:
        fh.write('job: "bad\\udcffname"\nkind: invalid job file\nmessage: "bad\\udcffname.yaml: not valid YAML"\n')
    time.sleep(3.2)  # the listing cache
    status, _, body = get(d.url)
    assert status == 200 and "bad?name" in body.decode()
    assert get(d.url + "status.json")[0] == 200
    reply = raw_request(d.url, b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 100000000\r\n\r\n" + b"0" * 4096)
    assert reply.startswith(b"HTTP/1.1 413")
    port = d.url.rsplit(":", 1)[1].strip("/")
    assert raw_request(d.url, f"GET / HTTP/1.1\r\nHost: evil.example:{port}\r\n\r\n".encode()).startswith(b"HTTP/1.1 421")
    assert raw_request(d.url, f"GET / HTTP/1.1\r\nHost: localhost:{port}\r\n\r\n".encode()).startswith(b"HTTP/1.1 200")
    assert get(d.url, "OPTIONS")[0] == 405
    assert get(d.url + "/files/outbox/x")[0] == 404


def test_a_page_process_that_dies_comes_back_and_its_address_is_updated(tmp_path):
    from nstd.state.folders import Folders
    from nstd.web.launch import StatusPage

    folders = Folders(*(tmp_path / n for n in ("inbox", "outbox", "quarantine", "state", "logs")))
    for f in (folders.outbox, folders.quarantine, folders.state):
        f.mkdir()
    page = StatusPage({"listen": "127.0.0.1:0", "results": 5, "refresh_seconds": 3, "hosts": [], "token": None},
                      folders, tmp_path)
    first = page.start()
    try:
        assert first and get(first + "status.json")[0] == 200
        page.proc.kill()
        page.proc.wait()
        assert page.ensure_alive() == first  # not before the restart delay
        page.next_start = 0
        second = page.ensure_alive()
        assert second and second != first and get(second + "status.json")[0] == 200
    finally:
        page.stop()


def test_the_pages_own_messages_cannot_flood_the_journal():
    """Clients that provoke waitress's "Task queue depth" warning once a request (4411 lines in 3 s
    before) get one line a minute, with the count of the rest."""
    import io
    import logging

    from nstd.web.server import Summarised, quiet_waitress

    now = [0.0]
    out = io.StringIO()
    handler = quiet_waitress(Summarised(out, seconds=60.0, clock=lambda: now[0]))
    try:
        log = logging.getLogger("waitress.queue")
        for i in range(4411):
            now[0] = i * 3 / 4411
            log.warning("Task queue depth is %d", 1)
        assert out.getvalue().count("\n") == 1
        now[0] = 61.0
        log.warning("Task queue depth is %d", 2)
        lines = out.getvalue().splitlines()
        assert len(lines) == 2 and "4410 more from waitress.queue" in lines[1], lines
        logging.getLogger("waitress").warning("client \x1b[2J disconnected")  # another logger: its own line, escaped
        assert len(out.getvalue().splitlines()) == 3 and "\x1b" not in out.getvalue()
    finally:
        logging.getLogger("waitress").handlers.remove(handler)


def test_a_thumbnail_costs_one_small_decode_at_most(tmp_path):
    """A 7000 x 7000 RGBA PNG (a few hundred KiB on disk) dropped as an input took the page from
    37 to 973 MiB per thumbnail request; now its decode cost is read from the header and refused,
    and a picture that is thumbnailed is scaled down before any conversion."""
    Image.new("RGBA", (7000, 7000), (10, 20, 30, 128)).save(tmp_path / "bomb.png")
    Image.new("RGBA", (3000, 3000), (10, 20, 30, 128)).save(tmp_path / "fine.png")
    Image.new("F", (7200, 7200)).save(tmp_path / "float.tif", compression="tiff_adobe_deflate")  # 4 bytes a pixel
    Image.new("RGB", (5000, 5000), (10, 20, 30)).save(tmp_path / "big.jpg")  # decoded at an eighth
    probe = (
        "import resource, sys\n"
        "from nstd.web.app import _Thumbs\n"
        "t = _Thumbs()\n"
        "base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "with open(sys.argv[1], 'rb') as fh:\n"
        "    data = t.get(('outbox', sys.argv[1], 1, 1), fh)\n"
        "print(len(data or b''), (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) // 1024)\n"
    )
    for name, made, most_mib in (("bomb.png", False, 20), ("fine.png", True, 2 * 3000 * 3000 * 4 / 2**20 + 20),
                                 ("float.tif", False, 20), ("big.jpg", True, 40)):
        r = subprocess.run([sys.executable, "-c", probe, str(tmp_path / name)], capture_output=True, text=True,
                           timeout=120, cwd=Path(__file__).resolve().parent.parent)
        size, grew = map(int, r.stdout.split())
        assert (size > 0) == made and grew < most_mib, (name, size, grew, r.stderr)


def test_thumbnails_asked_at_once_keep_the_page_small(tmp_path):
    """Three clients asking for thumbnails of twelve distinct 4000 x 4000 PNGs, over and over:
    the page's process peaks under 160 MiB (before: 286 MiB, each thread's malloc arena keeping a
    decode's worth; its malloc now maps such blocks and gives them back)."""
    import shutil
    import subprocess
    import threading

    d = Daemon(tmp_path, web={"enabled": True, "listen": "127.0.0.1:0"})
    d.start()
    try:
        d.wait(lambda: (d.status() or {}).get("web"), 30, "the page's address")
        url = d.status()["web"]
        first = d.outbox / "t0" / "picture.png"
        first.parent.mkdir()
        Image.linear_gradient("L").resize((4000, 4000)).convert("RGB").save(first)
        for n in range(1, 12):
            (d.outbox / f"t{n}").mkdir()
            shutil.copyfile(first, d.outbox / f"t{n}" / "picture.png")
        pids = subprocess.run(["pgrep", "-f", "nstd.web.server"], capture_output=True, text=True).stdout.split()
        pid = next(p for p in pids if str(d.root) in Path(f"/proc/{p}/environ").read_bytes().decode(errors="replace"))

        def client(k: int) -> None:
            for n in range(24):
                with urllib.request.urlopen(url + f"thumbs/outbox/t{(n + 4 * k) % 12}/picture.png", timeout=60) as r:
                    assert r.status == 200 and r.read(3) == b"\xff\xd8\xff"

        threads = [threading.Thread(target=client, args=(k,)) for k in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(300)
        peak = next(int(line.split()[1]) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
                    if line.startswith("VmHWM:")) / 1024
        print(f"the page's peak RSS: {peak:.0f} MiB")
        assert peak < 160, peak
    finally:
        d.stop()


def test_slow_clients_and_pipeliners_cannot_stop_the_page(page):
    """Ten clients, each pipelining 100 GETs of a 400 KiB outbox file and reading nothing: the
    page still answers /status.json within a second, and each of them is cut off (before: two
    such clients made 4 of 4 probes time out, for as long as they stayed)."""
    import socket

    d = page
    (d.outbox / "big").mkdir()
    (d.outbox / "big" / "big.png").write_bytes(os.urandom(400 * 1024))
    port = int(d.url.rsplit(":", 1)[1].strip("/"))
    ask = f"GET /files/outbox/big/big.png HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode() * 100
    hostile = []
    for _ in range(10):
        s = socket.create_connection(("127.0.0.1", port), timeout=10)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # reads nothing, holds little
        s.sendall(ask)
        hostile.append(s)
    try:
        time.sleep(1.0)
        waits = []
        for _ in range(10):
            t0 = time.monotonic()
            with urllib.request.urlopen(d.url + "status.json", timeout=5) as r:
                assert r.status == 200
            waits.append(time.monotonic() - t0)
            time.sleep(0.2)
        assert max(waits) < 1.0, waits
        time.sleep(7.0)  # past the stall allowed (STALL_SECONDS)
        everything = 100 * 400 * 1024
        for s in hostile:  # each was cut off: a little of what it asked for, then the end
            s.settimeout(10)
            got = 0
            try:
                while True:
                    chunk = s.recv(1 << 20)
                    if not chunk:
                        break
                    got += len(chunk)
            except ConnectionResetError:
                pass
            assert got < everything / 4, got
    finally:
        for s in hostile:
            s.close()


def test_readers_that_stall_are_closed_without_ending_the_page(page):
    """Twenty connections that each ask for a 4 MiB file once and then read nothing: each is
    closed once its answer has waited STALL_SECONDS, and the page goes on answering. Before, the
    close came while waitress listed the sockets to select() on: select() got a closed one,
    EBADF ended the page's process, and nothing answered until the daemon started another."""
    import socket

    d = page
    (d.outbox / "big").mkdir()
    (d.outbox / "big" / "big.png").write_bytes(os.urandom(4 << 20))
    port = int(d.url.rsplit(":", 1)[1].strip("/"))
    sleepers = []
    for _ in range(20):
        s = socket.create_connection(("127.0.0.1", port), timeout=10)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        s.sendall(f"GET /files/outbox/big/big.png HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode())
        sleepers.append(s)
    try:
        end = time.monotonic() + 10.0  # past the stall allowed (STALL_SECONDS), and past the closes
        while time.monotonic() < end:
            with urllib.request.urlopen(d.url + "status.json", timeout=5) as r:
                assert r.status == 200
            time.sleep(0.25)
        assert "ended" not in d.logs()  # "status page: its process ended (...)"
    finally:
        for s in sleepers:
            s.close()


def test_a_page_beyond_the_loopback_answers_its_own_names_and_its_token_only(tmp_path):
    """Bound to every interface: a foreign Host (DNS rebinding) gets 421; the machine's own name
    and web.hosts are answered; with web.token every request needs it (basic auth or Bearer).
    Before: Host: attacker.example got 200 and the job names, results and inputs."""
    import base64
    import socket

    d = Daemon(tmp_path, web={"enabled": True, "listen": "0.0.0.0:0", "hosts": ["nstd.lan"],
                              "token": "s3cret-token-for-the-page"})
    d.start()
    try:
        d.wait(lambda: (d.status() or {}).get("web"), 30, "the page's address")
        url = d.status()["web"].replace("0.0.0.0", "127.0.0.1")
        port = url.rsplit(":", 1)[1].strip("/")

        def ask(host: str, auth: str = "") -> bytes:
            line = f"GET /status.json HTTP/1.1\r\nHost: {host}\r\n" + (f"Authorization: {auth}\r\n" if auth else "")
            return raw_request(url, (line + "Connection: close\r\n\r\n").encode())

        basic = "Basic " + base64.b64encode(b"anyone:s3cret-token-for-the-page").decode()
        assert ask(f"attacker.example:{port}", basic).startswith(b"HTTP/1.1 421")
        assert ask(f"nstd.lan:{port}").startswith(b"HTTP/1.1 401")
        assert ask(f"nstd.lan:{port}", "Basic " + base64.b64encode(b"x:wrong").decode()).startswith(b"HTTP/1.1 401")
        assert ask(f"nstd.lan:{port}", basic).startswith(b"HTTP/1.1 200")
        assert ask(f"{socket.gethostname()}:{port}", "Bearer s3cret-token-for-the-page").startswith(b"HTTP/1.1 200")
        assert ask(f"127.0.0.1:{port}", basic).startswith(b"HTTP/1.1 200")
    finally:
        d.stop()


def test_each_jobs_first_step_is_timed_too():
    """nstd_step_seconds counted n - 1 of a job's n steps: its first has no step before it. The
    engine's time since its optimisation began times it."""
    from nstd.state.live import Live

    live = Live()
    for job in ("a", "b"):
        live.begin(job)
        for step in (1, 2, 3):
            live.step(step, None, None, elapsed=0.25 * step)
        live.end()
    assert live.steps.as_json()["count"] == 6
