"""params.yaml as typed dataclasses, validated in one place before any data or model is loaded.

Every error names the key (``train.num_generations``) and says what to change.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from .rewards import REWARD_FUNCS


class UserError(ValueError):
    """A problem the user can fix (params, data, environment): stages print it without a traceback."""


class ConfigError(UserError):
    """A params.yaml problem, reported before any expensive work starts."""


@dataclass(frozen=True)
class DataConfig:
    source: str = "hub"
    hub_id: str = "openai/gsm8k"
    hub_config: str = "main"
    local_dir: str | None = None
    train_limit: int | None = None
    system_prompt: str = ""


@dataclass(frozen=True)
class ModelConfig:
    name: str = "Qwen/Qwen2.5-3B-Instruct"
    backend: str = "unsloth"
    load_in_4bit: bool = True
    dtype: str = "bfloat16"
    max_seq_length: int = 1024
    gradient_checkpointing: bool = True


@dataclass(frozen=True)
class LoraConfig:
    r: int = 64
    alpha: int = 64
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class TrainConfig:
    seed: int = 3407
    learning_rate: float = 5e-6
    optim: str = "adamw_8bit"
    lr_scheduler_type: str = "cosine"
    warmup_ratio: float = 0.1
    weight_decay: float = 0.1
    max_grad_norm: float = 0.1
    adam_beta1: float = 0.9
    adam_beta2: float = 0.99
    max_steps: int = 250
    per_device_train_batch_size: int = 32
    gradient_accumulation_steps: int = 4
    num_generations: int = 8
    max_completion_length: int = 512
    temperature: float = 1.0
    beta: float = 0.0
    loss_type: str = "dapo"
    scale_rewards: str = "group"
    mask_truncated_completions: bool = False
    logging_steps: int = 1
    save_steps: int = 25
    save_total_limit: int = 2
    resume: str = "auto"
    reward_weights: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class GenerationConfig:
    use_vllm: bool = False
    vllm_mode: str = "colocate"
    vllm_gpu_memory_utilization: float = 0.5


@dataclass(frozen=True)
class EvalConfig:
    max_problems: int | None = None
    batch_size: int = 128
    max_new_tokens: int = 512


@dataclass(frozen=True)
class MergeConfig:
    dtype: str = "bfloat16"


@dataclass(frozen=True)
class HubConfig:
    repo_id: str | None = None
    adapter_repo_id: str | None = None
    private: bool = True


@dataclass(frozen=True)
class Params:
    data: DataConfig
    model: ModelConfig
    lora: LoraConfig
    train: TrainConfig
    generation: GenerationConfig
    eval: EvalConfig
    merge: MergeConfig
    hub: HubConfig


def _type_ok(value, annotation) -> bool:
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, arg) for arg in typing.get_args(annotation))
    if annotation is type(None):
        return value is None
    if origin is list:
        (item,) = typing.get_args(annotation)
        return isinstance(value, list) and all(_type_ok(v, item) for v in value)
    if origin is dict:
        key, item = typing.get_args(annotation)
        return isinstance(value, dict) and all(
            _type_ok(k, key) and _type_ok(v, item) for k, v in value.items()
        )
    if annotation is float:  # YAML writes 1 for 1.0; bool is an int subclass, never a number here
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, annotation)


def _build(cls, raw, prefix: str):
    if not isinstance(raw, dict):
        raise ConfigError(f"{prefix or 'params'}: expected a mapping of keys, got {type(raw).__name__}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(raw) - set(names))
    if unknown:
        key = f"{prefix}.{unknown[0]}" if prefix else unknown[0]
        raise ConfigError(f"{key}: unknown key; valid keys here are: {', '.join(names)}")
    values = {}
    for f in dataclasses.fields(cls):
        key = f"{prefix}.{f.name}" if prefix else f.name
        if f.name not in raw:
            if dataclasses.is_dataclass(hints[f.name]):
                raise ConfigError(f"{key}: section missing from params")
            continue
        value = raw[f.name]
        if dataclasses.is_dataclass(hints[f.name]):
            values[f.name] = _build(hints[f.name], value, key)
        elif not _type_ok(value, hints[f.name]):
            want = getattr(hints[f.name], "__name__", str(hints[f.name]))
            raise ConfigError(f"{key}: expected {want}, got {value!r} ({type(value).__name__})")
        else:
            values[f.name] = float(value) if hints[f.name] is float else value
    return cls(**values)


def _check(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: {message}")


def _choice(value, key: str, choices: tuple[str, ...]) -> None:
    _check(value in choices, key, f"{value!r} is not one of {', '.join(choices)}")


def validate(p: Params) -> Params:
    """Range and consistency checks. Types and key names were checked while building."""
    _choice(p.data.source, "data.source", ("hub", "local"))
    _check(p.data.source != "local" or bool(p.data.local_dir), "data.local_dir",
           "must name a folder with train.jsonl and test.jsonl when data.source is local")
    _check(p.data.train_limit is None or p.data.train_limit > 0, "data.train_limit", "must be positive or null")
    _check("<answer>" in p.data.system_prompt, "data.system_prompt",
           "must ask for the <answer>...</answer> format that the grader reads")
    _choice(p.model.backend, "model.backend", ("unsloth", "transformers"))
    _choice(p.model.dtype, "model.dtype", ("bfloat16", "float16", "float32"))
    _choice(p.merge.dtype, "merge.dtype", ("bfloat16", "float16", "float32"))
    _check(p.model.max_seq_length > p.train.max_completion_length, "model.max_seq_length",
           f"must exceed train.max_completion_length ({p.train.max_completion_length}) to leave room for the prompt")
    _check(p.lora.r > 0, "lora.r", "must be positive (e.g. 64)")
    _check(p.lora.alpha > 0, "lora.alpha", "must be positive (e.g. equal to lora.r)")
    _check(0 <= p.lora.dropout < 1, "lora.dropout", "must be in [0, 1)")
    _check(len(p.lora.target_modules) > 0, "lora.target_modules", "list at least one module, e.g. q_proj")
    t = p.train
    _check(t.learning_rate > 0 and t.learning_rate < 1, "train.learning_rate", "must be in (0, 1), e.g. 5e-6")
    _check(0 <= t.warmup_ratio < 1, "train.warmup_ratio", "must be in [0, 1)")
    _check(t.weight_decay >= 0, "train.weight_decay", "must be >= 0")
    _check(t.max_grad_norm > 0, "train.max_grad_norm", "must be > 0")
    _check(0 <= t.adam_beta1 < 1 and 0 <= t.adam_beta2 < 1, "train.adam_beta1/adam_beta2", "must be in [0, 1)")
    for key in ("max_steps", "per_device_train_batch_size", "gradient_accumulation_steps",
                "max_completion_length", "logging_steps", "save_steps", "save_total_limit"):
        _check(getattr(t, key) > 0, f"train.{key}", "must be a positive integer")
    _check(t.num_generations >= 2, "train.num_generations",
           "must be at least 2: GRPO's advantage compares completions of the same prompt")
    _check(t.per_device_train_batch_size % t.num_generations == 0, "train.per_device_train_batch_size",
           f"{t.per_device_train_batch_size} is not divisible by train.num_generations ({t.num_generations}); "
           f"use a multiple such as {t.num_generations * max(1, t.per_device_train_batch_size // t.num_generations)}")
    _check(t.temperature > 0, "train.temperature", "must be > 0: GRPO needs sampled, diverse completions")
    _check(t.beta >= 0, "train.beta", "must be >= 0")
    _choice(t.loss_type, "train.loss_type", ("grpo", "dr_grpo", "dapo", "bnpo"))
    _choice(t.scale_rewards, "train.scale_rewards", ("group", "batch", "none"))
    _choice(t.resume, "train.resume", ("auto", "fresh"))
    _choice(t.optim, "train.optim", ("adamw_8bit", "adamw_torch", "paged_adamw_8bit"))
    _choice(t.lr_scheduler_type, "train.lr_scheduler_type", ("cosine", "linear", "constant", "constant_with_warmup"))
    unknown = sorted(set(t.reward_weights) - set(REWARD_FUNCS))
    _check(not unknown, f"train.reward_weights.{unknown[0] if unknown else ''}",
           f"unknown reward; known rewards are {', '.join(REWARD_FUNCS)}")
    _check(bool(t.reward_weights) and any(w != 0 for w in t.reward_weights.values()), "train.reward_weights",
           "give at least one reward a non-zero weight (correctness is the one that teaches maths)")
    _choice(p.generation.vllm_mode, "generation.vllm_mode", ("colocate", "server"))
    shares_4bit = p.model.backend == "unsloth" and p.generation.vllm_mode == "colocate"  # fast_inference
    _check(not (p.generation.use_vllm and p.model.load_in_4bit and not shares_4bit),
           "generation.use_vllm",
           "TRL syncs the policy to vLLM by merging the LoRA into the base weights; on a 4-bit base that merge "
           "re-quantizes them and loses most of the update, so rollouts would not come from the policy being "
           "trained. Set model.load_in_4bit: false (16-bit base: exact sync, the fastest path), or "
           "model.backend: unsloth with generation.vllm_mode: colocate (4-bit weights shared with vLLM, LoRA "
           "passed per request), or "
           "generation.use_vllm: false (HF generate on the 4-bit model)")
    _check(0 < p.generation.vllm_gpu_memory_utilization < 1, "generation.vllm_gpu_memory_utilization",
           "must be in (0, 1), the share of GPU memory vLLM may take")
    _check(p.eval.max_problems is None or p.eval.max_problems > 0, "eval.max_problems", "must be positive or null")
    _check(p.eval.batch_size > 0 and p.eval.max_new_tokens > 0, "eval.batch_size/max_new_tokens", "must be positive")
    for key in ("repo_id", "adapter_repo_id"):
        repo = getattr(p.hub, key)
        _check(repo is None or (repo.count("/") == 1 and all(repo.split("/"))), f"hub.{key}",
               f"{repo!r} must look like 'owner/name' (or be null to skip publishing)")
    return p


def parse(raw: dict) -> Params:
    return validate(_build(Params, raw, ""))


def load(path: str | Path = "params.yaml") -> Params:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: params file not found; run from the repository root")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from err
    return parse(raw)


def as_dict(p: Params) -> dict:
    return dataclasses.asdict(p)
