#!/usr/bin/env bash
# Issue 15 on one H100 or H200, after `source bench/device.sh`. Writes into $2 (default /tmp/b15), then touches $2/DONE.
# (The third session ran its earlier form, bench/unsloth_session3.sh at 1a16997; the fourth ran `standin` on an H200.)
#   standin  the 3B stand-in (random weights, 32 prompts x 8, 512 tokens forced), 5 steps each, the first
#            two not timed (Unsloth's steps 1-2 take twice a later one's time): Unsloth fast_inference on a
#            16-bit base (the defaults with model.backend: unsloth), the transformers backend at the defaults;
#            then, while the lease allows, Unsloth 16-bit with vLLM's max_num_seqs left to Unsloth (the A/B) and
#            Unsloth fast_inference on a 4-bit base.
#   real     Qwen2.5-Coder-0.5B-Instruct (the GGUF chunks in /tmp/acc) through the project's own stages with
#            model.backend unsloth on a 16-bit base with fast_inference: the 50-step batch_scaled recipe of
#            LEARNING.md, seeds 0 and 1, beside the transformers backend's runs of the same recipe; then seed
#            0's adapter through stages/merge.py.
set -u
mode=$1
out=${2:-/tmp/b15}
mkdir -p "$out"
data=/tmp/carry/data/gsm8k
step() { echo "[session $(date +%T)] $*"; }
bench() {  # NAME CAP ARGS...: one bench_grpo.py train run, its log in $out/NAME.log
  local name=$1 cap=$2
  shift 2
  step "$name"
  timeout "$cap" python bench/bench_grpo.py train "${common[@]}" --budget-s $((cap - 60)) --out "$name" "$@" \
    > "$out/$name.log" 2>&1
  step "$name: rc $?"
}

if [ "$mode" = standin ]; then
  common=(--configs defaults --completion 512 --warmup 2 --data "$data" --model /tmp/standin --results-dir "$out")
  [ -f /tmp/standin/config.json ] || python bench/bench_grpo.py build-standin --tokenizer /tmp/carry/data/tokenizer --out /tmp/standin
  # The first two are the comparison the issue asks for; the A/B and the 4-bit row run while the lease allows
  # (each start is gated on its cap fitting in about 1,550 s of script time).
  bench unsloth_bf16 480 --backend unsloth --vllm --bf16 --unsloth-gc true --steps-big 5
  bench transformers_bf16 400 --backend transformers --vllm --bf16 --steps-big 5
  if [ "$SECONDS" -lt 1070 ]; then
    bench unsloth_bf16_seqs_auto 480 --backend unsloth --vllm --bf16 --unsloth-gc true --steps-big 5 --unsloth-vllm-seqs-auto
  fi
  if [ "$SECONDS" -lt 1070 ]; then
    bench unsloth_4bit 480 --backend unsloth --vllm --unsloth-gc true --steps-big 5
  fi
elif [ "$mode" = real ]; then
  [ -f /tmp/coder05/config.json ] || python bench/real_model.py build --gguf /tmp/model.gguf \
    --tokenizer /tmp/carry/data/tokenizer --out /tmp/coder05 > "$out/build.log" 2>&1
  step "real model built: $(ls /tmp/coder05 | tr '\n' ' ')"
  python bench/real_model.py run --model /tmp/coder05 --data "$data" --work /tmp/real_unsloth --out "$out/real" \
    --model-label "Qwen/Qwen2.5-Coder-0.5B-Instruct (Q4_K_M GGUF, dequantized to bf16)" \
    --runs batch_scaled:0 batch_scaled:1 \
    --set model.backend=unsloth model.load_in_4bit=false generation.use_vllm=true \
      generation.vllm_gpu_memory_utilization=0.15 model.gradient_checkpointing=true train.max_steps=50 \
      train.per_device_train_batch_size=8 train.gradient_accumulation_steps=16 > "$out/run.log" 2>&1
  step "real_model run: rc $?"
  adapter=/tmp/real_unsloth/batch_scaled-s0/models/adapter
  if [ -f "$adapter/adapter_config.json" ]; then
    cp "$adapter/training_run.json" "$out/real/adapter_s0_training_run.json"
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
