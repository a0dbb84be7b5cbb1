#!/usr/bin/env bash
# Issues 15 and 13 in one H100 session, after `source bench/device.sh` (vLLM, TRL, Unsloth, the GSM8K rows
# and the Qwen2.5 tokenizer in /tmp): Unsloth's training path attempt by attempt (bench_grpo.py diagnose,
# bench/results/unsloth_sources.md says what each tests), the Unsloth adapter through stages/merge.py, then
# the transformers backend on vLLM at the same batch in the same session, with and without gradient
# checkpointing. Everything lands in $1 (default /tmp/b15). The second session's script is unsloth_session2.sh.
set -u
out=${1:-/tmp/b15}
mkdir -p "$out"
data=/tmp/carry/data/gsm8k
train=(python bench/bench_grpo.py train --backend transformers --vllm --bf16 --gpu-memory 0.35 --configs defaults
       --completion 512 --steps-big 4 --data "$data" --model /tmp/standin --budget-s 270)
python bench/bench_grpo.py build-standin --tokenizer /tmp/carry/data/tokenizer --out /tmp/standin
python bench/bench_grpo.py diagnose --attempts as-is no-compile chunks-x1 gc-plain vllm --budget-s 720 \
  --out-dir "$out/diag" --model /tmp/standin --data "$data" --completion 512
if [ -f /tmp/adapter_unsloth/adapter_config.json ]; then
  python bench/bench_grpo.py merge --model /tmp/standin --adapter /tmp/adapter_unsloth --data "$data" --out merge_unsloth
fi
"${train[@]}" --out train_transformers_vllm_bf16_unsloth_session
"${train[@]}" --trainer-arg gradient_checkpointing=false --out train_transformers_vllm_bf16_no_checkpointing
cp bench/results/merge_unsloth.json bench/results/train_transformers_vllm_bf16_unsloth_session.json \
   bench/results/train_transformers_vllm_bf16_no_checkpointing.json "$out"/ 2>/dev/null
echo "unsloth_session done"
