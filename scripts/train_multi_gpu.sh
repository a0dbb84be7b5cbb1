#!/usr/bin/env bash
# Run the train stage (python stages/train.py, which reads params.yaml) on several GPUs of this
# machine with `accelerate launch`. Extra arguments go to stages/train.py.
#
#   scripts/train_multi_gpu.sh                   # all visible GPUs, DDP
#   N=4 ACCEL=zero2 scripts/train_multi_gpu.sh   # 4 GPUs, DeepSpeed ZeRO-2
#   N=4 DRY_RUN=1 scripts/train_multi_gpu.sh     # check and print the plan and commands, start nothing
#
# params.yaml's generation section picks the generation engine:
#   use_vllm: true, vllm_mode: colocate   every rank generates its share of the batch with its own vLLM engine
#   use_vllm: true, vllm_mode: server     `trl vllm-serve` on the last of the N GPUs, training on the other N-1;
#                                         the script waits for its /health/ and stops it when it exits (any way)
#   use_vllm: false                       HF generate in every rank
# Environment:
#   N            number of GPUs to use (default: all in CUDA_VISIBLE_DEVICES, else all nvidia-smi -L)
#   ACCEL        ddp (default) | zero2: configs/accelerate/$ACCEL.yaml
#   DRY_RUN      1: stop after the checks, printing what would run
#   VLLM_WAIT_S  seconds to wait for the server to become healthy (default 900)
#   VLLM_LOG     server log file (default build/vllm-serve.log)
# The checks (grpo_gsm8k/launch.py: params, N against the visible GPUs, the mode, the batch split) run before
# anything starts. The server always serves params.yaml's model.name on port 8000: the trainer connects there
# (TRL's default vllm_server_port) and pushes its weights under that model's parameter names.
#
# This runs the stage outside `dvc repro`: afterwards `dvc commit train` records its outputs.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

# MODE CONFIG TRAIN_DEVICES NTRAIN SERVER_GPU MODEL VLLM_PORT; the plan goes to stderr
PLAN="$(python -m grpo_gsm8k.launch)" || exit 2
eval "$PLAN"
LAUNCH=(accelerate launch --config_file "$CONFIG" --num_processes "$NTRAIN" stages/train.py "$@")
SERVE=(trl vllm-serve --model "$MODEL" --port "$VLLM_PORT")
if [ "${DRY_RUN:-0}" = 1 ]; then
    if [ "$MODE" = server ]; then echo "would run: CUDA_VISIBLE_DEVICES=$SERVER_GPU ${SERVE[*]}"; fi
    echo "would run: CUDA_VISIBLE_DEVICES=$TRAIN_DEVICES ${LAUNCH[*]}"
    exit 0
fi

if [ "$MODE" = server ]; then
    VLLM_LOG="${VLLM_LOG:-build/vllm-serve.log}"
    mkdir -p "$(dirname "$VLLM_LOG")"
    echo "== vLLM server: ${SERVE[*]} on GPU $SERVER_GPU (log: $VLLM_LOG)"
    # setsid: the server and its workers get their own process group, so the trap ends them all.
    CUDA_VISIBLE_DEVICES="$SERVER_GPU" setsid "${SERVE[@]}" > "$VLLM_LOG" 2>&1 &
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
fi

echo "== training on GPU(s) $TRAIN_DEVICES with $CONFIG ($NTRAIN processes)"
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
