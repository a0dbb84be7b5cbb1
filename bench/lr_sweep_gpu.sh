#!/usr/bin/env bash
# Issue 26 on one H200: `bash bench/device.sh start /tmp/b26 bash bench/lr_sweep_gpu.sh /tmp/b26` (the environment,
# in the background), then `bash bench/device.sh wait /tmp/b26` calls until DONE. Writes into $1 (default /tmp/b26).
# Qwen2.5-Coder-0.5B-Instruct (the GGUF chunks in /tmp/acc) through the project's own stages on the real GSM8K.
# RUNS (recipe:seed ..., bench/real_model.py's recipes) and STEPS choose what trains, side by side. The default is
# issue 26's claim: params.yaml as shipped on two seeds, "defaults:1 defaults:3407" (evaluated in that order), 60
# steps. The sweep that chose those defaults (bench/results/real_model/lr_sweep, lr_sweep2) ran RUNS="lr5e-6:3407
# lr2e-5:3407 ..." STEPS=30 with six runs on one GPU, in micro-batches of 8 x 32 accumulation steps (MICRO=8: the
# same 256 completions a step, one loss normalised over the whole batch). What the shared GPU and the device budget
# force, and nothing else:
# train.max_steps (the cosine schedule keeps its shape), a vLLM share of 0.08 each, and lm_eval.tasks: [] (lm-eval's
# tasks are an evaluation beside the project's, measured on their own by `python -m bench lm-eval`; they change
# nothing trained). lm-eval runs when its wheels were carried (.whl/a, .whl/b), on the base and the first run.
# Evaluation: all 1,319 test problems, greedy; the base's is the sweep's (--base-from: the same model, eval
# params and engine; evaluate_base would measure it again in about 1.5 minutes). nvidia-smi's memory and
# utilisation every 30 s go to $1/gpu.csv.
# Seen on 2026-12-04: GGUF to bf16 57-71 s; three runs side by side at micro-batches of 8 took 18.5-19.8 s a step
# (30 steps: 10 minutes of training), 76 s per evaluation engine start. Seen on 2026-12-07 (one H100, the defaults
# as they are here): GGUF to bf16 45 s, two runs at micro-batches of 32 took 9.7-9.8 s a step (60 steps: 10 minutes
# of training), and the whole job 15 minutes (bench/results/real_model/defaults_60steps). Send each polling call
# (`bash bench/device.sh wait /tmp/b26`) at once: the machine goes back 30 s after a call ends. Each `wait` packs
# $1 as it is (SWEEP_DONE: the runs are evaluated). Keep the result: copy $1/sweep (summary.json, predictions,
# logs, curves.png) to bench/results/real_model/<name>/, describe it in bench/results/runs.yaml, then
# `python -m bench report`.
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
runs=(${RUNS:-defaults:1 defaults:3407})
micro=${MICRO:-8}  # completions per micro-batch, the defaults' since 2026-12-07 (32 before); 256 a step either way
python -m bench real-model run --model /tmp/coder05 --data /tmp/carry/data/gsm8k --work /tmp/sweep --out "$out/sweep" \
  --model-label "Qwen/Qwen2.5-Coder-0.5B-Instruct (Q4_K_M GGUF, dequantized to bf16)" \
  --runs "${runs[@]}" --base-from bench/results/real_model/lr_sweep \
  --set train.max_steps="${STEPS:-60}" train.per_device_train_batch_size="$micro" \
    train.gradient_accumulation_steps=$((256 / micro)) \
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
