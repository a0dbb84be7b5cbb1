#!/usr/bin/env bash
# Check, without installing anything, that requirements.lock is usable by the GPU image
# (Linux x86_64, CPython 3.12). Needs PyPI; about 20 s with a cold uv cache, a few s warm.
#
#  1. uv resolves the lock as the image will install it (--require-hashes, every dependency of every
#     pin present, a wheel or sdist for the target platform for each), in dry-run mode into a
#     throwaway --target folder: nothing is downloaded beyond metadata, nothing installed.
#  2. The lock is in sync with requirements.in and its hashes are PyPI's: a fresh resolution of
#     requirements.in, constrained to the lock's versions, must give the same pins and hashes.
#     (uv's dry run does not download the files, so it cannot see a wrong hash by itself.)
#
#   scripts/check_lock.sh [LOCKFILE]      (default: requirements.lock; UV=/path/to/uv to choose uv)
source "$(dirname "${BASH_SOURCE[0]}")/_uv.sh"

LOCK="${1:-requirements.lock}"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT

echo "== 1/2 dry-run install of $LOCK for x86_64-manylinux_2_39 / Python 3.12"
rc=0
"$UV" pip install --dry-run "${UV_TARGET[@]}" --require-hashes \
    -r "$LOCK" --target "$tmp/target" > "$tmp/dry.log" 2>&1 || rc=$?
grep -v '^ + ' "$tmp/dry.log" || true      # the summary, without the 300 "+ pkg==x" lines
if [ "$rc" -ne 0 ]; then
    echo "check_lock: FAILED: $LOCK does not install on the target platform (see above)." >&2
    exit 1
fi

echo "== 2/2 $LOCK in sync with requirements.in, hashes as on the index"
# Pins only (no hashes, no comments) as constraints for a fresh resolution.
sed -n 's/^\([A-Za-z0-9][^ ]*==[^ ]*\).*/\1/p' "$LOCK" > "$tmp/pins.txt"
"$UV" pip compile requirements.in "${UV_TARGET[@]}" --generate-hashes --quiet \
    -c "$tmp/pins.txt" -o "$tmp/fresh.lock"
if ! diff -u <(grep -v '^ *#' "$LOCK") <(grep -v '^ *#' "$tmp/fresh.lock") > "$tmp/diff.txt"; then
    head -40 "$tmp/diff.txt" >&2
    echo "check_lock: FAILED: $LOCK differs from a fresh resolution of requirements.in" \
         "(stale lock or wrong hashes). Run 'make lock'." >&2
    exit 1
fi
echo "check_lock: OK ($(grep -c '^[A-Za-z0-9]' "$LOCK") pinned packages)"
