"""The operator's and the dropper's day, through the real CLI and daemon: one verdict for a job,
a waiting job that says why, retry and cancel, --until-empty, --version, a fast status, hooks."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from harness import Daemon
from nstd.commands.status import describe

REPO = Path(__file__).resolve().parent.parent


def nstd(*args, cwd=None, env=None, timeout=240):
    return subprocess.run([sys.executable, "-m", "nstd.cli", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, env={**os.environ, **(env or {})}, timeout=timeout)


def test_version():
    r = nstd("--version")
    assert r.returncode == 0 and r.stdout.startswith("nstd 0.")


# ------------------------------------------------------------------ one verdict


def test_validate_and_the_daemon_give_one_verdict(tmp_path):
    """An unknown key and a missing image: validate lists both at once, with the closest key; the
    daemon (missing_timeout far away) judges the job as soon as it settles, with the same words."""
    d = Daemon(tmp_path, watch={"missing_timeout": 600})
    d.start()
    try:
        d.image("tubingen.jpg")
        d.drop("typo", {"content": "tubingen.jpg", "style": "nowhere.jpg", "stpes": 3, "size": 5}, images=False)
        r = nstd("validate", d.inbox / "typo.yaml", "--config", d.config)
        assert r.returncode == 2
        assert r.stdout.splitlines() == [
            "typo.yaml: invalid job file",
            "  stpes: unknown key (did you mean 'steps'?)",
            "  size: expected an integer from 32 to 8192, got 5",
            "  not found: nowhere.jpg",
        ]
        d.wait_quarantined("typo", timeout=30)
        error = d.error("typo")
        assert error["kind"] == "invalid job file"
        assert error["message"] == "; ".join(line.strip() for line in r.stdout.splitlines()[1:])
    finally:
        d.stop()


def test_validate_reads_the_config_the_daemon_reads(tmp_path):
    """No --config: $NSTD_CONFIG, then ./config.yaml; the config's defaults decide the verdict."""
    (tmp_path / "img").mkdir()
    job = tmp_path / "img" / "j.yaml"
    for name in ("c.png", "s.png"):
        from PIL import Image

        Image.new("RGB", (40, 30)).save(tmp_path / "img" / name)
    job.write_text("content: c.png\nstyle: s.png\n")
    (tmp_path / "config.yaml").write_text("defaults: {steps: 7}\n")
    strict = tmp_path / "strict.yaml"
    strict.write_text("limits: {max_pixels: 100}\n")
    r = nstd("validate", job, cwd=tmp_path)
    assert r.returncode == 0 and "steps 7," in r.stdout
    r = nstd("validate", job, cwd=tmp_path, env={"NSTD_CONFIG": str(strict)})
    assert r.returncode == 2 and "bad image" in r.stdout and "1,200 pixels" in r.stdout.replace("1200", "1,200")
    r = nstd("validate", job, cwd=tmp_path / "img")  # no config anywhere: the built-in defaults
    assert r.returncode == 0 and "steps 300," in r.stdout


def test_commands_that_need_the_daemons_config_say_where_they_looked(tmp_path):
    r = nstd("status", cwd=tmp_path)
    assert r.returncode == 2
    assert "no config file" in r.stderr and "--config" in r.stderr and "/etc/nstd/config.yaml" in r.stderr
    r = nstd("status", "--config", "nope.yaml", cwd=tmp_path)
    assert r.returncode == 2 and "nope.yaml: cannot be read" in r.stderr and "full path" in r.stderr


def test_find_config_order(tmp_path, monkeypatch):
    from nstd import config

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("NSTD_CONFIG", raising=False)
    system = tmp_path / "etc-nstd.yaml"
    monkeypatch.setattr(config, "SYSTEM_CONFIG", system)
    assert config.find_config(None, required=False) is None
    system.write_text("{}")
    assert config.find_config(None, required=True) == system
    (tmp_path / "config.yaml").write_text("{}")
    assert config.find_config(None, required=True) == Path("config.yaml")
    monkeypatch.setenv("NSTD_CONFIG", "/x/env.yaml")
    assert config.find_config(None, required=True) == Path("/x/env.yaml")
    assert config.find_config("given.yaml", required=True) == Path("given.yaml")


def test_yaml_syntax_errors_and_option_names_read_as_sentences(tmp_path):
    (tmp_path / "config.yaml").write_text("watch:\n  settle_seconds: [1,\n")
    r = nstd("status", cwd=tmp_path)
    assert r.returncode == 2 and len(r.stderr.splitlines()) == 1
    assert "not valid YAML: line 3, column 1:" in r.stderr


# ------------------------------------------------------------------ a waiting job says why


def test_a_waiting_job_says_what_it_waits_for(tmp_path):
    d = Daemon(tmp_path, watch={"missing_timeout": 600, "settle_seconds": 0.3})
    d.start()
    try:
        d.drop("late", {"content": "hoovertowernight.jpg", "style": "later.jpg"}, style="")
        d.wait(lambda: "late.yaml: waiting for later.jpg" in d.logs(), 20, "the waiting line")
        assert d.logs().count("waiting for later.jpg") == 1  # said once, not every tick
        d.wait(lambda: (d.status() or {}).get("waiting"), 10, "status to list it")
        r = nstd("status", "--config", d.config)
        assert r.returncode == 0, r.stderr
        assert "waiting in inbox: 1" in r.stdout
        line = next(x for x in r.stdout.splitlines() if "late.yaml" in x)
        assert "waiting for later.jpg" in line and "quarantined as missing input in" in line and "min" in line
        d.image("starry_night.jpg", "later.jpg")
        d.wait_landed("late", timeout=60)
    finally:
        d.stop()


# ------------------------------------------------------------------ retry


def test_retry_puts_a_quarantined_job_back_with_new_keys(tmp_path):
    """A job quarantined for a bad key, retried with the key fixed: it lands; error.yaml and
    job.log stay aside and never become jobs; nothing is lost."""
    d = Daemon(tmp_path)
    d.start()
    try:
        d.drop("bad", {"content": "hoovertowernight.jpg", "style": "starry_night.jpg", "steps": 0})
        d.wait_quarantined("bad", timeout=30)
        r = nstd("retry", "bad", "steps=3", "size=40", "--config", d.config)
        assert r.returncode == 0, r.stderr
        assert "as bad.yaml" in r.stdout
        d.wait_landed("bad", timeout=60)
        d.wait_state_clean()
        job = yaml.safe_load((d.outbox / "bad" / "job.yaml").read_text())
        assert job["steps"] == 3 and job["size"] == 40
        kept = [p for p in d.quarantine.iterdir() if p.name.startswith("bad.retried-")]
        assert len(kept) == 1
        assert sorted(p.name for p in kept[0].iterdir()) == ["bad.yaml", "error.yaml", "job.log", "retried.yaml"]
        assert "steps: 0" in (kept[0] / "bad.yaml").read_text()  # the job file as dropped, kept
        assert not (d.quarantine / "error").exists() and not (d.outbox / "error").exists()
        assert sorted(os.listdir(d.inbox)) == []
        r = nstd("retry", "bad", "--config", d.config)  # it is not in quarantine any more
        assert r.returncode == 4 and "no quarantined job 'bad'" in r.stderr
    finally:
        d.stop()


def test_retry_without_a_daemon_and_a_refused_override(tmp_path):
    """No daemon runs: retry still puts the job back (the next start takes it). An override that
    would make the job invalid moves nothing. Inputs named from a sub-folder come back to the top."""
    d = Daemon(tmp_path, watch={"missing_timeout": 1.0})
    d.start()
    (d.inbox / "photos").mkdir(parents=True, exist_ok=True)
    try:
        d.image("tubingen.jpg", folder=d.inbox / "photos")
        d.drop("sub", {"content": "photos/tubingen.jpg", "style": "missing.jpg"}, images=False)
        d.wait_quarantined("sub", timeout=30)
    finally:
        d.stop()
    assert d.error("sub")["files"] == {"sub.yaml": "sub.yaml", "tubingen.jpg": "photos/tubingen.jpg"}
    before = sorted(os.listdir(d.quarantine / "sub"))
    r = nstd("retry", "sub", "stpes=3", "--config", d.config)
    assert r.returncode == 2 and "did you mean 'steps'" in r.stderr
    assert sorted(os.listdir(d.quarantine / "sub")) == before and sorted(os.listdir(d.inbox)) == ["photos"]
    d.image("starry_night.jpg", "missing.jpg", folder=d.quarantine / "sub")  # the operator supplies it
    r = nstd("retry", "sub", "--config", d.config)
    assert r.returncode == 0, r.stderr
    new = yaml.safe_load((d.inbox / "sub.yaml").read_text())
    assert new["content"] == "tubingen.jpg" and new["style"] == "missing.jpg"
    d.start()
    try:
        d.wait_landed("sub", timeout=60)
    finally:
        d.stop()


def test_retry_refuses_what_is_not_a_quarantined_job(tmp_path):
    d = Daemon(tmp_path)
    (d.quarantine).mkdir(parents=True)
    (tmp_path / "elsewhere").mkdir()
    (d.quarantine / "link").symlink_to(tmp_path / "elsewhere")
    for name, why in (("../var", "give the name of a folder"), ("link", "not a quarantined job"),
                      ("nope", "no quarantined job")):
        r = nstd("retry", name, "--config", d.config)
        assert r.returncode == 4 and why in r.stderr, (name, r.stderr)


# ------------------------------------------------------------------ cancel


def test_cancel_a_running_and_a_queued_job(tmp_path):
    d = Daemon(tmp_path, defaults={"size": 64, "steps": 100000, "gif": False}, limits={"max_steps": 100000})
    d.start()
    try:
        d.drop("long", {"content": "hoovertowernight.jpg", "style": "starry_night.jpg"})
        d.wait(lambda: ((d.status() or {}).get("running") or {}).get("step", 0) >= 1, 60, "the long job to run")
        d.drop("next", {"content": "hoovertowernight.jpg", "style": "starry_night.jpg"})
        d.wait(lambda: "next" in ((d.status() or {}).get("queue") or []), 30, "the next job to queue")
        r = nstd("cancel", "next", "--config", d.config)
        assert r.returncode == 0 and "cancelled next" in r.stdout, r.stderr
        assert d.error("next")["kind"] == "cancelled" and d.error("next")["stage"] == "queue"
        r = nstd("cancel", "long", "--config", d.config)
        assert r.returncode == 0 and "cancelled long" in r.stdout, r.stderr
        error = d.error("long")
        assert error["kind"] == "cancelled" and error["stage"] == "run" and "at step" in error["message"]
        assert sorted(p.name for p in (d.quarantine / "long").iterdir()) == [
            "error.yaml", "hoovertowernight.jpg", "job.log", "long.yaml", "starry_night.jpg"]
        r = nstd("cancel", "ghost", "--config", d.config)
        assert r.returncode == 4 and "no queued or running job is called 'ghost'" in r.stderr
        assert d.alive()
    finally:
        d.stop()
    assert d.audit() == []


def test_cancel_without_a_daemon_and_status_shows_what_waits_to_resume(tmp_path):
    """A job a stop left in state: status names it, and `nstd cancel` with no daemon ends it the
    way the daemon would (one path, Outcomes): error.yaml, and its hook runs."""
    said = tmp_path / "hook.txt"
    d = Daemon(tmp_path, defaults={"size": 64, "steps": 100000, "gif": False}, limits={"max_steps": 100000},
               service={"shutdown_grace_seconds": 0, "checkpoint_every": 1},
               hooks={"on_failed": f"sh -c 'echo \"$NSTD_JOB $NSTD_ERROR_KIND\" >> {said}'"})
    d.start()
    d.drop("halted", {"content": "hoovertowernight.jpg", "style": "starry_night.jpg"})
    d.wait(lambda: ((d.status() or {}).get("running") or {}).get("step", 0) >= 2, 60, "the job to run")
    d.stop()
    r = nstd("status", "--config", d.config)
    assert r.returncode == 1
    assert "waiting to resume at the next start: halted (from its checkpoint)" in r.stdout
    r = nstd("cancel", "halted", "--config", d.config)
    assert r.returncode == 0 and "cancelled halted" in r.stdout, r.stderr
    assert d.error("halted")["kind"] == "cancelled"
    assert said.read_text() == "halted cancelled\n"
    logged = (d.root / "logs" / "nstd.log").read_text()  # as the daemon's own cancel is
    assert r.stderr == "" and "cancelled with nstd cancel while no daemon ran" in logged
    assert os.listdir(d.state / "jobs") == []
    assert "waiting to resume" not in nstd("status", "--config", d.config).stdout


# ------------------------------------------------------------------ --until-empty


def test_run_until_empty_processes_the_inbox_and_exits(tmp_path):
    d = Daemon(tmp_path, watch={"missing_timeout": 600})
    (d.inbox).mkdir(parents=True)
    d.drop("one", {"content": "hoovertowernight.jpg", "style": "starry_night.jpg"})
    d.drop("two", {"content": "hoovertowernight.jpg", "style": "starry_night.jpg", "size": 40})
    d.drop("broken", "steps: [", images=False)
    d.drop("later", {"content": "hoovertowernight.jpg", "style": "not-yet.jpg"}, images=False)
    r = subprocess.run([sys.executable, "-m", "nstd.cli", "run", "--until-empty", "--config", str(d.config)],
                       capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stderr[-3000:]
    assert d.landed("one") and d.landed("two") and d.quarantined("broken")
    assert (d.inbox / "later.yaml").exists()  # waits for its input: left for the next run
    assert "exiting (--until-empty)" in r.stderr


# ------------------------------------------------------------------ status


def test_status_imports_no_torch(tmp_path):
    code = ("import sys; from nstd.cli import main; rc = main(['status', '--config', sys.argv[1]]); "
            "print('torch' in sys.modules)")
    (tmp_path / "config.yaml").write_text(f"paths: {{root: {tmp_path / 'var'}}}\n")
    r = subprocess.run([sys.executable, "-c", code, str(tmp_path / "config.yaml")], capture_output=True, text=True)
    assert r.stdout.strip().endswith("False"), r.stdout + r.stderr


def test_status_tells_a_stalled_daemon_and_since_when_it_counts():
    now = time.time()
    data = {"pid": os.getpid(), "state": "running", "started_at": now - 3600, "updated_at": now - 1,
            "running": {"name": "j", "step": 3, "steps": 10, "eta_seconds": 20, "device": "cpu"},
            "worker_heartbeat_at": now - 1, "queue": [], "waiting": [], "done": 4, "failed": 1}
    text, alive = describe(data, now=now)
    assert alive and "nstd is running" in text and "up 60 min" in text
    assert "done: 4, failed: 1, cancelled: 0 (since this daemon started" in text
    text, alive = describe({**data, "updated_at": now - 90}, now=now)
    assert alive and "NOT RESPONDING" in text and "SIGSTOP" in text
    text, _ = describe({**data, "worker_heartbeat_at": now - 900}, now=now)
    assert "has not finished a step for 15 min" in text


def test_a_stopped_daemon_shows_as_not_responding(tmp_path, monkeypatch):
    """SIGSTOP: the pid lives, the status file ages; `nstd status` says so (the age is faked
    forward rather than waited for)."""
    import nstd.commands.status as status_mod  # describe() reads STALE_SECONDS from there

    d = Daemon(tmp_path)
    d.start()
    try:
        os.kill(d.proc.pid, signal.SIGSTOP)
        monkeypatch.setattr(status_mod, "STALE_SECONDS", 1.0)
        time.sleep(2.5)
        text, alive = describe(status_mod.read_status(d.state))
        assert alive and "NOT RESPONDING" in text
    finally:
        os.kill(d.proc.pid, signal.SIGCONT)
        d.stop()


# ------------------------------------------------------------------ hooks


def test_hooks_run_with_the_job_in_their_environment(tmp_path):
    out = tmp_path / "hooks.jsonl"
    script = tmp_path / "hook.py"
    script.write_text("import json, os, sys\n"
                      f"open({str(out)!r}, 'a').write(json.dumps({{k: v for k, v in os.environ.items() "
                      "if k.startswith('NSTD_')}) + '\\n')\n"
                      "sys.exit(3 if os.environ['NSTD_EVENT'] == 'failed' else 0)\n")
    hang = tmp_path / "hang.sh"
    hang.write_text("#!/bin/sh\nsleep 60\n")
    hang.chmod(0o755)
    d = Daemon(tmp_path, hooks={"on_done": f"{sys.executable} {script}", "on_failed": f"{sys.executable} {script}",
                                "timeout_seconds": 2})
    d.start()
    try:
        d.drop("good; rm -rf $HOME", {"content": "hoovertowernight.jpg", "style": "starry_night.jpg"})
        d.drop("bad", "steps: [", images=False)
        d.wait(lambda: out.exists() and len(out.read_text().splitlines()) == 2, 90, "two hook runs")
        runs = {r["NSTD_EVENT"]: r for r in map(json.loads, out.read_text().splitlines())}
        assert runs["done"]["NSTD_JOB"] == "good; rm -rf $HOME"
        assert Path(runs["done"]["NSTD_RESULT"]).is_file() and Path(runs["done"]["NSTD_JOB_DIR"]).is_dir()
        assert runs["failed"]["NSTD_ERROR_KIND"] == "invalid job file" and runs["failed"]["NSTD_JOB"] == "bad"
        d.wait(lambda: "exited with 3" in d.logs(), 10, "the failed hook's line")
        d.write_config(hooks={"on_done": str(hang), "on_failed": "/nonexistent/hook"})
        d.proc.send_signal(signal.SIGHUP)
        d.wait(lambda: "configuration reloaded" in d.logs(), 10, "the reload")
        d.drop("again", {"content": "hoovertowernight.jpg", "style": "starry_night.jpg"})
        d.drop("bad2", "steps: [", images=False)
        d.wait(lambda: "still running after 2 s (hooks.timeout_seconds); killed" in d.logs(), 60, "the hang killed")
        d.wait(lambda: "cannot run '/nonexistent/hook'" in d.logs(), 30, "the missing hook")
        assert d.alive() and d.landed("again") and d.quarantined("bad2")
    finally:
        d.stop()


def test_until_empty_leaves_a_job_file_that_never_settles(tmp_path):
    """A job file rewritten without end: --until-empty gives up on it after missing_timeout,
    says so, and exits; a cancel request nobody can remove is acted on once, not every tick."""
    d = Daemon(tmp_path, watch={"missing_timeout": 3.0})
    (d.inbox).mkdir(parents=True)
    d.image("tubingen.jpg")
    (d.state / "cancel" / "abc").mkdir(parents=True)  # a request that cannot be unlinked
    stop = time.monotonic() + 60
    proc = subprocess.Popen([sys.executable, "-m", "nstd.cli", "run", "--until-empty", "--config", str(d.config)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    n = 0
    while proc.poll() is None and time.monotonic() < stop:
        n += 1
        (d.inbox / "busy.yaml").write_text(f"content: tubingen.jpg\nstyle: tubingen.jpg\nsteps: {n % 5 + 1}\n")
        time.sleep(0.1)
    out = proc.communicate(timeout=30)[0] if proc.poll() is not None else (proc.kill() or "killed")
    assert proc.returncode == 0, out[-3000:]
    assert "busy.yaml: its files are still changing after 3 s; left in the inbox" in out
    assert out.count("cannot remove the cancel request") == 1


def test_scripts_get_json_and_exit_codes_that_mean_something(tmp_path, images_dir):
    """status: 0 running, 1 none, 5 a daemon that holds the root but does not answer; validate:
    verdicts on stdout, --json a list; cancel: 6 while only asked, 0 once done, --json; retry --json."""
    import json

    from nstd.state.lock import RootLock

    d = Daemon(tmp_path, defaults={"size": 64, "steps": 100000, "gif": False}, limits={"max_steps": 100000},
               service={"shutdown_grace_seconds": 0})
    d.write_config()
    d.state.mkdir(parents=True, exist_ok=True)
    lock = RootLock(d.state)  # a daemon that holds the root, and whose status is 90 s old
    try:
        now = time.time()
        (d.state / "status.json").write_text(json.dumps({"pid": os.getpid(), "state": "running", "started_at": now - 600,
                                                         "updated_at": now - 90, "queue": [], "waiting": [],
                                                         "done": 0, "failed": 0}))
        r = nstd("status", "--config", d.config)
        assert r.returncode == 5 and "NOT RESPONDING" in r.stdout, (r.returncode, r.stdout)
        r = nstd("status", "--json", "--config", d.config)
        assert r.returncode == 5 and json.loads(r.stdout)["responding"] is False
    finally:
        lock.release()
    os.unlink(d.state / "status.json")
    d.start()
    try:
        d.image("tubingen.jpg")
        d.drop("typo", {"content": "tubingen.jpg", "style": "nowhere.jpg", "stpes": 3}, images=False)
        (tmp_path / "ok.yaml").write_text("content: t.jpg\nstyle: t.jpg\nsize: 64\nsteps: 300\nstages: 2\n")
        shutil.copy(images_dir / "tubingen.jpg", tmp_path / "t.jpg")
        r = nstd("validate", tmp_path / "ok.yaml", d.inbox / "typo.yaml", "--json", "--config", d.config)
        verdicts = json.loads(r.stdout)
        assert r.returncode == 2 and r.stderr == "" and [v["ok"] for v in verdicts] == [True, False]
        assert verdicts[0]["stages"] == [{"size": 32, "steps": 300}, {"size": 64, "steps": 150}], verdicts[0]["stages"]
        assert verdicts[1]["kind"] == "invalid job file" and any("stpes" in p for p in verdicts[1]["problems"])
        r = nstd("validate", tmp_path / "ok.yaml", "--config", d.config)
        assert "stages   32 px x 300, 64 px x 150 (450 steps in all)" in r.stdout
        d.wait_quarantined("typo")  # error.yaml as people read it: no doubled quotes (''steps'')
        raw = (d.quarantine / "typo" / "error.yaml").read_text()
        assert "did you mean 'steps'?" in raw and "''" not in raw, raw
        d.drop("long", {"content": "hoovertowernight.jpg", "style": "starry_night.jpg"})
        d.wait(lambda: ((d.status() or {}).get("running") or {}).get("step", 0) >= 1, 60, "the long job to run")
        assert nstd("status", "--config", d.config).returncode == 0
        r = nstd("cancel", "long", "--wait", "0", "--json", "--config", d.config)
        said = json.loads(r.stdout)
        assert r.returncode == 6 and said["outcome"] == "asked" and said["job"] == "long", r.stdout
        d.wait_quarantined("long", timeout=30)
        r = nstd("retry", "long", "steps=2", "--json", "--config", d.config)
        done = json.loads(r.stdout)
        assert r.returncode == 0 and done["sidecar"] == "long.yaml" and done["waits_for"] == [], r.stdout
        d.wait_landed("long", timeout=60)
    finally:
        d.stop()


def test_a_job_waiting_for_an_input_says_so_in_the_inbox_and_can_be_cancelled_there(tmp_path):
    """NAME.waiting.txt appears beside a job file that waits for an input and goes when the job
    is taken; a user's own file of that name, or a link planted there, is never written through
    or removed. `nstd cancel` takes a job still waiting in the inbox (before: exit 4)."""
    import json

    d = Daemon(tmp_path, watch={"settle_seconds": 0.3, "missing_timeout": 600})
    d.start()
    outside = tmp_path / "outside.txt"
    outside.write_text("not yours")
    try:
        d.image("starry_night.jpg")
        d.drop("late", {"content": "late.jpg", "style": "starry_night.jpg", "steps": 2}, images=False)
        note = d.inbox / "late.waiting.txt"
        d.wait(note.exists, 20, "the note beside late.yaml")
        text = note.read_text()
        assert text.startswith("nstd: late.yaml waits for late.jpg") and "missing input" in text, text
        d.image("hoovertowernight.jpg", as_name="late.jpg")
        d.wait_landed("late")
        d.wait(lambda: not note.exists(), 10, "the note to go")
        # Someone else's file, and a link, under the names a note would take: left alone.
        (d.inbox / "mine.waiting.txt").write_text("my own notes")
        os.symlink(outside, d.inbox / "linked.waiting.txt")
        d.image("starry_night.jpg")  # the first job took its copy to the outbox
        d.drop("mine", {"content": "nowhere.jpg", "style": "starry_night.jpg", "steps": 2}, images=False)
        d.drop("linked", {"content": "nowhere.jpg", "style": "starry_night.jpg", "steps": 2}, images=False)
        d.wait(lambda: {"mine.yaml", "linked.yaml"} <= {w["job"] for w in (d.status() or {}).get("waiting", [])}
               and "late" not in str(d.status().get("waiting")), 20, "both to wait")
        time.sleep(1.5)
        assert (d.inbox / "mine.waiting.txt").read_text() == "my own notes" and outside.read_text() == "not yours"
        r = nstd("cancel", "mine", "--json", "--config", d.config)
        said = json.loads(r.stdout)
        assert r.returncode == 0 and said["outcome"] == "cancelled", (r.stdout, r.stderr)
        assert d.error("mine")["kind"] == "cancelled" and "waited in the inbox" in d.error("mine")["message"]
        assert not (d.inbox / "mine.yaml").exists() and (d.inbox / "mine.waiting.txt").read_text() == "my own notes"
        assert "starry_night.jpg" in os.listdir(d.inbox)  # linked.yaml still names it: it stays
    finally:
        d.stop()
    assert os.path.islink(d.inbox / "linked.waiting.txt") and outside.read_text() == "not yours"


def test_a_cancel_for_a_job_in_the_inbox_without_a_daemon_is_done_at_the_next_start(tmp_path):
    d = Daemon(tmp_path)
    d.write_config()
    for folder in (d.inbox, d.state):
        folder.mkdir(parents=True, exist_ok=True)
    d.drop("early", {"content": "hoovertowernight.jpg", "style": "starry_night.jpg", "steps": 2})
    r = nstd("cancel", "early", "--config", d.config)
    assert r.returncode == 6 and "no daemon is running: it is cancelled when one starts" in r.stdout, (r.stdout, r.stderr)
    d.start()
    try:
        d.wait_quarantined("early", timeout=30)
        assert d.error("early")["kind"] == "cancelled" and not (d.outbox / "early").exists()
        assert sorted(os.listdir(d.quarantine / "early")) == ["early.yaml", "error.yaml", "hoovertowernight.jpg",
                                                               "job.log", "starry_night.jpg"]
    finally:
        d.stop()
    assert d.audit() == []


def test_retry_checks_the_images_with_the_new_keys_before_anything_moves(tmp_path):
    """A retry whose images the intake would refuse at once (one that no longer decodes, one too
    thin for the network at the new size) is refused by the command, naming why; nothing moves."""
    from PIL import Image

    d = Daemon(tmp_path)
    d.start()
    try:
        d.drop("thin", {"content": "hoovertowernight.jpg", "style": "starry_night.jpg", "steps": 0})
        d.wait_quarantined("thin", timeout=30)
        before = sorted(os.listdir(d.quarantine / "thin"))
        Image.new("RGB", (2000, 8), (90, 120, 200)).save(d.quarantine / "thin" / "hoovertowernight.jpg", "JPEG")
        r = nstd("retry", "thin", "steps=3", "size=64", "--config", d.config)
        assert r.returncode == 2 and "would be refused" in r.stderr and "2000x8" in r.stderr, r.stderr
        (d.quarantine / "thin" / "starry_night.jpg").write_bytes(b"not a picture any more")
        r = nstd("retry", "thin", "steps=3", "--config", d.config)
        assert r.returncode == 2 and "starry_night.jpg" in r.stderr and "would be refused" in r.stderr, r.stderr
        assert sorted(os.listdir(d.quarantine / "thin")) == before and not any(d.inbox.iterdir())
    finally:
        d.stop()
