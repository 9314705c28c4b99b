"""journald priorities: with stderr the journal stream (JOURNAL_STREAM = its dev:ino), every line
starts with `<N>`; with stderr anywhere else, lines are as they always were."""
import os
import subprocess
import sys

import pytest

from nstd import logs

LOGGING = {"level": "DEBUG", "json": False, "rotation": "10 MB", "retention": 10}

SCRIPT = f"""
from loguru import logger
from nstd import logs
logs.setup({LOGGING!r}, None)
logger.critical("a critical line")
logger.error("an error line")
logger.warning("a warning line")
logger.success("a success line")
logger.info("an info line")
logger.debug("a debug line")
logger.bind(file_only=True).error("a file-only line")
try:
    1 / 0
except ZeroDivisionError:
    logger.exception("a failure with its traceback")
"""


def run_with_stderr_in(path, journal_stream, script=SCRIPT):
    """Run `script` with stderr redirected to `path` and JOURNAL_STREAM as given (None: unset)."""
    env = {k: v for k, v in os.environ.items() if k != "JOURNAL_STREAM"}
    with open(path, "w") as err:
        if journal_stream == "same":
            st = os.fstat(err.fileno())
            journal_stream = f"{st.st_dev}:{st.st_ino}"
        if journal_stream is not None:
            env["JOURNAL_STREAM"] = journal_stream
        proc = subprocess.run([sys.executable, "-c", script], stderr=err, env=env, timeout=60)
    assert proc.returncode == 0, path.read_text()
    return path.read_text().splitlines()


def line_with(lines, text):
    [line] = [line for line in lines if text in line]
    return line


def test_the_journal_gets_each_lines_priority(tmp_path):
    lines = run_with_stderr_in(tmp_path / "stderr", "same")
    for text, prefix in [("a critical line", "<2>"), ("an error line", "<3>"), ("a warning line", "<4>"),
                         ("a success line", "<5>"), ("an info line", "<6>"), ("a debug line", "<7>")]:
        line = line_with(lines, text)
        assert line.startswith(prefix) and line.count("<") == 1, line
        assert line[len(prefix):len(prefix) + 4].isdigit()  # the usual format follows: the time first
    assert not any("a file-only line" in line for line in lines)
    # journald reads each line as its own entry: a traceback stays at the priority of its record.
    start = lines.index(line_with(lines, "a failure with its traceback"))
    traceback = lines[start:]
    assert any("ZeroDivisionError" in line for line in traceback) and len(traceback) > 3
    assert all(line.startswith("<3>") for line in traceback), traceback


@pytest.mark.parametrize("journal_stream", [None, "other", "not-a-dev-ino"])
def test_stderr_elsewhere_gets_no_prefix(tmp_path, journal_stream):
    if journal_stream == "other":  # a journal stream, but not the file stderr now points to
        other = tmp_path / "other"
        other.write_text("")
        st = os.stat(other)
        journal_stream = f"{st.st_dev}:{st.st_ino}"
    lines = run_with_stderr_in(tmp_path / "stderr", journal_stream)
    assert lines and not any(line.startswith("<") for line in lines), lines
    assert line_with(lines, "an error line").split(" | ")[1].strip() == "ERROR"


def test_journal_prefix(tmp_path):
    script = "from nstd import logs; import sys; print(repr(logs.journal_prefix(3)), file=sys.stderr)"
    assert run_with_stderr_in(tmp_path / "stderr", "same", script) == ["'<3>'"]
    assert run_with_stderr_in(tmp_path / "stderr", None, script) == ["''"]
    assert [logs.syslog_priority(n) for n in (50, 40, 30, 25, 20, 10, 5)] == [2, 3, 4, 5, 6, 7, 7]


def test_the_start_up_refusal_is_an_error_in_the_journal(tmp_path):
    # As run_daemon: loguru's default sink is removed before start, the refusal is the one line.
    script = ("import sys; from loguru import logger; from nstd.daemon.daemon import _refuse_start; "
              "logger.remove(); sys.exit(0 if _refuse_start(ValueError('inbox is missing')) == 2 else 1)")
    assert run_with_stderr_in(tmp_path / "stderr", "same", script) == ["<3>nstd: error: inbox is missing"]
    assert run_with_stderr_in(tmp_path / "stderr", None, script) == ["nstd: error: inbox is missing"]


def test_one_line_escapes_control_characters():
    assert logs.one_line("a\nb\r\x1b[31mc\td\x85é漢") == "a\\nb\\r\\x1b[31mc\td\\x85é漢"
    assert logs.one_line("x\u2028y\u2029z") == "x\\u2028y\\u2029z"


def test_a_job_name_cannot_forge_log_lines(tmp_path):
    """A dropper names a job file with a newline and a fake line after it: every line of the
    daemon's log, its file and the job's job.log is still one record, and the fake one is text
    inside the real line, escaped."""
    import re
    import time

    from harness import Daemon

    forged = "2020-01-01 00:00:00.000 | ERROR   | admin | \x1b[2Jdisk wiped"
    name = f"evil\n{forged}"
    d = Daemon(tmp_path, logging={"level": "DEBUG"})
    d.start()
    try:
        d.drop(name, {"content": "hoovertowernight.jpg", "style": "starry_night.jpg"})
        d.wait(lambda: d.outbox.exists() and len(list(d.outbox.iterdir())) == 1, 90, "the job in the outbox")
        time.sleep(0.5)
    finally:
        d.stop()
    (out,) = d.outbox.iterdir()
    stamp = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3} \| ")
    for where, text in (("stderr", d.logs()), ("nstd.log", (d.root / "logs" / "nstd.log").read_text()),
                        ("job.log", (out / "job.log").read_text())):
        lines = [x for x in text.splitlines() if x and not x.startswith(("Traceback", " "))]
        assert lines and all(stamp.match(x) and not x.startswith("2020-01-01") for x in lines), where
        assert "\x1b" not in text, where
        if where != "job.log":  # job.log's lines do not name their job
            assert "\\n2020-01-01 00:00:00.000 | ERROR   | admin | \\x1b[2Jdisk wiped" in text, where
