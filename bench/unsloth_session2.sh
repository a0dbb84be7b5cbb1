#!/usr/bin/env bash
# Issue 15, second H100 session, after `source bench/device.sh`: Unsloth's fast_inference (vLLM colocated,
# the LoRA per request) rerun with what the first session found (UNSLOTH_COMPILE_DISABLE=1, which
# import_backend now sets; plain gradient checkpointing) and without the periodic stack dumps that may
# have caused its segfaults; then the Unsloth adapter through stages/merge.py and through the evaluate
# stage's generation (vLLM, LoRA per request); last, the transformers backend at the defaults. Unsloth with HF
# generate runs only if fast_inference did not time 3 steps. Everything lands in $1 (default /tmp/b15b).
set -u
out=${1:-/tmp/b15b}
mkdir -p "$out"
data=/tmp/carry/data/gsm8k
common=(--configs defaults --completion 512 --steps-big 4 --warmup 1 --data "$data" --model /tmp/standin
        --results-dir "$out")
step() { echo "[session $(date +%T)] $*"; }
timed_steps() { python - "$1" <<'PY'
import json, sys
try:
    print(len(json.load(open(sys.argv[1]))["configs"]["defaults"]["summary"].get("timed_steps", [])))
except Exception:
    print(0)
PY
}
[ -f /tmp/standin/config.json ] || python bench/bench_grpo.py build-standin --tokenizer /tmp/carry/data/tokenizer --out /tmp/standin

step "unsloth fast_inference"
timeout 420 python bench/bench_grpo.py train --backend unsloth --vllm --unsloth-gc true "${common[@]}" --budget-s 380 \
  --out unsloth_fast_inference --save-adapter /tmp/adapter_unsloth > "$out/unsloth_fast_inference.log" 2>&1
step "unsloth fast_inference: rc $?, timed steps $(timed_steps "$out/unsloth_fast_inference.json")"

if [ "$(timed_steps "$out/unsloth_fast_inference.json")" -lt 3 ]; then
  rm -rf /tmp/adapter_unsloth
  step "unsloth hf generate"
  timeout 330 python bench/bench_grpo.py train --backend unsloth --unsloth-gc true "${common[@]}" --budget-s 300 \
    --out unsloth_hf --save-adapter /tmp/adapter_unsloth > "$out/unsloth_hf.log" 2>&1
  step "unsloth hf generate: rc $?, timed steps $(timed_steps "$out/unsloth_hf.json")"
fi

if [ -f /tmp/adapter_unsloth/adapter_config.json ]; then
  step "merge"
  timeout 240 python bench/bench_grpo.py merge --model /tmp/standin --adapter /tmp/adapter_unsloth --data "$data" \
    --workdir /tmp/merge_unsloth --out merge_unsloth > "$out/merge_unsloth.log" 2>&1
  step "merge: rc $?"
  cp bench/results/merge_unsloth.json "$out/" 2>/dev/null
fi

if [ -f /tmp/adapter_unsloth/adapter_config.json ]; then
  step "evaluate the Unsloth adapter as stages/evaluate.py does (vLLM, LoRA per request)"
  timeout 240 python bench/bench_grpo.py eval-adapter --model /tmp/standin --adapter /tmp/adapter_unsloth \
    --data "$data" --limit 128 --completion 128 --out eval_adapter_unsloth > "$out/eval_adapter_unsloth.log" 2>&1
  step "eval: rc $?"
  cp bench/results/eval_adapter_unsloth.json "$out/" 2>/dev/null
fi
step "transformers defaults"
timeout 300 python bench/bench_grpo.py train --backend transformers --vllm --bf16 --gpu-memory 0.35 "${common[@]}" \
  --budget-s 270 --out transformers_vllm_bf16_session2 > "$out/transformers_vllm_bf16_session2.log" 2>&1
step "transformers: rc $?, timed steps $(timed_steps "$out/transformers_vllm_bf16_session2.json")"

step "unsloth_session2 done"
