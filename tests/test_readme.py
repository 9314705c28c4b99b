"""The README's command lines work as typed: each ```sh block (but those marked skip) runs with
`bash -e` in a fresh copy of the checkout, in order, with ../shared beside it as on CI."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from harness import IMAGES

REPO = Path(__file__).resolve().parent.parent
BLOCK = re.compile(r"(<!-- readme-test: skip -->\n)?```sh\n(.*?)```", re.S)


def blocks() -> list[str]:
    return [body for skip, body in BLOCK.findall((REPO / "README.md").read_text()) if not skip]


def test_the_readme_has_blocks_to_run():
    assert len(blocks()) >= 2 and any("nstd validate" in b for b in blocks())


@pytest.fixture
def checkout(tmp_path):
    """What a new user has after `make`: the files, a .venv with nstd, ../shared beside it."""
    work = tmp_path / "main"
    work.mkdir()
    shutil.copy(REPO / "config.yaml", work / "config.yaml")
    venv_bin = Path(sys.executable).parent
    (work / ".venv").mkdir()
    (work / ".venv" / "bin").symlink_to(venv_bin)
    (tmp_path / "shared").mkdir()
    (tmp_path / "shared" / "images").symlink_to(IMAGES.resolve())
    return work


def run(block: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("NSTD_CONFIG", "VIRTUAL_ENV")}
    env["OMP_NUM_THREADS"] = "2"
    return subprocess.run(["bash", "-e", "-c", block], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def test_the_readmes_commands_work_as_typed(checkout):
    """The first job is dropped and validated as the README says, then `nstd run --until-empty`
    (which the README names for a machine without a running daemon) delivers it; the one-picture
    command writes its picture."""
    for block in blocks():
        r = run(block, checkout)
        assert r.returncode == 0, f"{block}\n--- stdout\n{r.stdout}\n--- stderr\n{r.stderr}"
    assert "first.yaml: ok" in run(". .venv/bin/activate && nstd validate var/inbox/first.yaml", checkout).stdout
    r = run(". .venv/bin/activate && nstd run --until-empty", checkout)
    assert r.returncode == 0, r.stderr[-3000:]
    outbox = checkout / "var" / "outbox" / "first"
    assert sorted(p.name for p in outbox.iterdir()) == ["first.gif", "first.png", "inputs", "job.log", "job.yaml",
                                                        "report.json"]
    assert (checkout / "tubingen_starry.png").stat().st_size > 0
    r = run(". .venv/bin/activate && nstd status", checkout)
    assert r.returncode == 1 and "no daemon is running" in r.stdout


def test_make_run_installs_only_what_running_needs():
    """The service's environment (make run, make install in docs/service.md) gets no pytest,
    Celery or Redis client; make test adds the test extra."""
    import subprocess

    def commands(target: str) -> str:
        return subprocess.run(["make", "-n", "-B", target, "VENV=/nonexistent/venv"], cwd=REPO, capture_output=True,
                              text=True, check=True).stdout

    assert "pip install" in commands("run") and "[test]" not in commands("run")
    assert "'.[test]'" in commands("test")
