#!/usr/bin/env bash
# Issue 15 on an H100, after `source bench/device.sh`. Writes into $2 (default /tmp/b15c), then touches $2/DONE.
#   standin  the 3B stand-in (random weights, 4-bit, 32 prompts x 8, 512 tokens forced): Unsloth fast_inference,
#            5 steps (the first is warm-up) with its adapter saved, that adapter through stages/merge.py
#            (bench_grpo.py merge), then the transformers backend at the defaults in the same session; Unsloth on
#            a 16-bit base last, if the session is young enough.
#   real     Qwen2.5-Coder-0.5B-Instruct (the GGUF chunks in /tmp/acc) through the project's own stages with
#            model.backend unsloth, 4-bit, fast_inference: the 50-step batch_scaled recipe of LEARNING.md, seeds 0
#            and 1, so that its rewards, log-prob gap and accuracy can be set beside the transformers backend's;
#            then seed 0's adapter through stages/merge.py.
set -u
mode=$1
out=${2:-/tmp/b15c}
mkdir -p "$out"
data=/tmp/carry/data/gsm8k
step() { echo "[session $(date +%T)] $*"; }

if [ "$mode" = standin ]; then
  common=(--configs defaults --completion 512 --steps-big 5 --warmup 1 --data "$data" --model /tmp/standin --results-dir "$out")
  [ -f /tmp/standin/config.json ] || python bench/bench_grpo.py build-standin --tokenizer /tmp/carry/data/tokenizer --out /tmp/standin
  step "unsloth fast_inference, 4-bit"
  timeout 560 python bench/bench_grpo.py train --backend unsloth --vllm --unsloth-gc true "${common[@]}" --budget-s 450 \
    --out unsloth_fast_inference --save-adapter /tmp/adapter_unsloth > "$out/unsloth_fast_inference.log" 2>&1
  step "unsloth fast_inference: rc $?"
  if [ -f /tmp/adapter_unsloth/adapter_config.json ]; then
    step "merge"
    timeout 300 python bench/bench_grpo.py merge --model /tmp/standin --adapter /tmp/adapter_unsloth --data "$data" \
      --workdir /tmp/merge_unsloth --out merge_unsloth > "$out/merge_unsloth.log" 2>&1
    step "merge: rc $?"
    cp bench/results/merge_unsloth.json "$out/"
  fi
  step "transformers defaults (16-bit, vLLM colocate)"
  timeout 400 python bench/bench_grpo.py train --backend transformers --vllm --bf16 "${common[@]}" --budget-s 330 \
    --out transformers_vllm_bf16 > "$out/transformers_vllm_bf16.log" 2>&1
  step "transformers: rc $?"
  if [ "$SECONDS" -lt 1200 ] && [ ! -f /tmp/skip_bf16 ]; then  # /tmp/skip_bf16: a poll call saves the time
    step "unsloth fast_inference, 16-bit base"
    timeout 480 python bench/bench_grpo.py train --backend unsloth --vllm --bf16 --unsloth-gc true "${common[@]}" \
      --budget-s 400 --out unsloth_fast_inference_bf16 > "$out/unsloth_fast_inference_bf16.log" 2>&1
    step "unsloth 16-bit: rc $?"
  fi
elif [ "$mode" = real ]; then
  [ -f /tmp/coder05/config.json ] || python bench/real_model.py build --gguf /tmp/model.gguf \
    --tokenizer /tmp/carry/data/tokenizer --out /tmp/coder05 > "$out/build.log" 2>&1
  step "real model built: $(ls /tmp/coder05 | tr '\n' ' ')"
  python bench/real_model.py run --model /tmp/coder05 --data "$data" --work /tmp/real_unsloth --out "$out/real" \
    --model-label "Qwen/Qwen2.5-Coder-0.5B-Instruct (Q4_K_M GGUF, dequantized to bf16)" \
    --runs batch_scaled:0 batch_scaled:1 --stagger-s 25 \
    --set model.backend=unsloth model.load_in_4bit=true generation.use_vllm=true \
      generation.vllm_gpu_memory_utilization=0.15 model.gradient_checkpointing=true train.max_steps=50 \
      train.per_device_train_batch_size=8 train.gradient_accumulation_steps=16 > "$out/run.log" 2>&1
  step "real_model run: rc $?"
  adapter=/tmp/real_unsloth/batch_scaled-s0/models/adapter
  if [ -f "$adapter/adapter_config.json" ]; then
    cp -r "$adapter" "$out/adapter_s0"
    timeout 300 python bench/bench_grpo.py merge --model /tmp/coder05 --adapter "$adapter" --data "$data" \
      --workdir /tmp/merge_real --out merge_unsloth_real > "$out/merge_unsloth_real.log" 2>&1
    step "merge: rc $?"
    cp bench/results/merge_unsloth_real.json "$out/"
  fi
else
  echo "usage: $0 standin|real [OUT]" >&2
  exit 2
fi
step "done"
touch "$out/DONE"
