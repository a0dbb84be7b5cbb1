#!/usr/bin/env bash
# `python -m bench multi-gpu` (bench/multi_gpu.py) on a machine of several GPUs, one phase per device call (each
# under 10 minutes):
#   bash bench/multi_gpu.sh zero2    # 2 GPUs: DDP against ZeRO-2, and a ZeRO-2 run killed and resumed
#   bash bench/multi_gpu.sh vllm     # 2 GPUs: `trl vllm-serve` on GPU 1 + training on GPU 0, against colocate
# Issue 31, colocated vLLM on every rank at the defaults' per-GPU batch; the calls of one session add to the same
# /tmp/multi_gpu/multi_gpu.json (and scaling.md), so run them on one warm machine, in this order (the first
# calls give the headline: 1 against all GPUs, the agreement and the resume):
#   nvidia-h200-x8:  scale --gpus 1 (~4 min, + unpacking) | scale --gpus 8 (~5) | agree --gpus 8 (~6)
#                    | scale --gpus 2,4 (~7) | server --gpus 8 (~6)
#   nvidia-h200-x4:  scale --gpus 1 (~4) | scale --gpus 4 (~4) | agree --gpus 4 (~6) | scale --gpus 2 (~4)
#                    | server --gpus 4 (~5)
#   nvidia-h200-x2:  scale --gpus 1,2 (~7) | agree --gpus 2 (~5) | server --gpus 2 (~4)
# e.g. `bash bench/multi_gpu.sh scale --gpus 1`. Estimates from the 1-GPU defaults (25.8 s a step, 65 s load and
# engine, BENCHMARKS.md), not measured on several GPUs. Each run is written as it ends, so a call cut short keeps
# the runs it finished; a leg gets at most the time left before 570 s of the call.
# Carried: .carry/site.tgz and .carry/data (copied to /tmp/carry), .carry/ds (deepspeed and hjson, plus what
# vLLM's HTTP server needs beyond its offline engine: uvicorn, watchfiles, prometheus-fastapi-instrumentator,
# model-hosting-container-standards, jmespath, supervisor). For vllm, scale, server and agree: vLLM's chunks in
# /tmp/vacc (earlier calls of the same message). A warm machine keeps /tmp, so later phases skip what the first
# unpacked. Keep the results: copy $OUT/multi_gpu.json, scaling.md and the logs to bench/results/multi_gpu/<name>/ (add
# the folder to bench/results/runs.yaml), then `python -m bench report`.
# .carry/ds is git-ignored; build it here (no GPU needed, DeepSpeed's ops are not used by ZeRO-2 here):
#   DS_BUILD_OPS=0 pip wheel --no-deps deepspeed==0.19.8 -w .carry/ds
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64 -d .carry/ds \
#     hjson==3.1.0 uvicorn==0.54.0 watchfiles==1.3.0 prometheus-fastapi-instrumentator==8.1.0 \
#     model-hosting-container-standards==0.1.16 jmespath==1.1.0 supervisor==4.3.0
set -euo pipefail
# NVLink multicast can take the shared host's GPUs down: off in this and every child process.
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source bench/device.sh
if [ ! -d /tmp/dsite/deepspeed ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/dsite .carry/ds/*.whl
fi
# The stages import grpo_gsm8k, which this machine has not installed: from this checkout.
export PYTHONPATH=$PWD:$PYTHONPATH:/tmp/dsite
nvidia-smi -L
phase="$1"; shift
exec python3 -m bench multi-gpu "$phase" --arch /tmp/carry/data/tokenizer --data /tmp/carry/data/gsm8k \
    --work /tmp/multi_gpu --out "${OUT:-build/multi_gpu}" --budget-s $((570 - SECONDS)) --leg-timeout-s 540 "$@"
