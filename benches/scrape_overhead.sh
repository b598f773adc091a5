#!/bin/bash
# Generation throughput with and without /metrics scraped 100 times per second, same server,
# same load, alternating three times (a benchmark: compare medians, the machine is noisy).
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
for round in 1 2 3; do
  for mode in quiet scraped; do
    if [ $mode = scraped ]; then
      python3 - "$port" <<'PY' &
import sys, time, urllib.request
url = f"http://127.0.0.1:{sys.argv[1]}/metrics"
n, t0 = 0, time.time()
while time.time() - t0 < 600:
    start = time.time()
    urllib.request.urlopen(url).read()
    n += 1
    time.sleep(max(0.0, 0.01 - (time.time() - start)))
PY
      scraper=$!
    fi
    echo "$mode: $(python3 "$HERE/stream_load.py" "http://127.0.0.1:$port" smol 8 2 64)"
    [ $mode = scraped ] && kill $scraper
  done
done
kill -TERM $pid; wait $pid
rm -f /tmp/scrape-serve.$$
