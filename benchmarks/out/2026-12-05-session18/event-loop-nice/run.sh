#!/bin/bash
# The event-loop (main) thread of a running inferd at nice 0 vs nice 10, alternating, 32 streams.
cd /work/main
PORT=18123
.venv/bin/inferd serve --model smollm2-135m-instruct --host 127.0.0.1 --port $PORT --log-level warning --dtype auto > /tmp/nice-server.log 2>&1 &
PID=$!
for i in $(seq 1 60); do sleep 1; curl -sf localhost:$PORT/ready >/dev/null && break; done
echo "server $PID ready after $i s"
ps -T -p $PID -o tid,ni,comm | head -20
for i in 1 2 3; do
  for n in 0 10; do
    renice -n $n -p $PID > /dev/null
    .venv/bin/python benchmarks/llm_bench.py --url http://127.0.0.1:$PORT --peers none --levels 32 --dtype auto \
       --json benchmarks/out/2026-12-05-session18/event-loop-nice/nice$n-run$i.json 2>&1 | grep "c=32:"
  done
done
kill $PID
