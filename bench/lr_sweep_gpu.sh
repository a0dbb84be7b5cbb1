#!/usr/bin/env bash
# Issue 26 on one H200, after `source bench/device.sh`; writes into $1 (default /tmp/b26), then touches $1/DONE.
# Qwen2.5-Coder-0.5B-Instruct (the GGUF chunks in /tmp/acc) through the project's own stages on the real GSM8K,
# six runs side by side at the defaults' batch (32 prompts x 8 completions, 512 tokens): learning rates 5e-6,
# 1e-5, 2e-5 and 5e-5 at grad clip 0.1, seed 3407, and params.yaml's defaults (2e-5, clip 1.0) on seeds 3407
# and 1. What the shared GPU and the device budget force, and nothing else: 30 steps (the cosine schedule keeps
# its shape), micro-batches of 8 x 32 accumulation steps (the same 256 completions a step, one loss normalised
# over the whole batch), a vLLM share of 0.08 each, and lm_eval.tasks: [] (lm-eval's tasks are an evaluation
# beside the project's, measured on their own by bench/lm_eval_gpu.py; they change nothing trained). Evaluation:
# all 1,319 test problems, greedy. nvidia-smi's memory and utilisation every 30 s go to $1/gpu.csv.
# Seen on 2026-12-03 (the run was lost with the machine after 6 minutes): GGUF to bf16 58 s, six runs at
# 29-36 s a step each, so about 17 minutes of training; budget about 24 minutes from the first call, and send
# each polling call (bench/device_wait.sh) at once: the machine goes back 30 s after a call ends.
set -u
out=${1:-/tmp/b26}
mkdir -p "$out"
step() { echo "[session $(date +%T)] $*"; }
[ -f /tmp/coder05/config.json ] || python bench/real_model.py build --gguf /tmp/model.gguf \
  --tokenizer /tmp/carry/data/tokenizer --out /tmp/coder05 > "$out/build.log" 2>&1
(while [ ! -f "$out/DONE" ]; do nvidia-smi --query-gpu=timestamp,memory.used,utilization.gpu \
  --format=csv,noheader >> "$out/gpu.csv"; sleep 30; done) &
step "real model built: $(ls /tmp/coder05 | tr '\n' ' ')"
python bench/real_model.py run --model /tmp/coder05 --data /tmp/carry/data/gsm8k --work /tmp/sweep --out "$out/sweep" \
  --model-label "Qwen/Qwen2.5-Coder-0.5B-Instruct (Q4_K_M GGUF, dequantized to bf16)" \
  --runs lr5e-6:3407 lr1e-5:3407 lr2e-5:3407 lr5e-5:3407 defaults:3407 defaults:1 --stagger-s 20 --eval-stagger-s 12 \
  --set train.max_steps=30 train.per_device_train_batch_size=8 train.gradient_accumulation_steps=32 \
    generation.vllm_gpu_memory_utilization=0.08 'lm_eval.tasks=[]' > "$out/run.log" 2>&1
step "real_model run: rc $?"
python bench/real_model.py plot --summary "$out/sweep/summary.json" --png "$out/sweep/curves.png" >> "$out/run.log" 2>&1
step "done"
touch "$out/DONE"
