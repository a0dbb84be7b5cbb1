"""bench/ as one CLI: every scenario behind `python -m bench`, imports that stay light, the GPU machine's helper
(bench/device.sh) on CPU, and the scenarios whose whole run fits a CPU test (eval-speed with HF generate,
checkpoint-verify)."""

import importlib
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from bench import common, report
from bench.__main__ import SCENARIOS
from grpo_gsm8k.config import read_yaml

ROOT = Path(__file__).resolve().parent.parent


def test_every_scenario_is_a_module_with_a_main_and_the_cli_lists_them():
    proc = subprocess.run([sys.executable, "-m", "bench"], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0
    for name, (module, what, _) in SCENARIOS.items():
        assert f"  {name} " in proc.stdout and what in proc.stdout
        assert callable(importlib.import_module(f"bench.{module}").main)
    unknown = subprocess.run([sys.executable, "-m", "bench", "nonsense"], capture_output=True, text=True, cwd=ROOT)
    assert unknown.returncode != 0 and "unknown scenario 'nonsense'" in unknown.stderr
    # every module of bench/ is a scenario or a shared piece: nothing left behind from a session
    modules = {p.stem for p in (ROOT / "bench").glob("*.py")} - {"__init__", "__main__", "common"}
    assert modules == {module for module, _, _ in SCENARIOS.values()}


def test_the_report_and_the_cli_load_no_torch():
    """`python -m bench report` stays fast: torch waits for the scenario that needs it."""
    code = ("import sys\nfrom bench import __main__, report\nreport.render()\n"
            "print(sorted(m for m in ('torch', 'transformers', 'trl') if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0 and proc.stdout.strip() == "[]", proc.stdout + proc.stderr[-2000:]


def test_a_scenarios_help_names_its_cli(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "bench", "train-speed", "--help"], capture_output=True, text=True,
                          cwd=ROOT)
    assert proc.returncode == 0 and proc.stdout.startswith("usage: python -m bench train-speed")


def test_the_device_helper_runs_a_command_in_the_background_and_brings_back_what_it_wrote(tmp_path):
    """`start` then `wait`, as a GPU session sends them in separate device calls; here on CPU, where the helper's
    unpacking finds nothing to unpack."""
    work, out = tmp_path / "session", tmp_path / "out"
    out.mkdir()
    env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path), "OUT": str(out)}
    script = ("import os; print('[bench 00:00:00] from', os.getcwd()); open('written.txt', 'w').write('x'); "
              "raise SystemExit(3)")
    started = subprocess.run(["bash", "bench/device.sh", "start", str(work), sys.executable, "-c", script], cwd=ROOT,
                             env=env, capture_output=True, text=True, timeout=60)
    assert started.returncode == 0 and "started in the background" in started.stdout, started.stderr
    waited = subprocess.run(["bash", "bench/device.sh", "wait", str(work), "60", str(ROOT / "written.txt")], cwd=ROOT,
                            env=env, capture_output=True, text=True, timeout=120)
    try:
        assert waited.returncode == 0, waited.stderr
        assert waited.stdout.startswith("DONE (exit 3)")  # the command's own exit status
        assert f"[bench 00:00:00] from {ROOT}" in waited.stdout  # run from the repository root; its log printed
        with tarfile.open(out / "res.tgz") as tar:
            names = tar.getnames()
        assert any(n.endswith("session/session.log") for n in names) and any(n.endswith("written.txt") for n in names)
    finally:
        (ROOT / "written.txt").unlink(missing_ok=True)
    usage = subprocess.run(["bash", "bench/device.sh", "nonsense"], cwd=ROOT, capture_output=True, text=True)
    assert usage.returncode == 2 and "usage:" in usage.stderr


@pytest.mark.slow
def test_eval_speed_on_cpu_writes_one_result_of_the_schema(tiny_model, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "bench", "eval-speed", "--model", str(tiny_model), "--data",
                           str(ROOT / "tests/fixtures/gsm8k"), "--limit", "6", "--batch-size", "4", "--completion", "6",
                           "--results-dir", str(tmp_path), "--out", "eval"], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((tmp_path / "eval.json").read_text())
    assert common.check(result) == [] and result["scenario"] == "eval-speed" and result["gpu"]["name"] == "cpu"
    assert result["problems"] == 6 and result["subset"] == "longest prompts"
    assert result["completion_lengths"] == [6, 6]  # forced to the length asked
    # 2 batches timed of the 4 (at most) that the whole fixture test split needs
    assert result["full_test_set_seconds_estimate"] == pytest.approx(
        result["generate_seconds"] / 2 * -(-result["test_set_problems"] // 4), abs=0.2)


@pytest.mark.slow
def test_lm_eval_dry_run_writes_its_result_and_the_report_tables_it(tmp_path):
    """`python -m bench lm-eval --tiny` (the tiny model, the fixture rows, HF generate) through the evaluate stages;
    its summary, kept where GPU results will land, fills BENCHMARKS.md's lm-eval table."""
    out = tmp_path / "results/lm_eval/tiny"
    proc = subprocess.run([sys.executable, "-m", "bench", "lm-eval", "--tiny", "--work", str(tmp_path / "ws"),
                           "--out", str(out), "--set", "lm_eval.max_problems=2"],
                          capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert common.check(summary) == [] and summary["status"] == "complete"
    assert [s["step"] for s in summary["runs"][0]["steps"]] == ["prepare", "evaluate_base", "evaluate"]
    tasks = summary["lm_eval"]["trained"]
    assert {t["task"] for t in tasks.values()} == {"gsm8k", "gsm8k_cot_zeroshot"}
    assert all(t["problems"] == 2 for t in tasks.values())

    (tmp_path / "results/runs.yaml").write_text("runs: {}\n")
    (tmp_path / "t.md").write_text("# B\n\n## lm-eval\n\n{{lm-eval}}\n")
    bench_md, index_md, problems = report.render(tmp_path / "results", tmp_path / "t.md", tmp_path)
    assert problems == [] and "Not measured yet" not in bench_md
    rows = [line for line in bench_md.splitlines() if line.startswith("| `lm_eval/tiny/summary.json` |")]
    assert len(rows) == 1 + 2 * len(tasks)  # the project's grader, then each task's strict-match and flexible-extract
    assert any("`gsm8k` (5-shot, chat template) | strict-match | 2 |" in row for row in rows)
    assert "| `lm_eval/<name>/` | landed |" in index_md


def test_checkpoint_verify_on_a_small_config_times_both_sides_and_verifies(tmp_path):
    config = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
              "num_key_value_heads": 2}
    (tmp_path / "config.json").write_text(json.dumps(config))
    proc = subprocess.run([sys.executable, "-m", "bench", "checkpoint-verify", "--config",
                           str(tmp_path / "config.json"), "--out", str(tmp_path / "cv.json")],
                          capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "cv.json").read_text())
    assert common.check(result) == [] and [r["name"] for r in result["runs"]] == ["marker at save", "verify at resume"]
    assert all(len(r["steps"]) == 3 and r["summary"]["timed_steps"] == 3 for r in result["runs"])
    lora = read_yaml(ROOT / "params.yaml")["lora"]  # r on each target projection of 2 layers: r x (in + out)
    widths = {"q_proj": 64 + 64, "o_proj": 64 + 64, "k_proj": 64 + 32, "v_proj": 64 + 32,  # kv: 2 heads of 16
              "gate_proj": 64 + 128, "up_proj": 64 + 128, "down_proj": 128 + 64}
    assert result["lora_params"] == 2 * lora["r"] * sum(widths[t] for t in lora["target_modules"])


@pytest.mark.parametrize("checkpointing", [False, True])
def test_the_training_floor_counts_the_flops_a_lora_step_does(checkpointing):
    """BENCHMARKS.md's training floor (bench/standin.py floor_seconds at 1 FLOP/s) against the matmul FLOPs torch
    counts in a LoRA forward and backward on a small Qwen2 with the 7 projections targeted: the frozen base gets no
    weight gradient (4N a token, not 6N), and checkpointing adds the decoder layers' forward once more."""
    import torch
    from peft import LoraConfig, get_peft_model
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from bench import standin

    cfg = {"hidden_size": 128, "intermediate_size": 384, "num_hidden_layers": 16, "num_attention_heads": 4,
           "num_key_value_heads": 2, "vocab_size": 512, "tie_word_embeddings": True, "max_position_embeddings": 256}
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(**cfg))
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=8, target_modules=targets))
    model.train()
    with FlopCounterMode(display=False) as counter:
        model(input_ids=torch.randint(0, 512, (4, 64))).logits.float().sum().backward()
    floor = standin.floor_seconds(standin.shape(cfg), 8, targets, 4, 0, 64, 1.0, 1.0, 16, True, float(checkpointing))
    assert floor["train_s"] == pytest.approx(counter.get_total_flops(), rel=0.01)
