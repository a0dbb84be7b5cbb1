#!/usr/bin/env bash
# Issue 27 on one H200, in ONE device call of under 10 minutes: the defaults' batch (3B stand-in, 32 prompts x 8,
# 512 tokens forced, vLLM colocate 0.35, 16-bit base) under each speed lever alone and all together, one process,
# one vLLM engine shared by every config (bench/train_speed.py share_vllm_engines), 1 warm-up + 3 timed steps each:
#   today             the defaults before issue 27: TRL's scoring forward, gradient checkpointing on
#   levers            both levers below together
#   reuse_logprobs    train.reuse_training_logprobs: the importance-sampling ratio from the training forward
#   no_checkpointing  model.gradient_checkpointing: false (micro-batches halved until they fit: --halve-on-oom)
# Every step also records TRL's own sections: sync_weights (LoRA merge + weight push), vLLM.generate, each reward.
# `sleep` (a second call, if the lease allows): vLLM's sleep mode alone and with both levers (an engine of its own).
# `next`: the default since 2026-12-07 (levers_mb8: checkpointing off at 8 x 32) on both sides of today, first and
# last, so that the comparison holds whichever position is the slower (on an H100 a call's first config once ran
# 2 s a step slower than the same config first in the next call; levers_h100_today): ~8 minutes.
# `h200`: the same with both levers at 16 x 16 (levers, which an 80 GB card cannot hold) before the default's second
# run: ~6 minutes on an H200.
# `pair`: the default, then today: `next` without its second default run, for a lease's last ~6 minutes.
# Liger's layer kernels gained nothing with checkpointing off on an H100 (levers_h100_today), so it leaves them out.
# The h100 modes use them; Liger is not in site.tgz: here, `python3 -m pip download --no-deps -d .carry/liger
# liger-kernel==0.8.5` (the lock's; 0.9 MB), and carry .carry/liger with it.
# `every_n`: gradient checkpointing in every 2nd and every 4th layer only (ckpt_every2, ckpt_every4), beside the
# default of 2026-12-06 (reuse_logprobs), today and the default since (levers_mb8).
# `h100`: on an 80 GB card, the default of 2026-12-06 (reuse_logprobs) beside Liger's kernels and the two ways of
# recomputing less that may fit there (ckpt_every2, levers_mb8); halved on out-of-memory like the rest. Run
# 2026-12-07 (bench/results/train_speed/levers_h100).
# `h100_next`: on an 80 GB card, the default since 2026-12-07 beside today and Liger with checkpointing off;
# `h100_liger_first`: Liger with checkpointing off first, then the default. Run 2026-12-07
# (bench/results/train_speed/levers_h100_today).
# `h100_empty_cache`: the default on both sides of the same with the caching allocator emptied before each
# generation (levers_mb8_empty_cache), with every step's allocator retries: is a near-full 80 GB card what slows
# the default's generation? (No: levers_h100_empty_cache.)
# `profile`: the default alone, one training micro-batch of its warm-up step under torch.profiler (--profile): where
# training's time goes, op by op, the next lever's question (~3 minutes on an H100).
# `casts`: the default (LoRA inputs left as they are under autocast since 2026-12-07) first, then the same with PEFT's
# casts of them (levers_mb8_lora_casts), each with a profiled micro-batch (~5 minutes on an H100); `casts_today`: with
# today between them (an H200: ~6 minutes).
#   bash bench/speed_levers.sh MODE    (the modes above, and `prepare`; any other word prints the list)
# results: $OUT/speed_levers/ (JSON + log).
# Keep them: copy $OUT/speed_levers/ to bench/results/train_speed/<run>/ (its JSON files are in the bench result
# schema; add the folder to bench/results/runs.yaml), then `python -m bench report` tables them in BENCHMARKS.md's
# speed-levers section.
# Carry .carry/site.tgz and .carry/data; vLLM's chunks in /tmp/vacc from earlier calls of the same message
# (shared/device/make-vllm-site.sh prints them). A warm machine keeps /tmp (vLLM, the stand-in): building the
# stand-in in a call before this one, e.g. `bash bench/speed_levers.sh prepare`, leaves this one ~70 s more.
# Seen 2026-12-06 on an H200 (bench/results/train_speed/levers_h200): prepare 24 s, main 388 s, the sleep pair 209 s
# (the engine's build included in each).
set -u
cd "$(dirname "${BASH_SOURCE[0]}")/.."
mode=${1:-main}
case $mode in
  main) configs=(today levers reuse_logprobs no_checkpointing) ;;
  sleep) configs=(sleep levers_sleep) ;;
  next) configs=(levers_mb8 today levers_mb8) ;;
  pair) configs=(levers_mb8 today) ;;
  h200) configs=(levers_mb8 today levers levers_mb8) ;;
  every_n) configs=(reuse_logprobs today ckpt_every2 ckpt_every4 levers_mb8) ;;
  h100) configs=(reuse_logprobs liger ckpt_every2 levers_mb8) ;;
  h100_next) configs=(levers_mb8 today levers_liger) ;;
  h100_liger_first) configs=(levers_liger levers_mb8) ;;
  h100_empty_cache) configs=(levers_mb8 levers_mb8_empty_cache levers_mb8) ;;
  profile) configs=(levers_mb8) ;;
  casts) configs=(levers_mb8 levers_mb8_lora_casts) ;;
  casts_today) configs=(levers_mb8 today levers_mb8_lora_casts) ;;
  prepare) configs=() ;;
  *) echo "usage: $0 [main|sleep|next|pair|h200|every_n|h100|h100_next|h100_liger_first|h100_empty_cache|profile|casts|casts_today|prepare]" >&2; exit 2 ;;
esac
out=${OUT:-/tmp/out}/speed_levers
mkdir -p "$out"
step() { echo "[speed_levers $(date +%T) ${SECONDS}s] $*"; }
source bench/device.sh
if [[ $mode = h100* ]] && ! python -c "import liger_kernel" 2> /dev/null; then
  python -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .carry/liger/liger_kernel-*.whl \
    || { echo "speed_levers.sh $mode: no liger-kernel; carry .carry/liger (this script's header says how)" >&2; exit 2; }
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-}
# params.yaml with the batch every lever that sets none runs at: 32 x 8, the defaults' until 2026-12-07 (levers_mb8's
# 8 x 32 without checkpointing since), so that results of before and after compare
python - <<'EOF'
from grpo_gsm8k import config
p = config.read_yaml("params.yaml")
p["train"].update(per_device_train_batch_size=32, gradient_accumulation_steps=8)
config.write_yaml("/tmp/levers_params.yaml", p)
EOF
nvidia-smi --query-gpu=name,memory.total,memory.used --format=csv,noheader
if [ ! -f /tmp/standin/config.json ]; then
  step "building the stand-in"
  python -m bench standin --tokenizer /tmp/carry/data/tokenizer --out /tmp/standin > "$out/build.log" 2>&1
fi
[ "$mode" = prepare ] && { step "prepared: $(ls /tmp/standin | tr '\n' ' ')"; exit 0; }
# What is left of the call's 600 s, less 30 s to pack up. Each later config keeps 85 s (its load and 4 steps take
# 80-110 s; the first one also builds the engine, ~2 minutes in all, and 4 steps of 25 s); a config past its
# share stops after its current step, and a timeout still writes what was measured (train_speed.py on_sigterm)
left=$((${SPEED_LEVERS_S:-570} - SECONDS))  # SPEED_LEVERS_S: a shorter call (the lease's last minutes)
step "${configs[*]}: ${left}s left"
timeout "$left" python -m bench train-speed --params /tmp/levers_params.yaml --backend transformers --vllm --bf16 \
  --completion 512 --steps-big 4 --warmup 1 --halve-on-oom --configs "${configs[@]}" --data /tmp/carry/data/gsm8k \
  --model /tmp/standin --budget-s $((left - 45)) --reserve-s 85 --results-dir "$out" --out "train_speed_levers_$mode" \
  $([[ $mode = profile || $mode = casts* ]] && echo --profile) \
  > "$out/$mode.log" 2>&1
step "bench: rc $?"
grep "\[bench" "$out/$mode.log" | grep -E "config .*(summary|out of memory)|OOM|wrote|Error" | cut -c1-600
python - "$out/train_speed_levers_$mode.json" <<'EOF'
import json, sys
r = json.load(open(sys.argv[1]))
print("status", r["status"])
for e in r["runs"]:
    s, m = e["summary"], e.get("peak_memory_gib") or {}
    logs = [row for row in e.get("trl_logs", []) if "sampling/sampling_logp_difference/mean" in row]
    print(e["name"], e["status"], e["batch"]["per_device_train_batch_size"], "x", e["batch"]["gradient_accumulation_steps"],
          "| s/step median", s.get("median_s"), [s.get("min_s"), s.get("max_s")], "| tok/s",
          s.get("completion_tokens_per_s"), "| gen/score/train", s.get("generate_s_per_step"),
          s.get("rewards_and_bookkeeping_s_per_step"), s.get("train_s_per_step"), "| peak GiB",
          m.get("allocated"), "|", s.get("sections_s_per_step"), s.get("alloc_retries_per_step"),
          "| logp diff / IS ratio mean",
          [(round(row["sampling/sampling_logp_difference/mean"], 4),
            round(row["sampling/importance_sampling_ratio/mean"], 4)) for row in logs])
    if "profile" in e:
        prof = e["profile"]
        print(f"  profiled micro-batch {prof['micro_batch']} ({e['micro_batch_seconds'][prof['micro_batch'] - 1]} s "
              f"wall): {prof['total_ms']} ms of {prof['clock']} time in its ops")
        for op in prof["ops"][:15]:
            print(f"    {op['ms']:9.2f} ms {100 * op['share']:5.1f} % x{op['calls']:<5} {op['op'][:90]}")
EOF
step "done"
