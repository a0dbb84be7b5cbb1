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
  diagnose       issue 15: `train` with the Unsloth backend under a list of settings, one capped process each
                 (stack dumps, recompiles, compile times; what a stopped one measured is kept), then
                 summary.json / summary.md; the vLLM attempt takes the fastest attempt's settings.

`--tiny` (build-standin) shrinks the architecture so every subcommand runs on a CPU as a dry run.
"""

from __future__ import annotations

import argparse
import faulthandler
import gc
import json
import math
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass
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
    "mb8": {"per_device_train_batch_size": 8, "gradient_accumulation_steps": 32},   # 32 prompts x 8, micro-batches of 8
}
# Issue 27's speed levers at the defaults' batch, each alone and together, every one of them pinned (not read from
# params.yaml) so that a result says what ran. "params": params.yaml keys by section; "trainer": GRPOConfig overrides.
# "today": the defaults before issue 27 (TRL's scoring forward, gradient checkpointing on).
_TODAY = {"train": {"reuse_training_logprobs": False}, "model": {"gradient_checkpointing": True}}
LEVERS = {
    "today": {"params": _TODAY},
    "reuse_logprobs": {"params": {**_TODAY, "train": {"reuse_training_logprobs": True}}},
    "no_checkpointing": {"params": {**_TODAY, "model": {"gradient_checkpointing": False}}},
    "levers": {"params": {"train": {"reuse_training_logprobs": True}, "model": {"gradient_checkpointing": False}}},
    # vLLM's sleep mode: its weights and KV cache released while training (an engine of its own: see
    # share_vllm_engines), for gradient checkpointing off on a card that is too small without it
    "sleep": {"params": _TODAY, "trainer": {"vllm_enable_sleep_mode": True}},
    "levers_sleep": {"params": {"train": {"reuse_training_logprobs": True}, "model": {"gradient_checkpointing": False}},
                     "trainer": {"vllm_enable_sleep_mode": True}},
}
CONFIGS.update(LEVERS)
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


def write_result(name: str, data: dict, directory: Path = RESULTS) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{name}.json"
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
    spec = {k: v for k, v in CONFIGS[name].items() if k not in ("params", "trainer")}
    length = completion or spec.pop("completion", None) or p.train.max_completion_length
    spec.pop("completion", None)
    pdb = spec.get("per_device_train_batch_size", p.train.per_device_train_batch_size)
    ga = spec.get("gradient_accumulation_steps", p.train.gradient_accumulation_steps)
    return {"per_device_train_batch_size": pdb, "gradient_accumulation_steps": ga, "completion_tokens": length,
            "completions_per_step": pdb * ga, "prompts_per_step": pdb * ga // p.train.num_generations}


def halved(bc: dict, num_generations: int) -> dict | None:
    """The same completions per step in micro-batches half as large (twice the accumulation), or None when a half
    would split a group. DAPO (the defaults' loss) sums token losses over the whole generation batch, so the
    optimizer step is the same; only memory and speed change."""
    pdb = bc["per_device_train_batch_size"] // 2
    if pdb < num_generations or pdb % num_generations or bc["per_device_train_batch_size"] % 2:
        return None
    return {**bc, "per_device_train_batch_size": pdb,
            "gradient_accumulation_steps": bc["gradient_accumulation_steps"] * 2}


def share_vllm_engines() -> dict:
    """One colocated vLLM engine per engine setting for the whole process, not one per config: an engine holds its
    share of GPU memory until the process ends, and building one takes a minute or more. Each trainer still gets its
    own VLLMGeneration (its model, tokenizer, sampling settings) around the shared engine, and its first step pushes
    every weight of its own model into it (TRL's sync_weights), so no config sees another's weights."""
    from trl.generation import vllm_generation
    from trl.trainer import grpo_trainer

    engines = {}

    class SharedEngine(vllm_generation.VLLMGeneration):
        def _init_vllm(self):
            key = (self.mode, self.model.name_or_path, self.tensor_parallel_size, self.gpu_memory_utilization,
                   self.max_model_length, self.max_num_seqs, self.enable_sleep_mode, self.model_impl)
            if self.mode != "colocate" or key not in engines:
                super()._init_vllm()
                if self.mode == "colocate":
                    engines[key] = self.llm
                return
            self.llm = engines[key]
            self._llm_weights_sleeping = self.enable_sleep_mode  # a sleeping engine has dropped its weights

    grpo_trainer.VLLMGeneration = SharedEngine
    return engines


def time_trl_sections(holder: dict) -> None:
    """Every section TRL's GRPOTrainer times with profiling_context (sync_weights, vLLM.generate, transformers.generate,
    each reward function) added into the current timer as section_<name>_s, CUDA synchronised: where generation goes."""
    from contextlib import contextmanager

    from trl.trainer import grpo_trainer

    original = grpo_trainer.profiling_context

    @contextmanager
    def timed(trainer, name):
        sync()
        start = time.perf_counter()
        with original(trainer, name):
            yield
        sync()
        timer = holder.get("timer")
        if timer is not None:
            key = "section_" + re.sub(r"[^A-Za-z0-9]+", "_", name) + "_s"
            timer.parts[key] = timer.parts.get(key, 0.0) + time.perf_counter() - start

    grpo_trainer.profiling_context = timed


def make_timer(deadline: float):
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        """Wall time of each optimizer step (CUDA synchronised), and what generation took inside it."""

        def __init__(self):
            self.steps, self.parts, self.lengths, self.t = [], {}, [], None
            self.micro = []  # seconds of each micro-batch (training_step); a step's first includes its generation

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
        log(f"{key[:-2]} done in {time.perf_counter() - start:.1f}s")  # before the step ends: a stalled step shows it
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
    each = sorted(s["seconds"] for s in timed)
    sections = sorted({k for s in timed for k in s if k.startswith("section_")})
    return {"timed_steps": len(timed), "seconds_per_step": round(secs / len(timed), 2),
            "sections_s_per_step": {k: round(sum(s.get(k, 0.0) for s in timed) / len(timed), 3) for k in sections},
            "seconds_per_step_median": round(statistics.median(each), 2), "seconds_min_max": [each[0], each[-1]],
            "completion_tokens_per_s": round(toks / secs, 1) if secs else None,
            "generate_share": round(gen / secs, 3) if secs else None,
            "generate_s_per_step": round(gen / len(timed), 2),
            "rewards_and_bookkeeping_s_per_step": round((score - gen) / len(timed), 2),
            "train_s_per_step": round((secs - score) / len(timed), 2),
            "first_step_seconds": steps[0]["seconds"], "warmup_steps_excluded": warmup}


def wrap_micro_batches(trainer, timer) -> None:
    """Log every micro-batch (Trainer.training_step) as it ends, so a step that never finishes still shows
    how far it got and how long each piece took."""
    orig = trainer.training_step

    def timed(*args, **kwargs):
        sync()
        start = time.perf_counter()
        out = orig(*args, **kwargs)
        sync()
        timer.micro.append(round(time.perf_counter() - start, 3))
        log(f"micro-batch {len(timer.micro)} in {timer.micro[-1]:.1f}s")
        return out

    trainer.training_step = timed


def fake_generate(model, tokenizer, length: int) -> None:
    """Replace ``model.generate`` with the prompt plus ``length`` random non-special tokens, at once. What
    follows generation (rewards, the policy's loss, backward) runs unchanged, and is then all a step times."""
    import torch

    special = set(tokenizer.all_special_ids)
    allowed = torch.tensor([i for i in range(len(tokenizer)) if i not in special])
    gen = torch.Generator().manual_seed(0)

    def generate(input_ids=None, **kwargs):
        picks = allowed[torch.randint(len(allowed), (input_ids.shape[0], length), generator=gen)]
        return torch.cat([input_ids, picks.to(input_ids.device)], dim=1)

    model.generate = generate  # an instance attribute: TRL and Unsloth's generation wrappers call through it


def parse_trainer_args(pairs: list[str]) -> dict:
    """GRPOConfig overrides from KEY=VALUE, each value read as JSON (1, 0.5, true, null) or else kept as text."""
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise SystemExit(f"--trainer-arg {pair!r}: expected KEY=VALUE, e.g. unsloth_logit_chunk_multiplier=1")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


# Environment that decides how Unsloth compiles: recorded with every train result
COMPILE_ENV = ("TORCHINDUCTOR_COMPILE_THREADS", "UNSLOTH_FORCE_SINGLE_COMPILE_WORKER", "NVIDIA_VISIBLE_DEVICES",
               "CUDA_VISIBLE_DEVICES", "UNSLOTH_COMPILE_DISABLE", "TORCH_COMPILE_DISABLE", "UNSLOTH_GRPO_SEQ_PACKING",
               "UNSLOTH_GRPO_PREFIX_GROUPER", "UNSLOTH_ENABLE_LOGGING")


def compile_stats() -> dict:
    """What torch.compile did in this process: time per compiled function and Dynamo's counters."""
    import torch._inductor.config as inductor_config
    from torch._dynamo.utils import compile_times, counters

    return {"compile_times": compile_times(repr="str", aggregate=True),
            "dynamo_counters": {k: dict(v) for k, v in counters.items() if k in ("stats", "frames", "recompiles")},
            "inductor_compile_threads": inductor_config.compile_threads,
            "env": {k: os.environ.get(k) for k in COMPILE_ENV}}


def unsloth_gradient_checkpointing(mode: str) -> None:
    """Make the next FastLanguageModel.get_peft_model use ``mode`` ("unsloth": activations offloaded to CPU,
    "true": plain recomputation, "false": none) in place of what modeling derives from params."""
    from unsloth import FastLanguageModel

    value = {"unsloth": "unsloth", "true": True, "false": False}[mode]
    original = FastLanguageModel.get_peft_model
    FastLanguageModel.get_peft_model = staticmethod(
        lambda model, **kwargs: original(model, **{**kwargs, "use_gradient_checkpointing": value}))


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
    p = config.load(a.params)
    p = replace(p, model={"name": str(Path(a.model).resolve()), "backend": a.backend, "load_in_4bit": not a.bf16},
                generation={"use_vllm": a.vllm, "vllm_mode": "colocate",
                            **({"vllm_gpu_memory_utilization": a.gpu_memory} if a.gpu_memory else {})})
    engine = "vllm" if a.vllm else "hf"
    if a.fake_generate and a.vllm:
        raise SystemExit("--fake-generate replaces HF generate; drop --vllm")
    overrides = parse_trainer_args(a.trainer_arg)
    if a.backend != "unsloth":
        assert "unsloth" not in sys.modules, "the transformers backend must run in a process without unsloth"
    modeling.check_backend(p)
    modeling.import_backend(p)  # unsloth first, as stages/train.py does
    import torch
    from datasets import Dataset
    from transformers import set_seed

    from grpo_gsm8k import training

    results_dir = Path(a.results_dir)
    out_name = a.out or f"train_{a.backend}_{engine}"
    results_dir.mkdir(parents=True, exist_ok=True)
    stacks = open(results_dir / f"{out_name}.stacks.txt", "w") if a.stack_every else None  # noqa: SIM115
    if stacks:  # every thread's Python stack, written even while the main thread is stuck in C
        faulthandler.dump_traceback_later(a.stack_every, repeat=True, file=stacks)
    if a.unsloth_gc:
        unsloth_gradient_checkpointing(a.unsloth_gc)
    if a.unsloth_vllm_seqs_auto:
        chosen = modeling.unsloth_load_kwargs
        modeling.unsloth_load_kwargs = lambda q: {k: v for k, v in chosen(q).items() if k != "max_num_seqs"}
    deadline_all = time.time() + a.budget_s
    records = load_records(Path(a.data) / "train.jsonl", p.data.system_prompt, "train")
    dataset = Dataset.from_list(records)
    sample = prompt_lengths(modeling.load_tokenizer(a.model), [r["prompt"] for r in records[:1000]])
    result = {"kind": "train", "backend": a.backend, "engine": engine, "base_precision": "4-bit" if
              p.model.load_in_4bit else p.model.dtype, "model": a.model, **gpu_info(),
              "versions": modeling.package_versions(), "params_base": config.as_dict(p),
              "generation": "random tokens (--fake-generate)" if a.fake_generate else engine,
              "trainer_overrides": overrides, "train_prompt_tokens_mean": round(sum(sample) / len(sample), 1),
              "configs": {}}
    current = {}  # the config being trained, for a SIGTERM to record

    def progress(entry: dict, timer, bc: dict) -> None:
        entry.update(steps=timer.steps, micro_batch_seconds=timer.micro, summary=summarise(timer.steps, a.warmup),
                     memory=memory(), compile=compile_stats())
        if not timer.lengths and not any(s["completion_tokens"] for s in timer.steps):
            # lengths from TRL's own logs when the wrapper could not see them
            for s, row in zip(timer.steps, current["trainer"].state.log_history):
                if "completions/mean_length" in row:
                    s["completion_tokens"] = round(row["completions/mean_length"] * bc["completions_per_step"])
            entry["summary"] = summarise(timer.steps, a.warmup)

    def on_sigterm(signum, frame):  # the diagnose driver's wall cap: keep what was measured, then go
        if stacks:  # where the main thread is now, in the periodic dumps' format
            stacks.write("Timeout (SIGTERM)!\n")
            stacks.flush()
            faulthandler.dump_traceback(file=stacks, all_threads=True)
        if current:
            current["entry"]["stopped"] = f"SIGTERM {time.time() - current['t0']:.0f}s into this config"
            progress(current["entry"], current["timer"], current["bc"])
            result["configs"][current["name"]] = current["entry"]
        write_result(out_name, result, results_dir)
        log(f"SIGTERM: wrote {results_dir / out_name}.json")
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(124)

    signal.signal(signal.SIGTERM, on_sigterm)
    policy = None
    if a.vllm and a.backend == "transformers":
        share_vllm_engines()
    sections = {}  # the timer that TRL's timed sections report into
    time_trl_sections(sections)
    fitted = {}  # gradient checkpointing on/off -> the largest micro-batch that trained without running out of memory
    for i, name in enumerate(a.configs):
        bc = batch_config(p, name, a.completion)
        spec = CONFIGS[name]
        base = replace(p, **spec.get("params", {}))
        checkpointing = base.model.gradient_checkpointing
        if a.halve_on_oom:  # start from what fitted before at this setting, not from an OOM already seen
            while checkpointing in fitted and bc["per_device_train_batch_size"] > fitted[checkpointing]:
                bc = halved(bc, p.train.num_generations)
        started_at = bc["per_device_train_batch_size"]
        left = len(a.configs) - i
        if a.reserve_s:  # keep a fixed reserve for each config still to come
            deadline = deadline_all - a.reserve_s * (left - 1)
        else:  # split what is left equally
            deadline = min(deadline_all, time.time() + max(30.0, (deadline_all - time.time()) / left))
        out_of_memory = []  # micro-batch sizes that ran out of memory before this one
        while True:
            q = replace(base, train={"per_device_train_batch_size": bc["per_device_train_batch_size"],
                                     "gradient_accumulation_steps": bc["gradient_accumulation_steps"],
                                     "max_steps": a.steps if name == "reference" else a.steps_big,
                                     "max_completion_length": bc["completion_tokens"], "save_steps": 10**6})
            log(f"config {name}: {bc}, max_steps {q.train.max_steps}, budget {deadline - time.time():.0f}s")
            set_seed(q.train.seed)
            if torch.cuda.is_available():
                torch.cuda.reset_peak_memory_stats()
            t_load = time.perf_counter()
            if policy is None or a.backend != "unsloth":  # unsloth's policy is a loaded model: reuse it
                policy = modeling.load_policy(q)
            timer = make_timer(deadline)
            sections["timer"] = timer
            trainer = training.build_trainer(q, policy, dataset, f"/tmp/bench_{a.backend}_{name}", callbacks=[timer],
                                             generation_kwargs={FORCE_KEY[engine]: bc["completion_tokens"]},
                                             save_strategy="no", **{**spec.get("trainer", {}), **overrides})
            load_s = time.perf_counter() - t_load
            wrapped = {m: wrap_timed(trainer, timer, m, k, lengths=(k == "generate_s"))
                       for m, k in (("_generate_single_turn", "generate_s"),
                                    ("_generate_and_score_completions", "generate_and_score_s"))}
            wrap_micro_batches(trainer, timer)
            if a.fake_generate:
                fake_generate(trainer.model, trainer.processing_class, bc["completion_tokens"])
            gen_cfg = getattr(trainer, "generation_config", None)
            entry = {"batch": bc, "load_and_build_s": round(load_s, 1), "wrapped": wrapped,
                     "params": spec.get("params", {}), "trainer_config": spec.get("trainer", {}),
                     "out_of_memory_at_micro_batch": out_of_memory,  # this config's own attempts
                     "started_at_micro_batch": started_at,  # smaller than the config's: an earlier config's OOM
                     "trainer_class": type(trainer).__name__,
                     "min_new_tokens_in_generation_config": getattr(gen_cfg, "min_new_tokens", None),
                     "max_new_tokens_in_generation_config": getattr(gen_cfg, "max_new_tokens", None),
                     "unsloth_gradient_checkpointing": getattr(policy.model, "_unsloth_gradient_checkpointing", None),
                     "unsloth_vllm_max_num_seqs": getattr(getattr(policy.model, "vllm_engine", None),
                                                          "approx_max_num_seqs", None),
                     "effective_args": {k: getattr(trainer.args, k, None) for k in (
                         "per_device_train_batch_size", "gradient_accumulation_steps", "steps_per_generation",
                         "generation_batch_size", "num_generations", "max_completion_length", "beta", "loss_type",
                         "gradient_checkpointing", "optim", "bf16", "cache_implementation", "generation_kwargs",
                         "use_vllm", "vllm_importance_sampling_correction", "vllm_importance_sampling_mode",
                         "vllm_enable_sleep_mode", "vllm_gpu_memory_utilization", "num_iterations",
                         "unsloth_num_chunks", "unsloth_logit_chunk_multiplier", "unsloth_grpo_mini_batch")}}
            log(f"built trainer in {load_s:.1f}s; args {entry['effective_args']}")
            current.update(name=name, entry=entry, timer=timer, bc=bc, trainer=trainer, t0=time.time())
            if a.log_recompiles:  # here, after Unsloth's import and load: they set every torch log to CRITICAL
                torch._logging.set_logs(recompiles=True)
            oom = False
            try:
                trainer.train()
            except torch.OutOfMemoryError as err:
                entry["error"] = f"OOM: {err}"[:500]
                log(entry["error"])
                oom = True
            smaller = halved(bc, p.train.num_generations) if oom and a.halve_on_oom else None
            if smaller is None or time.time() > deadline:
                break
            out_of_memory.append(bc["per_device_train_batch_size"])
            log(f"config {name}: out of memory at micro-batch {bc['per_device_train_batch_size']}; again at "
                f"{smaller['per_device_train_batch_size']}")
            current.clear()
            sections["timer"] = None
            del trainer, timer
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            bc = smaller
        if "error" not in entry:
            fitted[checkpointing] = bc["per_device_train_batch_size"]
        progress(entry, timer, bc)
        current.clear()
        sections["timer"] = None
        entry["trl_logs"] = [{k: v for k, v in row.items() if k.startswith(("completions/", "step_time", "loss", "sampling/", "entropy",
                                                                          "grad_norm", "reward", "num_tokens"))}
                             for row in trainer.state.log_history]
        log(f"config {name}: summary {entry['summary']} memory {entry['memory']}")
        result["configs"][name] = entry
        if a.save_adapter and name == a.configs[-1]:
            n = perturb_lora_b(trainer.model, a.noise_std, a.noise_seed)
            trainer.model.save_pretrained(a.save_adapter)
            policy.tokenizer.save_pretrained(a.save_adapter)
            # the record stages/merge.py builds the model card from, as the train stage writes it
            Path(a.save_adapter, "training_run.json").write_text(json.dumps({
                "base_model": q.model.name, "backend": q.model.backend, "params": config.as_dict(q),
                "effective_grpo_config": trainer.args.to_dict(), "versions": modeling.package_versions(),
                "bench": f"bench_grpo.py train, LoRA B perturbed (noise std {a.noise_std})"}, indent=1, default=str))
            result["adapter"] = {"dir": a.save_adapter, "lora_b_perturbed": n, "noise_std": a.noise_std,
                                 "noise_seed": a.noise_seed, "files": sorted(os.listdir(a.save_adapter)),
                                 "adapter_config": json.loads(Path(a.save_adapter, "adapter_config.json").read_text())}
            log(f"adapter saved to {a.save_adapter} after perturbing {n} LoRA B matrices")
        write_result(out_name, result, results_dir)  # after every config: a later timeout keeps what was measured
        del trainer, timer
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    if a.backend != "unsloth":
        assert "unsloth" not in sys.modules, "unsloth was imported on the transformers path"
        result["unsloth_imported"] = False
    write_result(out_name, result, results_dir)
    log(f"wrote {results_dir / out_name}.json")


# ------------------------------------------------------------------------------------------- diagnose

# Issue 15: where Unsloth's GRPO step goes at the defaults' batch (32 prompts x 8, 512 tokens). One process
# per attempt, since Unsloth reads its switches at import; most telling first (the hypotheses:
# bench/results/unsloth_sources.md). "--fake-generate" attempts skip generation, which finished in the
# stalled runs, so their steps time only the part that stalled.
@dataclass
class Attempt:
    why: str
    env: dict
    args: list
    cap_s: float  # wall cap of the process, load included (~35 s: Unsloth's import and a 4-bit load)


FAKE = ["--fake-generate"]
ATTEMPTS = {
    "as-is": Attempt("Unsloth's defaults: compiled chunked GRPO loss, CPU-offloaded checkpointing, packing",
                     {}, FAKE, 90),  # ~35 s into training when stopped: the stacks say where it stalls
    "no-compile": Attempt("UNSLOTH_COMPILE_DISABLE=1: Unsloth's chunked log-softmax eager (its loss's inner "
                          "accumulate_chunk stays compiled)",
                          {"UNSLOTH_COMPILE_DISABLE": "1"}, FAKE + ["--steps-big", "2"], 110),
    "no-torch-compile": Attempt("TORCH_COMPILE_DISABLE=1 as well: nothing compiled at all",
                                {"UNSLOTH_COMPILE_DISABLE": "1", "TORCH_COMPILE_DISABLE": "1"}, FAKE, 110),
    "chunks-x1": Attempt("unsloth_logit_chunk_multiplier=1: 32 logit chunks unrolled per micro-batch, not 128",
                         {}, FAKE + ["--trainer-arg", "unsloth_logit_chunk_multiplier=1"], 130),
    "micro-8": Attempt("micro-batches of 8 x 32 accumulation: the same 256 completions, 32 chunks each",
                       {}, FAKE + ["--configs", "mb8"], 150),
    "gc-plain": Attempt("use_gradient_checkpointing=True: recompute without the CPU offload (compile off)",
                        {"UNSLOTH_COMPILE_DISABLE": "1"}, FAKE + ["--unsloth-gc", "true"], 110),
    "no-packing": Attempt("UNSLOTH_GRPO_SEQ_PACKING=0: the padded loop, no packed sequence nor its per-row check",
                          {"UNSLOTH_GRPO_SEQ_PACKING": "0"}, FAKE, 130),
    "vllm": Attempt("fast_inference (4-bit, vLLM colocated), real generation, with the fastest attempt's settings",
                    {}, ["--vllm", "--steps-big", "4", "--save-adapter", "/tmp/adapter_unsloth"], 260),
    "vllm-bf16": Attempt("the same on a 16-bit base (params.yaml's model.load_in_4bit: false)",
                         {}, ["--vllm", "--bf16", "--steps-big", "4", "--save-adapter", "/tmp/adapter_unsloth"], 260),
}
DEFAULT_ATTEMPTS = ("as-is", "no-compile", "vllm")
# Not UNSLOTH_ENABLE_LOGGING: it would print packing decisions, but it also skips an early vLLM import
# (unsloth/models/_utils.py:3360) that sets TORCHINDUCTOR_COMPILE_THREADS, which is under test here.
COMMON_ENV = {"PYTHONUNBUFFERED": "1"}
GRACE_S = 20  # after SIGTERM, for an attempt to write what it measured
MIN_ATTEMPT_S = 60  # with less left, an attempt could not even load: skipped
# Frames only a compile runs through (Dynamo's entry, Inductor's, Triton's kernel compiler): eager code also
# passes through torch/_dynamo (the optimizer's disable wrappers) and compiled code through torch/_inductor.
COMPILING = ("/torch/_dynamo/convert_frame.py", "/torch/_inductor/compile_fx.py", "/triton/compiler/")


def main_thread_frames(text: str) -> list[str]:
    """The main thread's frames, innermost first, in the last faulthandler dump of ``text`` that shows any (one
    taken as the process exits shows none): the thread that runs this script (its <module> frame), or the
    deepest one when faulthandler cut a deep stack short."""
    for dump in reversed(text.split("Timeout (")):
        threads = []
        for line in dump.splitlines():
            if "(most recent call first)" in line:
                threads.append([])
            elif line.strip().startswith("File ") and threads and not line.endswith(" in on_sigterm"):
                threads[-1].append(line.strip())
        main = next((t for t in threads if any("bench_grpo.py" in f or " in <module>" in f for f in t)),
                    max(threads, key=len, default=[]))
        if main:
            return main
    return []


def compact_frame(frame: str) -> str:
    """'File "/a/b/c.py", line 7 in f' -> 'b/c.py:7 f'."""
    path, sep, rest = frame.partition('", line ')
    if not sep:
        return frame
    line, _, func = rest.partition(" in ")
    tail = "/".join(path.removeprefix('File "').split("/")[-2:])
    return f"{tail}:{line} {func}"


def stack_label(text: str) -> str:
    """Where the main thread was at the last dump: inside torch.compile or running, and in which Unsloth
    function (the innermost frame of unsloth or unsloth_zoo, or else the innermost frame)."""
    frames = main_thread_frames(text)
    if not frames:
        return ""
    # the innermost Unsloth frame that does real work, not one of its compile wrappers (temporary_patches)
    unsloth = next((f for f in frames if "/unsloth" in f and "/temporary_patches/" not in f), frames[0])
    compiling = any(part in f for f in frames for part in COMPILING)
    return ("in torch.compile, under " if compiling else "running ") + compact_frame(unsloth)


def attempt_row(row: dict, out: Path, rc, wall: float, timed_out: bool) -> dict:
    """One attempt's outcome from its result JSON, log and stack dumps (each may be missing)."""
    name = row["attempt"]

    def read(suffix: str) -> str:
        path = out / f"{name}{suffix}"
        return path.read_text(errors="replace") if path.is_file() else ""

    result = json.loads(read(".json") or "null")
    log_text, stacks = read(".log"), read(".stacks.txt")
    entry = next(iter(result["configs"].values()), {}) if result and result.get("configs") else {}
    steps, summary, compiled = entry.get("steps", []), entry.get("summary", {}), entry.get("compile", {})
    unfinished = timed_out or rc != 0 or not steps  # only then does the last stack dump say where it stuck
    lines = log_text.splitlines()
    recompiled, reasons = [], Counter()
    for i, line in enumerate(lines):
        if "Recompiling function " in line:
            recompiled.append(line.split("Recompiling function ", 1)[1].split()[0])
            why = next((x.split("    - ", 1)[1] for x in lines[i + 1:i + 4] if "    - " in x), "?")
            reasons[f"{recompiled[-1]}: {re.sub(r'[0-9]+', 'N', why)[:200]}"] += 1  # sizes vary, guards recur
    row.update(
        rc=rc, wall_s=wall, timed_out=timed_out, steps_done=len(steps), stalled=not steps,
        load_and_build_s=entry.get("load_and_build_s"),
        step_seconds=[s["seconds"] for s in steps], timed_steps=summary.get("timed_steps", 0),
        seconds_per_step=summary.get("seconds_per_step"),
        completion_tokens_per_s=summary.get("completion_tokens_per_s"),
        generate_s_per_step=summary.get("generate_s_per_step"), train_s_per_step=summary.get("train_s_per_step"),
        micro_batch_seconds=entry.get("micro_batch_seconds", []),
        peak_allocated_gib=entry.get("memory", {}).get("peak_allocated_gib"),
        recompiles=len(recompiled), recompile_reasons=reasons.most_common(5),
        compile_times=compiled.get("compile_times"), inductor_compile_threads=compiled.get("inductor_compile_threads"),
        compile_env=compiled.get("env"),
        stopped=entry.get("stopped"), error=entry.get("error"),
        last_stack=[compact_frame(f) for f in main_thread_frames(stacks)[:14]] if unfinished else [],
        where=stack_label(stacks) if unfinished else "",
        adapter=(result or {}).get("adapter"), last_log_lines=lines[-15:])
    return row


def fastest(rows: list[dict]) -> dict | None:
    """The attempt (vLLM's aside) with the shortest mean step, its first included: a setting that is fast only
    once compiled must pay for the compile, which the vLLM attempt's budget cannot absorb."""
    done = [r for r in rows if "--vllm" not in r["args"] and len(r.get("step_seconds", [])) >= 2]
    return min(done, key=lambda r: sum(r["step_seconds"]) / len(r["step_seconds"]), default=None)


def failure(row: dict) -> str:
    """How an attempt that exited on its own with an error ended: its last log line."""
    if row["rc"] in (0, None) or row["timed_out"]:
        return ""
    last = next((line for line in reversed(row["last_log_lines"]) if line.strip()), "")
    return f"exit {row['rc']}: {last.strip()[:160]}"


def summary_markdown(rows: list[dict]) -> str:
    head = ["attempt", "what it changes", "steps done", "first step s", "s/step (timed)", "train s/step",
            "micro-batch s (first 4)", "peak GiB", "recompiles", "wall s", "where the main thread was last"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        if r.get("skipped"):
            lines.append(f"| {r['attempt']} | {r['why']} | skipped: {r['skipped']} |" + " |" * (len(head) - 3))
            continue
        first = r["step_seconds"][0] if r["step_seconds"] else None
        cells = [r["attempt"], r["why"] + (f" (settings of {r['inherited']})" if r.get("inherited") else ""),
                 f"{r['steps_done']}" + (" (killed at the cap)" if r["timed_out"] else ""), first,
                 f"{r['seconds_per_step']} x {r['timed_steps']}" if r["seconds_per_step"] else "none",
                 r["train_s_per_step"], ", ".join(f"{m:.1f}" for m in r["micro_batch_seconds"][:4]),
                 r["peak_allocated_gib"], r["recompiles"], r["wall_s"], r["where"] or failure(r)]
        lines.append("| " + " | ".join("" if c is None else str(c) for c in cells) + " |")
    return "\n".join(lines) + "\n"


def run_capped(cmd: list[str], env: dict, log_path: Path, cap: float,
               grace: float = GRACE_S) -> tuple[int, float, bool]:
    """Run ``cmd`` in its own session for at most ``cap`` seconds: SIGTERM to it at cap - grace (it writes what
    it measured), then SIGKILL to its whole session (vLLM, compile workers). (exit status, seconds, capped)"""
    start = time.time()
    capped = False
    with open(log_path, "w") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True)
        try:
            proc.wait(timeout=max(1.0, cap - grace))
        except subprocess.TimeoutExpired:
            capped = True
            proc.send_signal(signal.SIGTERM)  # the attempt alone: its compile workers must not die under it first
            try:
                proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # whatever is left of its session holds no GPU memory after this
        except ProcessLookupError:
            pass
        return proc.wait(), round(time.time() - start, 1), capped


def cmd_diagnose(a) -> None:
    out = Path(a.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    deadline = time.time() + a.budget_s
    rows = []
    for name in a.attempts:
        spec = ATTEMPTS[name]
        row = {"attempt": name, "why": spec.why, "env": dict(spec.env), "args": list(spec.args)}
        best = fastest(rows) if "--vllm" in spec.args else None
        if best:  # generation aside, vLLM's steps run the same training path: give it what made that fastest
            row.update(inherited=best["attempt"], env={**best["env"], **spec.env},
                       args=[x for x in best["args"] if x != "--fake-generate"] + spec.args)
        cap = min(spec.cap_s, deadline - time.time())
        if cap < MIN_ATTEMPT_S:
            rows.append({**row, "skipped": f"{max(cap, 0):.0f}s of the budget left"})
        else:
            cmd = [sys.executable, str(Path(__file__).resolve()), "train", "--backend", a.backend, "--model", a.model,
                   "--data", a.data, "--configs", "defaults", "--steps-big", str(a.steps), "--warmup", "1",
                   "--budget-s", str(round(cap - GRACE_S - 15)), "--results-dir", str(out), "--out", name,
                   "--log-recompiles", "--stack-every", "30",
                   *(["--completion", str(a.completion)] if a.completion else []), *row["args"]]
            log(f"attempt {name} (cap {cap:.0f}s): {spec.why}; env {row['env']}")
            rc, wall, timed_out = run_capped(cmd, {**os.environ, **COMMON_ENV, **row["env"]}, out / f"{name}.log", cap)
            rows.append(attempt_row(row, out, rc, wall, timed_out))
            r = rows[-1]
            log(f"attempt {name}: rc {rc}, {wall}s, steps {r['step_seconds']}, {r['seconds_per_step']} s/step, "
                f"recompiles {r['recompiles']}, {r['where']}")
        (out / "summary.json").write_text(json.dumps(rows, indent=2, default=str) + "\n")
        (out / "summary.md").write_text(summary_markdown(rows))
    log(f"wrote {out / 'summary.md'}")


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
    timed_sections = [(path, name, e) for path in trains for name, e in json.loads(path.read_text())["configs"].items()
                      if e["summary"].get("sections_s_per_step")]
    if timed_sections:  # TRL's own timed sections (bench time_trl_sections), per timed step
        lines += ["", *_table_head("Where generation goes (TRL's timed sections, s per step)",
                                   ["result", "config", "weight sync (LoRA merge + push)",
                                    "engine's generate (vLLM or HF)",
                                    "rest of generation (TRL)", "rewards", "scoring + bookkeeping",
                                    "sampling logp diff mean", "IS ratio mean"])]
        for path, name, e in timed_sections:
            s, sec = e["summary"], e["summary"]["sections_s_per_step"]
            sync_s, vllm_s = sec.get("section_sync_weights_s", 0.0), sec.get("section_vLLM_generate_s", 0.0)
            engine_s = vllm_s or sec.get("section_transformers_generate_s", 0.0)
            rewards = sum(v for k, v in sec.items() if k not in (
                "section_sync_weights_s", "section_vLLM_generate_s", "section_transformers_generate_s"))
            rows = [row for row in e.get("trl_logs", [])
                    if "sampling/importance_sampling_ratio/mean" in row][-s["timed_steps"]:]
            diff = statistics.mean(row["sampling/sampling_logp_difference/mean"] for row in rows) if rows else None
            ratio = statistics.mean(row["sampling/importance_sampling_ratio/mean"] for row in rows) if rows else None
            lines.append(f"| {path.stem.removeprefix('train_')} | {name} | {sync_s:.2f} | {engine_s:.2f} "
                         f"| {s['generate_s_per_step'] - sync_s - engine_s:.2f} | {rewards:.2f} "
                         f"| {s['rewards_and_bookkeeping_s_per_step'] - rewards:.2f} "
                         f"| {'n/a' if diff is None else f'{diff:.4f}'} "
                         f"| {'n/a' if ratio is None else f'{ratio:.4f}'} |")
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
    t.add_argument("--params", default=str(ROOT / "params.yaml"), help="the params each config starts from")
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
    t.add_argument("--results-dir", default=str(RESULTS))
    t.add_argument("--fake-generate", action="store_true",
                   help="random forced tokens instead of HF generate: a step then times only what follows generation")
    t.add_argument("--unsloth-gc", choices=("unsloth", "true", "false"), default=None,
                   help="use_gradient_checkpointing for Unsloth's get_peft_model (default: from params)")
    t.add_argument("--unsloth-vllm-seqs-auto", action="store_true",
                   help="leave vLLM's max_num_seqs to Unsloth's pick from free memory (the project passes the batch)")
    t.add_argument("--trainer-arg", action="append", default=[], metavar="KEY=VALUE",
                   help="a GRPOConfig override, e.g. unsloth_logit_chunk_multiplier=1 (repeatable)")
    t.add_argument("--halve-on-oom", action="store_true",
                   help="a config that runs out of memory runs again in micro-batches half as large (same step)")
    t.add_argument("--log-recompiles", action="store_true", help="torch's recompiles log (Unsloth silences it)")
    t.add_argument("--stack-every", type=float, default=0, help="dump every thread's stack every S seconds")
    d = sub.add_parser("diagnose", help="issue 15: Unsloth's training path, one process per attempt")
    d.add_argument("--attempts", nargs="+", default=list(DEFAULT_ATTEMPTS), choices=sorted(ATTEMPTS))
    d.add_argument("--budget-s", type=float, default=460, help="wall-clock budget for all attempts")
    d.add_argument("--out-dir", default=str(RESULTS / "unsloth_diag"))
    d.add_argument("--backend", choices=("unsloth", "transformers"), default="unsloth",
                   help="transformers: a CPU dry run of the driver (Unsloth needs CUDA)")
    d.add_argument("--model", default="/tmp/standin")
    d.add_argument("--data", default=".carry/gsm8k")
    d.add_argument("--steps", type=int, default=3, help="optimizer steps per attempt (the first is warm-up)")
    d.add_argument("--completion", type=int, default=None, help="forced completion tokens (default: params)")
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
     "report": cmd_report, "diagnose": cmd_diagnose}[a.cmd](a)


if __name__ == "__main__":
    main()
