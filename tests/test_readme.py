"""The README's commands, as printed, in a copy of this checkout: `make smoke`, then every command in
build/smoke; then what a newcomer hits next there (a refused param, Ctrl-C, the metrics, the plots,
the model cards). One smoke workspace for all of it: each pipeline run takes minutes on CPU.

The README's rule, enforced here: every ```bash block runs, in order, in one shell; a block whose first
line is `# GPU machine` is skipped, and may hold nothing but Docker, `make all` and multi-GPU commands.
"""

import hashlib
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from grpo_gsm8k import smoke

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parent.parent
GPU_MARK = "# GPU machine"
GPU_ONLY = ("docker ", "mkdir -p ~/.cache/huggingface && docker", "mkdir -p run && docker", "make all",
            "make train-multi-gpu ")
VENV = Path(sys.prefix)


def readme_blocks() -> tuple[list[str], list[str]]:
    """(blocks to run, blocks skipped as GPU-only) of README.md."""
    blocks = re.findall(r"^```bash\n(.*?)^```", (ROOT / "README.md").read_text(), re.S | re.M)
    skipped = [b for b in blocks if b.startswith(GPU_MARK)]
    return [b for b in blocks if not b.startswith(GPU_MARK)], skipped


def commands(block: str) -> list[str]:
    """The block's commands: continuation lines joined, comments and blank lines left out."""
    joined = re.sub(r"\\\n\s*", " ", block)
    return [line.strip() for line in joined.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def user_env() -> dict:
    """A shell as a newcomer's: no virtual environment on PATH (the README activates it), offline."""
    env = {k: v for k, v in smoke.workspace_env().items() if k not in ("VIRTUAL_ENV", "PYTHONHOME")}
    env["PATH"] = os.pathsep.join(p for p in env["PATH"].split(os.pathsep) if not p.startswith(str(VENV)))
    return env


def sha(path: Path) -> str:
    if path.is_dir():
        return hashlib.sha256(b"".join(p.relative_to(path).as_posix().encode() + p.read_bytes()
                                       for p in sorted(path.rglob("*")) if p.is_file())).hexdigest()
    return hashlib.sha256(path.read_bytes()).hexdigest()


KEPT = ("models/adapter", "models/merged", "reports/eval/metrics.json", "reports/eval/predictions.jsonl",
        "reports/eval_base/metrics.json", "reports/eval_base/predictions.jsonl")


def dvc(ws: Path, *args: str, check=True) -> subprocess.CompletedProcess:
    proc = subprocess.run(["dvc", *args], cwd=ws, env=smoke.workspace_env(), capture_output=True, text=True)
    assert not check or proc.returncode == 0, f"dvc {' '.join(args)}:\n{proc.stdout}\n{proc.stderr}"
    return proc


@pytest.fixture(scope="module")
def walked(tmp_path_factory):
    """A copy of this checkout (a git repository, .venv linked to this environment), where the README's
    blocks ran in one bash; returns (checkout, the shell's output)."""
    repo = smoke.commit_repo(smoke.copy_project(tmp_path_factory.mktemp("readme") / "checkout",
                                                yaml.safe_load((ROOT / "params.yaml").read_text())), dvc=False)
    (repo / ".venv").symlink_to(VENV)
    os.utime(repo / "requirements-cpu.txt", (0, 0))  # older than .venv/.done: make builds nothing
    run, _ = readme_blocks()
    script = "\n".join(["set -eo pipefail",
                        "trap 'echo \"README COMMAND FAILED: $BASH_COMMAND\" >&2' ERR", *run])
    proc = subprocess.run(["bash", "-c", script], cwd=repo, env=user_env(), capture_output=True, text=True,
                          timeout=3600)
    assert proc.returncode == 0, f"{proc.stderr[-6000:]}\n--- stdout ---\n{proc.stdout[-3000:]}"
    return repo, proc.stdout + proc.stderr


def test_readme_gpu_blocks_are_marked_and_hold_only_gpu_commands():
    run, skipped = readme_blocks()
    assert run and skipped
    for block in skipped:
        for command in commands(block):
            assert command.startswith(GPU_ONLY), f"a skipped README block runs {command!r}, which the test must run"
    assert not any(command.startswith(("docker", "make all", "make train-multi-gpu"))
                   for block in run for command in commands(block)), "a GPU-only command outside a marked block"


def test_every_readme_command_runs_as_printed(walked):
    repo, out = walked
    ws = repo / "build/smoke"
    assert json.loads((ws / "predictions.json").read_text())["results"]  # `make predict --json | json.tool`
    # one progress line per step, not the Trainer's dict; no boilerplate card in the checkpoints
    assert re.search(r"^step 1/4  reward -?\d\.\d{3}  correctness \d\.\d{3}  \d+\.\d s/step$", out, re.M), out[-3000:]
    assert "{'loss'" not in out and "'reward':" not in out
    assert not list((ws / "checkpoints").rglob("README.md"))
    # the smoke run is committed: the README's comparisons had a baseline
    assert "smoke run results" in subprocess.run(["git", "log", "--format=%s"], cwd=ws, capture_output=True,
                                                 text=True).stdout
    assert "dvc_plots" not in subprocess.run(["git", "status", "--porcelain"], cwd=ws, capture_output=True,
                                             text=True).stdout


def test_smoke_refuses_to_delete_a_workspace_with_experiments(walked):
    repo, _ = walked
    ws = repo / "build/smoke"
    before = sha(ws / "models/adapter")
    proc = subprocess.run(["make", "smoke"], cwd=repo, env=user_env(), capture_output=True, text=True)
    assert proc.returncode != 0
    assert "holds 2 DVC experiment(s)" in proc.stderr and "make smoke FRESH=1" in proc.stderr, proc.stderr
    assert sha(ws / "models/adapter") == before and len(smoke.experiments(ws)) == 2


def test_metrics_are_the_figures_to_compare_and_plots_share_the_step_axis(walked):
    ws = walked[0] / "build/smoke"
    shown = json.loads(dvc(ws, "metrics", "show", "--json").stdout)
    files = {path: data["data"] for rev in shown.values() for path, data in rev["data"].items()}
    assert set(files) == {"reports/eval/metrics.json", "reports/train/summary.json"}
    assert {"trained", "base", "delta"} <= set(files["reports/eval/metrics.json"])
    assert {"accuracy", "accuracy_lenient", "format_adherence", "completion_tokens_mean"} <= set(
        files["reports/eval/metrics.json"]["trained"])
    assert set(files["reports/train/summary.json"]) == {"train_minutes", "optimizer_steps"}

    plots = json.loads(dvc(ws, "plots", "show", "--json").stdout)
    first_steps = set()
    for name, entries in plots["data"].items():
        if name.startswith("Held-out accuracy during training"):  # from step 0, before training; by minutes too
            continue  # (tests/test_heldout_curve.py)
        for entry in entries:
            if entry.get("type") == "vega":
                values = entry["content"]["data"]["values"]
                assert entry["content"]["encoding"]["x"]["field"] == "step", name
                first_steps.add(min(int(row["step"]) for row in values))
    assert 1 in first_steps and 0 not in first_steps, first_steps  # optimizer steps, not row numbers from 0
    assert any(entry.get("type") == "image" for entries in plots["data"].values() for entry in entries)
    page = (ws / "dvc_plots/index.html").read_text()
    assert '<meta charset="utf-8">' in page and "<img" in page and "summary.png" in page


def test_refused_params_keep_the_previous_outputs(walked):
    ws = walked[0] / "build/smoke"
    dvc(ws, "checkout")
    before = {path: sha(ws / path) for path in KEPT}
    saved = (ws / "params.yaml").read_text()
    try:
        for stage, section, key, refused in (("train", "train", "learning_rate", -1),
                                             ("evaluate_base", "eval", "max_new_tokens", 0),
                                             ("evaluate", "eval", "max_new_tokens", 0),
                                             ("merge", "merge", "dtype", "float8")):
            params = yaml.safe_load(saved)
            params[section][key] = refused
            (ws / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
            proc = dvc(ws, "repro", "-s", stage, check=False)
            assert proc.returncode != 0 and f"{section}.{key}" in proc.stderr, proc.stderr
            assert {path: sha(ws / path) for path in KEPT} == before, stage
    finally:
        (ws / "params.yaml").write_text(saved)


def test_ctrl_c_in_training_stops_cleanly_and_keeps_the_adapter(walked):
    """Ctrl-C (SIGINT to the terminal's process group) while `dvc repro` trains: the stage says where it
    stopped, without a traceback, and the previous adapter, which DVC would delete first, is still there."""
    ws = walked[0] / "build/smoke"
    dvc(ws, "checkout")
    before = sha(ws / "models/adapter")
    saved = (ws / "params.yaml").read_text()
    params = yaml.safe_load(saved)
    params["train"]["learning_rate"] = 0.002
    params["train"]["max_steps"] = 200  # a loaded machine reads "step 1/" late: the SIGINT must still find it training
    (ws / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    # SIGINT handled as in a terminal's foreground job: a test run started in the background by a non-interactive
    # shell (`make test &`) inherits SIGINT ignored, and the stage would then train on through the Ctrl-C
    proc = subprocess.Popen(["dvc", "repro", "train"], cwd=ws, env=smoke.workspace_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    lines = []
    try:
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("step 1/"):
                os.killpg(proc.pid, signal.SIGINT)
                break
        lines += proc.stdout.readlines()
        proc.wait(timeout=300)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        (ws / "params.yaml").write_text(saved)
    out = "".join(lines)
    assert proc.returncode != 0, out
    assert re.search(r"stopped at step \d+ \((newest checkpoint: step \d+|no checkpoint yet)\); rerun to resume", out), out
    assert "Traceback" not in out and "KeyboardInterrupt" not in out, out
    assert sha(ws / "models/adapter") == before
    dvc(ws, "checkout")


def test_model_card_snippets_run_as_printed_on_the_local_folders(walked):
    ws = walked[0] / "build/smoke"
    dvc(ws, "checkout")
    run = json.loads((ws / "models/adapter/training_run.json").read_text())
    assert run["base_weights"] == {"load_in_4bit": False, "dtype": "float32"}  # CPU, though the profile asks 4-bit
    for kind in ("adapter", "merged"):
        card = (ws / f"models/{kind}/README.md").read_text()
        assert "QLoRA on" not in card and "adamw_8bit" not in card and "16-bit" not in card
        snippets = [code for code in re.findall(r"```python\n(.*?)```", card, re.S) if "vllm" not in code]
        assert len(snippets) == 1
        proc = subprocess.run([sys.executable, "-c", snippets[0]], cwd=ws, env=smoke.workspace_env(),
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr
