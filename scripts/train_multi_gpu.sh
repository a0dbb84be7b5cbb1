#!/usr/bin/env bash
# Run the train stage (python stages/train.py, which reads params.yaml) on several GPUs of this
# machine with `accelerate launch`. Extra arguments go to stages/train.py.
#
#   scripts/train_multi_gpu.sh                          # all visible GPUs, DDP
#   N=4 ACCEL=zero2 scripts/train_multi_gpu.sh          # 4 GPUs, DeepSpeed ZeRO-2
#   N=4 VLLM_SERVER=1 scripts/train_multi_gpu.sh        # 3 GPUs train, the 4th serves vLLM
#
# Environment:
#   N            number of GPUs to use (default: all in CUDA_VISIBLE_DEVICES, else all nvidia-smi -L)
#   ACCEL        ddp (default) | zero2: configs/accelerate/$ACCEL.yaml
#   VLLM_SERVER  1: start `trl vllm-serve` on the last of the N GPUs, wait for its /health/, train
#                on the other N-1, and stop the server when this script exits (any way).
#                params.yaml must then say  generation.use_vllm: true  and  generation.vllm_mode:
#                server  (the script checks and stops if not). Without VLLM_SERVER, vllm_mode must
#                not be server (use colocate: vLLM inside each training process).
#   VLLM_WAIT_S  seconds to wait for the server to become healthy (default 900)
#   VLLM_LOG     server log file (default build/vllm-serve.log)
# The server always serves params.yaml's model.name on port 8000: the trainer connects there (TRL's default
# vllm_server_port) and pushes its weights under that model's parameter names.
#
# This runs the stage outside `dvc repro`: afterwards `dvc commit train` records its outputs.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

ACCEL="${ACCEL:-ddp}"
CONFIG="configs/accelerate/${ACCEL}.yaml"
[ -f "$CONFIG" ] || { echo "error: no $CONFIG (ACCEL is ddp or zero2)" >&2; exit 2; }

# The GPUs: CUDA_VISIBLE_DEVICES if set, else every GPU nvidia-smi lists; the first N of them.
if [ -n "${CUDA_VISIBLE_DEVICES:-}" ]; then
    IFS=, read -r -a ALL_GPUS <<<"$CUDA_VISIBLE_DEVICES"
else
    count=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
    [ "${count:-0}" -gt 0 ] || { echo "error: no GPU found (nvidia-smi -L)" >&2; exit 1; }
    mapfile -t ALL_GPUS < <(seq 0 $((count - 1)))
fi
N="${N:-${#ALL_GPUS[@]}}"
if [ "$N" -lt 1 ] || [ "$N" -gt "${#ALL_GPUS[@]}" ]; then
    echo "error: N=$N but ${#ALL_GPUS[@]} GPU(s) visible" >&2; exit 2
fi
GPUS=("${ALL_GPUS[@]:0:$N}")

param() {  # param KEY.PATH [DEFAULT]: a value from params.yaml, or DEFAULT
    python - "$1" "${2:-}" <<'PY'
import sys
from grpo_gsm8k.config import read_yaml  # params read the way DVC reads them (YAML 1.2)
value = read_yaml("params.yaml") or {}
for key in sys.argv[1].split("."):
    value = value.get(key) if isinstance(value, dict) else None
print(sys.argv[2] if value is None else value)
PY
}
use_vllm="$(param generation.use_vllm False)"
vllm_mode="$(param generation.vllm_mode colocate)"

TRAIN_GPUS=("${GPUS[@]}")
if [ "${VLLM_SERVER:-0}" = 1 ]; then
    if [ "$N" -lt 2 ]; then echo "error: VLLM_SERVER=1 needs N >= 2 GPUs" >&2; exit 2; fi
    if [ "$use_vllm" != True ] || [ "$vllm_mode" != server ]; then
        echo "error: VLLM_SERVER=1 but params.yaml has generation.use_vllm=$use_vllm," \
             "generation.vllm_mode=$vllm_mode. Set generation.use_vllm: true and" \
             "generation.vllm_mode: server in params.yaml (or unset VLLM_SERVER)." >&2
        exit 2
    fi
    SERVER_GPU="${GPUS[$((N - 1))]}"
    TRAIN_GPUS=("${GPUS[@]:0:$((N - 1))}")
    MODEL="$(param model.name)"
    VLLM_PORT=8000
    VLLM_LOG="${VLLM_LOG:-build/vllm-serve.log}"
    mkdir -p "$(dirname "$VLLM_LOG")"

    echo "== vLLM server: trl vllm-serve --model $MODEL on GPU $SERVER_GPU, port $VLLM_PORT (log: $VLLM_LOG)"
    # setsid: the server and its workers get their own process group, so the trap ends them all.
    CUDA_VISIBLE_DEVICES="$SERVER_GPU" setsid trl vllm-serve --model "$MODEL" \
        --port "$VLLM_PORT" > "$VLLM_LOG" 2>&1 &
    SERVER_PID=$!
    stop_server() {  # the whole process group: vLLM's workers may outlive the main process
        if kill -0 -- "-$SERVER_PID" 2>/dev/null; then
            echo "== stopping the vLLM server (process group $SERVER_PID)"
            kill -TERM -- "-$SERVER_PID" 2>/dev/null || true
            for _ in $(seq 30); do kill -0 -- "-$SERVER_PID" 2>/dev/null || return 0; sleep 1; done
            kill -KILL -- "-$SERVER_PID" 2>/dev/null || true
        fi
    }
    trap stop_server EXIT
    trap 'exit 130' INT
    trap 'exit 143' TERM

    deadline=$((SECONDS + ${VLLM_WAIT_S:-900}))
    until python -c "import sys, urllib.request as u; u.urlopen(sys.argv[1], timeout=5)" \
            "http://127.0.0.1:${VLLM_PORT}/health" 2>/dev/null; do
        if ! kill -0 "$SERVER_PID" 2>/dev/null; then
            echo "error: the vLLM server exited; last lines of $VLLM_LOG:" >&2
            tail -n 40 "$VLLM_LOG" >&2; exit 1
        fi
        if [ "$SECONDS" -ge "$deadline" ]; then
            echo "error: the vLLM server was not healthy after ${VLLM_WAIT_S:-900}s; see $VLLM_LOG" >&2
            exit 1
        fi
        sleep 5
    done
    echo "== vLLM server healthy"
elif [ "$use_vllm" = True ] && [ "$vllm_mode" = server ]; then
    echo "error: params.yaml has generation.vllm_mode: server but no server is started:" \
         "run with VLLM_SERVER=1, or set generation.vllm_mode: colocate." >&2
    exit 2
fi

NTRAIN=${#TRAIN_GPUS[@]}
TRAIN_DEVICES="$(IFS=,; echo "${TRAIN_GPUS[*]}")"
echo "== training on GPU(s) $TRAIN_DEVICES with $CONFIG ($NTRAIN processes)"
LAUNCH=(accelerate launch --config_file "$CONFIG" --num_processes "$NTRAIN" stages/train.py "$@")
if [ -z "${SERVER_PID:-}" ]; then
    CUDA_VISIBLE_DEVICES="$TRAIN_DEVICES" exec "${LAUNCH[@]}"
fi
# With a server: train in the background and wait, so that a signal to this script is handled at
# once (forwarded to the training, then the EXIT trap stops the server).
CUDA_VISIBLE_DEVICES="$TRAIN_DEVICES" "${LAUNCH[@]}" &
TRAIN_PID=$!
trap 'kill -TERM "$TRAIN_PID" 2>/dev/null || true; wait "$TRAIN_PID" || true; exit 130' INT
trap 'kill -TERM "$TRAIN_PID" 2>/dev/null || true; wait "$TRAIN_PID" || true; exit 143' TERM
rc=0
wait "$TRAIN_PID" || rc=$?
exit "$rc"
