"""Model loading for the two training backends, evaluation and merging.

Importing unsloth patches TRL and transformers for the whole process, so the unsloth backend is
imported first and only on its own path (`import_backend`); the transformers backend never
imports it.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import platform
from dataclasses import dataclass
from pathlib import Path

from .config import ConfigError, Params

VERSIONED_PACKAGES = ("torch", "transformers", "trl", "peft", "accelerate", "datasets", "bitsandbytes",
                      "unsloth", "unsloth_zoo", "vllm", "dvc", "dvclive", "huggingface_hub")


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def check_backend(p: Params) -> None:
    """Fail before any download when the backend cannot run on this machine."""
    if p.model.backend == "unsloth" and not cuda_available():
        raise ConfigError("model.backend: unsloth needs a CUDA GPU; set model.backend: transformers to run on CPU")
    check_vllm(p)


def check_vllm(p: Params) -> None:
    """vLLM generates the rollouts and the evaluation when generation.use_vllm is true: it must be usable."""
    if not p.generation.use_vllm:
        return
    if not cuda_available():
        raise ConfigError("generation.use_vllm: vLLM needs a CUDA GPU; set it to false to run on CPU")
    if importlib.util.find_spec("vllm") is None:
        raise ConfigError("generation.use_vllm: vllm is not installed in this environment; install the pinned one "
                          "(requirements.lock, as in the Docker image) or set generation.use_vllm: false "
                          "(HF generate: several times slower, BENCHMARKS.md)")


# train.report_to -> the modules that provide it (any one will do) and what to install
TRACKERS = {"wandb": (("wandb",), "wandb"), "tensorboard": (("tensorboard", "tensorboardX"), "tensorboard"),
            "trackio": (("trackio",), "trackio")}


def check_tracker(p: Params) -> None:
    """Fail before the model loads when train.report_to names a tracker whose package is missing."""
    if p.train.report_to == "none":
        return
    modules, package = TRACKERS[p.train.report_to]
    if not any(importlib.util.find_spec(m) for m in modules):
        raise ConfigError(f"train.report_to: {p.train.report_to} is not installed in this environment; "
                          f"`pip install {package}` or set train.report_to: none (DVCLive logs the run either way)")


def _looks_like_path(name: str) -> bool:
    if name.startswith(("./", "../", "/", "~")) or name in (".", "..") or Path(name).expanduser().exists():
        return True
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(name)
    except HFValidationError:
        return True  # cannot be a Hub id (e.g. a/b/c): only a folder is left
    return False


def check_model(name: str) -> None:
    """``model.name`` names a model that can be loaded, checked before anything loads or is written.

    A path (starts with ./ ../ / ~, or exists) must be a folder with config.json. Anything else is a
    Hub id whose config.json must resolve: from the local cache when HF_HUB_OFFLINE is set (an id
    already downloaded passes offline), else from the Hub, with HF_TOKEN for gated or private models.
    Every failure is one ConfigError line naming model.name and the fix.
    """
    fix = "point model.name at a folder with config.json or at a Hub id such as Qwen/Qwen2.5-3B-Instruct"
    if _looks_like_path(name):
        path = Path(name).expanduser()
        if not path.exists():
            raise ConfigError(f"model.name: local folder {name} not found (from {Path.cwd()}); {fix}")
        if not (path / "config.json").is_file():
            raise ConfigError(f"model.name: {name} has no config.json, so it is not a saved model "
                              f"(save one with save_pretrained); {fix}")
        return
    from huggingface_hub import constants, hf_hub_download
    from huggingface_hub.errors import (GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError,
                                        RemoteEntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError)

    try:
        hf_hub_download(name, "config.json")
    except GatedRepoError:
        raise ConfigError(f"model.name: {name} is gated on the Hub; accept its terms on "
                          f"{constants.ENDPOINT}/{name} and pass HF_TOKEN in the environment") from None
    except RepositoryNotFoundError:
        token = "" if os.environ.get("HF_TOKEN") else " (for a private model pass HF_TOKEN)"
        raise ConfigError(f"model.name: {name} is not a model on the Hub ({constants.ENDPOINT}) nor a local "
                          f"folder; check the spelling{token}, or {fix}") from None
    except (RemoteEntryNotFoundError, RevisionNotFoundError):
        raise ConfigError(f"model.name: the Hub repo {name} has no config.json on its main branch, so "
                          f"transformers cannot load it; {fix}") from None
    except LocalEntryNotFoundError:
        why = ("the Hub is switched off (HF_HUB_OFFLINE=1)" if constants.HF_HUB_OFFLINE
               else f"the Hub ({constants.ENDPOINT}) cannot be reached")
        raise ConfigError(f"model.name: {name} is not a local folder, {why} and the Hugging Face cache "
                          f"({constants.HF_HUB_CACHE}) has no copy of it; download it once with network "
                          f"(`hf download {name}`), or {fix}") from None
    except (HfHubHTTPError, OSError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConfigError(f"model.name: could not resolve {name} on the Hub ({first}); check the network "
                          f"and HF_TOKEN, or {fix}") from None


def import_backend(p: Params) -> None:
    """Import unsloth before trl/transformers/peft when (and only when) it is the backend."""
    if p.model.backend == "unsloth":
        # Unsloth compiles its chunked GRPO log-softmax with the chunk loop unrolled (128 chunks a 32-row
        # micro-batch): at 256 completions no step finished in 280-440 s. With this off, micro-batches took
        # 1.5-2.5 s on an H100 (BENCHMARKS.md, Unsloth section). Read once, at import; a user's own value wins.
        os.environ.setdefault("UNSLOTH_COMPILE_DISABLE", "1")
        import unsloth  # noqa: F401  (patches TRL's trainers on import)


def package_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in VERSIONED_PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    if cuda_available():
        import torch

        versions["cuda"] = torch.version.cuda
        versions["gpu"] = torch.cuda.get_device_name(0)
    return versions


def torch_dtype(name: str):
    import torch

    return {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[name]


def load_tokenizer(name_or_path: str):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(name_or_path, padding_side="left", truncation_side="left")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


@dataclass
class Policy:
    """What GRPOTrainer needs: a model (or its name for TRL to load) and how to wrap it in LoRA."""

    model: object
    tokenizer: object
    peft_config: object | None  # None when the backend already attached the LoRA (unsloth)
    quantization_config: object | None
    model_init_kwargs: dict | None


def lora_config(p: Params):
    from peft import LoraConfig

    return LoraConfig(r=p.lora.r, lora_alpha=p.lora.alpha, lora_dropout=p.lora.dropout,
                      target_modules=list(p.lora.target_modules), task_type="CAUSAL_LM")


def load_policy(p: Params) -> Policy:
    if p.model.backend == "unsloth":
        return _unsloth_policy(p)
    tokenizer = load_tokenizer(p.model.name)
    if not cuda_available():  # CPU: full precision, no quantization (tests and smoke runs)
        return Policy(p.model.name, tokenizer, lora_config(p), None, {"dtype": "float32"})
    quantization = None
    if p.model.load_in_4bit:
        import torch
        from transformers import BitsAndBytesConfig

        quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                          bnb_4bit_use_double_quant=True,
                                          bnb_4bit_compute_dtype=torch_dtype(p.model.dtype),
                                          bnb_4bit_quant_storage=torch_dtype(p.model.dtype))
    return Policy(p.model.name, tokenizer, lora_config(p), quantization, {"dtype": p.model.dtype})


def unsloth_load_kwargs(p: Params) -> dict:
    """FastLanguageModel.from_pretrained's arguments. fast_inference (vLLM inside the model, sharing its
    weights, the LoRA per request) is what colocated generation uses.
    use_exact_model_name: Unsloth would otherwise load its own copy of a Hub id (Qwen/Qwen2.5-3B-Instruct ->
    unsloth/Qwen2.5-3B-Instruct-unsloth-bnb-4bit in 4-bit, unsloth/Qwen2.5-3B-Instruct in 16-bit: its
    models/mapper.py), a repo check_model never checked, missing from an offline cache, and the base the
    saved adapter would name instead of model.name.
    max_num_seqs: Unsloth sizes vLLM's concurrent sequences from free memory (48-96 on an H100, 112 on an H200 at
    share 0.35), so a step's 256 completions decoded in waves; TRL's own colocated engine takes the whole
    generation batch at once. One more than the batch, because 256 is Unsloth's "pick for me" value
    (unsloth_zoo vllm_utils.load_vllm). On the H200 it cut the defaults' step from 29.4 to 23.8 s
    (BENCHMARKS.md, Unsloth section, fourth session)."""
    fast_inference = p.generation.use_vllm and p.generation.vllm_mode == "colocate"
    kwargs = dict(model_name=p.model.name, use_exact_model_name=True, max_seq_length=p.model.max_seq_length,
                  load_in_4bit=p.model.load_in_4bit, dtype=torch_dtype(p.model.dtype), fast_inference=fast_inference,
                  max_lora_rank=p.lora.r, gpu_memory_utilization=p.generation.vllm_gpu_memory_utilization)
    if fast_inference:  # a single process: TRL's generation batch is per-device batch x steps_per_generation
        kwargs["max_num_seqs"] = p.train.per_device_train_batch_size * p.train.gradient_accumulation_steps + 1
    return kwargs


def _unsloth_policy(p: Params) -> Policy:
    from unsloth import FastLanguageModel

    model, tokenizer = FastLanguageModel.from_pretrained(**unsloth_load_kwargs(p))
    model = FastLanguageModel.get_peft_model(
        model,
        r=p.lora.r,
        lora_alpha=p.lora.alpha,
        lora_dropout=p.lora.dropout,
        target_modules=list(p.lora.target_modules),
        # Plain recomputation, not "unsloth" (activations offloaded to CPU): the one measured to finish steps at
        # the defaults' batch on an H100, with and without fast_inference (BENCHMARKS.md, Unsloth section).
        use_gradient_checkpointing=p.model.gradient_checkpointing,
        random_state=p.train.seed,
    )
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return Policy(model, tokenizer, None, None, None)


def load_merged(base: str, adapter_dir: str | None, dtype: str):
    """The base model in 16-bit (never the 4-bit training copy) with the adapter merged in."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch_dtype(dtype),
                                                 device_map="cuda" if cuda_available() else None)
    if adapter_dir:
        model = PeftModel.from_pretrained(model, adapter_dir).merge_and_unload()
    return model.eval()
