"""What a checkpoint marker vouches for, and the check that a checkpoint still holds it.

A full disk, an interrupted copy of ``checkpoints/`` between machines or bit rot leave a checkpoint whose
marker says complete while a file is short, missing or changed; the Trainer then dies in a traceback
halfway into loading it. The marker lists every file's size and SHA-256, and a resume checks a checkpoint
against that list before anything loads. Cheapest first: sizes (catch truncation and missing files
without reading a byte), then each file's header or directory (the part a loader reads first), then
the streaming hashes.
"""

from __future__ import annotations

import hashlib
import json
import zipfile
from pathlib import Path

# What a resume reads, for a marker written before markers listed the files: the Trainer dies without
# trainer_state.json or weights, and resumes silently with a new optimizer when its state is missing.
_LEGACY_NEEDS = {
    "trainer_state.json": ("trainer_state.json",),
    "adapter or model weights": ("adapter_model.safetensors", "adapter_model.bin", "model.safetensors",
                                 "model.safetensors.index.json", "pytorch_model.bin"),
}
# Parsed before a resume; not tokenizer.json (11 MB of Qwen's vocabulary: 0.6 CPU s), which no resume reads.
_JSON_READ_ON_RESUME = {"trainer_state.json", "adapter_config.json", "config.json"}


def sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()  # reads in 256 KiB pieces, any file size


def manifest(folder: Path, skip: set[str]) -> dict[str, dict]:
    """{path relative to ``folder``: {"size", "sha256"}} of every file in it, but the names in ``skip``."""
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name not in skip)
    return {p.relative_to(folder).as_posix(): {"size": p.stat().st_size, "sha256": sha256(p)} for p in files}


def problem(folder: Path, marker: dict) -> str | None:
    """Why ``folder`` is not what ``marker`` vouches for, naming the file; None when it verifies."""
    files = marker.get("files")
    if files is None:  # an older marker: no sizes or hashes to compare, only what a resume reads
        return _legacy_problem(folder)
    for name, want in files.items():
        path = folder / name
        if not path.is_file():
            return f"{path} is missing"
        if path.stat().st_size != want["size"]:
            return f"{path} is {path.stat().st_size} bytes, its marker says {want['size']}"
    for name in files:
        if failure := _load_failure(folder / name):
            return failure
    for name, want in files.items():
        if sha256(folder / name) != want["sha256"]:
            return f"{folder / name} changed since it was saved (its SHA-256 differs from its marker's)"
    return None


def _legacy_problem(folder: Path) -> str | None:
    names = {p.name for p in folder.iterdir()}
    for what, candidates in _LEGACY_NEEDS.items():
        if not names.intersection(candidates):
            return f"{folder / candidates[0]} is missing" if len(candidates) == 1 else f"{folder} has no {what}"
    if not any("optim" in p.name for p in folder.rglob("*")):
        return f"{folder} has no optimizer state ({folder / 'optimizer.pt'} is missing)"
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        if failure := _load_failure(path):
            return failure
    return None


def _load_failure(path: Path) -> str | None:
    """Whether the start of loading ``path`` fails: the JSON a resume reads, a safetensors header, a torch
    zip's directory."""
    try:
        if path.name in _JSON_READ_ON_RESUME:
            json.loads(path.read_text())
        elif path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), "pt"):
                pass
        elif path.suffix in (".pt", ".pth", ".bin"):
            zipfile.ZipFile(path).close()  # torch.save writes a zip; its directory is at the end
    except Exception as err:  # noqa: BLE001 - any failure to parse is the answer
        return f"{path} does not load ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})"
    return None
