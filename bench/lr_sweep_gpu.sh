#!/usr/bin/env bash
# Issue 26 on one H200: `bash bench/device.sh start /tmp/b26 bash bench/lr_sweep_gpu.sh /tmp/b26` (the environment,
# in the background), then `bash bench/device.sh wait /tmp/b26` calls until DONE. Writes into $1 (default /tmp/b26).
# RUNS (recipe:seed ..., default the sweep's second half, below) and STEPS (default 30) change what trains; lm-eval
# runs when its wheels were carried (.whl/a, .whl/b), on the base and on the first run's adapter. The next session's
# run: RUNS="defaults:3407 defaults:1" STEPS=60 (the defaults on both seeds at twice the steps, LEARNING.md).
# Qwen2.5-Coder-0.5B-Instruct (the GGUF chunks in /tmp/acc) through the project's own stages on the real GSM8K,
# at the defaults' batch (32 prompts x 8 completions, 512 tokens), the rest of the sweep that 2026-12-04 began
# (bench/results/real_model/lr_sweep: lr 5e-6, 2e-5 and 5e-5 at clip 0.1 and 2e-5 at clip 1.0, seed 3407; lr 5e-5
# won and became the default): params.yaml's defaults on seed 1, lr 1e-5 (clip 0.1) and lr 5e-5 at clip 1.0,
# seed 3407, side by side. What the shared GPU and the device budget force, and nothing else: 30 steps (the cosine
# schedule keeps its shape), micro-batches of 8 x 32 accumulation steps (the same 256 completions a step, one loss
# normalised over the whole batch), a vLLM share of 0.08 each, and lm_eval.tasks: [] (lm-eval's tasks are an
# evaluation beside the project's, measured on their own by `python -m bench lm-eval`; they change nothing trained).
# Evaluation: all 1,319 test problems, greedy; the base's is the first half's (--base-from: the same model, eval
# params and engine; evaluate_base would measure it again in about 1.5 minutes). nvidia-smi's memory and utilisation every 30 s go to $1/gpu.csv.
# Seen on 2026-12-04 (six runs, 20 s staggers): GGUF to bf16 71 s, prepares + base evaluation 3.5 min, four runs
# at 25-33 s a step (13.5-14.1 min of training), 76 s per evaluation engine start; two runs lost their vLLM start
# to the others' memory, which real_model.py now prevents by starting one engine at a time. Budget: about 25
# minutes from the first call; send each polling call (`bash bench/device.sh wait /tmp/b26`) at once: the machine
# goes back 30 s after a call ends. Each `wait` packs $1 as it is (SWEEP_DONE: the sweep's part is complete). Keep the result: copy $1/sweep (summary.json, predictions, logs, curves.png) to
# bench/results/real_model/<name>/, describe it in bench/results/runs.yaml, then `python -m bench report`.
set -u
out=$(mkdir -p "${1:-/tmp/b26}" && cd "${1:-/tmp/b26}" && pwd)
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source bench/device.sh
step() { echo "[session $(date +%T)] $*"; }
[ -f /tmp/coder05/config.json ] || python -m bench real-model build --gguf /tmp/model.gguf \
  --tokenizer /tmp/carry/data/tokenizer --out /tmp/coder05 > "$out/build.log" 2>&1
(while true; do nvidia-smi --query-gpu=timestamp,memory.used,utilization.gpu \
  --format=csv,noheader >> "$out/gpu.csv"; sleep 30; done) &
monitor=$!
trap 'kill $monitor' EXIT  # the GPU log ends with the script
step "real model built: $(ls /tmp/coder05 | tr '\n' ' ')"
runs=(${RUNS:-defaults:1 lr1e-5:3407 lr5e-5-clip1:3407})
python -m bench real-model run --model /tmp/coder05 --data /tmp/carry/data/gsm8k --work /tmp/sweep --out "$out/sweep" \
  --model-label "Qwen/Qwen2.5-Coder-0.5B-Instruct (Q4_K_M GGUF, dequantized to bf16)" \
  --runs "${runs[@]}" --base-from bench/results/real_model/lr_sweep \
  --set train.max_steps="${STEPS:-30}" train.per_device_train_batch_size=8 train.gradient_accumulation_steps=32 \
    generation.vllm_gpu_memory_utilization=0.08 'lm_eval.tasks=[]' > "$out/run.log" 2>&1 &
sweep=$!
# Issue 30 (carry .whl/a and .whl/b: bench/lm_eval_wheels.sh): lm-eval's GSM8K through the evaluate stages, beside
# the project's grader. The base's while the trainings run: its engines start once the last training's has settled
# (its first step) and it ends minutes before the first evaluation starts; its times are measured beside three
# trainings. The first run's adapter's after the sweep, alone on the GPU.
run_name() { echo "${1%:*}-s${1#*:}"; }  # recipe:seed -> real_model.py's recipe-sSEED
if [ -d /tmp/lmsite/lm_eval ]; then
  last="$out/sweep/$(run_name "${runs[-1]}").log"
  until grep -q "^step [0-9]*/" "$last" 2> /dev/null || ! kill -0 $sweep 2> /dev/null; do sleep 5; done
  step "lm-eval on the base"
  python -m bench lm-eval --only base --out "$out/lm_eval" --set generation.vllm_gpu_memory_utilization=0.15 \
    > "$out/lm_eval_base.log" 2>&1
  step "lm-eval on the base: rc $?"
fi
wait $sweep
step "real_model run: rc $?"
python -m bench real-model plot --summary "$out/sweep/summary.json" --png "$out/sweep/curves.png" >> "$out/run.log" 2>&1
touch "$out/SWEEP_DONE"
adapter=/tmp/sweep/$(run_name "${runs[0]}")/models/adapter
if [ -d /tmp/lmsite/lm_eval ] && [ -f "$adapter/adapter_config.json" ]; then
  step "lm-eval on the trained model"
  python -m bench lm-eval --only trained --adapter "$adapter" --out "$out/lm_eval" \
    --set generation.vllm_gpu_memory_utilization=0.3 > "$out/lm_eval_trained.log" 2>&1
  step "lm-eval on the trained model: rc $?"
fi
step "done"
