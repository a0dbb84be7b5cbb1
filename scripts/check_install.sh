#!/usr/bin/env bash
# Install the GPU image's Python environment for real and check that it works: a fresh CPython 3.12
# venv, requirements.lock exactly as the Dockerfile installs it (--require-hashes --no-deps), `pip
# check`, then an import of every package the stages import, with its version. Not in CI: it
# downloads several GB from PyPI (8.7 GB installed; ~5 min on a fast link); check_lock.sh is the
# quick dry-run version. Last result: bench/results/install_check/dev_machine/install_check.log.
#
#   scripts/check_install.sh               # venv in a temp folder, deleted at the end
#   KEEP_VENV=/path/to/venv scripts/check_install.sh   # keep it there instead
#   PYTHON=/path/to/python3.12 scripts/check_install.sh
#
# Without a GPU, unsloth is not imported (it raises without one); run the script on a GPU machine
# with network to cover it. The Python is $PYTHON, else uv's managed 3.12 (from GitHub), else
# python3.12 on PATH. Exit status: non-zero if the install, pip check or any import fails.
source "$(dirname "${BASH_SOURCE[0]}")/_uv.sh"

# Python 3.12: $PYTHON, else uv's managed build (downloads from GitHub), else a python3.12 on PATH.
if [ -z "${PYTHON:-}" ]; then
    if "$UV" python install 3.12 >/dev/null 2>&1; then
        PYTHON="$("$UV" python find 3.12)"
    else
        echo "note: 'uv python install 3.12' failed (no download host?); looking for python3.12 on PATH"
        PYTHON="$(command -v python3.12 || true)"
    fi
fi
if [ -z "$PYTHON" ] || ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 12))'; then
    echo "error: no CPython 3.12 found (PYTHON='$PYTHON'). Set PYTHON=/path/to/python3.12." >&2
    exit 1
fi

if [ -n "${KEEP_VENV:-}" ]; then
    venv="$KEEP_VENV"
else
    venv="$(mktemp -d)/venv"
    trap 'rm -rf "$(dirname "$venv")"' EXIT
fi
echo "== python: $PYTHON ($("$PYTHON" -VV | tr '\n' ' '))"
echo "== host: $(uname -m), $(ldd --version | head -n1)"
"$PYTHON" -m venv "$venv"
py="$venv/bin/python"

# The Dockerfile's command, isolated from this machine's pip config (extra indexes, find-links,
# constraints) so that exactly PyPI's files are checked against the lock's hashes.
pip_install() {
    PIP_CONFIG_FILE=/dev/null "$py" -m pip --isolated install --quiet --no-cache-dir \
        --disable-pip-version-check "$@"
}
echo "== pip install --require-hashes --no-deps -r requirements.lock"
start=$SECONDS
pip_install --index-url "$LOCK_INDEX_URL" --require-hashes --no-deps -r requirements.lock
pip_install --no-deps "$ROOT"
echo "installed $("$py" -m pip list --format=freeze | wc -l) distributions in $((SECONDS - start)) s," \
     "$(du -sh "$venv" | cut -f1) on disk"

echo "== pip check"
rc=0
"$py" -m pip check || rc=1

echo "== imports"
gpu=0
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >/dev/null 2>&1; then gpu=1; fi
GPU="$gpu" "$py" - <<'PY' || rc=1
import importlib.metadata, os, time

# (distribution, what the code imports): every third-party package that stages/ and grpo_gsm8k/
# import, by the names they use (several packages load their contents lazily, so a bare `import
# vllm` proves little), then the project's own modules.
checks = [
    ("torch", "import torch"),
    ("transformers", "from transformers import AutoModelForCausalLM, AutoTokenizer, set_seed"),
    ("trl", "from trl import GRPOConfig, GRPOTrainer"),
    ("peft", "from peft import LoraConfig, PeftModel, get_peft_model"),
    ("bitsandbytes", "import bitsandbytes.optim"),
    ("accelerate", "import accelerate"),
    ("datasets", "from datasets import Dataset, load_dataset"),
    ("tokenizers", "import tokenizers"),
    ("vllm", "from vllm import LLM, SamplingParams; from vllm.lora.request import LoRARequest"),
    ("dvc", "from dvc.repo import Repo"),
    ("dvclive", "from dvclive import Live"),
    ("scmrepo", "import scmrepo.git"),
    ("huggingface_hub", "from huggingface_hub import EvalResult, HfApi, ModelCard, ModelCardData"),
    ("httpx", "import httpx"),
    ("matplotlib", "import matplotlib.pyplot"),
    ("PyYAML", "import yaml"),
    ("tqdm", "import tqdm"),
    ("xformers", "import xformers.ops"),
    ("deepspeed", "import deepspeed"),
    ("liger_kernel", "import liger_kernel.transformers"),
    ("unsloth", "import unsloth"),
    ("grpo-gsm8k", "import " + ", ".join(f"grpo_gsm8k.{m}" for m in (
        "config", "gsm8k", "grading", "rewards", "modeling", "training", "evaluation", "hub",
        "model_card", "predict", "smoke"))),
]
failed = 0
for dist, statement in checks:
    version = importlib.metadata.version(dist)
    if dist == "unsloth" and os.environ["GPU"] != "1":
        print(f"  {dist:16} {version:12} installed; import SKIPPED: it raises without a GPU")
        continue
    start = time.time()
    try:
        exec(statement, {})
    except Exception as exc:  # report every failure, not just the first
        failed += 1
        print(f"  {dist:16} {version:12} FAILED: {statement}: {type(exc).__name__}: {exc}".splitlines()[0])
        continue
    print(f"  {dist:16} {version:12} ok in {time.time() - start:4.1f} s: {statement}")
import torch
print(f"torch: CUDA build {torch.version.cuda}, CUDA available here: {torch.cuda.is_available()}")
raise SystemExit(failed)
PY

if [ "$rc" -ne 0 ]; then
    echo "check_install: FAILED (see above)" >&2
    exit 1
fi
echo "check_install: OK"
