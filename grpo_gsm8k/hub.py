"""Publishing to the Hugging Face Hub: what gets uploaded, idempotently, with a receipt."""

from __future__ import annotations

import hashlib
from pathlib import Path

from .config import ConfigError


def check_push(repo_id: str | None, token: str | None) -> None:
    if repo_id and not token:
        raise ConfigError("hub.repo_id is set but HF_TOKEN is not in the environment; "
                          "export HF_TOKEN (or `docker run -e HF_TOKEN ...`), or set hub.repo_id: null")


def folder_manifest(folder: str | Path) -> dict[str, str]:
    """sha256 of every file, by relative path: what an upload would send."""
    folder = Path(folder)
    return {str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
            for path in sorted(folder.rglob("*")) if path.is_file()}


def content_hash(manifest: dict[str, str]) -> str:
    return hashlib.sha256("".join(f"{k}\0{v}\n" for k, v in sorted(manifest.items())).encode()).hexdigest()


def publish(folder: str, repo_id: str | None, private: bool, token: str | None) -> dict:
    manifest = folder_manifest(folder)
    receipt = {"folder": folder, "files": sorted(manifest), "content_hash": content_hash(manifest),
               "repo_id": repo_id, "uploaded": False, "commit_id": None, "url": None}
    if not repo_id:
        receipt["message"] = f"hub.repo_id is null: would upload {len(manifest)} files from {folder}"
        return receipt
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    commit = api.upload_folder(repo_id=repo_id, folder_path=folder, repo_type="model",
                               commit_message=f"Upload GRPO GSM8K model ({receipt['content_hash'][:12]})")
    receipt |= {"uploaded": True, "commit_id": commit.oid, "url": str(url),
                "message": f"uploaded {len(manifest)} files to {url}"}
    return receipt
