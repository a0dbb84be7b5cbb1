"""bench_grpo.py's issue-15 driver (`diagnose`) and what `train` leaves behind when the driver's wall cap
stops it, dry-run on CPU with the transformers backend and the tiny model (Unsloth itself needs CUDA)."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
import bench_grpo  # noqa: E402

DATA = ROOT / "tests" / "fixtures" / "gsm8k"
pytestmark = pytest.mark.slow


def gone(pid: int, within: float = 5.0) -> bool:
    """The process ended (a zombie holds no memory) within a few seconds: SIGKILL is delivered asynchronously."""
    deadline = time.time() + within
    while time.time() < deadline:
        status = Path(f"/proc/{pid}/status")
        if not status.exists() or "\nState:\tZ" in status.read_text():
            return True
        time.sleep(0.1)
    return False


def test_run_capped_stops_the_attempt_then_everything_it_started(tmp_path):
    child = tmp_path / "child.py"
    child.write_text(
        "import signal, subprocess, sys, time\n"
        f"sleeper = subprocess.Popen(['sleep', '600'])\n"
        f"open({str(tmp_path / 'grandchild')!r}, 'w').write(str(sleeper.pid))\n"
        f"def stop(*_):\n"
        f"    open({str(tmp_path / 'saved')!r}, 'w').write('measured')\n"
        f"    sys.exit(124)\n"
        "signal.signal(signal.SIGTERM, stop)\n"
        "time.sleep(600)\n")
    rc, seconds, capped = bench_grpo.run_capped([sys.executable, str(child)], dict(os.environ), tmp_path / "log",
                                                cap=4, grace=2)
    assert capped and rc == 124 and seconds < 10
    assert (tmp_path / "saved").read_text() == "measured"  # SIGTERM first: the attempt wrote what it had
    assert gone(int((tmp_path / "grandchild").read_text()))  # then its session: nothing left on the GPU


def test_train_stopped_by_sigterm_keeps_its_micro_batches_and_where_it_was(tiny_model, tmp_path):
    log_path = tmp_path / "train.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [sys.executable, str(ROOT / "bench/bench_grpo.py"), "train", "--backend", "transformers",
             "--model", str(tiny_model), "--data", str(DATA), "--configs", "defaults", "--steps-big", "1000",
             "--completion", "8", "--fake-generate", "--results-dir", str(tmp_path), "--out", "stopped",
             "--stack-every", "1", "--budget-s", "3000"], stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    deadline = time.time() + 300
    while "micro-batch 1 in" not in log_path.read_text():
        assert proc.poll() is None and time.time() < deadline, log_path.read_text()[-3000:]
        time.sleep(0.5)
    time.sleep(1.5)  # a stack dump (every second) taken inside training
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 124, log_path.read_text()[-3000:]

    result = json.loads((tmp_path / "stopped.json").read_text())
    entry = result["configs"]["defaults"]
    assert entry["stopped"].startswith("SIGTERM")
    assert entry["micro_batch_seconds"] and all(s > 0 for s in entry["micro_batch_seconds"])
    assert result["generation"] == "random tokens (--fake-generate)"
    assert set(entry["compile"]["env"]) == set(bench_grpo.COMPILE_ENV)
    row = bench_grpo.attempt_row({"attempt": "stopped"}, tmp_path, 124, 10.0, True)
    assert row["timed_out"] and row["micro_batch_seconds"] == entry["micro_batch_seconds"]
    frames = bench_grpo.main_thread_frames((tmp_path / "stopped.stacks.txt").read_text())
    assert any("bench_grpo.py" in frame for frame in frames)  # the main thread's, not tqdm's or a logger's
    assert row["last_stack"] == [bench_grpo.compact_frame(frame) for frame in frames[:14]]
    assert row["where"].startswith("running ")


def test_diagnose_runs_each_attempt_and_gives_vllm_the_fastest_settings(tiny_model, tmp_path):
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench/bench_grpo.py"), "diagnose", "--backend", "transformers",
         "--model", str(tiny_model), "--data", str(DATA), "--attempts", "no-compile", "vllm", "--steps", "2",
         "--completion", "8", "--budget-s", "400", "--out-dir", str(tmp_path)],
        capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    trained, vllm = json.loads((tmp_path / "summary.json").read_text())

    assert trained["attempt"] == "no-compile" and trained["env"] == {"UNSLOTH_COMPILE_DISABLE": "1"}
    assert trained["rc"] == 0 and not trained["timed_out"] and trained["steps_done"] == 2
    assert trained["timed_steps"] == 1 and trained["seconds_per_step"] > 0
    assert len(trained["micro_batch_seconds"]) == 2 * 8  # defaults: 8 micro-batches a step
    assert trained["compile_env"]["UNSLOTH_COMPILE_DISABLE"] == "1"  # the attempt's env reached its process
    assert trained["where"] == "" and trained["last_stack"] == []  # finished: no stall to locate

    assert vllm["inherited"] == "no-compile" and vllm["env"] == trained["env"]
    assert "--fake-generate" not in vllm["args"] and "--vllm" in vllm["args"]
    # refused before any model loads (here: the transformers backend cannot share 4-bit weights with vLLM)
    assert vllm["rc"] != 0 and vllm["stalled"]
    assert any("generation.use_vllm:" in line for line in vllm["last_log_lines"])
    table = (tmp_path / "summary.md").read_text()
    assert "| no-compile |" in table and "(settings of no-compile)" in table
    assert f"exit {vllm['rc']}: grpo_gsm8k.config.ConfigError: generation.use_vllm:" in table  # why it ended


def test_trainer_args_are_typed_like_yaml_values():
    pairs = ["unsloth_logit_chunk_multiplier=1", "optim=adamw_torch", "vllm_importance_sampling_correction=false",
             "unsloth_grpo_mini_batch=null"]
    assert bench_grpo.parse_trainer_args(pairs) == {
        "unsloth_logit_chunk_multiplier": 1, "vllm_importance_sampling_correction": False,
        "unsloth_grpo_mini_batch": None, "optim": "adamw_torch"}
    with pytest.raises(SystemExit, match="expected KEY=VALUE"):
        bench_grpo.parse_trainer_args(["unsloth_logit_chunk_multiplier"])


def test_recompiles_are_counted_and_grouped_by_guard_from_torchs_own_log(tmp_path):
    script = ("import torch\ntorch._logging.set_logs(recompiles=True)\n"
              "f = torch.compile(lambda x: x * 2, backend='eager', dynamic=False)\n"
              "for n in (3, 4, 5):\n    f(torch.randn(n))\n")
    with open(tmp_path / "shapes.log", "w") as log:
        subprocess.run([sys.executable, "-c", script], stdout=log, stderr=subprocess.STDOUT, check=True)
    row = bench_grpo.attempt_row({"attempt": "shapes"}, tmp_path, 0, 1.0, False)
    assert row["recompiles"] == 2  # a new static size twice
    [(reason, count)] = row["recompile_reasons"]
    assert count == 2 and "size mismatch" in reason and "expected N, actual N" in reason


def test_a_stall_inside_torch_compile_is_labelled_with_the_unsloth_function_that_called_it(tmp_path):
    # a package named like Unsloth's whose function calls a compiled function; the backend (run by Dynamo
    # inside its compile) dumps every thread's stack, as the periodic dump does during a long Inductor compile.
    # Dumped from inside rather than by faulthandler's watchdog thread: a watchdog dump racing Dynamo segfaulted
    # about one run in three on CI's CPU.
    (tmp_path / "unsloth_zoo").mkdir()
    (tmp_path / "unsloth_zoo" / "rl_replacements.py").write_text(
        "import torch\n"
        "def grpo_accumulated_loss(x, backend):\n    return torch.compile(lambda t: t * 2, backend=backend)(x)\n")
    script = ("import faulthandler, sys, torch\n"
              f"sys.path.insert(0, {str(tmp_path)!r})\n"
              f"stacks = open({str(tmp_path / 'x.stacks.txt')!r}, 'w')\n"
              "from unsloth_zoo.rl_replacements import grpo_accumulated_loss\n"
              "def dumping_backend(gm, inputs):\n"
              "    faulthandler.dump_traceback(file=stacks, all_threads=True)\n"
              "    return gm.forward\n"
              "grpo_accumulated_loss(torch.ones(3), dumping_backend)\n")
    subprocess.run([sys.executable, "-c", script], check=True, timeout=120)
    label = bench_grpo.stack_label((tmp_path / "x.stacks.txt").read_text())
    assert label.startswith("in torch.compile, under unsloth_zoo/rl_replacements.py:")
    assert label.endswith(" grpo_accumulated_loss")


def test_a_bench_adapter_goes_through_the_merge_stage_with_its_card(tiny_model, tmp_path):
    """`train --save-adapter` then `merge`, as bench/unsloth_gpu.sh runs them on the GPU: the merge stage
    reads the adapter's training_run.json for the model card, which the H100 run found missing."""
    def bench(*args):
        proc = subprocess.run([sys.executable, str(ROOT / "bench/bench_grpo.py"), *args],
                              capture_output=True, text=True, cwd=ROOT)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    adapter = tmp_path / "adapter"
    bench("train", "--backend", "transformers", "--model", str(tiny_model), "--data", str(DATA), "--configs",
          "defaults", "--steps-big", "1", "--completion", "8", "--fake-generate", "--results-dir", str(tmp_path),
          "--out", "train", "--save-adapter", str(adapter), "--budget-s", "300")
    run = json.loads((adapter / "training_run.json").read_text())
    assert run["backend"] == "transformers" and run["base_model"] == str(tiny_model.resolve())
    assert run["effective_grpo_config"]["vllm_importance_sampling_correction"] is True

    bench("merge", "--model", str(tiny_model), "--adapter", str(adapter), "--data", str(DATA),
          "--workdir", str(tmp_path / "work"), "--out", str(tmp_path / "merge"))
    merge = json.loads((tmp_path / "merge.json").read_text())
    assert merge["pass"] and merge["base_vs_merged"]["max_abs"] > 0  # the perturbed LoRA changed the logits
    card = (tmp_path / "work/models/merged/README.md").read_text()
    assert "| backend | transformers |" in card


def test_summary_gives_the_median_and_spread_of_the_timed_steps_not_only_the_mean():
    steps = [{"seconds": s, "completion_tokens": 100, "generate_s": 1.0, "generate_and_score_s": 2.0}
             for s in (70.0, 68.0, 38.0, 37.0, 39.0)]  # two slow early steps: a mean alone would hide them
    summary = bench_grpo.summarise(steps, warmup=1)
    assert summary["timed_steps"] == 4 and summary["seconds_per_step"] == 45.5
    assert summary["seconds_per_step_median"] == 38.5 and summary["seconds_min_max"] == [37.0, 68.0]
