"""GRPO speed and memory on one GPU, through the project's own code paths, plus a merge check and
the evaluation's timing. Results land in bench/results/*.json; `report` turns them into the tables
of BENCHMARKS.md.

Subcommands (run each backend in its own process: importing unsloth patches TRL for the process):

  build-standin  a random-weight model of Qwen2.5-3B-Instruct's exact architecture (config.json of the
                 real model, bf16) with the real tokenizer files: speed and memory are those of the
                 real model as long as completions have the same length, so lengths are forced.
  train          modeling.load_policy + training.build_trainer with params.yaml, model.name pointed at
                 the stand-in, for each named batch config; times every optimizer step (the first is
                 warm-up/compilation and is not counted), the generation inside it, peak memory.
                 Optionally perturbs the LoRA B weights (seeded) and saves the adapter.
  merge          stages/merge.py on that adapter (in a scratch workspace), then the merged model's
                 logits against base(bf16) + adapter unmerged (PeftModel) and base alone.
  eval           evaluation.generate_hf over GSM8K test prompts with forced completion lengths.
  report         BENCHMARKS.md tables from bench/results/*.json, with the physical floor for each.

`--tiny` (build-standin) shrinks the architecture so every subcommand runs on a CPU as a dry run.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from grpo_gsm8k import config, gsm8k, modeling  # noqa: E402  (no torch/transformers import here)

RESULTS = ROOT / "bench" / "results"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "config.json", "generation_config.json",
                   "vocab.json", "merges.txt")
# Batch configs. "reference": the public Unsloth GRPO notebook's recipe (8 generations of one prompt per
# optimizer step: per_device_train_batch_size 8, gradient_accumulation_steps 1), HF generation.
# "defaults": whatever params.yaml holds. Others: candidates for the defaults.
CONFIGS = {
    "reference": {"per_device_train_batch_size": 8, "gradient_accumulation_steps": 1, "completion": 256},
    "defaults": {},
    "p16": {"per_device_train_batch_size": 32, "gradient_accumulation_steps": 4},   # 16 prompts x 8
    "p32": {"per_device_train_batch_size": 32, "gradient_accumulation_steps": 8},   # 32 prompts x 8
    "p64": {"per_device_train_batch_size": 64, "gradient_accumulation_steps": 8},   # 64 prompts x 8
}
# How each engine is told to generate exactly L tokens (random weights never stop by themselves): HF
# generate's GenerationConfig, vLLM's SamplingParams (TRL passes generation_kwargs into either).
FORCE_KEY = {"hf": "min_new_tokens", "vllm": "min_tokens"}
# Peak rates for the floors: memory bandwidth (bytes/s) and dense bf16 matrix rate (FLOP/s).
GPU_PEAKS = {"H100 PCIe": (2.0e12, 756e12), "H100": (3.35e12, 989e12), "H200": (4.8e12, 989e12)}


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def replace(p: config.Params, **sections) -> config.Params:
    """params with some keys of some sections replaced, validated again."""
    return config.replace(p, **sections)


def load_records(path: Path, system_prompt: str, split: str) -> list[dict]:
    rows = gsm8k.validate_rows(gsm8k.read_jsonl(path), split)
    return [{"prompt": gsm8k.build_prompt(r["question"], system_prompt), "answer": r["answer"],
             "question": r["question"]} for r in rows]


def write_result(name: str, data: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")
    return path


def prompt_lengths(tok, prompts: list[list[dict]]) -> list[int]:
    texts = [tok.apply_chat_template(p, add_generation_prompt=True, tokenize=False) for p in prompts]
    return [len(ids) for ids in tok(texts, add_special_tokens=False)["input_ids"]]


def gpu_info() -> dict:
    import torch

    if not torch.cuda.is_available():
        return {"gpu": "cpu", "mem_bw": None, "matmul_flops": None}
    name = torch.cuda.get_device_name(0)
    bw, flops = next((v for k, v in GPU_PEAKS.items() if k in name), (None, None))
    return {"gpu": name, "gpu_mem_gib": round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1),
            "mem_bw": bw, "matmul_flops": flops}


def sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def memory() -> dict:
    import torch

    if not torch.cuda.is_available():
        return {}
    return {"peak_allocated_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
            "peak_reserved_gib": round(torch.cuda.max_memory_reserved() / 2**30, 2)}


# ---------------------------------------------------------------------------------------------- build


def cmd_build_standin(a) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    tiny = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
            "num_key_value_heads": 2}  # same family and vocabulary, toy sizes: a CPU dry run of every path
    if a.tiny:
        raw = {**json.loads((Path(a.tokenizer) / "config.json").read_text()), **tiny}
        raw.pop("layer_types", None)
        cfg = AutoConfig.for_model(raw.pop("model_type"), **raw)
    else:
        cfg = AutoConfig.from_pretrained(a.tokenizer)
    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    start = time.perf_counter()
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    model.generation_config = GenerationConfig.from_pretrained(a.tokenizer)
    out = Path(a.out)
    if out.exists():
        shutil.rmtree(out)
    model.save_pretrained(out)
    for name in TOKENIZER_FILES:
        if (Path(a.tokenizer) / name).is_file() and name != "config.json":
            shutil.copy(Path(a.tokenizer) / name, out / name)
    params = sum(t.numel() for t in model.parameters())
    log(f"stand-in {out}: {params / 1e9:.3f}B parameters, {cfg.num_hidden_layers} layers, "
        f"built in {time.perf_counter() - start:.1f}s on {device}")


# ---------------------------------------------------------------------------------------------- train


def batch_config(p: config.Params, name: str, completion: int | None) -> dict:
    spec = dict(CONFIGS[name])
    length = completion or spec.pop("completion", None) or p.train.max_completion_length
    spec.pop("completion", None)
    pdb = spec.get("per_device_train_batch_size", p.train.per_device_train_batch_size)
    ga = spec.get("gradient_accumulation_steps", p.train.gradient_accumulation_steps)
    return {"per_device_train_batch_size": pdb, "gradient_accumulation_steps": ga, "completion_tokens": length,
            "completions_per_step": pdb * ga, "prompts_per_step": pdb * ga // p.train.num_generations}


def make_timer(deadline: float):
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        """Wall time of each optimizer step (CUDA synchronised), and what generation took inside it."""

        def __init__(self):
            self.steps, self.parts, self.lengths, self.t = [], {}, [], None

        def on_train_begin(self, args, state, control, **kwargs):
            sync()
            self.t = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            sync()
            now = time.perf_counter()
            row = {"step": state.global_step, "seconds": round(now - self.t, 3),
                   **{k: round(v, 3) for k, v in self.parts.items()},
                   "completion_tokens": sum(self.lengths),
                   "completions": len(self.lengths),
                   "min_len": min(self.lengths, default=0), "max_len": max(self.lengths, default=0)}
            self.steps.append(row)
            log(f"step {json.dumps(row)}")
            self.parts, self.lengths, self.t = {}, [], now
            if time.time() > deadline:
                log("time budget reached: stopping this config after this step")
                control.should_training_stop = True

    return StepTimer()


def wrap_timed(trainer, timer, name: str, key: str, lengths: bool = False) -> bool:
    """Time a GRPOTrainer method on the instance (works for TRL's class and Unsloth's patched copy)."""
    orig = getattr(trainer, name, None)
    if orig is None:
        return False

    def timed(*args, **kwargs):
        sync()
        start = time.perf_counter()
        out = orig(*args, **kwargs)
        sync()
        timer.parts[key] = timer.parts.get(key, 0.0) + time.perf_counter() - start
        if lengths:
            try:
                timer.lengths.extend(len(ids) for ids in out[0])
            except Exception:  # noqa: BLE001  (a patched return shape: lengths then come from TRL's logs)
                pass
        return out

    setattr(trainer, name, timed)
    return True


def summarise(steps: list[dict], warmup: int = 1) -> dict:
    """Steady state: the first `warmup` steps (compilation, allocator growth) are not counted; with fewer
    steps than that, only the last one is."""
    warmup = max(0, min(warmup, len(steps) - 1))
    timed = steps[warmup:]
    if not timed:
        return {"timed_steps": 0}
    secs = sum(s["seconds"] for s in timed)
    toks = sum(s["completion_tokens"] for s in timed)
    gen = sum(s.get("generate_s", 0.0) for s in timed)
    score = sum(s.get("generate_and_score_s", 0.0) for s in timed)
    return {"timed_steps": len(timed), "seconds_per_step": round(secs / len(timed), 2),
            "completion_tokens_per_s": round(toks / secs, 1) if secs else None,
            "generate_share": round(gen / secs, 3) if secs else None,
            "generate_s_per_step": round(gen / len(timed), 2),
            "rewards_and_bookkeeping_s_per_step": round((score - gen) / len(timed), 2),
            "train_s_per_step": round((secs - score) / len(timed), 2),
            "first_step_seconds": steps[0]["seconds"], "warmup_steps_excluded": warmup}


def perturb_lora_b(model, std: float, seed: int) -> int:
    """Seeded noise on every LoRA B matrix, so a merge visibly changes the logits."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    count = 0
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                noise = torch.randn(param.shape, generator=gen, dtype=torch.float32) * std
                param.add_(noise.to(param.device, param.dtype))
                count += 1
    return count


def cmd_train(a) -> None:
    p = config.load(ROOT / "params.yaml")
    p = replace(p, model={"name": str(Path(a.model).resolve()), "backend": a.backend, "load_in_4bit": not a.bf16},
                generation={"use_vllm": a.vllm, "vllm_mode": "colocate",
                            **({"vllm_gpu_memory_utilization": a.gpu_memory} if a.gpu_memory else {})})
    engine = "vllm" if a.vllm else "hf"
    if a.backend != "unsloth":
        assert "unsloth" not in sys.modules, "the transformers backend must run in a process without unsloth"
    modeling.check_backend(p)
    modeling.import_backend(p)  # unsloth first, as stages/train.py does
    import torch
    from datasets import Dataset
    from transformers import set_seed

    from grpo_gsm8k import training

    deadline_all = time.time() + a.budget_s
    records = load_records(Path(a.data) / "train.jsonl", p.data.system_prompt, "train")
    dataset = Dataset.from_list(records)
    sample = prompt_lengths(modeling.load_tokenizer(a.model), [r["prompt"] for r in records[:1000]])
    result = {"kind": "train", "backend": a.backend, "engine": engine, "base_precision": "4-bit" if
              p.model.load_in_4bit else p.model.dtype, "model": a.model, **gpu_info(),
              "versions": modeling.package_versions(), "params_base": config.as_dict(p),
              "train_prompt_tokens_mean": round(sum(sample) / len(sample), 1), "configs": {}}
    out_name = a.out or f"train_{a.backend}_{engine}"
    policy = None
    for i, name in enumerate(a.configs):
        bc = batch_config(p, name, a.completion)
        q = replace(p, train={"per_device_train_batch_size": bc["per_device_train_batch_size"],
                              "gradient_accumulation_steps": bc["gradient_accumulation_steps"],
                              "max_steps": a.steps if name == "reference" else a.steps_big,
                              "max_completion_length": bc["completion_tokens"], "save_steps": 10**6})
        left = len(a.configs) - i
        if a.reserve_s:  # keep a fixed reserve for each config still to come
            deadline = deadline_all - a.reserve_s * (left - 1)
        else:  # split what is left equally
            deadline = min(deadline_all, time.time() + max(30.0, (deadline_all - time.time()) / left))
        log(f"config {name}: {bc}, max_steps {q.train.max_steps}, budget {deadline - time.time():.0f}s")
        set_seed(q.train.seed)
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        t_load = time.perf_counter()
        if policy is None or a.backend != "unsloth":  # unsloth's policy is a loaded model: reuse it
            policy = modeling.load_policy(q)
        timer = make_timer(deadline)
        trainer = training.build_trainer(q, policy, dataset, f"/tmp/bench_{a.backend}_{name}", callbacks=[timer],
                                         generation_kwargs={FORCE_KEY[engine]: bc["completion_tokens"]},
                                         save_strategy="no")
        load_s = time.perf_counter() - t_load
        wrapped = {m: wrap_timed(trainer, timer, m, k, lengths=(k == "generate_s"))
                   for m, k in (("_generate_single_turn", "generate_s"),
                                ("_generate_and_score_completions", "generate_and_score_s"))}
        gen_cfg = getattr(trainer, "generation_config", None)
        entry = {"batch": bc, "load_and_build_s": round(load_s, 1), "wrapped": wrapped,
                 "min_new_tokens_in_generation_config": getattr(gen_cfg, "min_new_tokens", None),
                 "max_new_tokens_in_generation_config": getattr(gen_cfg, "max_new_tokens", None),
                 "effective_args": {k: getattr(trainer.args, k, None) for k in (
                     "per_device_train_batch_size", "gradient_accumulation_steps", "steps_per_generation",
                     "generation_batch_size", "num_generations", "max_completion_length", "beta", "loss_type",
                     "gradient_checkpointing", "optim", "bf16", "cache_implementation", "generation_kwargs")}}
        log(f"built trainer in {load_s:.1f}s; args {entry['effective_args']}")
        try:
            trainer.train()
        except torch.OutOfMemoryError as err:
            entry["error"] = f"OOM: {err}"[:500]
            log(entry["error"])
        entry["steps"] = timer.steps
        entry["summary"] = summarise(timer.steps, a.warmup)
        entry["memory"] = memory()
        entry["trl_logs"] = [{k: v for k, v in row.items() if k.startswith(("completions/", "step_time", "loss", "sampling/", "entropy",
                                                                          "grad_norm", "reward", "num_tokens"))}
                             for row in trainer.state.log_history]
        if not timer.lengths and not any(s["completion_tokens"] for s in timer.steps):
            # lengths from TRL's own logs when the wrapper could not see them
            for s, row in zip(timer.steps, trainer.state.log_history):
                if "completions/mean_length" in row:
                    s["completion_tokens"] = round(row["completions/mean_length"] * bc["completions_per_step"])
            entry["summary"] = summarise(timer.steps, a.warmup)
        log(f"config {name}: summary {entry['summary']} memory {entry['memory']}")
        result["configs"][name] = entry
        if a.save_adapter and name == a.configs[-1]:
            n = perturb_lora_b(trainer.model, a.noise_std, a.noise_seed)
            trainer.model.save_pretrained(a.save_adapter)
            policy.tokenizer.save_pretrained(a.save_adapter)
            result["adapter"] = {"dir": a.save_adapter, "lora_b_perturbed": n, "noise_std": a.noise_std,
                                 "noise_seed": a.noise_seed, "files": sorted(os.listdir(a.save_adapter))}
            log(f"adapter saved to {a.save_adapter} after perturbing {n} LoRA B matrices")
        write_result(out_name, result)  # after every config: a later timeout keeps what was measured
        del trainer, timer
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    if a.backend != "unsloth":
        assert "unsloth" not in sys.modules, "unsloth was imported on the transformers path"
        result["unsloth_imported"] = False
    write_result(out_name, result)
    log(f"wrote {RESULTS / out_name}.json")


# ---------------------------------------------------------------------------------------------- merge


def cmd_merge(a) -> None:
    import importlib.util

    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model_path = str(Path(a.model).resolve())
    p = replace(config.load(ROOT / "params.yaml"), model={"name": model_path})
    test = load_records(Path(a.data) / "test.jsonl", p.data.system_prompt, "test")[: a.prompts]
    work = Path(a.workdir)
    if work.exists():
        shutil.rmtree(work)
    (work / "models").mkdir(parents=True)
    shutil.copytree(a.adapter, work / "models" / "adapter")
    spec = importlib.util.spec_from_file_location("merge_stage", ROOT / "stages" / "merge.py")
    stage = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(stage)
    cwd = os.getcwd()
    os.chdir(work)
    try:
        start = time.perf_counter()
        stage.merge(p)  # stages/merge.py: models/adapter -> models/merged (p.merge.dtype)
        merge_s = time.perf_counter() - start
    finally:
        os.chdir(cwd)
    merged_dir = work / "models" / "merged"
    log(f"stages/merge.py merged in {merge_s:.1f}s: {sorted(os.listdir(merged_dir))}")

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = modeling.torch_dtype(p.merge.dtype)
    tok = modeling.load_tokenizer(str(merged_dir))
    texts = [tok.apply_chat_template(r["prompt"], add_generation_prompt=True, tokenize=False) for r in test]
    enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
    mask = enc["attention_mask"].bool()

    def logits(model):
        with torch.inference_mode():
            return model(**enc).logits.float()[mask]  # [real tokens, vocab]

    def load(path, dt):
        return AutoModelForCausalLM.from_pretrained(path, dtype=dt, device_map=device).eval()

    def compare(x, y) -> dict:
        d = (x - y).abs()
        return {"max_abs": float(d.max()), "mean_abs": float(d.mean()),
                "argmax_agree": float((x.argmax(-1) == y.argmax(-1)).float().mean())}

    merged = load(str(merged_dir), dtype)
    lm = logits(merged)
    del merged
    base = load(model_path, dtype)
    lb = logits(base)
    peft = PeftModel.from_pretrained(base, str(work / "models" / "adapter")).eval()
    lp = logits(peft)
    del peft, base
    gc.collect()
    # float32 unmerged as the yardstick: how far bf16 alone moves the logits
    base32 = load(model_path, torch.float32)
    l32 = logits(PeftModel.from_pretrained(base32, str(work / "models" / "adapter")).eval())
    del base32
    result = {"kind": "merge", "model": a.model, "adapter": a.adapter, **gpu_info(),
              "merge_dtype": p.merge.dtype, "merge_stage_seconds": round(merge_s, 1),
              "prompts": len(texts), "tokens_compared": int(mask.sum()),
              "logit_scale": {"mean_abs_logit": float(lp.abs().mean()), "max_abs_logit": float(lp.abs().max())},
              "merged_vs_unmerged": compare(lm, lp), "base_vs_merged": compare(lb, lm),
              "unmerged_bf16_vs_fp32": compare(lp, l32), "merged_bf16_vs_unmerged_fp32": compare(lm, l32)}
    r = result
    # pass: merging adds no more error than bf16 itself (vs the float32 unmerged yardstick), and the adapter
    # moves the logits far more than merged and unmerged differ
    r["pass"] = bool(r["merged_bf16_vs_unmerged_fp32"]["max_abs"] <= 2 * r["unmerged_bf16_vs_fp32"]["max_abs"] + 1e-3
                     and r["base_vs_merged"]["max_abs"] > 4 * r["merged_vs_unmerged"]["max_abs"])
    log(json.dumps(result, indent=1))
    write_result(a.out or "merge", result)


# ---------------------------------------------------------------------------------------------- eval


def cmd_eval(a) -> None:
    import torch

    from grpo_gsm8k import evaluation

    p = config.load(ROOT / "params.yaml")
    bs = a.batch_size or p.eval.batch_size
    length = a.completion or p.eval.max_new_tokens
    records = load_records(Path(a.data) / "test.jsonl", p.data.system_prompt, "test")
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
        llm = evaluation.load_vllm(a.model, p.model.max_seq_length, a.gpu_memory or p.generation.vllm_gpu_memory_utilization,
                                   p.model.dtype)
        load_s = time.perf_counter() - start
        evaluation.generate_vllm(llm, prompts[:2], 4, min_new_tokens=4)
        sync()
        start = time.perf_counter()
        comps = evaluation.generate_vllm(llm, prompts, length, min_new_tokens=length)
    else:
        model = modeling.load_merged(a.model, None, p.model.dtype if torch.cuda.is_available() else "float32")
        load_s = time.perf_counter() - start
        evaluation.generate_hf(model, tok, prompts[:2], 2, 4, min_new_tokens=4)  # CUDA/kernel warm-up
        sync()
        start = time.perf_counter()
        comps = evaluation.generate_hf(model, tok, prompts, bs, length, min_new_tokens=length)
    sync()
    secs = time.perf_counter() - start
    rows, metrics = evaluation.score(records, comps)
    prompt_tokens = prompt_lengths(tok, prompts)
    n = len(records)
    batches = math.ceil(n / bs)
    result = {"kind": "eval", "engine": a.engine, "model": a.model, **gpu_info(), "versions": modeling.package_versions(),
              "batch_size": bs if a.engine == "hf" else "vLLM scheduler", "forced_completion_tokens": length, "problems": n, "test_set_problems": total,
              "subset": "longest prompts" if n < total else "whole test set",
              "load_seconds": round(load_s, 1), "generate_seconds": round(secs, 1),
              "problems_per_s": round(n / secs, 2), "completion_tokens_per_s": round(sum(c.tokens for c in comps) / secs),
              "completion_lengths": [min(c.tokens for c in comps), max(c.tokens for c in comps)],
              "prompt_tokens_mean": round(sum(prompt_tokens) / n, 1), "prompt_tokens_max": max(prompt_tokens),
              "metrics_sanity": {k: metrics[k] for k in ("problems", "accuracy", "truncation_rate")},
              **(memory() if a.engine == "hf" else {})}  # vLLM's engine runs in its own process
    if n < total:  # whole set: as many batches as it needs, each no slower than these longest ones
        full_batches = math.ceil(total / bs)
        result["full_test_set_seconds_estimate"] = round(secs / batches * full_batches, 1)
        result["estimate_note"] = (f"{batches} batch(es) of the longest prompts timed; the whole set needs "
                                   f"{full_batches} batches of at most this length (upper bound)")
    log(json.dumps(result, indent=1))
    write_result(a.out or (f"eval_bs{bs}" if a.engine == "hf" else "eval_vllm"), result)


# ---------------------------------------------------------------------------------------------- report


def model_shape(config_path: Path) -> dict:
    c = json.loads(config_path.read_text())
    h, i, layers, v = c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"], c["vocab_size"]
    heads, kv = c["num_attention_heads"], c["num_key_value_heads"]
    hd = c.get("head_dim") or h // heads
    proj = {"q_proj": (h, heads * hd), "k_proj": (h, kv * hd), "v_proj": (h, kv * hd), "o_proj": (heads * hd, h),
            "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}
    linear = layers * sum(a * b for a, b in proj.values())
    return {"proj": proj, "layers": layers, "linear": linear, "lm_head": v * h,
            "kv_bytes_per_token": layers * 2 * kv * hd * 2}


def floor_seconds(shape: dict, lora_r: int, targets: list[str], completions: int, prompt_len: float, length: int,
                  bw: float, flops: float, weight_bits: int, training: bool) -> dict:
    """Lower bounds: each decode step reads every weight once (4-bit linears or 16-bit, 16-bit LM head and
    LoRA) and the KV cache; training costs 6*N FLOPs per token, plus 2*N for the recomputed forward of
    gradient checkpointing (N counts matrix parameters, LM head and LoRA included)."""
    lora = shape["layers"] * lora_r * sum(sum(shape["proj"][t]) for t in targets) if training else 0
    n_mm = shape["linear"] + shape["lm_head"] + lora
    weight_bytes = shape["linear"] * weight_bits / 8 + shape["lm_head"] * 2 + lora * 2
    gen = 2 * n_mm * completions * prompt_len / flops  # prefill
    for t in range(length):
        kv = completions * (prompt_len + t) * shape["kv_bytes_per_token"]
        gen += max((weight_bytes + kv) / bw, 2 * n_mm * completions / flops)
    train = 8 * n_mm * completions * (prompt_len + length) / flops if training else 0.0
    return {"generate_s": gen, "train_s": train, "total_s": gen + train,
            "weight_bytes_per_decode_step": weight_bytes}


def _table_head(title: str, columns: list[str]) -> list[str]:
    return [f"### {title}", "", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]


def cmd_report(a) -> None:
    shape = model_shape(Path(a.config))
    p = config.load(ROOT / "params.yaml")
    lines = ["<!-- bench:begin (generated by `python bench/bench_grpo.py report`; edit around it) -->", ""]
    trains = sorted(RESULTS.glob("train_*.json"))
    if trains:
        lines += _table_head("GRPO training throughput (random-weight Qwen2.5-3B stand-in, forced completion lengths)",
                             ["result", "backend", "generation (policy base)", "config", "prompts x gens / step",
                              "micro-batch x accum", "forced tokens", "s/step: median (min-max), timed steps",
                              "completion tok/s", "load + build s", "generate / score / train s per step",
                              "peak alloc / reserved GiB", "floor s/step (gen + train)", "floor tok/s", "gap"])
    for path in trains:
        r = json.loads(path.read_text())
        engine, precision = r.get("engine", "hf"), r.get("base_precision", "4-bit")  # older results: HF, 4-bit
        bw, fl = r.get("mem_bw"), r.get("matmul_flops")
        for name, e in r["configs"].items():
            b, s, m = e["batch"], e["summary"], e.get("memory", {})
            head = (f"| {path.stem.removeprefix('train_')} | {r['backend']} | {engine} ({precision}) | {name} | {b['prompts_per_step']} x "
                    f"{p.train.num_generations} | {b['per_device_train_batch_size']} x {b['gradient_accumulation_steps']} "
                    f"| {b['completion_tokens']} ")
            if not s.get("timed_steps"):
                lines.append(head + f"| no timed step ({e.get('error', 'stopped')[:60]}) |" + " |" * 7)
                continue
            fl_txt, fl_tok, gap = "n/a", "n/a", "n/a"
            if bw and fl:
                f = floor_seconds(shape, p.lora.r, p.lora.target_modules, b["completions_per_step"],
                                  r.get("train_prompt_tokens_mean", a.prompt_tokens),
                                  b["completion_tokens"], bw, fl, 4 if precision == "4-bit" else 16, True)
                fl_txt = f"{f['total_s']:.2f} ({f['generate_s']:.2f} + {f['train_s']:.2f})"
                fl_tok = f"{b['completions_per_step'] * b['completion_tokens'] / f['total_s']:,.0f}"
                gap = f"{s['seconds_per_step'] / f['total_s']:.0f}x"
            timed = sorted(step["seconds"] for step in e["steps"][-s["timed_steps"]:])
            lines.append(
                head + f"| {statistics.median(timed):.1f} ({timed[0]:.1f}-{timed[-1]:.1f}), {s['timed_steps']} "
                f"(first {s['first_step_seconds']:.0f}) | **{s['completion_tokens_per_s']:,.0f}** "
                f"| {e.get('load_and_build_s', 'n/a')} "
                f"| {s['generate_s_per_step']} / {s['rewards_and_bookkeeping_s_per_step']} / {s['train_s_per_step']} "
                f"| {m.get('peak_allocated_gib', 'n/a')} / {m.get('peak_reserved_gib', 'n/a')} "
                f"| {fl_txt} | {fl_tok} | {gap} |")
    if trains:
        for path in trains:
            r = json.loads(path.read_text())
            v = r.get("versions", {})
            lines += ["", f"{path.name}: {r.get('gpu')}; " + ", ".join(f"{k} {v[k]}" for k in sorted(v))]
        lines.append("")
    evals = sorted(RESULTS.glob("eval_*.json"))
    if evals:
        lines += _table_head("Evaluation timing (bf16 stand-in, greedy, forced completion length)",
                             ["engine", "batch size", "problems", "forced tokens", "load s", "generate s", "problems/s",
                              "completion tok/s", "whole test set (1,319) s", "peak alloc GiB",
                              "floor s (same problems)"])
        for path in evals:
            r = json.loads(path.read_text())
            floor = "n/a"
            if r.get("mem_bw"):
                size = r["batch_size"] if isinstance(r["batch_size"], int) else r["problems"]  # vLLM: one call
                batches = [min(size, r["problems"] - k) for k in range(0, r["problems"], size)]
                floor = sum(floor_seconds(shape, 0, [], nb, r["prompt_tokens_mean"], r["forced_completion_tokens"],
                                          r["mem_bw"], r["matmul_flops"], 16, False)["generate_s"] for nb in batches)
                floor = f"{floor:.1f}"
            peak = "n/a (engine process)" if r.get("engine") == "vllm" else r.get("peak_allocated_gib", "n/a")
            full = r.get("full_test_set_seconds_estimate", r["generate_seconds"])
            est = " (estimate)" if "full_test_set_seconds_estimate" in r else ""
            lines.append(f"| {r.get('engine', 'hf')} | {r['batch_size']} | {r['problems']} ({r['subset']}) "
                         f"| {r['forced_completion_tokens']} | {r.get('load_seconds', 'n/a')} | {r['generate_seconds']} "
                         f"| {r['problems_per_s']} | {r['completion_tokens_per_s']:,} "
                         f"| **{full}**{est} | {peak} | {floor} |")
        lines.append("")
    merges = sorted(RESULTS.glob("merge*.json"))
    if merges:
        lines += _table_head("Merge check (stages/merge.py, then logits on GSM8K test prompts)",
                             ["adapter", "merged vs base+adapter unmerged (bf16) max / mean abs",
                              "base vs merged max / mean abs", "unmerged bf16 vs fp32 max abs",
                              "argmax agreement merged/unmerged", "pass"])
        for path in merges:
            r = json.loads(path.read_text())
            mu, bm, u32 = r["merged_vs_unmerged"], r["base_vs_merged"], r["unmerged_bf16_vs_fp32"]
            lines.append(f"| {path.stem} | {mu['max_abs']:.4f} / {mu['mean_abs']:.5f} | {bm['max_abs']:.3f} / "
                         f"{bm['mean_abs']:.4f} | {u32['max_abs']:.4f} | {mu['argmax_agree']:.4f} | {r['pass']} |")
        lines.append("")
    lines.append("<!-- bench:end -->")
    block = "\n".join(lines)
    md = ROOT / "BENCHMARKS.md"
    text = md.read_text() if md.exists() else "# Benchmarks\n"
    if "<!-- bench:begin" in text:
        head, rest = text.split("<!-- bench:begin", 1)
        tail = rest.split("<!-- bench:end -->", 1)[1] if "<!-- bench:end -->" in rest else ""
        text = head + block + tail
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    md.write_text(text)
    print(block)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build-standin")
    b.add_argument("--tokenizer", required=True, help="folder with config.json and the tokenizer files")
    b.add_argument("--out", default="/tmp/standin")
    b.add_argument("--tiny", action="store_true")
    t = sub.add_parser("train")
    t.add_argument("--backend", choices=("unsloth", "transformers"), required=True)
    t.add_argument("--model", default="/tmp/standin")
    t.add_argument("--data", default=".carry/gsm8k")
    t.add_argument("--configs", nargs="+", default=["reference", "defaults"], choices=sorted(CONFIGS))
    t.add_argument("--steps", type=int, default=3, help="optimizer steps for the reference (first is warm-up)")
    t.add_argument("--steps-big", type=int, default=3, help="optimizer steps for the other configs")
    t.add_argument("--warmup", type=int, default=1, help="first steps of each config not timed (compilation)")
    t.add_argument("--completion", type=int, default=None, help="force this completion length for every config")
    t.add_argument("--budget-s", type=float, default=420, help="wall-clock budget for all configs")
    t.add_argument("--reserve-s", type=float, default=0, help="seconds kept for each later config (0: equal split)")
    t.add_argument("--save-adapter", default=None)
    t.add_argument("--noise-std", type=float, default=0.01)
    t.add_argument("--noise-seed", type=int, default=1234)
    t.add_argument("--vllm", action="store_true", help="generation.use_vllm (colocate; unsloth: fast_inference)")
    t.add_argument("--bf16", action="store_true", help="model.load_in_4bit: false (16-bit base)")
    t.add_argument("--gpu-memory", type=float, default=None, help="generation.vllm_gpu_memory_utilization")
    t.add_argument("--out", default=None)
    m = sub.add_parser("merge")
    m.add_argument("--model", default="/tmp/standin")
    m.add_argument("--adapter", required=True)
    m.add_argument("--data", default=".carry/gsm8k")
    m.add_argument("--prompts", type=int, default=4)
    m.add_argument("--workdir", default="/tmp/bench_merge")
    m.add_argument("--out", default=None)
    e = sub.add_parser("eval")
    e.add_argument("--model", default="/tmp/standin")
    e.add_argument("--data", default=".carry/gsm8k")
    e.add_argument("--batch-size", type=int, default=None, help="default: eval.batch_size from params.yaml")
    e.add_argument("--completion", type=int, default=None, help="forced tokens (default eval.max_new_tokens)")
    e.add_argument("--limit", type=int, default=None, help="time only the N longest prompts")
    e.add_argument("--engine", choices=("hf", "vllm"), default="hf")
    e.add_argument("--gpu-memory", type=float, default=None, help="vLLM's share of GPU memory")
    e.add_argument("--out", default=None)
    r = sub.add_parser("report")
    r.add_argument("--config", default="/work/shared/qwen2.5-tokenizer/config.json")
    r.add_argument("--prompt-tokens", type=float, default=None,
                   help="mean prompt tokens for the floors when a result lacks it (default 160)")
    a = ap.parse_args()
    if a.cmd == "report" and a.prompt_tokens is None:
        a.prompt_tokens = 160.0
    {"build-standin": cmd_build_standin, "train": cmd_train, "merge": cmd_merge, "eval": cmd_eval,
     "report": cmd_report}[a.cmd](a)


if __name__ == "__main__":
    main()
