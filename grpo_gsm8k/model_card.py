"""The README.md model card of each published repo: Hub metadata (base model, relation, library,
dataset, tags, model-index with the GSM8K test accuracy beside the base model's), the training
params of the run, the reward-curve image, the prompt format and usage snippets.

Built only from the run's own files (reports/eval/metrics.json, models/adapter/training_run.json)
and params, so an unchanged run gives a byte-identical card and the push stays idempotent.
The train and merge stages write the same card, less the results (not measured yet), into the
folders they make (folder_card); push publishes it with the results (hub.py).
"""

from __future__ import annotations

from huggingface_hub import EvalResult, ModelCard, ModelCardData

DATASET = "openai/gsm8k"
TAGS = ["grpo", "trl", "gsm8k", "reasoning"]  # and what ran: unsloth, qlora or lora (tags())
IMAGE = "assets/summary.png"        # where the reward-curve / accuracy figure lives in each repo
KINDS = {  # kind -> (base_model_relation, library_name, title)
    "adapter": ("adapter", "peft", "LoRA adapter"),
    "merged": ("finetune", "transformers", "merged model"),
}


def what_ran(training_run: dict) -> dict:
    """Backend, base weights (4-bit or not, dtype), optimizer and mixed precision of the run, from its
    record: the values the trainer used (on CPU: no 4-bit, float32, adamw_torch), the params only where
    an older record lacks them."""
    params = training_run.get("params", {})
    model, train = params.get("model", {}), params.get("train", {})
    weights = training_run.get("base_weights") or {}
    effective = training_run.get("effective_grpo_config") or {}
    mixed = ("bf16" if effective.get("bf16") else "fp16" if effective.get("fp16") else "no") if effective else None
    return {"backend": training_run.get("backend"),
            "load_in_4bit": weights.get("load_in_4bit", model.get("load_in_4bit")),
            "dtype": weights.get("dtype", model.get("dtype")),
            "optim": effective.get("optim", train.get("optim")), "mixed_precision": mixed}


def tags(training_run: dict) -> list[str]:
    ran = what_ran(training_run)
    return TAGS + (["unsloth"] if ran["backend"] == "unsloth" else []) + (["qlora"] if ran["load_in_4bit"] else ["lora"])


def eval_results(base_model: str, metrics: dict) -> list[EvalResult]:
    """model-index: the trained model's strict GSM8K test accuracy, and the base model's beside it."""
    common = dict(task_type="text-generation", task_name="Grade-school math word problems",
                  dataset_type=DATASET, dataset_name="GSM8K", dataset_config="main", dataset_split="test",
                  metric_type="accuracy")
    results = [
        EvalResult(**common, metric_name="accuracy (GRPO fine-tuned, greedy)",
                   metric_value=metrics["trained"]["accuracy"]),
        EvalResult(**common, metric_name=f"accuracy of the base model {base_model} (greedy)",
                   metric_value=metrics["base"]["accuracy"]),
    ]
    common["metric_type"] = "exact_match"
    for side, label, f, name in _lm_eval_rows(metrics.get("lm_eval", {})):
        model = "GRPO fine-tuned" if side == "trained" else f"base model {base_model}"
        score = metrics["lm_eval"][side][label]["filters"][f]
        results.append(EvalResult(**common, metric_name=f"{name} ({model})", metric_value=score["exact_match"]))
    return results


def _lm_eval_rows(lm_eval: dict) -> list[tuple[str, str, str, str]]:
    """(side, label, filter, name) of each lm-eval score, the name saying task, shots, filter and chat template."""
    rows = []
    for side in ("trained", "base"):
        for label, block in lm_eval.get(side, {}).items():
            chat = "chat template" if block["chat_template"] else "no chat template"
            for f in block["filters"]:
                rows.append((side, label, f, f"lm-eval {lm_eval['version']} {block['task']}, "
                                             f"{block['num_fewshot']}-shot, {chat}, {f}"))
    return rows


def card_data(kind: str, repo_id: str | None, base_model: str, metrics: dict | None,
              training_run: dict | None = None) -> ModelCardData:
    relation, library, _ = KINDS[kind]
    return ModelCardData(
        model_name=(repo_id or f"{base_model}-gsm8k-grpo").split("/")[-1],
        base_model=base_model, base_model_relation=relation, library_name=library,
        pipeline_tag="text-generation", datasets=[DATASET], tags=tags(training_run or {}), metrics=["accuracy"],
        eval_results=eval_results(base_model, metrics) if metrics else None,
    )


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (list, tuple)):
        return ", ".join(str(v) for v in value)
    if isinstance(value, dict):
        return ", ".join(f"{k}={_fmt(v)}" for k, v in value.items())
    return str(value)


def training_table(training_run: dict) -> str:
    """The run's hyperparameters as a Markdown table, from training_run.json (what the trainer saw)."""
    p = training_run.get("params", {})
    t, lora, model = p.get("train", {}), p.get("lora", {}), p.get("model", {})
    ran = what_ran(training_run)
    rows = [
        ("learning rate", t.get("learning_rate")), ("LR schedule", t.get("lr_scheduler_type")),
        ("warmup ratio", t.get("warmup_ratio")), ("optimizer steps", t.get("max_steps")),
        ("per-device batch (completions)", t.get("per_device_train_batch_size")),
        ("gradient accumulation", t.get("gradient_accumulation_steps")),
        ("generations per prompt (GRPO group)", t.get("num_generations")),
        ("max completion length", t.get("max_completion_length")), ("sampling temperature", t.get("temperature")),
        ("KL beta", t.get("beta")), ("loss type", t.get("loss_type")),
        ("ratio clip (epsilon, epsilon_high)", (t["epsilon"], t["epsilon_high"]) if "epsilon" in t else None),
        ("optimizer", ran["optim"]), ("mixed precision", ran["mixed_precision"]),
        ("weight decay", t.get("weight_decay")), ("max grad norm", t.get("max_grad_norm")),
        ("reward weights", t.get("reward_weights")), ("seed", t.get("seed")),
        ("LoRA r", lora.get("r")), ("LoRA alpha", lora.get("alpha")), ("LoRA dropout", lora.get("dropout")),
        ("LoRA target modules", lora.get("target_modules")), ("backend", training_run.get("backend")),
        ("4-bit (QLoRA) base", ran["load_in_4bit"]), ("base weights dtype", ran["dtype"]),
        ("max sequence length", model.get("max_seq_length")), ("run hash", training_run.get("run_hash")),
    ]
    versions = training_run.get("versions") or {}
    if versions:
        rows.append(("versions", versions))
    lines = ["| parameter | value |", "|---|---|"]
    lines += [f"| {name} | {_fmt(value)} |" for name, value in rows if value is not None]
    return "\n".join(lines)


def _stack(training_run: dict) -> str:
    """What trained it, from the run's record: the card names only what was actually used."""
    ran = what_ran(training_run)
    lora = (f"QLoRA on a 4-bit base ({ran['dtype']} compute)" if ran["load_in_4bit"]
            else f"LoRA on a {ran['dtype']} base" if ran["dtype"] else "LoRA")
    return ", ".join(["TRL", "Unsloth" if ran["backend"] == "unsloth" else "PEFT", lora])


_MESSAGES = 'messages = [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": question}]'
QUESTION = "A pen costs $3. How much do 4 pens cost?"


def _inputs(system_prompt: str) -> str:
    """The snippets' first lines, so that each runs as printed: the training system prompt and a question."""
    return f'SYSTEM_PROMPT = {system_prompt!r}\nquestion = {QUESTION!r}'


def _transformers_usage(imports: str, model_class: str, repo: str, system_prompt: str) -> str:
    """Load ``repo`` with ``model_class`` and answer one question greedily, as evaluation does."""
    return f'''```python
{imports}

{_inputs(system_prompt)}
model = {model_class}.from_pretrained("{repo}", dtype="auto", device_map="auto")
tokenizer = AutoTokenizer.from_pretrained("{repo}")
{_MESSAGES}
prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
inputs = tokenizer(prompt, return_tensors="pt", add_special_tokens=False).to(model.device)
output = model.generate(**inputs, max_new_tokens=512, do_sample=False)
print(tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))
```'''


def _usage(kind: str, repo: str, base_model: str, lora_r: int | None, system_prompt: str, local: bool) -> str:
    if kind == "merged":
        return f'''transformers:

{_transformers_usage("from transformers import AutoModelForCausalLM, AutoTokenizer", "AutoModelForCausalLM", repo,
                     system_prompt)}

vLLM:

```python
from vllm import LLM, SamplingParams

{_inputs(system_prompt)}
llm = LLM(model="{repo}")
{_MESSAGES}
print(llm.chat(messages, SamplingParams(temperature=0, max_tokens=512))[0].outputs[0].text)
```'''
    peft_imports = "from peft import AutoPeftModelForCausalLM\nfrom transformers import AutoTokenizer"
    # a local folder is the adapter's path as it is; a Hub repo is downloaded first
    download = "" if local else "from huggingface_hub import snapshot_download\n"
    path = f'"{repo}"' if local else f'snapshot_download("{repo}")'
    return f'''PEFT (base model + this adapter):

{_transformers_usage(peft_imports, "AutoPeftModelForCausalLM", repo, system_prompt)}

vLLM (base model with the LoRA applied per request):

```python
{download}from vllm import LLM, SamplingParams
from vllm.lora.request import LoRARequest

{_inputs(system_prompt)}
llm = LLM(model="{base_model}", enable_lora=True, max_lora_rank={lora_r or 64})
lora = LoRARequest("gsm8k-grpo", 1, {path})
{_MESSAGES}
print(llm.chat(messages, SamplingParams(temperature=0, max_tokens=512), lora_request=lora)[0].outputs[0].text)
```'''


def _results(metrics: dict | None) -> str:
    if not metrics:
        return ("Not measured when this folder was written: the evaluate stage scores the model, and the "
                "push stage\nwrites this card with the results and the reward curves to `reports/hub/`, "
                "as it publishes it.")
    trained, base = metrics["trained"], metrics["base"]
    problems, capped = trained.get("problems"), trained.get("capped_at")
    scope = (f"the first {problems} problems of the GSM8K test split (eval.max_problems={capped})" if capped
             else f"the GSM8K test split ({problems} problems)")
    rows = [("accuracy (strict: number inside `<answer>`)", "accuracy"),
            ("accuracy (lenient: last number anywhere)", "accuracy_lenient"),
            ("format adherence", "format_adherence")]
    table = "\n".join(f"| {label} | {base.get(key, float('nan')):.4f} | {trained.get(key, float('nan')):.4f} |"
                      for label, key in rows)
    return (f"Greedy decoding on {scope}, graded by the project's shared grader:\n\n"
            f"| metric | base model | GRPO fine-tuned |\n|---|---|---|\n{table}\n\n{_lm_eval_table(metrics)}"
            f"![GRPO reward curves and GSM8K accuracy before and after training]({IMAGE})")


def _lm_eval_table(metrics: dict) -> str:
    """lm-eval's GSM8K tasks, comparable with published tables, beside the project's own grader's numbers."""
    lm_eval = metrics.get("lm_eval", {})
    rows = [(label, f, name) for side, label, f, name in _lm_eval_rows(lm_eval) if side == "trained"]
    if not rows:
        return ""

    def cell(side, label, f):
        score = lm_eval.get(side, {}).get(label, {}).get("filters", {}).get(f)
        return f"{score['exact_match']:.4f} ± {score['stderr']:.4f}" if score else "n/a"

    table = "\n".join(f"| {name} | {cell('base', label, f)} | {cell('trained', label, f)} |" for label, f, name in rows)
    problems = next(iter(lm_eval["trained"].values()))["problems"]
    return (f"EleutherAI lm-evaluation-harness's own GSM8K tasks (their prompts and answer filters, not the "
            f"format above; exact match ± standard error, {problems} test problems, {lm_eval['backend']}):\n\n"
            f"| task | base model | GRPO fine-tuned |\n|---|---|---|\n{table}\n\n")


def build_card(kind: str, *, repo_id: str | None, local_folder: str, base_model: str, system_prompt: str,
               metrics: dict | None, training_run: dict, other_repo_id: str | None = None,
               merged_dtype: str | None = None) -> ModelCard:
    """The card of one repo: kind is "adapter" (LoRA, PEFT) or "merged" (transformers, in merged_dtype,
    as the merge stage saved it); metrics None (not evaluated yet) leaves out the results and the model-index."""
    _, _, title = KINDS[kind]
    if kind == "merged" and merged_dtype:
        title = f"{title} ({merged_dtype})"
    repo = repo_id or local_folder
    other = ""
    if other_repo_id:
        other = (f"The merged model is [{other_repo_id}](https://huggingface.co/{other_repo_id}).\n"
                 if kind == "adapter" else
                 f"The LoRA adapter alone is [{other_repo_id}](https://huggingface.co/{other_repo_id}).\n")
    what = ("a LoRA adapter for" if kind == "adapter"
            else f"a full {merged_dtype + ' ' if merged_dtype else ''}model: the LoRA adapter merged into")
    lora_r = training_run.get("params", {}).get("lora", {}).get("r")
    body = f"""
# {title}: {base_model} fine-tuned with GRPO on GSM8K

This repo holds {what} [{base_model}](https://huggingface.co/{base_model}), trained with GRPO
({_stack(training_run)}) on the GSM8K training split with rule-based rewards (correct final answer,
`<reasoning>`/`<answer>` format). {other}
## Results

{_results(metrics)}

## Prompt format

A chat with this system prompt, then the question as the user turn; the final number is read from
`<answer>...</answer>`:

```text
{system_prompt}
```

## Usage

Each snippet runs as printed; `question` is any math word problem.

{_usage(kind, repo, base_model, lora_r, system_prompt, local=repo_id is None)}

## Training

GRPO on [{DATASET}](https://huggingface.co/datasets/{DATASET}) (config `main`, train split), from
`training_run.json` in this repo:

{training_table(training_run)}
"""
    data = card_data(kind, repo_id, base_model, metrics, training_run)
    return ModelCard(f"---\n{data.to_yaml()}\n---\n{body}")


def folder_card(kind: str, folder: str, training_run: dict, merged_dtype: str | None = None) -> str:
    """The card that the train (adapter) and merge (merged) stages write as the folder's README.md in
    place of PEFT's template: from the run record alone, so those stages read no other file."""
    return str(build_card(kind, repo_id=None, local_folder=folder, base_model=training_run["base_model"],
                          system_prompt=training_run["params"]["data"]["system_prompt"], metrics=None,
                          training_run=training_run, merged_dtype=merged_dtype))


def saved_dtype(folder) -> str | None:
    """The dtype a saved transformers model folder holds (its config.json), e.g. "float32"."""
    import json
    from pathlib import Path

    config = Path(folder) / "config.json"
    if not config.is_file():
        return None
    data = json.loads(config.read_text())
    return data.get("dtype") or data.get("torch_dtype")
