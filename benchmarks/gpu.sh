#!/usr/bin/env bash
# The feed on a CUDA GPU, in at most 6 minutes: resnet50 in bf16, channels_last, fed from
# ONE local host answering after 200 ms (bench_feed.py --gpu), printed as images/s against
# the model alone (`feed_end_to_end_rate`, target >= 3,000; `feed_over_model`), with the
# pipeline's CPU ms per image by stage and the GIL estimate; then the previews decoded in
# batches on the GPU (nvJPEG) against the CPU path on every core, with their difference
# (`decode_batched_over_cpu`); then bench_decode (the CPU path on 4000x3000 scans).
# Everything printed is also written to benchmarks/results/gpu.txt (not by a dry run).
#
#   bash benchmarks/gpu.sh             # on a machine with a CUDA GPU
#   bash benchmarks/gpu.sh --dry-run   # anywhere: the same steps at 64 images, on the CPU
#
# .venv is reused when the Makefile's install stamp is there, else it is made the way
# the Makefile's install rule makes it. Without PostgreSQL binaries (initdb) and without
# BENCH_DATABASE_URL, the pipeline writes to a SQLite file, and the output says so.
set -euo pipefail
cd "$(dirname "$0")/.."
LIMIT=360
DRY_RUN=""
case "${1:-}" in
    "") ;;
    --dry-run) DRY_RUN="--dry-run" ;;
    *) echo "usage: bash benchmarks/gpu.sh [--dry-run]" >&2; exit 2 ;;
esac

if [ ! -f .venv/.installed ]; then
    test -x .venv/bin/python || python3 -m venv .venv
    .venv/bin/pip install -q torch==2.14.1 torchvision==0.29.1
    .venv/bin/pip install -q -e '.[dev]'
    touch .venv/.installed
fi

if [ -z "$DRY_RUN" ] \
    && ! .venv/bin/python -c 'import sys, torch; sys.exit(not torch.cuda.is_available())'; then
    echo "gpu.sh: torch sees no CUDA GPU on this machine; run make bench (or --dry-run)" >&2
    exit 3
fi

if [ -z "${BENCH_DATABASE_URL:-}" ] && ! command -v initdb >/dev/null \
    && ! compgen -G '/usr/lib/postgresql/*/bin/initdb' >/dev/null; then
    BENCH_DATABASE_URL="sqlite:///$(mktemp -d)/bench.sqlite3"
    export BENCH_DATABASE_URL
    echo "gpu.sh: no PostgreSQL on this machine: the pipeline writes to SQLite instead"
fi

export PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore::DeprecationWarning
mkdir -p benchmarks/results
left=$((LIMIT - SECONDS))
if [ "$left" -lt 120 ]; then
    echo "gpu.sh: setting up took ${SECONDS} s; too little of the ${LIMIT} s is left" >&2
    exit 4
fi
OUTPUT=benchmarks/results/gpu.txt
[ -z "$DRY_RUN" ] || OUTPUT=/dev/null  # a dry run's figures are the CPU's: nothing to keep
{
    status=0
    .venv/bin/python -c 'import torch; print("gpu.sh:", torch.cuda.get_device_name(0)
        if torch.cuda.is_available() else "no GPU (dry run)", "| torch", torch.__version__)'
    timeout "$left" .venv/bin/python benchmarks/bench_feed.py --gpu $DRY_RUN || status=$?
    left=$((LIMIT - SECONDS))
    if [ "$left" -lt 30 ]; then
        echo "gpu.sh: no time left for bench_decode" >&2
        exit 4
    fi
    timeout "$left" .venv/bin/python benchmarks/bench_decode.py ${DRY_RUN:+--quick} || status=$?
    exit "$status"  # 1: a target missed (as a dry run on a CPU always does), 124: out of time
} 2>&1 | tee "$OUTPUT"
