"""The benchmarks bench/gpu_check.sh runs on a lent GPU, run tiny on the CPU: a script that broke
would cost minutes of GPU time that cannot be had back. Their figures are not asserted here."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
IMAGES = Path(os.environ.get("NSTD_IMAGES") or REPO.parent / "shared" / "images")


def bench(*args: str, timeout: float = 240) -> str:
    r = subprocess.run([sys.executable, str(REPO / "bench" / args[0]), *args[1:]], capture_output=True, text=True,
                       timeout=timeout, cwd=REPO)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    return r.stdout


def test_daemon_overhead_compares_the_daemon_with_the_bare_engine_on_the_same_jobs():
    out = bench("daemon_overhead.py", "--jobs", "2", "--size", "32", "--steps", "3", "--gif-every", "1")
    assert "| style targets computed | 1 time(s) for 2 jobs |" in out
    ratio = next(x for x in out.splitlines() if x.startswith("| daemon / bare engine, jobs per hour |"))
    assert float(ratio.split("|")[2].split("x")[0]) > 0
    rows = [x for x in out.splitlines() if x.startswith("| job")][:3]
    assert rows[0].endswith("bare engine optimised s |") and all(float(x.split("|")[-2]) > 0 for x in rows[1:])


def test_startup_times_each_process_against_import_torch():
    out = bench("startup.py", "--rounds", "1")
    rows = {x.split("|")[1].strip(): x for x in out.splitlines() if x.startswith("| python") or x.startswith("| nstd")}
    assert len(rows) == 4, out
    assert rows["python -c 'import torch'"].rstrip().endswith("| 1.00x |")
    assert "nstd.engine.stylize" in out or "torch" in out.split("slowest imports")[1]


def test_step_time_runs_on_the_cpu():
    out = bench("step_time.py", "--device", "cpu", "--sizes", "32", "--steps", "3")
    assert "| 32 " in out, out


def test_quality_bench_runs_settings_side_by_side_and_reuses_what_it_made(tmp_path):
    import json

    out = bench("quality.py", "--size", "40", "--pairs", "tubingen-starry", "--out", str(tmp_path),
                "--precision", "fp32", "old:steps=2;grain=0", "default:steps=2", "max:steps=2;pooling=max")
    assert ("| setting | S_held | C_held | colour | moiré | moiré/c | clipped % | E512 | moiré, moiré/c <= max's on every pair |"
            in out)
    made = json.loads((tmp_path / "results.json").read_text())["tubingen-starry"]
    assert set(made) == {"old", "default", "max"} and made["max"]["keys"] == {"steps": 2, "pooling": "max"}
    assert all(0 <= r["s_held"] and 0 <= r["colour"] <= 1 and r["e512"] > 0 for r in made.values())
    for f in ("tubingen-starry.side.jpg", "tubingen-starry.crops.png", "tubingen-starry.old.40.png"):
        assert (tmp_path / f).is_file(), f
    again = bench("quality.py", "--size", "40", "--pairs", "tubingen-starry", "--out", str(tmp_path),
                  "--precision", "fp32", "old:steps=2;grain=0")
    assert json.loads((tmp_path / "results.json").read_text())["tubingen-starry"]["old"] == made["old"]
    assert "| old |" in again


def test_quality_bench_measures_regions(tmp_path):
    import json

    out = bench("quality.py", "--regions", "--size", "48", "--out", str(tmp_path), "--precision", "fp32",
                "default:steps=2")
    assert "| setup | S_held A: masked / alone |" in out and "| kept in the run |" in out, out
    measures = json.loads((tmp_path / "regions.measures.json").read_text())
    assert len(measures["setups"]) == 3 and all(r["a"]["ratio"] > 0 and r["seam"]["masked"] > 0
                                                for r in measures["setups"])
    assert (tmp_path / "regions.jpg").is_file() and (tmp_path / "keep.48.png").is_file()


def test_passes_bench_judges_one_run_along_its_way_and_reads_off_the_passes_to_a_goal(tmp_path):
    import json

    out = bench("passes.py", "--size", "40", "--pairs", "tubingen-starry", "--out", str(tmp_path), "--precision", "fp32",
                "--e512", "0.05", "--every", "3", "--pictures", "--curves", "--figure", "3,4", "ref", "short:steps=4",
                f"painted:steps=4;init={IMAGES / 'starry_night.jpg'}")
    curves = json.loads((tmp_path / "passes.json").read_text())
    ref = next(v for k, v in curves.items() if "|ref|" in k)
    short = next(v for k, v in curves.items() if "|short|" in k)
    assert [p["step"] for p in ref][:3] == [3, 6, 9] and [p["step"] for p in short] == [3, 4]
    assert all(a["e512"] < b["e512"] for a, b in zip(ref, ref[1:])) and all(p["s_held"] > 0 for p in ref)
    assert all(p["moire"] > 0 and 0 <= p["clipped"] <= 1 and p["loss"] > 0 for p in ref)
    assert len(short[-1]["losses"]) == 4 and short[-1]["losses"][-1]["total"] == short[-1]["loss"]
    saved = sorted(x.name for x in (tmp_path / "tubingen-starry" / "short-40-0.05").iterdir())
    assert saved == ["step00003.png", "step00004.png"], saved
    painted = next(v for k, v in curves.items() if "|painted|" in k)  # started from a picture file
    assert painted[0]["c_held"] > short[0]["c_held"], (painted[0], short[0])
    assert (tmp_path / "tubingen-starry.short.crops.png").is_file() and "| 4 | " in out.split("tubingen-starry, short:")[1]
    row = next(x for x in out.splitlines() if x.startswith("| tubingen-starry | ref |"))
    assert row.split("|")[-2].strip() != "-" and row.split("|")[-3].strip() != "-", out  # the reference reaches its own last picture


def test_page_load_prints_a_row_per_count_of_hostile_clients():
    out = bench("page_load.py", "--seconds", "2", "--browsers", "1", "--hostile", "0", "3")
    rows = [x for x in out.splitlines() if x.startswith("| 0 |") or x.startswith("| 3 |")]
    assert len(rows) == 2 and rows[0].split("|")[7].strip() == "1.00x", out
    assert "pipelined=" in rows[1] and "thumbs=" in rows[1], out
