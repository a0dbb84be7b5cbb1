#!/usr/bin/env bash
# Regenerate requirements.lock from requirements.in (the recipe behind `make lock`).
#
#   scripts/lock.sh              # keep existing pins, add/remove what requirements.in changed
#   UPGRADE=1 scripts/lock.sh    # re-resolve everything to the newest versions allowed
#   UV=/path/to/uv scripts/lock.sh
#
# One resolution, with hashes, for Linux x86_64 + CPython 3.12 (the Docker image), run from any
# machine. Then run scripts/check_lock.sh and commit requirements.in + requirements.lock together.
source "$(dirname "${BASH_SOURCE[0]}")/_uv.sh"

extra=()
if [ "${UPGRADE:-0}" = 1 ]; then extra+=(--upgrade); fi

"$UV" pip compile requirements.in "${UV_TARGET[@]}" --generate-hashes \
    --custom-compile-command "make lock" "${extra[@]}" -o requirements.lock --quiet

n=$(grep -c '^[A-Za-z0-9]' requirements.lock)
echo "requirements.lock: $n pinned packages. Key versions:"
grep -E '^(vllm|unsloth|unsloth-zoo|trl|transformers|torch|bitsandbytes|datasets|xformers|peft|accelerate|deepspeed)==' \
    requirements.lock | sed 's/ *\\$//; s/^/  /'
