# Sourced by scripts/lock.sh and scripts/check_lock.sh: the shared uv settings of the lock.
# The GPU image (Dockerfile) is Ubuntu 24.04 (glibc 2.39) + CPython 3.12 on x86_64, so the lock is
# resolved for exactly that platform. manylinux_2_28 would be too old: llguidance (a vllm
# dependency) ships its Linux x86_64 wheel as manylinux_2_31 only, and would fall back to a Rust sdist.
# shellcheck shell=bash
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

# uv: ${UV:-uv}, falling back to the CPU venv's copy (requirements-cpu.txt pins uv==0.13.8).
UV="${UV:-uv}"
if ! command -v "$UV" >/dev/null 2>&1; then
    if [ -x "$ROOT/.venv/bin/uv" ]; then
        UV="$ROOT/.venv/bin/uv"
    else
        echo "error: uv not found (UV=$UV). Run 'make venv' (installs uv==0.13.8 into .venv) or set UV=/path/to/uv." >&2
        exit 127
    fi
fi

# Hashes must be those of the files the image build downloads, i.e. PyPI's. The machine's pip config
# may add local find-links/file indexes (CPU-only, cp311 wheels): they are deliberately not used here.
LOCK_INDEX_URL="${LOCK_INDEX_URL:-https://pypi.org/simple}"
UV_TARGET=(--no-config --python-platform x86_64-manylinux_2_39 --python-version 3.12
           --default-index "$LOCK_INDEX_URL")
