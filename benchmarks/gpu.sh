#!/usr/bin/env bash
# The benchmarks that need a GPU, in at most 8 minutes: the one-host feed with resnet50
# on the GPU in bf16, channels_last (bench_feed: end-to-end images/s, `feed_end_to_end_rate`,
# target >= 3,000 on one H200 with 16 cores), the pipeline against the model alone and
# the naive way (bench_e2e, GPU sizes), and preprocessing (bench_decode). Prints the same summary lines as `make bench`; the figures go to
# benchmarks/results/gpu.json, so the CPU run's latest.json is left as it is.
#
#   bash benchmarks/gpu.sh
#
# .venv is reused when the Makefile's install stamp is there, else it is made the way
# the Makefile's install rule makes it. Without PostgreSQL binaries (initdb) and without
# BENCH_DATABASE_URL, the pipeline writes to a SQLite file, and the output says so.
set -euo pipefail
cd "$(dirname "$0")/.."
LIMIT=480

if [ ! -f .venv/.installed ]; then
    test -x .venv/bin/python || python3 -m venv .venv
    .venv/bin/pip install -q torch==2.14.1 torchvision==0.29.1
    .venv/bin/pip install -q -e '.[dev]'
    touch .venv/.installed
fi

if ! .venv/bin/python -c 'import sys, torch; sys.exit(not torch.cuda.is_available())'; then
    echo "gpu.sh: torch sees no CUDA GPU on this machine; run make bench instead" >&2
    exit 3
fi

if [ -z "${BENCH_DATABASE_URL:-}" ] && ! command -v initdb >/dev/null \
    && ! compgen -G '/usr/lib/postgresql/*/bin/initdb' >/dev/null; then
    BENCH_DATABASE_URL="sqlite:///$(mktemp -d)/bench.sqlite3"
    export BENCH_DATABASE_URL
    echo "gpu.sh: no PostgreSQL on this machine: the pipeline writes to SQLite instead"
fi

export PYTHONUNBUFFERED=1
left=$((LIMIT - SECONDS))
if [ "$left" -lt 120 ]; then
    echo "gpu.sh: setting up took ${SECONDS} s; too little of the ${LIMIT} s is left" >&2
    exit 4
fi
exec timeout "$left" .venv/bin/python benchmarks/run_all.py --only feed,e2e,decode \
    --results benchmarks/results/gpu.json
