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
import yaml

from grpo_gsm8k import smoke, training
from grpo_gsm8k.outputs import atomic_path, write_jsonl

ROOT = Path(__file__).resolve().parent.parent


def stage(ws: Path, *cmd: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(list(cmd), cwd=ws, env=smoke.workspace_env(), capture_output=True, text=True, **kwargs)


def start_training(ws: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "stages/train.py"], cwd=ws, env=smoke.workspace_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def kill_after_checkpoint(ws: Path, step: int) -> None:
    """SIGKILL the train stage as soon as a complete checkpoint of ``step`` or later exists."""
    proc = start_training(ws)
    deadline = time.time() + 300
    while not any(int(m.parent.name.split("-")[1]) >= step for m in (ws / "checkpoints").glob(f"checkpoint-*/{training.MARKER}")):
        assert proc.poll() is None and time.time() < deadline, f"training ended before a checkpoint of step {step}"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    assert not (ws / "checkpoints" / training.FINISHED).exists()


def resume(ws: Path) -> int:
    """Rerun the train stage; the step of the checkpoint it resumed from."""
    resumed = stage(ws, "dvc", "repro", "train")
    assert resumed.returncode == 0, resumed.stderr
    return int(resumed.stdout.split("resuming from checkpoints/checkpoint-")[1].split()[0])


CURVES = Path("reports/train/plots/metrics")
# Wall-clock speeds, and train_loss: the mean loss of the steps this process ran, so a resumed run's differs.
NOT_REPRODUCIBLE = {Path(f"{name}.tsv") for name in ("step_time", "train_runtime", "train_samples_per_second",
                                                     "train_steps_per_second", "train_loss")}


def assert_same_run(killed: Path, clean: Path, steps: int) -> None:
    """Same curves (each step logged once) and the same adapter as the uninterrupted run."""
    from safetensors.torch import load_file

    for ws in (killed, clean):
        assert json.loads((ws / "checkpoints" / training.FINISHED).read_text())["step"] == steps
    curves = [{p.relative_to(ws / CURVES): p.read_text() for p in (ws / CURVES).rglob("*.tsv")} for ws in (killed, clean)]
    assert curves[0].keys() == curves[1].keys()
    assert [int(row.split("\t")[0]) for row in curves[0][Path("loss.tsv")].splitlines()[1:]] == list(range(1, steps + 1))
    for name in curves[0].keys() - NOT_REPRODUCIBLE:  # rewards, lengths, entropy, grad norms, ...
        assert curves[0][name] == curves[1][name], name
    grad_norms = curves[1][Path("grad_norm.tsv")].splitlines()[1:]
    assert any(float(row.split("\t")[1]) > 0 for row in grad_norms)  # the runs really moved the weights
    a, b = (load_file(ws / "models/adapter/adapter_model.safetensors") for ws in (killed, clean))
    assert a.keys() == b.keys()
    for key in a:  # bitwise equal on CPU; 1e-6 leaves room for float summation order, 1000x below a wrong resume
        assert (a[key] - b[key]).abs().max() <= 1e-6, key


def workspaces(tmp_path: Path, overrides: dict) -> tuple[Path, Path]:
    """Two identical prepared workspaces: one to kill and resume, one to run uninterrupted."""
    killed = smoke.make_workspace(tmp_path / "killed", overrides)
    assert stage(killed, "dvc", "repro", "prepare").returncode == 0
    clean = tmp_path / "clean"
    shutil.copytree(killed, clean, symlinks=True)
    assert stage(clean, "dvc", "repro", "train").returncode == 0
    return killed, clean


@pytest.mark.slow
def test_a_sigkilled_run_resumes_and_matches_an_uninterrupted_run(tmp_path):
    """SIGKILL mid-run, `dvc repro train` again: the same curves and adapter as a run never killed. The hard case:
    8 prompts at 2 per step are 4 steps per pass, 12 steps 3 passes; the kill lands in pass 2 (the resume must
    find the right pass over the shuffled data, not only the right step), and the resumed run checkpoints at
    the save_steps changed after the kill (4, not the killed run's 3)."""
    killed, clean = workspaces(tmp_path, {"data.train_limit": 8, "train.max_steps": 12, "train.save_steps": 3})
    kill_after_checkpoint(killed, 6)
    params = yaml.safe_load((killed / "params.yaml").read_text())
    params["train"]["save_steps"] = 4
    (killed / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    step = resume(killed)
    assert step == 6  # in pass 2 (steps 5-8); the next checkpoint (9) is seconds away
    assert sorted(p.name for p in (killed / "checkpoints").glob("checkpoint-*")) == ["checkpoint-12", "checkpoint-8"]
    assert_same_run(killed, clean, 12)


def test_changed_params_refuse_to_resume_naming_what_differs(tmp_path, tiny_params, capsys, monkeypatch):
    from transformers import TrainerControl, TrainerState, TrainingArguments

    from grpo_gsm8k import config

    data, ckpts = tmp_path / "train.jsonl", tmp_path / "checkpoints"
    write_jsonl(data, [{"question": "1+1?", "answer": "2"}])
    killed = training.run_identity(config.parse(tiny_params), data)
    (ckpts / "checkpoint-6").mkdir(parents=True)
    args = TrainingArguments(output_dir=str(ckpts), use_cpu=True, report_to="none")
    training.CheckpointMarker(killed).on_save(args, TrainerState(global_step=6), TrainerControl())
    (ckpts / "checkpoint-9").mkdir()  # killed while saving: no marker

    tiny_params["train"] |= {"save_steps": 5, "save_total_limit": 9, "logging_steps": 3}  # how it is saved, watched
    same = training.run_identity(config.parse(tiny_params), data)
    assert training.resume_checkpoint(ckpts, same) == ckpts / "checkpoint-6"
    assert f"{ckpts}/checkpoint-9/{training.MARKER} is missing" in capsys.readouterr().out  # passed over, said so

    tiny_params["train"]["learning_rate"] = 0.002
    tiny_params["train"]["reward_weights"]["format"] = 1.0
    write_jsonl(data, [{"question": "1+2?", "answer": "3"}])
    changed = training.run_identity(config.parse(tiny_params), data)
    with pytest.raises(config.ConfigError) as refused:
        training.resume_checkpoint(ckpts, changed)
    message = str(refused.value)
    assert f"{ckpts}/ holds an unfinished run (newest checkpoint: step 6)" in message
    assert ("differs from this one in train.learning_rate (0.001 there, 0.002 now); train.reward_weights.format "
            "(0.5 there, 1.0 now); the training data (data/prepared/train.jsonl)") in message
    assert "`GRPO_FRESH=1 dvc repro train` (or `python stages/train.py --fresh`)" in message
    assert (ckpts / "checkpoint-6").exists()
    monkeypatch.setenv("DVC_EXP_NAME", "lr-high")  # inside `dvc exp run`, where `dvc repro` is the wrong advice
    with pytest.raises(config.ConfigError, match=r"`GRPO_FRESH=1 dvc exp run` and this experiment's -S options\.$"):
        training.resume_checkpoint(ckpts, changed)
    monkeypatch.delenv("DVC_EXP_NAME")

    assert training.resume_checkpoint(ckpts, changed, fresh=True) is None
    assert capsys.readouterr().out == (f"warning: starting fresh as asked: deleting {ckpts}/ "
                                       f"(newest complete checkpoint: step 6)\n")
    assert not ckpts.exists()
    training.mark_finished(ckpts, killed["run_hash"], 9)
    assert training.resume_checkpoint(ckpts, changed) is None  # a finished run is history, not work
    assert not ckpts.exists()


def test_fresh_is_asked_for_one_run_by_flag_or_environment_never_by_a_param(monkeypatch):
    from grpo_gsm8k.config import UserError

    assert "resume" not in yaml.safe_load((ROOT / "params.yaml").read_text())["train"]
    monkeypatch.delenv(training.FRESH_ENV, raising=False)
    assert training.fresh_requested(True) and not training.fresh_requested(False)
    for value, fresh in (("1", True), ("0", False), ("", False)):
        monkeypatch.setenv("GRPO_FRESH", value)
        assert training.fresh_requested(False) is fresh
    monkeypatch.setenv("GRPO_FRESH", "yes")
    with pytest.raises(UserError, match="GRPO_FRESH='yes': set GRPO_FRESH=1 to discard"):
        training.fresh_requested(False)


def test_too_few_rows_for_one_step_are_refused_and_a_short_run_writes_no_adapter(tmp_path, monkeypatch):
    """1 row against 2 prompts per step (8 completions / 4 per prompt) would train 0 steps and exit 0."""
    import importlib.util

    ws = smoke.make_workspace(tmp_path / "ws", {"data.train_limit": 1})
    assert stage(ws, "dvc", "repro", "prepare").returncode == 0
    weights = ws / "tiny-model/model.safetensors"
    hidden = weights.rename(ws / "weights.bak")  # the refusal must come before the model loads
    proc = stage(ws, sys.executable, "stages/train.py")
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1] == (
        "error: data.train_limit: 1 training row(s), fewer than the 2 prompts of one optimizer step "
        "(train.per_device_train_batch_size 8 x gradient_accumulation_steps 1 x 1 process(es) / num_generations 4); "
        "set data.train_limit to at least 2 (or null for all rows), or lower that batch")
    assert not [p for p in ("models", "checkpoints", "reports") if (ws / p).exists()]

    # Should a run still end short of train.max_steps, it fails instead of saving an untrained adapter.
    hidden.rename(weights)
    spec = importlib.util.spec_from_file_location("train_stage", ws / "stages" / "train.py")
    train_stage = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(train_stage)
    monkeypatch.chdir(ws)
    monkeypatch.setattr(training, "check_enough_rows", lambda rows, args: None)  # the first guard off
    with pytest.raises(SystemExit, match=r"^error: training ended after 0 of train.max_steps 4 optimizer steps, "
                                         r"so no adapter was written"):
        train_stage.train(train_stage.config.load())
    assert not (ws / "models").exists() and not (ws / "checkpoints" / training.FINISHED).exists()


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


@pytest.mark.parametrize("name", ["reports/eval/predictions.jsonl", "models/merged"])
def test_a_kill_mid_write_leaves_the_previous_output_intact_and_its_leftover_git_ignored(tmp_path, name):
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    shutil.copy(ROOT / ".gitignore", tmp_path / ".gitignore")
    target = tmp_path / name
    if name.endswith(".jsonl"):
        write_jsonl(target, [{"old": True}])
    else:
        target.mkdir(parents=True)
        (target / "config.json").write_text("{}")
    before = sorted(p.name for p in target.iterdir()) if target.is_dir() else target.read_text()
    proc = subprocess.run([sys.executable, "-c", KILL_MID_WRITE, str(target)], capture_output=True)
    assert proc.returncode == -signal.SIGKILL
    after = sorted(p.name for p in target.iterdir()) if target.is_dir() else target.read_text()
    assert after == before  # no truncated file, no half a model folder
    leftovers = [p for p in target.parent.iterdir() if p.name.startswith(".")]
    assert leftovers  # the partial write stayed hidden ...
    ignored = subprocess.run(["git", "check-ignore", *map(str, leftovers), str(target.with_name(f".{target.name}.old"))],
                             cwd=tmp_path, capture_output=True, text=True)
    assert len(ignored.stdout.splitlines()) == len(leftovers) + 1  # ... and out of git's way ...
    with atomic_path(target) as tmp:
        tmp.write_text("new") if name.endswith(".jsonl") else tmp.mkdir()
    assert not [p for p in target.parent.iterdir() if p.name.startswith(".")]  # ... until the next write cleared it


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
    for split in ("train", "test"):  # test: the held-out curve's problems
        write_jsonl(tmp_path / f"data/prepared/{split}.jsonl", [
            {"prompt": [{"role": "user", "content": "1+1?"}], "answer": "2", "question": "1+1?"}] * 8)
    monkeypatch.chdir(tmp_path)

    def out_of_memory(self, **kwargs):  # a CPU cannot run out of CUDA memory: raise what CUDA would
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(GRPOTrainer, "train", out_of_memory)
    with pytest.raises(SystemExit, match=r"ran out of memory.*model\.gradient_checkpointing: true.*"
                                         r"train\.per_device_train_batch_size.*"
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
