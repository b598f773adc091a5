#!/bin/bash
# Generation throughput with and without /metrics scraped 100 times per second (and /health as
# the control), same server,
# same load, alternating ROUNDS times (default 3) (a benchmark: compare medians, the machine is noisy).
# usage: benches/scrape_overhead.sh [--device cpu|xla-cpu]
set -u
BIN=${TPUSERVE_BIN:-$HOME/.cache/tpuserve/target/release/tpuserve}
HERE=$(dirname "$0")
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
"$BIN" serve --port "$port" --served-model-name smol --max-num-seqs 8 "$@" > /tmp/scrape-serve.$$ 2>&1 &
pid=$!
until curl -sf -o /dev/null "localhost:$port/health"; do
  kill -0 $pid 2>/dev/null || { tail -5 /tmp/scrape-serve.$$; exit 1; }
  sleep 0.5
done
python3 "$HERE/stream_load.py" "http://127.0.0.1:$port" smol 8 1 16 > /dev/null  # warm-up
for round in $(seq "${ROUNDS:-3}"); do
  for mode in quiet scraped health; do
    if [ $mode != quiet ]; then
      # `health`: the same client at the same rate on /health, the control for what the
      # scraping activity itself (client process, HTTP, wake-ups) takes from a 2-core machine.
      path=/metrics; [ $mode = health ] && path=/health
      python3 - "$port" "$path" <<'PY' &
import http.client, signal, sys, time
def report(*_):
    print(f"  scraper: {n} scrapes in {time.time() - t0:.1f} s ({n / (time.time() - t0):.0f}/s)", file=sys.stderr)
    sys.exit(0)
signal.signal(signal.SIGTERM, report)
# One kept-alive connection, as Prometheus scrapes.
conn = http.client.HTTPConnection("127.0.0.1", int(sys.argv[1]))
n, t0 = 0, time.time()
while time.time() - t0 < 600:
    start = time.time()
    conn.request("GET", sys.argv[2])
    r = conn.getresponse()
    r.read()
    assert r.status == 200
    n += 1
    time.sleep(max(0.0, 0.01 - (time.time() - start)))
PY
      scraper=$!
    fi
    echo "$mode: $(python3 "$HERE/stream_load.py" "http://127.0.0.1:$port" smol 8 2 64)"
    [ $mode != quiet ] && { kill $scraper; wait $scraper; }
  done
done
kill -TERM $pid; wait $pid
rm -f /tmp/scrape-serve.$$
