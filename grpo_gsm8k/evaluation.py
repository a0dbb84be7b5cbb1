"""Greedy generation on the test prompts and the metrics, graded by the shared grader."""

from __future__ import annotations

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


def generate(p: Params, adapters: list[str | None], prompts: list[list[dict]], temperature: float = 0.0,
             seed: int | None = None) -> list[list[Completion]]:
    """The prompts' completions by the base model with each adapter (None: the base alone), under params'
    model and eval settings: one vLLM engine applying each adapter per request when generation.use_vllm
    is true (CUDA; callers check it up front with modeling.check_vllm), transformers with each adapter
    merged otherwise. Greedy unless temperature > 0."""
    if p.generation.use_vllm:
        lora = any(adapters)
        llm = load_vllm(p.model.name, p.model.max_seq_length, p.generation.vllm_gpu_memory_utilization, p.model.dtype,
                        max_lora_rank=p.lora.r if lora else None, seed=seed or 0)
        try:
            return [generate_vllm(llm, prompts, p.eval.max_new_tokens, adapter, temperature=temperature, seed=seed or 0)
                    for adapter in adapters]
        finally:  # the engine's process exits now, not when the collector gets to it: an engine started next (lm-eval's
            # in the evaluate stage) fails if memory is freed while it profiles ("Error in memory profiling")
            llm.llm_engine.engine_core.shutdown()
    cuda = modeling.cuda_available()
    tokenizer = modeling.load_tokenizer(p.model.name)
    results = []
    for adapter in adapters:
        model = modeling.load_merged(p.model.name, adapter, p.model.dtype if cuda else "float32")
        if seed is not None:
            from transformers import set_seed

            set_seed(seed)
        results.append(generate_hf(model, tokenizer, prompts, p.eval.batch_size, p.eval.max_new_tokens,
                                   temperature=temperature))
        del model
    return results


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
                                     pad_token_id=tokenizer.pad_token_id,
                                     repetition_penalty=1.0)  # as vLLM: Qwen's generation_config ships 1.05
            for row, i in enumerate(batch):
                ids = out[row, enc["input_ids"].shape[1]:].tolist()
                ended = next((k for k, t in enumerate(ids) if t in eos_ids), None)
                kept = ids if ended is None else ids[:ended]
                results[i] = Completion(tokenizer.decode(kept, skip_special_tokens=True), len(kept), ended is None)
            bar.update(len(batch))
            bar.set_postfix(problems_per_s=f"{bar.n / (time.perf_counter() - start):.2f}")
    return results


def load_vllm(model_name: str, max_model_len: int, gpu_memory_utilization: float, dtype: str,
              max_lora_rank: int | None = None, seed: int = 0):
    """A vLLM engine on the 16-bit base; with max_lora_rank, ready to apply a LoRA per request."""
    from vllm import LLM

    return LLM(model=model_name, dtype=dtype, enable_lora=max_lora_rank is not None,
               max_lora_rank=max_lora_rank or 16, max_model_len=max_model_len,
               gpu_memory_utilization=gpu_memory_utilization, seed=seed)


def generate_vllm(llm, prompts: list[list[dict]], max_new_tokens: int, adapter_dir: str | None = None,
                  min_new_tokens: int = 0, temperature: float = 0.0, seed: int = 0) -> list[Completion]:
    """All prompts in one call, which vLLM schedules itself; the LoRA is applied per request, never merged
    into the weights. Greedy by default; the chat template is the one generate_hf applies."""
    from vllm import SamplingParams
    from vllm.lora.request import LoRARequest

    sampling = SamplingParams(temperature=temperature, max_tokens=max_new_tokens, min_tokens=min_new_tokens,
                              seed=seed if temperature > 0 else None)
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
