"""Greedy generation on the test prompts and the metrics, graded by the shared grader."""

from __future__ import annotations

import importlib.util
import math
import time
from dataclasses import dataclass

from tqdm import tqdm

from . import modeling
from .config import Params
from .grading import extract_answer, is_correct, is_correct_lenient, parse_number
from .rewards import has_format


@dataclass
class Completion:
    text: str
    tokens: int
    truncated: bool  # stopped by the token budget, not by an end-of-turn token


def generate(p: Params, adapter: str | None, prompts: list[list[dict]], temperature: float = 0.0,
             seed: int | None = None) -> list[Completion]:
    """The base model, or with the adapter, on the chat prompts under params' model and eval settings:
    vLLM on a GPU where it is installed, transformers otherwise. Greedy unless temperature > 0."""
    cuda = modeling.cuda_available()
    if cuda and importlib.util.find_spec("vllm"):
        return generate_vllm(p.model.name, adapter, prompts, p.eval.max_new_tokens, p.model.max_seq_length,
                             p.generation.vllm_gpu_memory_utilization, p.lora.r, temperature=temperature, seed=seed)
    model = modeling.load_merged(p.model.name, adapter, p.model.dtype if cuda else "float32")
    tokenizer = modeling.load_tokenizer(p.model.name)
    if seed is not None:
        from transformers import set_seed

        set_seed(seed)
    return generate_hf(model, tokenizer, prompts, p.eval.batch_size, p.eval.max_new_tokens, temperature=temperature)


def generate_hf(model, tokenizer, prompts: list[list[dict]], batch_size: int, max_new_tokens: int,
                min_new_tokens: int = 0, temperature: float = 0.0) -> list[Completion]:
    """Left-padded batches of similar length (sorted), greedy (or plain temperature sampling: no top-k
    or top-p); results in the original order."""
    import torch

    texts = [tokenizer.apply_chat_template(p, add_generation_prompt=True, tokenize=False) for p in prompts]
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]), reverse=True)
    eos_ids = set(_eos_ids(model, tokenizer))
    results: list[Completion | None] = [None] * len(texts)
    tokenizer.padding_side = "left"
    sampling = (dict(do_sample=True, temperature=temperature, top_p=1.0, top_k=0) if temperature > 0
                else dict(do_sample=False, temperature=None, top_p=None, top_k=None))
    start = time.perf_counter()
    with tqdm(total=len(texts), desc="evaluating", unit="problem") as bar:
        for first in range(0, len(order), batch_size):
            batch = order[first:first + batch_size]
            enc = tokenizer([texts[i] for i in batch], return_tensors="pt", padding=True,
                            add_special_tokens=False).to(model.device)
            with torch.inference_mode():
                out = model.generate(**enc, **sampling, max_new_tokens=max_new_tokens,
                                     min_new_tokens=min_new_tokens, eos_token_id=sorted(eos_ids),
                                     pad_token_id=tokenizer.pad_token_id)
            for row, i in enumerate(batch):
                ids = out[row, enc["input_ids"].shape[1]:].tolist()
                ended = next((k for k, t in enumerate(ids) if t in eos_ids), None)
                kept = ids if ended is None else ids[:ended]
                results[i] = Completion(tokenizer.decode(kept, skip_special_tokens=True), len(kept), ended is None)
            bar.update(len(batch))
            bar.set_postfix(problems_per_s=f"{bar.n / (time.perf_counter() - start):.2f}")
    return results


def generate_vllm(model_name: str, adapter_dir: str | None, prompts: list[list[dict]], max_new_tokens: int,
                  max_model_len: int, gpu_memory_utilization: float, max_lora_rank: int,
                  temperature: float = 0.0, seed: int | None = None) -> list[Completion]:
    """vLLM, when installed: the base model with the LoRA applied per request, greedy unless
    temperature > 0."""
    from vllm import LLM, SamplingParams
    from vllm.lora.request import LoRARequest

    llm = LLM(model=model_name, enable_lora=adapter_dir is not None, max_lora_rank=max_lora_rank,
              max_model_len=max_model_len, gpu_memory_utilization=gpu_memory_utilization)
    sampling = SamplingParams(temperature=temperature, seed=seed, max_tokens=max_new_tokens)
    lora = LoRARequest("adapter", 1, adapter_dir) if adapter_dir else None
    outputs = llm.chat(prompts, sampling, lora_request=lora, use_tqdm=True)
    return [Completion(o.outputs[0].text, len(o.outputs[0].token_ids), o.outputs[0].finish_reason == "length")
            for o in outputs]


def _eos_ids(model, tokenizer) -> list[int]:
    ids = model.generation_config.eos_token_id
    ids = [] if ids is None else [ids] if isinstance(ids, int) else list(ids)
    return [i for i in {*ids, tokenizer.eos_token_id} if i is not None]


def score(records: list[dict], completions: list[Completion]) -> tuple[list[dict], dict]:
    """Per-problem rows and the summary metrics for one model."""
    rows = []
    for record, c in zip(records, completions, strict=True):
        extracted = extract_answer(c.text)
        rows.append({
            "question": record["question"], "prompt": record["prompt"], "completion": c.text,
            "extracted": extracted, "gold": record["answer"],
            "correct": is_correct(c.text, record["answer"]),
            "correct_lenient": is_correct_lenient(c.text, record["answer"]),
            "formatted": has_format(c.text),
            "extraction_failed": parse_number(extracted) is None,
            "completion_tokens": c.tokens, "truncated": c.truncated,
        })
    n = len(rows)
    lengths = sorted(r["completion_tokens"] for r in rows)
    metrics = {
        "problems": n,
        "accuracy": _mean(r["correct"] for r in rows),
        "accuracy_lenient": _mean(r["correct_lenient"] for r in rows),
        "format_adherence": _mean(r["formatted"] for r in rows),
        "extraction_failures": sum(r["extraction_failed"] for r in rows),
        "completion_tokens_mean": round(_mean(lengths), 1),
        "completion_tokens_p95": lengths[max(0, math.ceil(0.95 * n) - 1)] if n else 0,
        "truncation_rate": _mean(r["truncated"] for r in rows),
    }
    return rows, metrics


def _mean(values) -> float:
    values = [float(v) for v in values]
    return round(sum(values) / len(values), 4) if values else 0.0
