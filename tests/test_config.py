"""params.yaml validation: every mistake is named by key with the fix, before any work starts."""

import copy
from pathlib import Path

import pytest

from grpo_gsm8k import config

ROOT = Path(__file__).resolve().parent.parent
DEFAULTS = config.read_yaml(ROOT / "params.yaml")


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
    assert (t.learning_rate, t.optim, t.warmup_ratio, t.lr_scheduler_type) == (5e-5, "adamw_8bit", 0.1, "cosine")
    assert (t.weight_decay, t.max_grad_norm, t.num_generations, t.max_completion_length) == (0.1, 0.1, 8, 512)
    assert "<reasoning>" in p.data.system_prompt and "<answer>" in p.data.system_prompt


def test_tiny_profile_is_valid():
    p = config.load(ROOT / "profiles" / "tiny.yaml")
    assert p.model.backend == "transformers" and p.data.source == "local"


@pytest.mark.parametrize("dotted, value, message", [
    ("train.learning_rat", 1e-5,
     r"train\.learning_rat: unknown key \(did you mean learning_rate\?\); valid keys here are: .*learning_rate"),
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
    ("data.local_dir", None, r"data\.local_dir: must name a folder .* in either data\.source mode"),
    ("data.system_prompt", "Answer briefly.", r"data\.system_prompt: must ask for the <answer>"),
    ("generation.vllm_gpu_memory_utilization", 1.5, r"generation\.vllm_gpu_memory_utilization: must be in \(0, 1\)"),
    ("hub.repo_id", "no-owner", r"hub\.repo_id: 'no-owner' must look like 'owner/name'"),
    ("eval.max_problems", 0, r"eval\.max_problems: must be a positive integer or null"),
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


# ------------------------------------------------------------------ one source of values, every key required

def test_no_second_set_of_defaults_every_key_is_required():
    for section, field in config.Params.model_fields.items():
        assert field.is_required(), section
        for key, sub in field.annotation.model_fields.items():
            assert sub.is_required(), f"{section}.{key} has a default in config.py: params.yaml must hold it"


def test_params_and_tiny_profile_hold_the_same_keys():
    tiny = config.read_yaml(ROOT / "profiles" / "tiny.yaml")
    assert {s: list(v) for s, v in tiny.items()} == {s: list(v) for s, v in DEFAULTS.items()}


@pytest.mark.parametrize("section, key", [("train", "max_steps"), ("model", "backend"), ("hub", "private")])
def test_missing_key_names_key_and_section(tmp_path, section, key):
    raw = copy.deepcopy(DEFAULTS)
    del raw[section][key]
    config.write_yaml(tmp_path / "params.yaml", raw)
    with pytest.raises(config.ConfigError) as err:
        config.load(tmp_path / "params.yaml")
    assert str(err.value) == f"{section}.{key}: missing from params.yaml (section {section}); add `{key}: <value>` there"


def test_misspelled_or_unknown_section_is_an_error():
    raw = copy.deepcopy(DEFAULTS)
    raw["trian"] = raw.pop("train")
    with pytest.raises(config.ConfigError, match=r"^trian: unknown section \(did you mean train\?\); valid sections "
                                                 r"are: data, model, lora, train, generation, eval, lm_eval, merge, hub$"):
        config.parse(raw)  # and not also "train: section missing": the typo explains it
    raw = copy.deepcopy(DEFAULTS) | {"wandb": {"project": "x"}}
    with pytest.raises(config.ConfigError, match=r"^wandb: unknown section; valid sections are: data, "):
        config.parse(raw)


def test_misspelled_key_is_named_first_and_other_problems_are_counted():
    raw = with_change("train.max_steps", 0)
    raw["train"]["learning_rat"] = raw["train"].pop("learning_rate")
    with pytest.raises(config.ConfigError, match=r"^train\.learning_rat: unknown key .* \(and 1 more: train\.max_steps\)$"):
        config.parse(raw)


def test_every_error_is_one_line():
    for raw in (with_change("train.max_steps", "ten"), with_change("data.local_dir", None), None, []):
        with pytest.raises(config.ConfigError) as err:
            config.parse(raw)
        assert "\n" not in str(err.value) and ": " in str(err.value)


# ------------------------------------------------------------------------------- numbers as people write them

def params_text(**lines: str) -> str:
    """params.yaml's text with some `key: value` lines replaced verbatim (as a person would type them)."""
    import re

    text = (ROOT / "params.yaml").read_text()
    for key, value in lines.items():
        text, n = re.subn(rf"(?m)^(  {key}:) [^#\n]*?(\s*(#.*)?)$", rf"\g<1> {value}\g<2>", text)
        assert n == 1, key
    return text


@pytest.mark.parametrize("written, value", [("1e-5", 1e-5), ("5e-6", 5e-6), ("1E-4", 1e-4), ("3e-4", 3e-4),
                                            ("1e-05", 1e-5), ("5.0e-6", 5e-6), ("0.0003", 3e-4), ("+2e-5", 2e-5)])
def test_scientific_notation_loads_as_float(tmp_path, written, value):
    (tmp_path / "params.yaml").write_text(params_text(learning_rate=written))
    p = config.load(tmp_path / "params.yaml")
    assert p.train.learning_rate == value and type(p.train.learning_rate) is float


def test_params_are_read_with_one_yaml_1_2_loader_everywhere():
    import yaml

    assert yaml.safe_load("lr: 1e-5")["lr"] == "1e-5"  # PyYAML (YAML 1.1): text, hence config.read_yaml
    code = [*ROOT.glob("grpo_gsm8k/*.py"), *ROOT.glob("stages/*.py"), *ROOT.glob("scripts/*"),
            *ROOT.glob("bench/**/*.py")]
    pyyaml_readers = {path.name for path in code if "yaml.safe_load(" in path.read_text()}
    assert pyyaml_readers <= {"hub.py"}  # it reads dvc.lock, not params


@pytest.mark.parametrize("written, value", [("1e3", 1000), ("250.0", 250), ("2.5e2", 250), ("1_000", 1000)])
def test_whole_numbers_written_as_floats_are_that_integer(tmp_path, written, value):
    (tmp_path / "params.yaml").write_text(params_text(max_steps=written))
    p = config.load(tmp_path / "params.yaml")
    assert p.train.max_steps == value and type(p.train.max_steps) is int


@pytest.mark.parametrize("key, written, message", [
    ("max_steps", "1.5", r"train\.max_steps: expected int, got 1\.5 \(float\); write a whole number"),
    ("max_steps", "1e-3", r"train\.max_steps: expected int, got 0\.001 \(float\)"),
    ("max_steps", "'250'", r"train\.max_steps: expected int, got '250' \(str\)"),
    ("max_steps", "true", r"train\.max_steps: expected int, got True \(bool\)"),
    ("learning_rate", "'1e-5'", r"train\.learning_rate: expected float, got '1e-5' \(str\); .*without quotes"),
    ("learning_rate", "false", r"train\.learning_rate: expected float, got False \(bool\)"),
    ("learning_rate", ".nan", r"train\.learning_rate: nan is not a finite number"),
    ("mask_truncated_completions", "1", r"train\.mask_truncated_completions: expected true or false, got 1 \(int\)"),
    ("mask_truncated_completions", "yes", r"expected true or false, got 'yes' \(str\)"),  # YAML 1.2: text
    ("seed", "null", r"train\.seed: expected int, got nothing \(null\)"),
])
def test_booleans_numbers_and_text_never_pass_for_each_other(tmp_path, key, written, message):
    (tmp_path / "params.yaml").write_text(params_text(**{key: written}))
    with pytest.raises(config.ConfigError, match=message):
        config.load(tmp_path / "params.yaml")


def test_duplicate_key_is_refused_not_silently_overwritten(tmp_path):
    text = params_text(max_steps="233\n  max_steps: 500")
    (tmp_path / "params.yaml").write_text(text)
    with pytest.raises(config.ConfigError, match=r"params\.yaml: not valid YAML \(line \d+\): .*duplicate key"):
        config.load(tmp_path / "params.yaml")


def test_write_yaml_round_trips_and_keeps_the_prompt_a_block(tmp_path):
    config.write_yaml(tmp_path / "p.yaml", DEFAULTS)
    assert config.read_yaml(tmp_path / "p.yaml") == DEFAULTS
    assert "system_prompt: |-\n    Respond in the following format:" in (tmp_path / "p.yaml").read_text()


def test_replace_validates_again():
    p = config.load(ROOT / "params.yaml")
    assert config.replace(p, train={"max_steps": 5}).train.max_steps == 5 and p.train.max_steps == 233
    with pytest.raises(config.ConfigError, match="train.max_steps: must be a positive integer"):
        config.replace(p, train={"max_steps": 0})


# --------------------------------------------------------------------------------------------- train.report_to

@pytest.mark.parametrize("tracker", ["none", "tensorboard", "wandb", "trackio"])
def test_report_to_passes_through_to_grpo_config_and_stays_out_of_the_run_hash(tmp_path, tracker):
    from grpo_gsm8k import training

    p = config.parse(with_change("train.report_to", tracker))
    args = training.grpo_args(p, str(tmp_path), cuda=False)
    assert args.report_to == ([] if tracker == "none" else [tracker])
    data = tmp_path / "train.jsonl"
    data.write_text("{}\n")
    assert training.run_identity(p, data) == training.run_identity(config.parse(DEFAULTS), data)  # resume matches


@pytest.mark.parametrize("tracker", ["wandb", "tensorboard", "trackio"])
def test_missing_tracker_package_is_a_config_error(tracker, monkeypatch):
    import importlib.util

    from grpo_gsm8k import modeling

    p = config.parse(with_change("train.report_to", tracker))
    modules = modeling.TRACKERS[tracker][0]
    if any(importlib.util.find_spec(m) for m in modules):
        modeling.check_tracker(p)  # installed here: passes
        real = importlib.util.find_spec
        monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name in modules else real(name, *a))
    with pytest.raises(config.ConfigError, match=rf"^train\.report_to: {tracker} is not installed in this "
                                                 rf"environment; `pip install {tracker}` or set train.report_to: none"):
        modeling.check_tracker(p)
    modeling.check_tracker(config.parse(DEFAULTS))  # none: nothing to check


# ------------------------------------------------------------- a value set with `dvc exp run -S`, as DVC writes it

@pytest.mark.slow
def test_dvc_exp_run_sets_a_float_in_e_notation_and_train_reads_a_float(tmp_path):
    """`dvc exp run -S train.learning_rate=1e-5`: DVC writes 1e-05 (YAML 1.2) and the train stage reads a float.
    (The README's own commands are walked by tests/test_readme.py.) The tiny profile made cheaper per step:
    2 completions of 4 tokens, no per-step checkpoints, no held-out curve or lm-eval."""
    import json
    import shlex
    import subprocess

    from grpo_gsm8k import smoke

    command = "dvc exp run -S train.learning_rate=1e-5 -S train.max_steps=50"
    ws = smoke.make_workspace(tmp_path / "ws", {
        "train.per_device_train_batch_size": 2, "train.num_generations": 2, "train.max_completion_length": 4,
        "train.logging_steps": 50, "train.save_steps": 500, "model.gradient_checkpointing": False,
        "eval.max_problems": 2, "eval.max_new_tokens": 4, "eval.during_training_problems": 0, "lm_eval.tasks": []})
    env = dict(smoke.workspace_env(), OMP_NUM_THREADS="1")  # a tiny model: 2 threads only fight (5x slower)
    proc = subprocess.run(shlex.split(command), cwd=ws, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "  learning_rate: 1e-05\n" in (ws / "params.yaml").read_text()  # what DVC wrote: text to PyYAML
    run = json.loads((ws / "models/adapter/training_run.json").read_text())
    assert run["params"]["train"]["learning_rate"] == 1e-5 and run["params"]["train"]["max_steps"] == 50
    assert run["effective_grpo_config"]["learning_rate"] == 1e-5
    assert json.loads((ws / "checkpoints/FINISHED.json").read_text())["step"] == 50
    # lm_eval.tasks: [] runs no lm-eval; its samples file, a DVC out, is there and empty
    assert "lm_eval" not in json.loads((ws / "reports/eval/metrics.json").read_text())
    assert (ws / "reports/eval/lm_eval_samples.jsonl").read_text() == ""
