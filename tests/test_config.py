"""params.yaml validation: every mistake is named by key with the fix, before any work starts."""

import copy
from pathlib import Path

import pytest
import yaml

from grpo_gsm8k import config

ROOT = Path(__file__).resolve().parent.parent
DEFAULTS = yaml.safe_load((ROOT / "params.yaml").read_text())


def with_change(dotted: str, value):
    raw = copy.deepcopy(DEFAULTS)
    *path, last = dotted.split(".")
    node = raw
    for key in path:
        node = node[key]
    node[last] = value
    return raw


def test_defaults_are_the_reference_recipe():
    p = config.load(ROOT / "params.yaml")
    assert p.model.name == "Qwen/Qwen2.5-3B-Instruct" and p.model.backend == "transformers"
    # vLLM rollouts on a 16-bit base: the fastest path whose LoRA sync is exact (BENCHMARKS.md)
    assert p.generation.use_vllm and not p.model.load_in_4bit and p.generation.vllm_mode == "colocate"
    # correctness dominates, and batch-level scaling keeps format-only groups from outweighing it (LEARNING.md)
    assert p.train.reward_weights == {"correctness": 1.0, "format": 0.2} and p.train.scale_rewards == "batch"
    assert (p.lora.r, p.lora.alpha) == (64, 64)
    assert set(p.lora.target_modules) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    t = p.train
    assert (t.learning_rate, t.optim, t.warmup_ratio, t.lr_scheduler_type) == (5e-6, "adamw_8bit", 0.1, "cosine")
    assert (t.weight_decay, t.max_grad_norm, t.num_generations, t.max_completion_length) == (0.1, 0.1, 8, 512)
    assert "<reasoning>" in p.data.system_prompt and "<answer>" in p.data.system_prompt


def test_tiny_profile_is_valid():
    p = config.load(ROOT / "profiles" / "tiny.yaml")
    assert p.model.backend == "transformers" and p.data.source == "local"


@pytest.mark.parametrize("dotted, value, message", [
    ("train.learning_rat", 1e-5, r"train\.learning_rat: unknown key; valid keys here are: .*learning_rate"),
    ("train.learning_rate", "fast", r"train\.learning_rate: expected float, got 'fast'"),
    ("train.learning_rate", -1.0, r"train\.learning_rate: must be in \(0, 1\)"),
    ("train.max_steps", 1.5, r"train\.max_steps: expected int"),
    ("train.max_steps", True, r"train\.max_steps: expected int"),
    ("train.max_steps", 0, r"train\.max_steps: must be a positive integer"),
    ("train.per_device_train_batch_size", 12,
     r"train\.per_device_train_batch_size: 12 is not divisible by train\.num_generations \(8\); use a multiple"),
    ("train.num_generations", 1, r"train\.num_generations: must be at least 2"),
    ("train.loss_type", "ppo", r"train\.loss_type: 'ppo' is not one of"),
    ("train.reward_weights", {"correctnes": 1.0}, r"train\.reward_weights\.correctnes: unknown reward"),
    ("train.reward_weights", {"correctness": 0}, r"train\.reward_weights: give at least one reward"),
    ("model.backend", "jax", r"model\.backend: 'jax' is not one of unsloth, transformers"),
    ("model.max_seq_length", 256, r"model\.max_seq_length: must exceed train\.max_completion_length \(512\)"),
    ("lora.target_modules", "q_proj", r"lora\.target_modules: expected list"),
    ("lora.target_modules", [], r"lora\.target_modules: list at least one module"),
    ("data.source", "local", r"data\.local_dir: must name a folder"),
    ("data.system_prompt", "Answer briefly.", r"data\.system_prompt: must ask for the <answer>"),
    ("generation.vllm_gpu_memory_utilization", 1.5, r"generation\.vllm_gpu_memory_utilization: must be in \(0, 1\)"),
    ("hub.repo_id", "no-owner", r"hub\.repo_id: 'no-owner' must look like 'owner/name'"),
    ("eval.max_problems", 0, r"eval\.max_problems: must be positive or null"),
])
def test_bad_params_name_key_and_fix(dotted, value, message):
    with pytest.raises(config.ConfigError, match=message):
        config.parse(with_change(dotted, value))


def test_missing_section_and_bad_files(tmp_path):
    raw = copy.deepcopy(DEFAULTS)
    del raw["lora"]
    with pytest.raises(config.ConfigError, match="lora: section missing"):
        config.parse(raw)
    with pytest.raises(config.ConfigError, match="params file not found"):
        config.load(tmp_path / "nope.yaml")
    bad = tmp_path / "params.yaml"
    bad.write_text("train: [unclosed")
    with pytest.raises(config.ConfigError, match="not valid YAML"):
        config.load(bad)


def test_integers_are_accepted_where_floats_are_expected():
    p = config.parse(with_change("train.max_grad_norm", 1))
    assert p.train.max_grad_norm == 1.0 and isinstance(p.train.max_grad_norm, float)


def test_train_stage_rejects_bad_params_before_loading_anything(tmp_path):
    import subprocess
    import sys

    (tmp_path / "params.yaml").write_text(yaml.safe_dump(with_change("train.num_generations", 1)))
    proc = subprocess.run([sys.executable, str(ROOT / "stages" / "train.py")], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "error: train.num_generations: must be at least 2" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "checkpoints").exists() and not (tmp_path / "models").exists()
