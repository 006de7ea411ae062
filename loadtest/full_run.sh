#!/usr/bin/env bash
# The full benchmark suite behind docs/performance.md. Takes ~15 minutes on 2 cores.
# Each run waits (up to 2 min) for the machine to be idle first; results go to $OUT.
set -u
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=${OUT:-loadtest/results/full}
COMMON=(--spawn --server-cpus 0 --client-cpus 1 --wait-idle 60 --no-progress --out "$OUT")
run() { echo "== $*"; "$PY" -m loadtest run "${COMMON[@]}" "$@" 2>&1 | grep -v -i insecurekey | grep -v _jws; }

# 1. fan-out target: one room, 5,000 viewers, 200 gifts/s (default and a longer batch window)
run -V 5000 -R 1 -G 10 --rate 200 -D 30 --label fanout-5000x200
run -V 5000 -R 1 -G 10 --rate 200 -D 30 --batch-ms 25 --label fanout-5000x200-b25
# 2. ack target: 200 gifters in 50 rooms, 5,000 gifts/s, Redis on the server's core / on its own
run -V 0 -R 50 -G 200 --rate 5000 -D 20 --warm-rooms --label acks-5000
run -V 0 -R 50 -G 200 --rate 5000 -D 20 --warm-rooms --redis-cpus 1 --label acks-5000-redis-core1
# 3. many small rooms (capacity model): 50 rooms x 100 viewers, 5 gifts/s per room
run -V 5000 -R 50 -G 50 --rate 250 -D 20 --warm-rooms --label rooms-50x100
# 4. idle memory at 10,000 connections
run -V 10000 -R 10 -G 1 --rate 1 -D 3 --warm-rooms --label idle-10000
# 5. the comparison
echo "== compare"
"$PY" -m loadtest compare -V 5000 --rate 200 -D 20 --warm-rooms --wait-idle 60 --no-progress \
    --out "$OUT" 2>&1 | grep -v -i insecurekey | grep -v _jws
