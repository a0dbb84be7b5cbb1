"""The model cards say what ran (training_run.json), not what params.yaml asked for."""

import re

import yaml

from grpo_gsm8k import config
from grpo_gsm8k.model_card import build_card



def _params() -> dict:
    from pathlib import Path

    return yaml.safe_load((Path(__file__).resolve().parent.parent / "profiles/tiny.yaml").read_text())


def cpu_run() -> dict:
    """A record as the train stage writes it on CPU: the tiny profile asks for 4-bit, bfloat16 and
    adamw_8bit, the trainer used a float32 base without quantization and adamw_torch."""
    params = config.as_dict(config.parse(_params()))
    return {"run_hash": "abc", "base_model": "tiny-model", "backend": "transformers", "params": params,
            "base_weights": {"load_in_4bit": False, "dtype": "float32"},
            "effective_grpo_config": {"optim": "adamw_torch", "bf16": False, "fp16": False}}


def card(kind: str, run: dict, repo_id=None, merged_dtype=None) -> str:
    return str(build_card(kind, repo_id=repo_id, local_folder=f"models/{kind}", base_model="tiny-model",
                          system_prompt=run["params"]["data"]["system_prompt"], metrics=None, training_run=run,
                          **({"merged_dtype": merged_dtype} if merged_dtype else {})))


def test_cards_state_the_backend_precision_and_optimizer_that_ran():
    from huggingface_hub import ModelCard

    run = cpu_run()
    text = card("adapter", run)
    data = ModelCard(text).data
    assert "lora" in data.tags and "qlora" not in data.tags and "unsloth" not in data.tags
    assert "TRL, PEFT, LoRA on a float32 base" in text
    assert "QLoRA on" not in text and "| 4-bit (QLoRA) base | False |" in text
    assert "| optimizer | adamw_torch |" in text and "adamw_8bit" not in text
    assert "| base weights dtype | float32 |" in text and "bfloat16" not in text
    assert "| mixed precision | no |" in text

    gpu = dict(run, backend="unsloth", base_weights={"load_in_4bit": True, "dtype": "bfloat16"},
               effective_grpo_config={"optim": "adamw_8bit", "bf16": True, "fp16": False})
    gpu_text = card("adapter", gpu)
    assert {"unsloth", "qlora"} <= set(ModelCard(gpu_text).data.tags)
    assert "TRL, Unsloth, QLoRA on a 4-bit base (bfloat16 compute)" in gpu_text
    assert "| mixed precision | bf16 |" in gpu_text


def test_merged_card_names_the_dtype_it_was_saved_in():
    text = card("merged", cpu_run(), merged_dtype="float32")
    assert "16-bit" not in text
    assert "a full float32 model: the LoRA adapter merged into" in text


def test_local_adapter_vllm_snippet_uses_the_folder_and_hub_one_downloads():
    run = cpu_run()
    local = card("adapter", run)
    [vllm] = [code for code in re.findall(r"```python\n(.*?)```", local, re.S) if "vllm" in code]
    assert "snapshot_download" not in vllm and 'LoRARequest("gsm8k-grpo", 1, "models/adapter")' in vllm
    hub = card("adapter", run, repo_id="me/tiny-grpo")
    assert 'snapshot_download("me/tiny-grpo")' in hub
    for code in re.findall(r"```python\n(.*?)```", local, re.S):  # every snippet defines what it uses
        assert code.index("SYSTEM_PROMPT = ") < code.index("SYSTEM_PROMPT}") and "question = " in code
