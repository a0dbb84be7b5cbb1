"""Publishing to the Hugging Face Hub: what gets uploaded, idempotently, with a receipt.

Two repos: the LoRA adapter (hub.adapter_repo_id, from models/adapter) and the merged 16-bit model
(hub.repo_id, from models/merged). Each is uploaded from a staged folder: symlinks to the DVC
output's files (never modified), the summary figure, for the merged model the adapter's
training_run.json, and README.md: the model card with the results, written first to
reports/hub/<adapter|merged>/README.md (the push stage's output), so that what is published, or in a
dry run what would be, is on disk byte for byte. The receipt maps every uploaded file to its local
source. The token comes only from HF_TOKEN in the
environment and is never printed or written; every message that leaves here is scrubbed of it.
"""

from __future__ import annotations

import contextlib
import hashlib
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from .config import ConfigError, Params
from .model_card import IMAGE, build_card, saved_dtype
from .outputs import atomic_path, read_json

ADAPTER = "models/adapter"
MERGED = "models/merged"
EVAL_METRICS = "reports/eval/metrics.json"
SUMMARY = "reports/summary.png"
DVC_LOCK = "dvc.lock"
TRAINING_RUN = "training_run.json"
CARDS = "reports/hub"     # <CARDS>/<kind>/README.md: each repo's card exactly as uploaded
SCAN_LIMIT = 64 * 2**20   # files up to this size are checked for the token before upload


class HubError(RuntimeError):
    """A Hub problem (unreachable, offline, refused), explained for the user; never holds the token."""


@dataclass(frozen=True)
class Target:
    """One repo to publish: the DVC output folder, the extra files and the card that go with it."""

    kind: str                       # "adapter" or "merged"
    key: str                        # the params key naming the repo
    repo_id: str | None
    folder: Path
    card: str                       # README.md text
    card_file: Path                 # where the card is written before upload
    extra: dict[str, Path] = field(default_factory=dict)  # path in repo -> local file

    def files(self) -> dict[str, Path]:
        """Path in the repo -> local file: the output folder (its own README.md, the card the train or
        merge stage wrote without results, replaced), the extra files and the card."""
        files = {p.relative_to(self.folder).as_posix(): p for p in sorted(self.folder.rglob("*")) if p.is_file()}
        return files | self.extra | {"README.md": self.card_file}


def repo_keys(p: Params) -> dict[str, str | None]:
    return {"hub.adapter_repo_id": p.hub.adapter_repo_id, "hub.repo_id": p.hub.repo_id}


def check_push(p: Params, token: str | None) -> None:
    """Before any work: a repo to publish needs HF_TOKEN in the environment."""
    named = [key for key, repo in repo_keys(p).items() if repo]
    if named and not token:
        raise ConfigError(f"{' and '.join(named)} set but HF_TOKEN is not in the environment: export HF_TOKEN "
                          "(a write token; `docker run -e HF_TOKEN ...`), or set hub.repo_id and "
                          "hub.adapter_repo_id to null to only write what would be uploaded")


def check_online(p: Params) -> None:
    """Before any work: publishing with HF_HUB_OFFLINE set cannot succeed, so say so now."""
    from huggingface_hub import constants

    named = [key for key, repo in repo_keys(p).items() if repo]
    if named and constants.HF_HUB_OFFLINE:
        raise HubError(f"{' and '.join(named)} set but offline mode is on (HF_HUB_OFFLINE or TRANSFORMERS_OFFLINE), "
                       f"so the Hub at {constants.ENDPOINT} cannot be reached: unset HF_HUB_OFFLINE on a machine "
                       "with network access, or set hub.repo_id and hub.adapter_repo_id to null to only write "
                       "what would be uploaded")


def scrub(text: str, token: str | None) -> str:
    return text.replace(token, "<HF_TOKEN>") if token else text


def git_revision(cwd: str | Path = ".") -> str:
    """`git rev-parse --short HEAD`, with -dirty when tracked files changed; "unknown" outside git."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, check=True).stdout.strip()

    try:
        rev = git("rev-parse", "--short", "HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return f"{rev}-dirty" if dirty else rev


def dvc_revision(lock: str | Path = DVC_LOCK, stage: str = "train", path: str = ADAPTER) -> str:
    """The md5 that dvc.lock records for the train stage's adapter ("unknown" without a lock entry)."""
    try:
        outs = yaml.safe_load(Path(lock).read_text())["stages"][stage]["outs"]
        md5 = next(o.get("md5") for o in outs if o.get("path") == path)
    except (OSError, yaml.YAMLError, KeyError, TypeError, StopIteration):
        return "unknown"
    return md5 or "unknown"


def file_sha256(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def folder_manifest(folder: str | Path) -> dict[str, str]:
    """sha256 of every file, by relative POSIX path: what an upload would send."""
    folder = Path(folder)
    return {path.relative_to(folder).as_posix(): file_sha256(path)
            for path in sorted(folder.rglob("*")) if path.is_file()}


def content_hash(manifest: dict[str, str]) -> str:
    return hashlib.sha256("".join(f"{k}\0{v}\n" for k, v in sorted(manifest.items())).encode()).hexdigest()


def targets(p: Params, adapter: str | Path = ADAPTER, merged: str | Path = MERGED,
            metrics_file: str | Path = EVAL_METRICS, summary: str | Path = SUMMARY,
            cards: str | Path = CARDS) -> list[Target]:
    """The two repos, with their cards; fails naming the missing input if a stage has not run."""
    adapter, merged, summary, cards = Path(adapter), Path(merged), Path(summary), Path(cards)
    for path in (adapter / TRAINING_RUN, merged, Path(metrics_file), summary):
        if not path.exists():
            raise ConfigError(f"{path}: not found; run the train, evaluate, merge and report stages first "
                              "(`dvc repro push` runs them)")
    metrics, run = read_json(metrics_file), read_json(adapter / TRAINING_RUN)
    common = dict(base_model=p.model.name, system_prompt=p.data.system_prompt, metrics=metrics, training_run=run)
    return [
        Target("adapter", "hub.adapter_repo_id", p.hub.adapter_repo_id, adapter,
               str(build_card("adapter", repo_id=p.hub.adapter_repo_id, local_folder=str(adapter),
                              other_repo_id=p.hub.repo_id, **common)),
               cards / "adapter" / "README.md", {IMAGE: summary}),
        Target("merged", "hub.repo_id", p.hub.repo_id, merged,
               str(build_card("merged", repo_id=p.hub.repo_id, local_folder=str(merged),
                              other_repo_id=p.hub.adapter_repo_id, merged_dtype=saved_dtype(merged), **common)),
               cards / "merged" / "README.md", {IMAGE: summary, TRAINING_RUN: adapter / TRAINING_RUN}),
    ]


@contextlib.contextmanager
def staged(target: Target) -> Iterator[Path]:
    """Write the card to target.card_file, then yield a temporary folder that is exactly what gets
    uploaded: symlinks to target.files() (the outputs stay untouched)."""
    with atomic_path(target.card_file) as tmp:
        tmp.write_text(target.card, encoding="utf-8")
    with tempfile.TemporaryDirectory(prefix=f"push-{target.kind}-") as tmp:
        root = Path(tmp)
        for rel, src in target.files().items():
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            (root / rel).symlink_to(src.resolve())
        yield root


def check_no_token(folder: Path, token: str | None) -> None:
    if not token:
        return
    needle = token.encode()
    for path in sorted(folder.rglob("*")):
        if path.is_file() and path.stat().st_size <= SCAN_LIMIT and needle in path.read_bytes():
            raise HubError(f"refusing to upload {path.relative_to(folder)}: it contains the HF_TOKEN value")


def previous_entry(receipt_path: str | Path, kind: str) -> dict | None:
    try:
        return read_json(receipt_path)["repos"][kind]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def remote_head(api, repo_id: str):
    """The repo's current info (sha, private) on the Hub, or None if it does not exist."""
    from huggingface_hub.errors import RepositoryNotFoundError

    try:
        return api.repo_info(repo_id, repo_type="model")
    except RepositoryNotFoundError:
        return None


def upload(api, target: Target, folder: Path, entry: dict, last: dict | None, private: bool,
           message: str, description: str) -> dict:
    """Upload one staged folder unless the last receipt's content is what the Hub still serves."""
    repo_id = target.repo_id
    if (last and last.get("repo_id") == repo_id and last.get("content_hash") == entry["content_hash"]
            and last.get("commit_id")):
        info = remote_head(api, repo_id)
        if info is not None and info.sha == last["commit_id"]:
            return entry | {"uploaded": False, "reason": "unchanged", "commit_id": info.sha,
                            "url": last.get("url") or f"{api.endpoint}/{repo_id}"}
    url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    before = remote_head(api, repo_id)
    if before is not None and before.private is not None and bool(before.private) != private:
        print(f"warning: {repo_id} is {'private' if before.private else 'public'} on the Hub but "
              f"hub.private is {private}; its visibility was left as it is")
    commit = api.upload_folder(repo_id=repo_id, folder_path=str(folder), repo_type="model",
                               commit_message=message, commit_description=description)
    if before is not None and commit.oid == before.sha:  # every file already there: the Hub made no commit
        return entry | {"uploaded": False, "reason": "unchanged", "commit_id": commit.oid, "url": str(url)}
    return entry | {"uploaded": True, "reason": None, "commit_id": commit.oid, "url": str(url)}


def publish(p: Params, token: str | None, receipt_path: str | Path, **paths) -> dict:
    """Stage, hash and (where a repo id and the token are set) upload both repos; returns the receipt.

    Raises HubError, with the endpoint and what to do, when the Hub cannot be reached or refuses.
    """
    from huggingface_hub import HfApi, constants

    git_rev, dvc_rev = git_revision(), dvc_revision()
    receipt = {"git_revision": git_rev, "dvc_revision": dvc_rev, "endpoint": constants.ENDPOINT,
               "private": p.hub.private, "repos": {}}
    api = HfApi(token=token) if token else None
    for target in targets(p, **paths):
        with staged(target) as folder:
            manifest = folder_manifest(folder)
            entry = {"repo_id": target.repo_id, "url": None, "commit_id": None, "source": str(target.folder),
                     "content_hash": content_hash(manifest),
                     "files": {rel: str(src) for rel, src in sorted(target.files().items())}, "uploaded": False}
            if not target.repo_id or api is None:
                why = f"{target.key} is null" if not target.repo_id else "HF_TOKEN is not set"
                receipt["repos"][target.kind] = entry | {"reason": f"dry run: {why}"}
                continue
            check_no_token(folder, token)
            label = "LoRA adapter" if target.kind == "adapter" else "merged model"
            message = f"Upload GRPO GSM8K {label} (git {git_rev}, dvc {dvc_rev})"
            description = (f"git revision: {git_rev}\ndvc train {ADAPTER} md5: {dvc_rev}\n"
                           f"content hash (sha256 of the file manifest): {entry['content_hash']}")
            try:
                receipt["repos"][target.kind] = upload(api, target, folder, entry, previous_entry(
                    receipt_path, target.kind), p.hub.private, message, description)
            except Exception as err:
                mapped = _hub_error(err, target, constants.ENDPOINT, token)
                if mapped is err:
                    raise
                raise mapped from None
    receipt["uploaded"] = any(e["uploaded"] for e in receipt["repos"].values())  # anything new on the Hub
    return receipt


def _hub_error(err: Exception, target: Target, endpoint: str, token: str | None) -> Exception:
    import httpx
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    what = f"publishing {target.folder} to {target.key}={target.repo_id}"
    if isinstance(err, (httpx.TransportError, OfflineModeIsEnabled, ConnectionError)):
        return HubError(f"{what}: cannot reach the Hugging Face Hub at {endpoint} ({type(err).__name__}). "
                        "Check the network or proxy (and HF_ENDPOINT if set), then rerun; or set "
                        "hub.repo_id and hub.adapter_repo_id to null to only write what would be uploaded")
    if isinstance(err, HfHubHTTPError):
        status = err.response.status_code if err.response is not None else "?"
        hint = (" Check that HF_TOKEN is a write token with access to that namespace."
                if status in (401, 403, 404) else "")
        return HubError(scrub(f"{what}: the Hub at {endpoint} answered HTTP {status}: {err}.{hint}", token))
    if isinstance(err, ValueError):  # e.g. invalid README.md metadata reported by the Hub
        return HubError(scrub(f"{what}: {err}", token))
    return err


def summary_lines(receipt: dict) -> list[str]:
    lines = []
    for kind, e in receipt["repos"].items():
        n = len(e["files"])
        if e["uploaded"]:
            lines.append(f"{kind}: uploaded {n} files to {e['url']} (commit {e['commit_id']})")
        elif e["reason"] == "unchanged":
            lines.append(f"{kind}: {e['repo_id']} unchanged at commit {e['commit_id']}; nothing uploaded")
        else:
            lines.append(f"{kind}: {e['reason']}; would upload {n} files from {e['source']}: "
                         + ", ".join(e["files"]) + f" (model card: {e['files']['README.md']})")
    return lines
