"""params.yaml as pydantic models, validated in one place before any data or model is loaded.

Every key is required: params.yaml is the only place a value lives (no second set of defaults
here). Every error is one line that names the key (``train.num_generations``) and says what to
change. params files are read the way DVC reads and writes them (ruamel.yaml, YAML 1.2), so
``1e-5`` is a float whether it was typed into params.yaml or set with ``dvc exp run -S``.
"""

from __future__ import annotations

import difflib
import types
import typing
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, field_validator, model_validator

from .rewards import REWARD_FUNCS


class UserError(ValueError):
    """A problem the user can fix (params, data, environment): stages print it without a traceback."""


class ConfigError(UserError):
    """A params.yaml problem, reported before any expensive work starts."""


# ----------------------------------------------------------------------------------------- reading


def read_yaml(path: str | Path) -> Any:
    """A YAML file as plain Python data, read exactly as DVC reads params (ruamel.yaml, YAML 1.2).

    YAML 1.2 makes ``1e-5`` and ``5e-6`` floats (PyYAML's YAML 1.1 reads them as strings) and
    ``yes``/``no`` plain text; a key given twice is an error instead of silently taking the last.
    """
    return read_yaml_text(Path(path).read_text())


def read_yaml_text(text: str) -> Any:
    """``read_yaml`` for text, e.g. a value given on a command line as ``train.learning_rate=1e-5``."""
    from ruamel.yaml import YAML

    return YAML(typ="safe", pure=True).load(text)


def write_yaml(path: str | Path, data: Any) -> None:
    """Plain data as YAML that ``read_yaml`` (and DVC) read back to the same values."""
    import io

    from ruamel.yaml import YAML
    from ruamel.yaml.representer import RoundTripRepresenter
    from ruamel.yaml.scalarstring import LiteralScalarString

    class Representer(RoundTripRepresenter):  # null as `null`, not an empty value; ruamel's own class untouched
        pass

    Representer.add_representer(type(None), lambda r, _: r.represent_scalar("tag:yaml.org,2002:null", "null"))

    def blocks(node):  # multi-line text as a `|-` block, as people write the system prompt
        if isinstance(node, dict):
            return {k: blocks(v) for k, v in node.items()}
        if isinstance(node, list):
            return [blocks(v) for v in node]
        return LiteralScalarString(node) if isinstance(node, str) and "\n" in node else node

    yaml = YAML()  # round-trip mode, as DVC writes params.yaml
    yaml.Representer = Representer
    yaml.width = 4096
    stream = io.StringIO()
    yaml.dump(blocks(data), stream)
    Path(path).write_text(stream.getvalue())


# ------------------------------------------------------------------------------------------ types


def _whole(value):
    """An integer written as 1e3 or 100.0 is that integer; 1.5 stays a float and is refused."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


Int = Annotated[int, BeforeValidator(_whole)]
Dtype = Literal["bfloat16", "float16", "float32"]


class _Section(BaseModel):
    # strict: no str -> number, no bool -> number, no number -> bool; an int is accepted as a float
    model_config = ConfigDict(strict=True, extra="forbid", frozen=True, allow_inf_nan=False)


class _Problem(ValueError):
    """A check that failed: ``key`` is relative to the model that raised it (None: the field itself)."""

    def __init__(self, key: str | None, message: str):
        super().__init__(message)
        self.key, self.message = key, message


class DataConfig(_Section):
    source: Literal["hub", "local"]
    hub_id: str
    hub_config: str
    local_dir: str | None
    train_limit: Int | None = Field(gt=0)
    system_prompt: str

    @model_validator(mode="after")
    def _consistent(self):
        if not self.local_dir:
            raise _Problem("local_dir", "must name a folder with train.jsonl and test.jsonl, in either data.source "
                                        "mode: they are DVC deps of prepare (default: tests/fixtures/gsm8k)")
        if "<answer>" not in self.system_prompt:
            raise _Problem("system_prompt", "must ask for the <answer>...</answer> format that the grader reads")
        return self


class ModelConfig(_Section):
    name: str = Field(min_length=1, description="name a Hub id such as Qwen/Qwen2.5-3B-Instruct or a local folder")
    backend: Literal["unsloth", "transformers"]
    load_in_4bit: bool
    dtype: Dtype
    max_seq_length: Int = Field(gt=0)
    gradient_checkpointing: bool


class LoraConfig(_Section):
    r: Int = Field(gt=0, description="e.g. 64")
    alpha: Int = Field(gt=0, description="e.g. equal to lora.r")
    dropout: float = Field(ge=0, lt=1)
    target_modules: list[str] = Field(min_length=1, description="list at least one module, e.g. q_proj")


class TrainConfig(_Section):
    seed: Int
    learning_rate: float = Field(gt=0, lt=1, description="e.g. 5e-6")
    optim: Literal["adamw_8bit", "adamw_torch", "paged_adamw_8bit"]
    lr_scheduler_type: Literal["cosine", "linear", "constant", "constant_with_warmup"]
    warmup_ratio: float = Field(ge=0, lt=1)
    weight_decay: float = Field(ge=0)
    max_grad_norm: float = Field(gt=0)
    adam_beta1: float = Field(ge=0, lt=1)
    adam_beta2: float = Field(ge=0, lt=1)
    max_steps: Int = Field(gt=0)
    per_device_train_batch_size: Int = Field(gt=0)
    gradient_accumulation_steps: Int = Field(gt=0)
    num_generations: Int = Field(ge=2, description="GRPO's advantage compares completions of the same prompt")
    max_completion_length: Int = Field(gt=0)
    temperature: float = Field(gt=0, description="GRPO needs sampled, diverse completions")
    beta: float = Field(ge=0)
    loss_type: Literal["grpo", "dr_grpo", "dapo", "bnpo"]
    epsilon: float = Field(gt=0, lt=1, description="the policy ratio is clipped below 1 - epsilon")
    epsilon_high: float = Field(gt=0, lt=1, description="the policy ratio is clipped above 1 + epsilon_high")
    scale_rewards: Literal["group", "batch", "none"]
    mask_truncated_completions: bool
    reuse_training_logprobs: bool
    logging_steps: Int = Field(gt=0)
    save_steps: Int = Field(gt=0)
    save_total_limit: Int = Field(gt=0)
    report_to: Literal["none", "wandb", "tensorboard", "trackio"]
    reward_weights: dict[str, float]

    @model_validator(mode="after")
    def _consistent(self):
        batch, group = self.per_device_train_batch_size, self.num_generations
        if batch % group:
            raise _Problem("per_device_train_batch_size",
                           f"{batch} is not divisible by train.num_generations ({group}); "
                           f"use a multiple such as {group * max(1, batch // group)}")
        unknown = sorted(set(self.reward_weights) - set(REWARD_FUNCS))
        if unknown:
            raise _Problem(f"reward_weights.{unknown[0]}",
                           f"unknown reward; known rewards are {', '.join(REWARD_FUNCS)}")
        if not any(w != 0 for w in self.reward_weights.values()):
            raise _Problem("reward_weights", "give at least one reward a non-zero weight "
                                             "(correctness is the one that teaches maths)")
        return self


class GenerationConfig(_Section):
    use_vllm: bool
    vllm_mode: Literal["colocate", "server"]
    vllm_gpu_memory_utilization: float = Field(gt=0, lt=1, description="the share of GPU memory vLLM may take")


class EvalConfig(_Section):
    max_problems: Int | None = Field(gt=0)
    batch_size: Int = Field(gt=0)
    max_new_tokens: Int = Field(gt=0)
    during_training_problems: Int = Field(ge=0)
    during_training_every: Int = Field(gt=0)


# lm-eval's GSM8K tasks that read openai/gsm8k and decode greedily (harness.py points them at the local rows);
# gsm8k_cot_self_consistency samples 64 answers per problem and is left out.
LM_EVAL_TASKS = ("gsm8k", "gsm8k_cot", "gsm8k_cot_llama", "gsm8k_cot_zeroshot")


class LmEvalConfig(_Section):
    tasks: list[str]
    max_problems: Int | None = Field(gt=0)
    max_new_tokens: Int | None = Field(gt=0)

    @field_validator("tasks")
    @classmethod
    def _known(cls, tasks: list[str]):
        for task in tasks:
            if task not in LM_EVAL_TASKS:
                raise _Problem(None, f"unknown task {task!r}; lm-eval's GSM8K tasks here are "
                                     f"{', '.join(LM_EVAL_TASKS)} (an empty list turns lm-eval off)")
        if len(set(tasks)) < len(tasks):
            raise _Problem(None, "lists a task twice")
        return tasks


class MergeConfig(_Section):
    dtype: Dtype


class HubConfig(_Section):
    repo_id: str | None
    adapter_repo_id: str | None
    private: bool

    @field_validator("repo_id", "adapter_repo_id")
    @classmethod
    def _owner_name(cls, repo: str | None, info):
        if repo is not None and not (repo.count("/") == 1 and all(repo.split("/"))):
            raise _Problem(None, f"{repo!r} must look like 'owner/name' (or be null to skip publishing)")
        return repo


class Params(_Section):
    data: DataConfig
    model: ModelConfig
    lora: LoraConfig
    train: TrainConfig
    generation: GenerationConfig
    eval: EvalConfig
    lm_eval: LmEvalConfig
    merge: MergeConfig
    hub: HubConfig

    @model_validator(mode="after")
    def _consistent(self):
        if self.model.max_seq_length <= self.train.max_completion_length:
            raise _Problem("model.max_seq_length", f"must exceed train.max_completion_length "
                                                   f"({self.train.max_completion_length}) to leave room for the prompt")
        # Unsloth's colocated fast_inference shares the base weights with vLLM and passes the LoRA with every
        # request: no merge, so a 4-bit base is synced exactly there (and only there).
        fast_inference = self.model.backend == "unsloth" and self.generation.vllm_mode == "colocate"
        if self.generation.use_vllm and self.model.load_in_4bit and not fast_inference:
            raise _Problem("generation.use_vllm",
                           "TRL syncs the policy to vLLM by merging the LoRA into the base weights; on a 4-bit base "
                           "that merge re-quantizes them and loses most of the update, so rollouts would not come "
                           "from the policy being trained. Set model.load_in_4bit: false (16-bit base: exact sync, "
                           "the fastest path), model.backend: unsloth with generation.vllm_mode: colocate (its "
                           "fast_inference passes the LoRA to vLLM per request), or generation.use_vllm: false "
                           "(HF generate on the 4-bit model)")
        return self


SECTIONS = tuple(Params.model_fields)


# ------------------------------------------------------------------------------------------ errors

_EXPECTED = {  # pydantic error type -> (what was expected, how to write it)
    "int_type": ("int", "write a whole number such as 250"),
    "int_parsing": ("int", "write a whole number such as 250"),
    "int_from_float": ("int", "write a whole number such as 250"),
    "float_type": ("float", "write a number such as 5e-6 or 0.1, without quotes"),
    "float_parsing": ("float", "write a number such as 5e-6 or 0.1, without quotes"),
    "bool_type": ("true or false", "write true or false"),
    "bool_parsing": ("true or false", "write true or false"),
    "string_type": ("text", "write the value as text"),
    "list_type": ("list", "write a YAML list such as [q_proj, v_proj]"),
    "dict_type": ("a mapping of keys", "write `key: value` lines under it"),
    "model_type": ("a mapping of keys", "write `key: value` lines under it"),
    "model_attributes_type": ("a mapping of keys", "write `key: value` lines under it"),
}


def _field(loc: tuple):
    """The FieldInfo of the key at ``loc`` (None where ``loc`` leaves the models, e.g. inside a dict)."""
    cls, info = Params, None
    for part in loc:
        if not (isinstance(cls, type) and issubclass(cls, BaseModel)) or part not in cls.model_fields:
            return None
        info = cls.model_fields[part]
        cls = info.annotation
    return info


def _kind(annotation) -> tuple[Any, bool]:
    """(the base type, whether null is allowed) of a field annotation such as ``Int | None``."""
    args = typing.get_args(annotation) if typing.get_origin(annotation) in (typing.Union, types.UnionType) else ()
    nullable = type(None) in args
    if args:
        annotation = next(a for a in args if a is not type(None))
    if typing.get_origin(annotation) is Annotated:
        annotation = typing.get_args(annotation)[0]
    return annotation, nullable


def _range(info, nullable: bool, whole: bool) -> str:
    bounds = {name: getattr(m, name) for m in info.metadata for name in ("gt", "ge", "lt", "le") if hasattr(m, name)}
    low = ("(", bounds["gt"]) if "gt" in bounds else ("[", bounds["ge"]) if "ge" in bounds else None
    high = (")", bounds["lt"]) if "lt" in bounds else ("]", bounds["le"]) if "le" in bounds else None
    if low and high:
        text = f"must be in {low[0]}{low[1]:g}, {high[1]:g}{high[0]}"
    elif low == ("(", 0) and whole:
        text = "must be a positive integer"
    elif low and low[0] == "[" and whole:
        text = f"must be at least {low[1]}"
    elif low:
        text = f"must be {'>' if low[0] == '(' else '>='} {low[1]:g}"
    elif high:
        text = f"must be {'<' if high[0] == ')' else '<='} {high[1]:g}"
    else:
        text = "is out of range"
    return text + (" or null" if nullable else "")


def _valid_keys(loc: tuple) -> list[str]:
    """The keys allowed in the mapping at ``loc`` (the top level: the sections)."""
    info = _field(loc) if loc else None
    cls = Params if not loc else info.annotation if info is not None else None
    return list(cls.model_fields) if isinstance(cls, type) and issubclass(cls, BaseModel) else []


def _guess(loc: tuple) -> tuple[str, ...] | None:
    """The valid key that a misspelled one at ``loc`` most likely meant, as a full location."""
    close = difflib.get_close_matches(loc[-1], _valid_keys(loc[:-1]), n=1, cutoff=0.7)
    return (*loc[:-1], close[0]) if close else None


def _describe(value) -> str:
    return f"{value!r} ({type(value).__name__})" if value is not None else "nothing (null)"


def _problem(error: dict, source: str) -> tuple[str, str]:
    """One pydantic error as (dotted key, problem and fix)."""
    loc = tuple(str(part) for part in error["loc"])
    kind, value = error["type"], error.get("input")
    key = ".".join(loc) or "params"
    info = _field(loc)
    hint = f" ({info.description})" if info is not None and info.description else ""

    if kind == "missing":
        if len(loc) == 1:
            return key, f"section missing from {source}; the sections are {', '.join(SECTIONS)}"
        return key, f"missing from {source} (section {'.'.join(loc[:-1])}); add `{loc[-1]}: <value>` there"
    if kind == "extra_forbidden":
        valid, guess = _valid_keys(loc[:-1]), _guess(loc)
        did = f" (did you mean {guess[-1]}?)" if guess else ""
        if len(loc) == 1:
            return key, f"unknown section{did}; valid sections are: {', '.join(valid)}"
        return key, f"unknown key{did}; valid keys here are: {', '.join(valid)}"
    if kind == "value_error" and isinstance(error.get("ctx", {}).get("error"), _Problem):
        problem = error["ctx"]["error"]
        return ".".join([*loc, problem.key] if problem.key else loc), problem.message
    if kind == "literal_error":
        choices = error["ctx"]["expected"].replace("'", "").replace(" or ", ", ")
        return key, f"{value!r} is not one of {choices}"
    if kind in ("greater_than", "greater_than_equal", "less_than", "less_than_equal") and info is not None:
        base, nullable = _kind(info.annotation)
        return key, _range(info, nullable, base is int) + hint
    if kind in ("too_short", "string_too_short"):
        return key, info.description if info is not None and info.description else "must not be empty"
    if kind == "finite_number":
        return key, f"{value!r} is not a finite number"
    if kind in _EXPECTED:
        want, fix = _EXPECTED[kind]
        if len(loc) == 0:
            return "params", f"expected a mapping of the sections {', '.join(SECTIONS)}, got {_describe(value)}"
        if len(loc) == 1 and kind in ("model_type", "model_attributes_type", "dict_type"):
            return key, f"expected a mapping of keys, got {_describe(value)}; write `key: value` lines under `{key}:`"
        nullable = info is not None and _kind(info.annotation)[1]
        return key, f"expected {want}{' or null' if nullable else ''}, got {_describe(value)}; {fix}"
    return key, error["msg"]


def _config_error(err: ValidationError, source: str) -> ConfigError:
    errors = err.errors()
    # A misspelled key also leaves the right one missing: name the misspelling, skip its echo.
    meant = {_guess(tuple(map(str, e["loc"]))) for e in errors if e["type"] == "extra_forbidden"}
    errors = [e for e in errors if not (e["type"] == "missing" and tuple(map(str, e["loc"])) in meant)]
    errors.sort(key=lambda e: e["type"] != "extra_forbidden")  # the typo first: it explains the rest
    problems = [_problem(e, source) for e in errors]
    (key, message), rest = problems[0], problems[1:]
    more = f" (and {len(rest)} more: {', '.join(k for k, _ in rest)})" if rest else ""
    return ConfigError(f"{key}: {message}{more}")


# -------------------------------------------------------------------------------------------- API


def parse(raw: Any, source: str = "params.yaml") -> Params:
    """Plain data (as read from a params file) -> validated Params, or one ConfigError line."""
    try:
        return Params.model_validate(raw)
    except ValidationError as err:
        raise _config_error(err, source) from None


def load(path: str | Path = "params.yaml") -> Params:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: params file not found; run from the repository root")
    from ruamel.yaml import YAMLError

    try:
        raw = read_yaml(path)
    except YAMLError as err:
        where = getattr(err, "problem_mark", None) or getattr(err, "context_mark", None)
        at = f" (line {where.line + 1})" if where is not None else ""
        what = " ".join(str(getattr(err, "problem", None) or err).split())
        raise ConfigError(f"{path}: not valid YAML{at}: {what}") from None
    return parse(raw, path.name)


def as_dict(p: Params) -> dict:
    return p.model_dump()


def replace(p: Params, **sections: dict) -> Params:
    """Params with some keys of some sections replaced, validated again: replace(p, train={"max_steps": 5})."""
    raw = as_dict(p)
    for name, values in sections.items():
        raw[name] = {**raw[name], **values}
    return parse(raw)
