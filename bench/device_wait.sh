#!/usr/bin/env bash
# On the GPU machine: wait up to $2 seconds (default 540) for a background session's $1/DONE, then pack $1 and
# any further paths into $OUT/res.tgz (the device tool returns at most 8 files, 2 folders down), so each device
# call brings back what the session has written so far.
d=$1
limit=${2:-540}
shift 2
while [ ! -f "$d/DONE" ] && [ "$SECONDS" -lt "$limit" ]; do sleep 5; done
tar czf "$OUT/res.tgz" "$d" "$@" 2>/dev/null
[ -f "$d/DONE" ] && echo "DONE" || echo "still running after ${SECONDS}s"
cat "$d/session.log"
for f in "$d"/*.log; do echo "== $f"; grep -v "it/s\]\|s/it\]" "$f" | grep "\[bench\|\[real_model\|Error\|error" | tail -6 | cut -c1-400; done
nvidia-smi --query-gpu=memory.used,utilization.gpu --format=csv,noheader
