"""Which settings each backend x generation.use_vllm x model.load_in_4bit combination produces, and the
combinations refused up front. Nothing here runs vLLM: it needs a GPU (BENCHMARKS.md has the runs)."""

import copy
import importlib.abc
import importlib.util
import os
import itertools
import subprocess
import sys
from pathlib import Path

import pytest

from grpo_gsm8k import config, modeling, training

ROOT = Path(__file__).resolve().parent.parent


def params(tiny_params, backend: str, use_vllm: bool, four_bit: bool, mode: str = "colocate") -> dict:
    raw = copy.deepcopy(tiny_params)
    raw["model"].update(backend=backend, load_in_4bit=four_bit)
    raw["generation"].update(use_vllm=use_vllm, vllm_mode=mode)
    return raw


def lossy(backend: str, use_vllm: bool, four_bit: bool, mode: str) -> bool:
    """TRL's sync merges the LoRA into the base weights; on 4-bit weights that merge re-quantizes them.
    Only Unsloth's fast_inference (colocate) shares the 4-bit weights and passes the LoRA per request."""
    return use_vllm and four_bit and not (backend == "unsloth" and mode == "colocate")


COMBOS = list(itertools.product(("transformers", "unsloth"), (False, True), (False, True), ("colocate", "server")))


@pytest.mark.parametrize("backend,use_vllm,four_bit,mode", COMBOS)
def test_lossy_sync_is_refused_with_the_fix(tiny_params, backend, use_vllm, four_bit, mode):
    raw = params(tiny_params, backend, use_vllm, four_bit, mode)
    if lossy(backend, use_vllm, four_bit, mode):
        with pytest.raises(config.ConfigError) as err:
            config.parse(raw)
        message = str(err.value)
        assert message.startswith("generation.use_vllm:")
        assert "model.load_in_4bit: false" in message and "generation.use_vllm: false" in message
        assert "model.backend: unsloth with generation.vllm_mode: colocate" in message
    else:
        p = config.parse(raw)
        assert (p.model.backend, p.generation.use_vllm, p.model.load_in_4bit) == (backend, use_vllm, four_bit)


@pytest.mark.parametrize("use_vllm,mode", [(False, "colocate"), (True, "colocate"), (True, "server")])
def test_grpo_config_carries_the_generation_settings(tiny_params, tmp_path, use_vllm, mode):
    raw = params(tiny_params, "transformers", use_vllm, False, mode)
    raw["generation"]["vllm_gpu_memory_utilization"] = 0.35
    raw["train"]["scale_rewards"] = "batch"
    p = config.parse(raw)
    args = training.grpo_args(p, str(tmp_path), cuda=False)  # the real TRL GRPOConfig
    assert args.use_vllm is use_vllm and args.vllm_mode == mode
    assert args.vllm_gpu_memory_utilization == 0.35
    assert args.vllm_max_model_length == p.model.max_seq_length  # not the model's 32k context
    assert args.scale_rewards == "batch"
    assert args.reward_weights == [p.train.reward_weights[name] for name in p.train.reward_weights]


def test_grpo_config_states_what_unsloth_would_otherwise_change(tiny_params, tmp_path):
    """Importing Unsloth turns TRL's importance-sampling correction off and sets epsilon_high to 0.28 for dapo
    (unsloth/models/rl.py) unless the config states them: the project states both, so both backends train
    the same objective, the clip range comes from params.yaml, and the log-prob gap is logged either way."""
    raw = params(tiny_params, "transformers", False, False, "colocate")
    raw["train"].update(epsilon=0.15, epsilon_high=0.28)
    args = training.grpo_args(config.parse(raw), str(tmp_path), cuda=False)
    assert args.vllm_importance_sampling_correction is True
    assert (args.epsilon, args.epsilon_high) == (0.15, 0.28)
    raw["train"]["epsilon_high"] = 1.5
    with pytest.raises(config.ConfigError, match=r"train\.epsilon_high"):
        config.parse(raw)


@pytest.mark.parametrize("use_vllm,four_bit,mode", [(False, True, "colocate"), (False, False, "colocate"),
                                                    (True, False, "server"), (True, True, "colocate"),
                                                    (True, False, "colocate")])
def test_unsloth_loads_vllm_inside_the_model_only_when_colocated(tiny_params, use_vllm, four_bit, mode):
    p = config.parse(params(tiny_params, "unsloth", use_vllm, four_bit, mode))
    kwargs = modeling.unsloth_load_kwargs(p)
    # vLLM inside the model only for colocated generation; server mode talks to `trl vllm-serve`
    assert kwargs["fast_inference"] is (use_vllm and mode == "colocate")
    assert kwargs["load_in_4bit"] is four_bit and kwargs["max_lora_rank"] == p.lora.r
    assert kwargs["gpu_memory_utilization"] == p.generation.vllm_gpu_memory_utilization
    # the very model params name (and check_model checked), never Unsloth's pre-quantized copy of it
    assert kwargs["model_name"] == p.model.name and kwargs["use_exact_model_name"] is True


@pytest.mark.parametrize("per_device,accumulation", [(32, 8), (8, 16), (4, 2)])
def test_unsloth_vllm_takes_the_whole_generation_batch_at_once(tiny_params, tmp_path, per_device, accumulation):
    """Left to itself Unsloth caps vLLM at 48-112 concurrent sequences (H100, H200: BENCHMARKS.md), so the
    defaults' 256 completions decode in waves; 256 itself means "pick from free memory" to Unsloth."""
    raw = params(tiny_params, "unsloth", True, False, "colocate")
    raw["train"].update(per_device_train_batch_size=per_device, gradient_accumulation_steps=accumulation)
    p = config.parse(raw)
    generation_batch = training.grpo_args(p, str(tmp_path), cuda=False).generation_batch_size  # TRL's own count
    seqs = modeling.unsloth_load_kwargs(p)["max_num_seqs"]
    assert generation_batch <= seqs <= generation_batch + 1 and seqs != 256
    raw["generation"]["use_vllm"] = False  # no engine: nothing for Unsloth to drop with a warning
    assert "max_num_seqs" not in modeling.unsloth_load_kwargs(config.parse(raw))


@pytest.mark.parametrize("four_bit", [False, True])
def test_transformers_loader_quantizes_only_on_request(tiny_params, monkeypatch, four_bit):
    monkeypatch.setattr(modeling, "cuda_available", lambda: True)  # the GPU branch's settings, without a GPU
    monkeypatch.setattr(modeling, "load_tokenizer", lambda name: None)
    p = config.parse(params(tiny_params, "transformers", not four_bit, four_bit))
    policy = modeling.load_policy(p)
    assert policy.model == p.model.name and policy.model_init_kwargs == {"dtype": p.model.dtype}
    assert (policy.quantization_config is not None) is four_bit
    if four_bit:
        assert policy.quantization_config.load_in_4bit and policy.quantization_config.bnb_4bit_quant_type == "nf4"


def test_use_vllm_without_a_gpu_or_without_vllm_is_refused(tiny_params, monkeypatch):
    p = config.parse(params(tiny_params, "transformers", True, False))
    with pytest.raises(config.ConfigError, match=r"^generation\.use_vllm: vLLM needs a CUDA GPU"):
        modeling.check_backend(p)
    monkeypatch.setattr(modeling, "cuda_available", lambda: True)
    monkeypatch.setattr(modeling.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(config.ConfigError, match=r"^generation\.use_vllm: vllm is not installed"):
        modeling.check_vllm(p)


@pytest.mark.parametrize("stage", ["train.py", "evaluate.py"])
def test_stages_refuse_lossy_sync_before_loading_anything(tiny_params, tmp_path, stage):
    raw = params(tiny_params, "transformers", True, True)
    config.write_yaml(tmp_path / "params.yaml", raw)
    proc = subprocess.run([sys.executable, str(ROOT / "stages" / stage)], cwd=tmp_path, capture_output=True, text=True)
    assert proc.returncode != 0
    assert proc.stderr.startswith("error: generation.use_vllm: TRL syncs the policy to vLLM"), proc.stderr
    assert "Traceback" not in proc.stderr
    assert sorted(path.name for path in tmp_path.iterdir()) == ["params.yaml"]  # nothing written


class _RecordingImport(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Stands in for the unsloth package (GPU-only): records UNSLOTH_COMPILE_DISABLE as its import sees it."""

    def __init__(self):
        self.seen = []

    def find_spec(self, name, path, target=None):
        return importlib.util.spec_from_loader(name, self) if name == "unsloth" else None

    def create_module(self, spec):
        return None

    def exec_module(self, module):
        self.seen.append(os.environ.get("UNSLOTH_COMPILE_DISABLE"))


@pytest.mark.parametrize("users_value,expected", [(None, "1"), ("0", "0")])
def test_unsloth_is_imported_with_its_loss_compile_off_unless_the_user_says(tiny_params, monkeypatch,
                                                                            users_value, expected):
    recorder = _RecordingImport()
    monkeypatch.setattr(sys, "meta_path", [recorder, *sys.meta_path])
    monkeypatch.delenv("UNSLOTH_COMPILE_DISABLE", raising=False)
    if users_value is not None:
        monkeypatch.setenv("UNSLOTH_COMPILE_DISABLE", users_value)
    sys.modules.pop("unsloth", None)
    try:
        modeling.import_backend(config.parse(params(tiny_params, "transformers", False, True)))
        assert recorder.seen == []  # the transformers backend never imports it
        modeling.import_backend(config.parse(params(tiny_params, "unsloth", False, True)))
        assert recorder.seen == [expected]
    finally:
        sys.modules.pop("unsloth", None)
