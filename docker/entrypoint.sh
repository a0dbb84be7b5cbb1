#!/usr/bin/env bash
# Entrypoint of the GPU image: check the GPU and its driver, make the project folder usable by git,
# DVC and the stages (the image's own copy in /app, or a checkout bind-mounted over it), run the command.
#
#   docker run --rm --gpus all -e HF_TOKEN grpo-gsm8k make all     # the whole pipeline, results in the container
#   docker run --rm --gpus all --user "$(id -u):$(id -g)" -v "$PWD":/app -e HF_TOKEN grpo-gsm8k make all
#                                                                    # ... results in this checkout (README.md)
#   docker run --rm -it grpo-gsm8k bash                              # no GPU: fails with a message
#   docker run --rm -e ALLOW_NO_GPU=1 grpo-gsm8k dvc status          # ... unless told to go on
#
# Environment: MIN_DRIVER_MAJOR (default 580: CUDA 13, which torch 2.11's wheels are built for),
# ALLOW_NO_GPU=1 (only warn when the GPU or driver is missing/too old, then run the command anyway).
set -euo pipefail

MIN_DRIVER_MAJOR="${MIN_DRIVER_MAJOR:-580}"

gpu_problem() {
    {
        echo "============================================================================"
        echo "grpo-gsm8k: $1"
        echo "$2"
        echo "The image needs an NVIDIA GPU and NVIDIA driver >= ${MIN_DRIVER_MAJOR} on the host"
        echo "(CUDA 13), the NVIDIA Container Toolkit, and 'docker run --gpus all ...'."
        echo "Set ALLOW_NO_GPU=1 to run a command that needs no GPU anyway."
        echo "============================================================================"
    } >&2
    if [ "${ALLOW_NO_GPU:-0}" = 1 ]; then
        echo "grpo-gsm8k: ALLOW_NO_GPU=1: going on without a usable GPU." >&2
    else
        exit 1
    fi
}

check_gpu() {
    if ! command -v nvidia-smi >/dev/null 2>&1; then
        gpu_problem "no GPU visible in the container (nvidia-smi not found)." \
            "Fix: start the container with --gpus all (Docker) and install the NVIDIA Container Toolkit on the host."
        return 0
    fi
    local out
    if ! out="$(timeout 60 nvidia-smi --query-gpu=driver_version,name --format=csv,noheader 2>&1)" \
        || [ -z "$out" ]; then
        gpu_problem "nvidia-smi is present but failed: ${out:-no GPU listed}" \
            "Fix: check the host driver with 'nvidia-smi' on the host (a driver/library mismatch needs a reboot)."
        return 0
    fi
    local driver major
    driver="$(head -n1 <<<"$out" | cut -d, -f1 | tr -d ' ')"
    major="${driver%%.*}"
    if ! [[ "$major" =~ ^[0-9]+$ ]]; then
        gpu_problem "could not read the NVIDIA driver version from nvidia-smi (got '$driver')." \
            "Fix: check 'nvidia-smi' on the host."
        return 0
    fi
    if [ "$major" -lt "$MIN_DRIVER_MAJOR" ]; then
        gpu_problem "NVIDIA driver $driver is too old (need >= ${MIN_DRIVER_MAJOR}, for CUDA 13)." \
            "Fix: upgrade the host driver to the 580 branch or newer (e.g. Ubuntu: apt install nvidia-driver-580-server), or use a host/cloud image that has it."
        return 0
    fi
    echo "grpo-gsm8k: GPU OK: $(head -n1 <<<"$out" | cut -d, -f2- | sed 's/^ *//') (x$(wc -l <<<"$out")), driver $driver" >&2
}

# `make all` runs `dvc repro`, and DVC refuses to work outside a git repository unless told not to
# use git. The image's /app is a copy of the project without .git (.dockerignore), so switch DVC to
# its no-SCM mode there (.dvc/config.local, which is never committed). Not `git init`: an empty
# repository with nothing committed would make dvclive/DVC experiments misbehave and would look like
# a real checkout. A checkout bind-mounted over /app with its .git keeps git.
setup_dvc() {
    [ -f dvc.yaml ] || return 0
    [ -e .git ] && return 0
    if [ ! -d .dvc ]; then
        dvc init --no-scm --quiet
    elif ! grep -qsE '^\s*no_scm\s*=\s*(true|True)' .dvc/config .dvc/config.local; then
        dvc config --local core.no_scm true
    fi
}

# With --user <host uid> (to write a bind-mounted checkout as its owner) the container's user has no
# passwd entry: HOME is "/", not writable (git config, torch and triton caches need one), and
# getpass (torch's compile cache) needs USER.
setup_user() {
    if [ -z "${HOME:-}" ] || [ "$HOME" = / ] || [ ! -w "$HOME" ]; then
        export HOME="${TMPDIR:-/tmp}/home-$(id -u)"
        mkdir -p "$HOME"
    fi
    if [ -z "${USER:-}" ]; then
        USER="$(id -un 2>/dev/null || echo app)"
        export USER
    fi
}

# A bind-mounted checkout has .git and may belong to another uid than the container's user (rootless
# Docker or Podman map the owner to another uid): git, and DVC and DVCLive through it, then refuse it
# as "dubious ownership". Trust exactly this folder, for this container's user only.
setup_git() {
    [ -e .git ] && command -v git >/dev/null 2>&1 || return 0
    git rev-parse --git-dir >/dev/null 2>&1 && return 0
    git config --global --add safe.directory "$PWD"
    echo "grpo-gsm8k: $PWD belongs to another user; marked as git safe.directory for this container" >&2
}

check_gpu
setup_user
setup_git
setup_dvc
# The stages import grpo_gsm8k from the working folder, not the image's installed copy: a checkout
# bind-mounted over /app runs its own code, the code that DVC tracks as the stages' dependencies.
if [ -d grpo_gsm8k ]; then
    export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi

if [ "$#" -eq 0 ]; then
    set -- make all
fi
exec "$@"
