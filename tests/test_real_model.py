"""The real-model scenario (`python -m bench real-model`, bench/real_model.py), dry-run on CPU with the tiny model:
it drives dvc.yaml's own stage commands and reports exactly what the evaluate stage measured, in the bench result
schema."""

import gzip
import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench import common

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    base = tmp_path_factory.mktemp("real_model")
    work, out = base / "work", base / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "real-model", "run", "--tiny", "--model", str(base / "tiny-model"),
         "--runs", "batch_scaled:7", "--hf-agreement", "--set", "train.max_steps=2",
         "--work", str(work), "--out", str(out)], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return work, out, json.loads((out / "summary.json").read_text())


def test_summary_holds_the_stages_own_metrics(dry_run):
    work, out, summary = dry_run
    [run] = summary["runs"]
    ws = work / "batch_scaled-s7"
    eval_metrics = json.loads((ws / "reports/eval/metrics.json").read_text())
    base = json.loads((ws / "reports/eval_base/metrics.json").read_text())
    base.pop("lm_eval")  # lm-eval's block: under eval_metrics["lm_eval"], beside the trained model's
    assert run["base"] == eval_metrics["base"] == base
    assert run["trained"] == eval_metrics["trained"] and run["delta"] == eval_metrics["delta"]
    assert run["trained"]["problems"] == run["base"]["problems"] > 0
    # the recipe and the seed reached the training stage, as training_run.json recorded them
    effective = json.loads((ws / "models/adapter/training_run.json").read_text())
    assert run["params"] == effective["params"] and run["params"]["train"]["seed"] == 7
    assert run["params"]["train"]["reward_weights"] == {"correctness": 1.0, "format": 0.2}
    assert run["effective_grpo_config"]["scale_rewards"] == "batch" and run["effective_grpo_config"]["max_steps"] == 2
    assert 0 < run["train_minutes"] < 30
    assert run["importance_sampling_logprobs"] == effective["importance_sampling_logprobs"]
    assert run["importance_sampling_logprobs"].startswith("none")  # no vLLM on CPU
    assert [step for step, _ in run["curves"]["rewards/correctness/mean"]] == [1, 2]
    # the train stage's held-out curve, as it wrote it: before training and at the last step (every 2)
    assert [row["step"] for row in run["heldout"]] == [0, 2]
    assert run["heldout"][0]["problems"] == 4 and 0 <= run["heldout"][-1]["accuracy_lenient"] <= 1
    # the bench result schema: the command, and each run's steps (TRL's step_time), the first one left out
    assert common.check(summary) == [] and summary["status"] == "complete" and summary["failed"] == {}
    assert summary["command"].startswith("python -m bench real-model run --tiny ")
    assert run["name"] == "batch_scaled-s7" and [s["step"] for s in run["steps"]] == [1, 2]
    assert run["summary"]["timed_steps"] == 1 and run["summary"]["median_s"] == round(run["steps"][1]["seconds"], 3)


def test_a_summary_written_before_the_last_evaluation_says_what_is_pending(dry_run, tmp_path):
    """cmd_run rewrites summary.json after each evaluation: one taken while runs remain is partial and names them."""
    from bench import real_model

    work, out, summary = dry_run
    early = real_model.summarize(work, [("batch_scaled", 7)], tmp_path, "tiny-model", pending=[("lr5e-5", 1)])
    assert early["status"] == "partial" and early["pending"] == ["lr5e-5-s1"] and common.check(early) == []
    assert early["runs"][0]["trained"] == summary["runs"][0]["trained"]
    assert json.loads((tmp_path / "summary.json").read_text())["pending"] == ["lr5e-5-s1"]
    assert summary["status"] == "complete" and summary["pending"] == []


def test_the_figure_draws_every_run(dry_run, tmp_path):
    work, out, summary = dry_run
    png = tmp_path / "curves.png"
    proc = subprocess.run([sys.executable, "-m", "bench", "real-model", "plot", "--summary", str(out / "summary.json"),
                           "--png", str(png)], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 20_000


def test_predictions_and_engine_agreement_are_kept(dry_run):
    work, out, summary = dry_run
    with gzip.open(out / "batch_scaled-s7-eval.jsonl.gz", "rt") as f:
        rows = [json.loads(line) for line in f]
    assert len(rows) == summary["runs"][0]["trained"]["problems"]
    assert rows == [json.loads(line) for line in (work / "batch_scaled-s7/reports/eval/predictions.jsonl").open()]
    agreement = summary["agreement"]
    # on CPU both evaluations are HF generate, greedy: the same model must give the same completions
    assert agreement["evaluate_base_hf"]["engine"] == "transformers"
    assert agreement["identical_completion"] == 1.0 and agreement["problems"] == rows.__len__()


def test_unknown_recipe_is_refused_before_any_work(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "bench", "real-model", "run", "--tiny", "--model",
                           str(tmp_path / "m"), "--runs", "nonsense:0", "--work", str(tmp_path / "w"),
                           "--out", str(tmp_path / "o")], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode != 0 and "unknown recipe(s) nonsense" in proc.stderr
    assert not (tmp_path / "w").exists() and not (tmp_path / "m").exists()


def test_an_earlier_base_evaluation_is_reused_only_for_the_same_eval(dry_run, tmp_path):
    work, out, summary = dry_run
    script = [sys.executable, "-m", "bench", "real-model", "run", "--tiny", "--model", str(work.parent / "tiny-model"),
              "--runs", "defaults:7", "--base-from", str(out), "--set", "train.max_steps=1"]
    proc = subprocess.run([*script, "--work", str(tmp_path / "w"), "--out", str(tmp_path / "o")],
                          capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    [run] = json.loads((tmp_path / "o/summary.json").read_text())["runs"]
    assert run["base"] == summary["runs"][0]["base"] and run["trained"]["problems"] == run["base"]["problems"]
    assert gzip.open(tmp_path / "o/base-eval_base.jsonl.gz").read() == gzip.open(out / "base-eval_base.jsonl.gz").read()
    assert "===== evaluate_base" not in (tmp_path / "o/defaults-s7.log").read_text()  # the stage did not run
    # other eval params: refused before any stage runs
    proc = subprocess.run([*script[:-1], "train.max_steps=1", "eval.max_new_tokens=7", "--work", str(tmp_path / "w2"),
                           "--out", str(tmp_path / "o2")], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode != 0 and "its base evaluation was" in proc.stderr and "'max_new_tokens': 7" in proc.stderr
    assert "===== prepare" not in (tmp_path / "o2/defaults-s7.log").read_text()


@pytest.mark.parametrize("failures", [1, 2])
def test_an_evaluation_that_fails_beside_a_training_is_run_again_after_it(dry_run, tmp_path, monkeypatch, capsys,
                                                                         failures):
    """2026-12-07, H100: seed 1's evaluation engine failed its memory profiling as seed 3407's training, beside it,
    freed memory. Here the first run's evaluation fails `failures` times while the second still trains (the second
    holds its training until then): once, and it is evaluated again after the trainings and the summary is complete;
    twice, and summary.json still holds the other run and names the failed one."""
    import threading

    from bench import real_model

    work, out, _ = dry_run
    attempts, tried = [], threading.Event()

    def run_stage(ws, stage, logfile, *rest):
        if stage == "train" and ws.name == "defaults-s8":
            assert tried.wait(600)  # still training when the first run's evaluation starts
        if stage == "evaluate" and ws.name == "defaults-s7":
            attempts.append(ws)
            if len(attempts) <= failures:
                tried.set()
                raise common.StageFailed("defaults-s7: stage evaluate failed (exit 1): Error in memory profiling", 1, 0.0)
        return common.run_stage(ws, stage, logfile, *rest)

    monkeypatch.setattr(real_model, "run_stage", run_stage)
    argv = ["run", "--tiny", "--model", str(work.parent / "tiny-model"), "--runs", "defaults:7", "defaults:8",
            "--base-from", str(out), "--set", "train.max_steps=1", "--work", str(tmp_path / "w"),
            "--out", str(tmp_path / "o")]
    if failures == 1:
        real_model.main(argv)
    else:
        with pytest.raises(SystemExit, match="1 of 2 runs failed"):
            real_model.main(argv)
    assert "defaults seed 7: its evaluation failed beside other trainings; again after them" in capsys.readouterr().out
    assert len(attempts) == 2
    summary = json.loads((tmp_path / "o/summary.json").read_text())
    assert common.check(summary) == [] and summary["pending"] == []
    if failures == 1:
        assert summary["status"] == "complete" and summary["failed"] == {}
        assert [r["name"] for r in summary["runs"]] == ["defaults-s7", "defaults-s8"]
        assert (tmp_path / "o/defaults-s7-eval.jsonl.gz").is_file()
    else:
        assert summary["status"] == "partial" and list(summary["failed"]) == ["defaults-s7"]
        assert "Error in memory profiling" in summary["failed"]["defaults-s7"]
        assert [r["name"] for r in summary["runs"]] == ["defaults-s8"]
