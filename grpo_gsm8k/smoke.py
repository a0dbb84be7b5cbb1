"""`make smoke`: the real DVC pipeline, end to end, on the tiny profile, offline, on CPU.

Copies the repository's tracked files into a fresh git + DVC workspace, puts profiles/tiny.yaml in
place of params.yaml, builds the tiny random-weight model there, runs `dvc repro` and commits the
results, so `dvc metrics diff`, `dvc exp show` and `dvc plots diff` have a baseline to compare with.
The user's own workspace and params are never touched. A workspace that holds experiments is deleted
only when asked (SMOKE_FRESH=1; `make smoke FRESH=1`). Tests use the same functions.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from .config import read_yaml, write_yaml

ROOT = Path(__file__).resolve().parent.parent
TINY_PARAMS = ROOT / "profiles" / "tiny.yaml"
FRESH_ENV = "SMOKE_FRESH"
HTML_TEMPLATE = "../configs/dvc/plots.html"  # relative to .dvc/, as in this repository's .dvc/config


def run(cmd: list[str], cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=cwd, check=True, env=env, text=True)


def tracked_files(root: Path) -> list[str]:
    out = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=root, check=True,
                         capture_output=True, text=True).stdout
    return [line for line in out.splitlines() if (root / line).is_file()]


def params_with(base: dict, overrides: dict) -> dict:
    """A copy of params with ``{"section.key": value}`` overrides."""
    params = copy.deepcopy(base)
    for dotted, value in overrides.items():
        section, key = dotted.split(".", 1)
        params[section][key] = value
    return params


def copy_project(dest: Path, params: dict, skip: tuple[str, ...] = ()) -> Path:
    """The project's tracked files in a fresh folder, with the given params as params.yaml."""
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    for rel in tracked_files(ROOT):
        if rel.startswith((".dvc/", "dvc.lock", *skip)):
            continue
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / rel, dest / rel)
    write_yaml(dest / "params.yaml", params)
    return dest


def commit_repo(dest: Path, dvc: bool) -> Path:
    """A git repository with one commit (DVCLive logs only in one), DVC initialised if asked."""
    env = workspace_env()
    run(["git", "init", "-q"], dest, env)
    if dvc:
        run(["dvc", "init", "-q"], dest, env)
        run(["dvc", "config", "core.analytics", "false"], dest, env)
        run(["dvc", "config", "plots.html_template", HTML_TEMPLATE], dest, env)
    run(["git", "add", "-A"], dest, env)
    run(["git", "commit", "-qm", "smoke workspace"], dest, env)
    return dest


def bench_workspace(dest: Path, params: dict) -> Path:
    """A git repository with this project's files (not its benchmark results or docs) and the given params,
    for a GPU benchmark that runs the stages (bench/real_model.py, bench/multi_gpu.py)."""
    return commit_repo(copy_project(dest, params, skip=("bench/results/", "docs/")), dvc=False)


def make_workspace(dest: Path, params_overrides: dict | None = None) -> Path:
    """A git repo with DVC initialised, the project's files, the tiny params and the tiny model."""
    from .tiny import build_tiny

    params = params_with(read_yaml(TINY_PARAMS), params_overrides or {})
    copy_project(dest, params)
    texts = [json.loads(line)["question"] for line in (dest / "tests/fixtures/gsm8k/train.jsonl").open()]
    build_tiny(texts, dest / params["model"]["name"])
    return commit_repo(dest, dvc=True)


def workspace_env() -> dict:
    env = dict(os.environ, DVC_NO_ANALYTICS="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false", GIT_AUTHOR_NAME="smoke", GIT_AUTHOR_EMAIL="smoke@localhost",
               GIT_COMMITTER_NAME="smoke", GIT_COMMITTER_EMAIL="smoke@localhost")
    # Stages run `python`: make it this interpreter, whose environment holds the project.
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


def experiments(dest: Path) -> list[str]:
    """The DVC experiments kept in the workspace at ``dest`` (git refs under refs/exps), if any."""
    if not (dest / ".git").exists():
        return []
    out = subprocess.run(["git", "for-each-ref", "--format=%(refname)", "refs/exps"], cwd=dest,
                         capture_output=True, text=True).stdout
    return [ref for ref in out.split() if ref.count("/") > 3]  # refs/exps/<sha[:2]>/<sha[2:]>/<name>


def check_replaceable(dest: Path) -> None:
    """Refuse to delete a workspace holding experiments, unless SMOKE_FRESH=1."""
    fresh = os.environ.get(FRESH_ENV, "")
    if fresh not in ("", "0", "1"):
        sys.exit(f"error: {FRESH_ENV}={fresh!r}: set it to 1 to replace the workspace, or leave it unset")
    found = experiments(dest)
    if found and fresh != "1":
        sys.exit(f"error: {dest} holds {len(found)} DVC experiment(s) (`dvc exp show` there lists them), which a "
                 f"new smoke run would delete. Rerun with `make smoke FRESH=1` ({FRESH_ENV}=1) to replace it, or "
                 f"keep working in it.")


def commit_results(dest: Path) -> None:
    env = workspace_env()
    run(["git", "add", "-A"], dest, env)
    run(["git", "commit", "-qm", "smoke run results"], dest, env)


def main() -> None:
    dest = Path(sys.argv[1] if len(sys.argv) > 1 else "build/smoke").resolve()
    check_replaceable(dest)
    make_workspace(dest)
    run(["dvc", "repro"], dest, workspace_env())
    commit_results(dest)
    print(f"\nsmoke run done and committed in {dest}:")
    print((dest / "reports/eval/metrics.json").read_text())


if __name__ == "__main__":
    main()
