"""Evaluation speed: the evaluate stage's generation (vLLM, or HF generate at eval.batch_size) over the GSM8K test
prompts, greedy, every completion forced to its full length (the worst case), on the stand-in.

    python -m bench eval-speed --engine vllm --model /tmp/standin --data <gsm8k> --results-dir DIR --out NAME

`--limit N` times only the N longest prompts and estimates the whole test set from them (an upper bound).
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

from bench import common
from grpo_gsm8k import config, modeling

SCENARIO = "eval-speed"
log = common.logger("bench")


def main(argv: list[str] | None = None) -> None:
    argv = common.argv_or_sys(argv)
    ap = common.parser(SCENARIO, __doc__, standin=True)
    ap.add_argument("--batch-size", type=int, default=None, help="default: eval.batch_size from params.yaml")
    ap.add_argument("--completion", type=int, default=None, help="forced tokens (default eval.max_new_tokens)")
    ap.add_argument("--limit", type=int, default=None, help="time only the N longest prompts")
    ap.add_argument("--engine", choices=("hf", "vllm"), default="hf")
    ap.add_argument("--gpu-memory", type=float, default=None, help="vLLM's share of GPU memory")
    ap.add_argument("--results-dir", default=str(common.ROOT / "build/bench"))
    ap.add_argument("--out", default=None, help="the result's name (default eval_bs<N> or eval_vllm)")
    a = ap.parse_args(argv)
    import torch

    from grpo_gsm8k import evaluation

    p = config.load(common.ROOT / "params.yaml")
    bs = a.batch_size or p.eval.batch_size
    length = a.completion or p.eval.max_new_tokens
    records = common.load_records(Path(a.data) / "test.jsonl", p.data.system_prompt, "test")
    tok = modeling.load_tokenizer(a.model)
    total = len(records)
    if a.limit and a.limit < total:  # the longest prompts: generate_hf's own first (worst) batches
        key = {id(r): len(tok.apply_chat_template(r["prompt"], add_generation_prompt=True, tokenize=False))
               for r in records}
        records = sorted(records, key=lambda r: key[id(r)], reverse=True)[: a.limit]
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    prompts = [r["prompt"] for r in records]
    start = time.perf_counter()
    if a.engine == "vllm":  # what stages/evaluate.py runs when generation.use_vllm is true
        llm = evaluation.load_vllm(a.model, p.model.max_seq_length,
                                   a.gpu_memory or p.generation.vllm_gpu_memory_utilization, p.model.dtype)
        load_s = time.perf_counter() - start
        evaluation.generate_vllm(llm, prompts[:2], 4, min_new_tokens=4)
        common.sync()
        start = time.perf_counter()
        comps = evaluation.generate_vllm(llm, prompts, length, min_new_tokens=length)
    else:
        model = modeling.load_merged(a.model, None, p.model.dtype if torch.cuda.is_available() else "float32")
        load_s = time.perf_counter() - start
        evaluation.generate_hf(model, tok, prompts[:2], 2, 4, min_new_tokens=4)  # CUDA/kernel warm-up
        common.sync()
        start = time.perf_counter()
        comps = evaluation.generate_hf(model, tok, prompts, bs, length, min_new_tokens=length)
    common.sync()
    secs = time.perf_counter() - start
    _, metrics = evaluation.score(records, comps)
    prompt_tokens = common.prompt_lengths(tok, prompts)
    n = len(records)
    peak = common.peak_memory() if a.engine == "hf" else None  # vLLM's engine runs in a process of its own
    run = common.run_entry("whole test set" if n == total else "longest prompts",
                           [{"step": 1, "seconds": round(secs, 1)}], peak_memory_gib=peak)
    extra = {"engine": a.engine, "model": a.model, "batch_size": bs if a.engine == "hf" else "vLLM scheduler",
             "forced_completion_tokens": length, "problems": n, "test_set_problems": total,
             "subset": "longest prompts" if n < total else "whole test set",
             "load_seconds": round(load_s, 1), "generate_seconds": round(secs, 1),
             "problems_per_s": round(n / secs, 2),
             "completion_tokens_per_s": round(sum(c.tokens for c in comps) / secs),
             "completion_lengths": [min(c.tokens for c in comps), max(c.tokens for c in comps)],
             "prompt_tokens_mean": round(sum(prompt_tokens) / n, 1), "prompt_tokens_max": max(prompt_tokens),
             "metrics_sanity": {k: metrics[k] for k in ("problems", "accuracy", "truncation_rate")}}
    if n < total:  # whole set: as many batches as it needs, each no slower than these longest ones
        batches, full_batches = math.ceil(n / bs), math.ceil(total / bs)
        extra["full_test_set_seconds_estimate"] = round(secs / batches * full_batches, 1)
        extra["estimate_note"] = (f"{batches} batch(es) of the longest prompts timed; the whole set needs "
                                  f"{full_batches} batches of at most this length (upper bound)")
    data = common.result(SCENARIO, argv, vars(a), [run], "complete", **extra)
    log(json.dumps({k: v for k, v in data.items() if k != "versions"}, indent=1, default=str))
    name = a.out or (f"eval_bs{bs}" if a.engine == "hf" else "eval_vllm")
    common.write_json(Path(a.results_dir) / f"{name}.json", data)
