"""Crashes, kills and guards: a killed run resumes to the same result, outputs are never half-written,
bad training states stop with a clear message, and the HF token never leaks."""

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from grpo_gsm8k import smoke, training
from grpo_gsm8k.outputs import atomic_path, write_jsonl

ROOT = Path(__file__).resolve().parent.parent


def stage(ws: Path, *cmd: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(list(cmd), cwd=ws, env=smoke.workspace_env(), capture_output=True, text=True, **kwargs)


@pytest.mark.slow
def test_sigkilled_training_resumes_and_matches_an_uninterrupted_run(tmp_path):
    from safetensors.torch import load_file

    killed = smoke.make_workspace(tmp_path / "killed", {"train.max_steps": 12, "train.save_steps": 3})
    assert stage(killed, "dvc", "repro", "prepare").returncode == 0
    clean = tmp_path / "clean"
    shutil.copytree(killed, clean, symlinks=True)

    proc = subprocess.Popen([sys.executable, "stages/train.py"], cwd=killed, env=smoke.workspace_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while not list((killed / "checkpoints").glob(f"checkpoint-*/{training.MARKER}")):
        assert proc.poll() is None and time.time() < deadline, "training ended before its first checkpoint"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    assert not (killed / "checkpoints" / training.FINISHED).exists()

    resumed = stage(killed, "dvc", "repro", "train")
    assert resumed.returncode == 0, resumed.stderr
    step = int(resumed.stdout.split("resuming from checkpoints/checkpoint-")[1].split()[0])
    assert 3 <= step < 12 and step % 3 == 0
    assert stage(clean, "dvc", "repro", "train").returncode == 0

    for ws in (killed, clean):
        assert json.loads((ws / "checkpoints" / training.FINISHED).read_text())["step"] == 12
    curves = [(ws / "reports/train/plots/metrics/loss.tsv").read_text().splitlines() for ws in (killed, clean)]
    assert [int(row.split("\t")[0]) for row in curves[0][1:]] == list(range(1, 13))  # redone steps logged once
    assert curves[0] == curves[1]
    grad_norms = (clean / "reports/train/plots/metrics/grad_norm.tsv").read_text().splitlines()[1:]
    assert any(float(row.split("\t")[1]) > 0 for row in grad_norms)  # the runs really moved the weights
    a, b = (load_file(ws / "models/adapter/adapter_model.safetensors") for ws in (killed, clean))
    assert a.keys() == b.keys()
    for key in a:
        assert (a[key] - b[key]).abs().max() <= 1e-6, key


def test_changed_params_refuse_to_resume_unless_told(tmp_path):
    from grpo_gsm8k.config import ConfigError

    ckpt = tmp_path / "checkpoints" / "checkpoint-6"
    ckpt.mkdir(parents=True)
    (ckpt / training.MARKER).write_text(json.dumps({"run_hash": "aaaa", "step": 6}))
    (tmp_path / "checkpoints" / "checkpoint-9").mkdir()  # killed while saving: no marker
    assert training.resume_checkpoint(tmp_path / "checkpoints", "aaaa", "auto") == ckpt
    with pytest.raises(ConfigError, match="unfinished run with different params.*train.resume: fresh"):
        training.resume_checkpoint(tmp_path / "checkpoints", "bbbb", "auto")
    assert ckpt.exists()
    assert training.resume_checkpoint(tmp_path / "checkpoints", "bbbb", "fresh") is None
    assert not (tmp_path / "checkpoints").exists()
    training.mark_finished(tmp_path / "checkpoints", "aaaa", 9)  # a finished run is history, not work
    assert training.resume_checkpoint(tmp_path / "checkpoints", "bbbb", "auto") is None


KILL_MID_WRITE = """
import os, signal, sys
from grpo_gsm8k.outputs import atomic_path, write_jsonl
target = sys.argv[1]
def rows():
    for i in range(1000):
        if i == 500:
            os.kill(os.getpid(), signal.SIGKILL)
        yield {"i": i, "pad": "x" * 100}
if target.endswith(".jsonl"):
    write_jsonl(target, rows())
else:
    with atomic_path(target) as tmp:
        tmp.mkdir()
        (tmp / "model-00001.safetensors").write_bytes(b"0" * 1000)
        os.kill(os.getpid(), signal.SIGKILL)
"""


@pytest.mark.parametrize("name", ["predictions.jsonl", "merged"])
def test_a_kill_mid_write_leaves_the_previous_output_intact(tmp_path, name):
    target = tmp_path / name
    if name.endswith(".jsonl"):
        write_jsonl(target, [{"old": True}])
    else:
        target.mkdir()
        (target / "config.json").write_text("{}")
    before = sorted(p.name for p in target.iterdir()) if target.is_dir() else target.read_text()
    proc = subprocess.run([sys.executable, "-c", KILL_MID_WRITE, str(target)], capture_output=True)
    assert proc.returncode == -signal.SIGKILL
    after = sorted(p.name for p in target.iterdir()) if target.is_dir() else target.read_text()
    assert after == before  # no truncated file, no half a model folder
    assert [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # the partial write stayed hidden ...
    with atomic_path(target) as tmp:
        tmp.write_text("new") if name.endswith(".jsonl") else tmp.mkdir()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # ... until the next write cleared it


def test_non_finite_loss_stops_training_with_advice():
    from transformers import TrainerControl, TrainerState, TrainingArguments

    guards = training.Guards(["correctness"])
    args = TrainingArguments(output_dir="checkpoints", use_cpu=True, report_to="none")
    state = TrainerState()
    state.global_step = 7
    guards.on_log(args, state, TrainerControl(), logs={"loss": 0.5, "grad_norm": 1.0})
    for logs in ({"loss": math.nan}, {"grad_norm": math.inf}):
        with pytest.raises(training.TrainingStopped, match=r"non-finite .* at step 7.*last good checkpoint"):
            guards.on_log(args, state, TrainerControl(), logs=logs)


def test_a_reward_that_never_scores_is_reported(capsys):
    guards = training.Guards(["correctness", "format"], patience=3)
    from transformers import TrainerControl, TrainerState, TrainingArguments

    args = TrainingArguments(output_dir="x", use_cpu=True, report_to="none")
    state = TrainerState()
    for step in range(4):
        state.global_step = step
        guards.on_log(args, state, TrainerControl(), logs={
            "rewards/correctness/mean": 0.0, "rewards/correctness/std": 0.0,
            "rewards/format/mean": 0.5, "rewards/format/std": 0.1})
    out = capsys.readouterr().out
    assert out.count("reward 'correctness' gave 0 to every completion for 3 logged steps") == 1
    assert "'format'" not in out


def test_out_of_memory_is_answered_with_the_params_to_lower(tmp_path, tiny_model, tiny_params, monkeypatch):
    import torch
    import yaml
    from trl import GRPOTrainer

    import importlib.util

    spec = importlib.util.spec_from_file_location("train_stage", ROOT / "stages" / "train.py")
    train_stage = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(train_stage)

    tiny_params["model"]["name"] = str(tiny_model)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(tiny_params))
    write_jsonl(tmp_path / "data/prepared/train.jsonl", [
        {"prompt": [{"role": "user", "content": "1+1?"}], "answer": "2", "question": "1+1?"}] * 8)
    monkeypatch.chdir(tmp_path)

    def out_of_memory(self, **kwargs):  # a CPU cannot run out of CUDA memory: raise what CUDA would
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(GRPOTrainer, "train", out_of_memory)
    with pytest.raises(SystemExit, match=r"ran out of memory.*train\.per_device_train_batch_size.*"
                                         r"train\.max_completion_length"):
        train_stage.train(train_stage.config.load())
    assert not (tmp_path / "models").exists()


def test_git_repository_without_commits_is_refused_before_anything_loads(tmp_path, monkeypatch):
    """DVCLive would crash on an unborn HEAD only after the model loaded; the stage says so up front."""
    root = Path(__file__).resolve().parent.parent
    shutil.copy(root / "profiles/tiny.yaml", tmp_path / "params.yaml")
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    proc = subprocess.run([sys.executable, str(root / "stages/train.py")], cwd=tmp_path,
                          env=dict(os.environ, PYTHONPATH=str(root)), capture_output=True, text=True)
    assert proc.returncode != 0
    assert "has no commits" in proc.stderr and "git commit" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == [".git", "params.yaml"]  # nothing written

    monkeypatch.chdir(tmp_path)
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@localhost", "commit", "-q", "--allow-empty",
                    "-m", "init"], check=True)
    training.require_git_commit()  # one commit is enough
    (tmp_path / "sub").mkdir()
    monkeypatch.chdir(tmp_path / "sub")
    training.require_git_commit()  # found from a subfolder, as DVCLive finds it
