"""Fast checks of what a newcomer reads: the progress line, and `make smoke` keeping a workspace that
holds experiments (tests/test_readme.py walks the whole README)."""

import subprocess
import sys
from pathlib import Path

import pytest

from grpo_gsm8k import smoke, training

ROOT = Path(__file__).resolve().parent.parent


def test_progress_is_one_line_per_logged_step(capsys):
    from transformers import TrainerControl, TrainerState, TrainingArguments

    args = TrainingArguments(output_dir="unused", use_cpu=True, report_to="none")
    state, line = TrainerState(global_step=0, max_steps=8), training.StepLine()
    line.on_train_begin(args, state, TrainerControl())
    state.global_step = 2
    line.on_log(args, state, TrainerControl(), logs={"loss": 0.1, "reward": 0.4123, "rewards/correctness/mean": 0.125,
                                                      "completions/mean_length": 17.0, "learning_rate": 1e-5})
    state.global_step = 8
    line.on_log(args, state, TrainerControl(), logs={"train_runtime": 90.0, "train_loss": 0.2})
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2
    assert lines[0].startswith("step 2/8  reward 0.412  correctness 0.125  ") and lines[0].endswith(" s/step")
    assert lines[1] == "trained to step 8 in 1.5 min"


def test_smoke_keeps_a_workspace_with_experiments_unless_asked(tmp_path):
    ws = tmp_path / "smoke"
    ws.mkdir()
    (ws / "keep.txt").write_text("results\n")
    smoke.commit_repo(ws, dvc=False)
    env = smoke.workspace_env()
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ws, env=env, capture_output=True, text=True).stdout.strip()
    subprocess.run(["git", "update-ref", f"refs/exps/{head[:2]}/{head[2:]}/lr-high", head], cwd=ws, env=env, check=True)
    subprocess.run(["git", "update-ref", "refs/exps/exec/EXEC_HEAD", head], cwd=ws, env=env, check=True)
    assert smoke.experiments(ws) == [f"refs/exps/{head[:2]}/{head[2:]}/lr-high"]

    proc = subprocess.run([sys.executable, "-m", "grpo_gsm8k.smoke", str(ws)], cwd=ROOT, env=env,
                          capture_output=True, text=True)
    assert proc.returncode != 0
    assert f"error: {ws} holds 1 DVC experiment(s)" in proc.stderr and "make smoke FRESH=1" in proc.stderr
    assert (ws / "keep.txt").read_text() == "results\n"

    typo = subprocess.run([sys.executable, "-m", "grpo_gsm8k.smoke", str(ws)], cwd=ROOT,
                          env=dict(env, SMOKE_FRESH="yes"), capture_output=True, text=True)
    assert typo.returncode != 0 and "SMOKE_FRESH='yes'" in typo.stderr and (ws / "keep.txt").exists()

