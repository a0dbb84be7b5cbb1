# bench/device.sh: the GPU machine's side of a benchmark session, one helper for every scenario.
#
#   source bench/device.sh                      the environment: unpacks what earlier device calls carried (vLLM +
#                                               TRL from the chunks in /tmp/vacc, the rest of the stack from
#                                               site.tgz, the real model's GGUF from the chunks in /tmp/acc), copies
#                                               .carry/site.tgz and .carry/data to /tmp/carry, and sets what vLLM
#                                               needs there (FlashInfer is not carried). Each step runs once a machine.
#   bash bench/device.sh start DIR CMD [ARG...] runs CMD in that environment in the background, in a session of its
#                                               own, from the repository root: its output in DIR/session.log, its exit
#                                               status in DIR/DONE once it ends
#   bash bench/device.sh wait DIR [S] [PATH...] waits up to S seconds (default 540) for DIR/DONE, packing DIR and
#                                               the PATHs into $OUT/res.tgz every minute and at the end (the device
#                                               tool returns at most 8 files, 2 folders down), then prints
#                                               DIR/session.log, each log's progress lines and the GPU's memory
#
# Work longer than one device command (10 minutes): one call `start`s it and `wait`s; then send the next `wait` call
# as soon as one returns, until it prints DONE: the machine goes back 30 s after a call ends, and what was not packed
# goes with it. The chunks come from shared/device/make-vllm-site.sh, make-site.sh and real-model.sh (one device call
# each; make-vllm-site.sh writes the archive's sha256 beside its chunks, carried with the first one).
# Start the machine with ONE call first (the first chunk, say) and send the rest only once it has answered: when no
# machine comes, every later call of the same message is refused for 15 s of device time each, and the kind is not
# tried again for about 10 minutes (2026-12-06: 14 of 30 device minutes lost that way, two messages of 15 calls).
# After a failed start, a call naming nvidia-h200 asks for H200s only for 10 minutes; nvidia-h100-x1 asks for H100s.
# A machine can also be taken back during a call (2026-12-07: the one start that came in ten tries went back in
# the third call after it): 22 of 30 device minutes went that way, and nothing was measured. Fit the measurement to
# the budget left after a start: `speed_levers.sh pair`'s two configs took 4.4 minutes on an H100 (the first two
# of train_speed/levers_h100_both_sides), about 6 with the setup calls. 2026-12-07 (a later session): nvidia-h200
# with needs_h200 (speed_levers.sh h200's `levers` at 16 x 16 needs more than 80 GB) failed to start 9 times, one
# every ~11 minutes from 14:13 to 15:49 UTC, 90 s each (13.5 of 30 device minutes), while nvidia-h100-x1 came at the
# first try: take the H100 measurement first, then try for an H200 while the budget still holds a start and the run.
GGUF_SHA=1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32

bench_device_env() {
  local root
  root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
  if [ ! -d /tmp/carry/data ] && [ -d "$root/.carry/data" ]; then
    mkdir -p /tmp/carry && cp -r "$root/.carry/data" /tmp/carry/
    if [ -f "$root/.carry/site.tgz" ]; then cp "$root/.carry/site.tgz" /tmp/carry/; fi
  fi
  if [ ! -d /tmp/vsite/vllm ] && [ -d /tmp/vacc ]; then
    local sha
    sha=$(cat /tmp/vacc/SHA256) || echo "device.sh: carry .carry/vllm/SHA256 with the first vLLM chunk" >&2
    cat /tmp/vacc/part* > /tmp/vsite.tar.xz && echo "$sha  /tmp/vsite.tar.xz" | sha256sum -c - \
      && mkdir -p /tmp/vsite && tar xJf /tmp/vsite.tar.xz -C /tmp/vsite && rm /tmp/vsite.tar.xz
  fi
  if [ ! -d /tmp/site/dvc ] && [ -f /tmp/carry/site.tgz ]; then
    mkdir -p /tmp/site && tar xzf /tmp/carry/site.tgz -C /tmp/site
  fi
  if [ ! -f /tmp/model.gguf ] && [ -d /tmp/acc ]; then
    cat /tmp/acc/part* > /tmp/model.gguf && echo "$GGUF_SHA  /tmp/model.gguf" | sha256sum -c - && rm -rf /tmp/acc
  fi
  if [ ! -d /tmp/lmsite/lm_eval ] && ls /tmp/whl/*.whl > /dev/null 2>&1; then
    # lm-eval and what it imports that the machine lacks (.whl/a and .whl/b: bench/lm_eval_wheels.sh)
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/lmsite /tmp/whl/*.whl
  fi
  export PYTHONPATH=/tmp/vsite:/tmp/site:/tmp/lmsite VLLM_USE_FLASHINFER_SAMPLER=0 VLLM_NO_USAGE_STATS=1 HF_HUB_OFFLINE=1 \
    HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1 DVC_NO_ANALYTICS=1
  export PATH=/tmp/site/bin:$PATH
}

bench_device_wait() {
  local d=$1 limit=${2:-540}
  shift $(($# < 2 ? $# : 2))
  local res=${OUT:-/tmp}/res.tgz packed=$SECONDS
  # packed every minute too: a call cut at its time limit (the session's device time running out) still returns $OUT
  pack() { tar czf "$res.part" "$d" "$@" 2>/dev/null; mv -f "$res.part" "$res"; }
  while [ ! -f "$d/DONE" ] && [ "$SECONDS" -lt "$limit" ]; do
    sleep 5
    if [ $((SECONDS - packed)) -ge 60 ]; then pack "$@"; packed=$SECONDS; fi
  done
  pack "$@"
  if [ -f "$d/DONE" ]; then echo "DONE (exit $(cat "$d/DONE"))"; else echo "still running after ${SECONDS}s"; fi
  cat "$d/session.log" 2>/dev/null
  for f in "$d"/*.log "$d"/*/*.log; do
    [ -f "$f" ] && [ "$f" != "$d/session.log" ] || continue
    echo "== $f"
    grep -v "it/s\]\|s/it\]" "$f" | grep "^\[[a-z_]* [0-9:]*\]\|^step \|Error\|error" | tail -6 | cut -c1-400
  done
  if command -v nvidia-smi > /dev/null; then
    nvidia-smi --query-gpu=memory.used,utilization.gpu --format=csv,noheader
  fi
}

if [ "${BASH_SOURCE[0]}" = "$0" ]; then  # run, not sourced
  set -u
  case ${1:-} in
    start)
      [ $# -ge 3 ] || { echo "usage: bash bench/device.sh start DIR CMD [ARG...]" >&2; exit 2; }
      d=$(mkdir -p "$2" && cd "$2" && pwd)
      shift 2
      rm -f "$d/DONE"
      bench_device_env
      cd "$(dirname "$0")/.."
      setsid nohup bash -c '"${@:2}"; echo $? > "$1/DONE"' _ "$d" "$@" > "$d/session.log" 2>&1 < /dev/null &
      echo "started in the background: $* (output in $d/session.log, exit status in $d/DONE)"
      ;;
    wait)
      [ $# -ge 2 ] || { echo "usage: bash bench/device.sh wait DIR [SECONDS] [PATH...]" >&2; exit 2; }
      shift
      bench_device_wait "$@"
      ;;
    *)
      echo "usage: source bench/device.sh | bash bench/device.sh start DIR CMD [ARG...] | bash bench/device.sh wait DIR [SECONDS] [PATH...]" >&2
      exit 2
      ;;
  esac
else
  bench_device_env
fi
