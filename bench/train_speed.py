"""Training speed: GRPO steps through the project's own path (modeling.load_policy + training.build_trainer with
params.yaml, model.name pointed at the stand-in), HF generate or vLLM colocate, either backend, 4-bit or 16-bit
base, for each named batch config in one process. Every optimizer step is timed (CUDA synchronised), with the
generation and scoring inside it, TRL's own timed sections (weight sync, vLLM.generate, each reward) and peak
memory; the first --warmup steps are not counted. Every completion is forced to its full length (random weights
never stop), so a step is the worst case of real completions of that length.

    python -m bench standin --tokenizer <Qwen2.5 tokenizer + config.json> --out /tmp/standin
    python -m bench train-speed --backend transformers --vllm --bf16 --configs defaults --completion 512 \\
        --steps-big 5 --model /tmp/standin --data <gsm8k> --results-dir DIR --out NAME

Configs (--configs): `defaults` (params.yaml), `reference` (the public Unsloth GRPO notebook's 1 prompt x 8),
candidate batches (p16, p32, p64, mb8) and issue 27's speed levers (today, reuse_logprobs, no_checkpointing,
levers, sleep, levers_sleep, liger, levers_liger, levers_mb8, ckpt_every2, ckpt_every4: bench/speed_levers.sh).
Run each backend in its own process: importing Unsloth patches TRL for the process. A config that fails (out of
memory, or an error) is recorded with its error and the next configs still run; a SIGTERM (a timeout) writes what
was measured, status "partial".
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import re
import signal
import sys
import time
import traceback
from pathlib import Path

from bench import common, standin
from grpo_gsm8k import config, modeling

SCENARIO = "train-speed"
log = common.logger("bench")
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
# The batch comes from --params where a lever does not set it: bench/speed_levers.sh gives them micro-batches of
# 32 x 8 accumulation steps, the defaults' until 2026-12-07, when levers_mb8 (8 x 32, checkpointing off) became them.
_TODAY = {"train": {"reuse_training_logprobs": False}, "model": {"gradient_checkpointing": True}}
_MB8 = {"per_device_train_batch_size": 8, "gradient_accumulation_steps": 32,  # the default since 2026-12-07
        "params": {"train": {"reuse_training_logprobs": True}, "model": {"gradient_checkpointing": False}}}
LEVERS = {
    "today": {"params": _TODAY},
    "reuse_logprobs": {"params": {**_TODAY, "train": {"reuse_training_logprobs": True}}},
    "no_checkpointing": {"params": {**_TODAY, "model": {"gradient_checkpointing": False}}},
    # checkpointing off starts at micro-batches of 16 x 16: 32 x 8 ran out of memory on an H200 (2026-12-06)
    "levers": {"per_device_train_batch_size": 16, "gradient_accumulation_steps": 16,
               "params": {"train": {"reuse_training_logprobs": True}, "model": {"gradient_checkpointing": False}}},
    # vLLM's sleep mode: its weights and KV cache released while training (an engine of its own: see
    # share_vllm_engines), for gradient checkpointing off on a card that is too small without it
    "sleep": {"params": _TODAY, "trainer": {"vllm_enable_sleep_mode": True}},
    "levers_sleep": {"trainer": {"vllm_enable_sleep_mode": True},
                     "params": {"train": {"reuse_training_logprobs": True},
                                "model": {"gradient_checkpointing": False}}},
    # the next levers (speed_levers.sh h100, h100_next): Liger's fused layer kernels (RMSNorm, SwiGLU, RoPE;
    # liger-kernel is in the lock and TRL 1.15 still applies them, the LM head staying TRL's fused one), which keep
    # fewer activations, and checkpointing off at micro-batches of 8, which fits an 80 GB card: the defaults since
    # 2026-12-07
    "liger": {"trainer": {"use_liger_kernel": True},
              "params": {"train": {"reuse_training_logprobs": True}, "model": {"gradient_checkpointing": True}}},
    "levers_liger": {"per_device_train_batch_size": 16, "gradient_accumulation_steps": 16,
                     "params": {"train": {"reuse_training_logprobs": True}, "model": {"gradient_checkpointing": False}},
                     "trainer": {"use_liger_kernel": True}},
    "levers_mb8": _MB8,
    # the default with the caching allocator emptied as each optimizer step begins, i.e. just before TRL generates,
    # tried because at 74-78 GiB reserved of an 80 GB card vLLM's generation ran 1-2 s slower than `today`'s at 51 GiB:
    # no allocator retry in generation, no gain (levers_h100_empty_cache), not adopted
    "levers_mb8_empty_cache": {**_MB8, "empty_cache_before_generation": True},
    # the default as it ran until training.skip_lora_input_casts_under_autocast: PEFT casting every LoRA layer's input
    # to its float32 weights' dtype and autocast casting it back (speed_levers.sh casts)
    "levers_mb8_lora_casts": {**_MB8, "peft_lora_casts": True},
    # checkpointing only every n-th layer (transformers 5's every_n_layers, see checkpoint_every_n_layers;
    # speed_levers.sh every_n): the time saved against the memory kept, between every layer (63 GiB, 12.4 s of
    # training on an H200) and none (out of memory at micro-batches of 32)
    "ckpt_every2": {"checkpoint_every_n_layers": 2,
                    "params": {"train": {"reuse_training_logprobs": True}, "model": {"gradient_checkpointing": True}}},
    "ckpt_every4": {"checkpoint_every_n_layers": 4,
                    "params": {"train": {"reuse_training_logprobs": True}, "model": {"gradient_checkpointing": True}}},
}
CONFIGS.update(LEVERS)
# How each engine is told to generate exactly L tokens (random weights never stop by themselves): HF
# generate's GenerationConfig, vLLM's SamplingParams (TRL passes generation_kwargs into either).
FORCE_KEY = {"hf": "min_new_tokens", "vllm": "min_tokens"}
EFFECTIVE_ARGS = ("per_device_train_batch_size", "gradient_accumulation_steps", "steps_per_generation",
                  "generation_batch_size", "num_generations", "max_completion_length", "beta", "loss_type",
                  "gradient_checkpointing", "gradient_checkpointing_kwargs", "optim", "bf16", "cache_implementation",
                  "generation_kwargs", "use_vllm",
                  "vllm_importance_sampling_correction", "vllm_importance_sampling_mode", "vllm_enable_sleep_mode",
                  "vllm_gpu_memory_utilization", "num_iterations", "use_liger_kernel")
TRL_LOG_KEYS = ("completions/", "step_time", "loss", "sampling/", "entropy", "grad_norm", "reward", "num_tokens")


def batch_config(p: config.Params, name: str, completion: int | None) -> dict:
    spec = CONFIGS[name]
    length = completion or spec.get("completion") or p.train.max_completion_length
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
        common.sync()
        start, retries = time.perf_counter(), alloc_retries()
        with original(trainer, name):
            yield
        common.sync()
        timer = holder.get("timer")
        if timer is not None:
            key = "section_" + re.sub(r"[^A-Za-z0-9]+", "_", name)
            timer.parts[key + "_s"] = timer.parts.get(key + "_s", 0.0) + time.perf_counter() - start
            timer.parts[key + "_alloc_retries"] = timer.parts.get(key + "_alloc_retries", 0) + alloc_retries() - retries

    grpo_trainer.profiling_context = timed


def alloc_retries() -> int:
    """How often PyTorch's caching allocator has had to free its cached blocks and retry a cudaMalloc: each retry
    synchronises the device, so a card near full slows whatever allocates (0 without CUDA)."""
    import torch

    return torch.cuda.memory_stats().get("num_alloc_retries", 0) if torch.cuda.is_available() else 0


def make_timer(deadline: float, empty_cache_before_generation: bool = False):
    import torch
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        """Wall time of each optimizer step (CUDA synchronised), what generation took inside it, and the caching
        allocator's retries in it."""

        def __init__(self):
            self.steps, self.parts, self.lengths, self.t, self.retries = [], {}, [], None, 0
            self.micro = []  # seconds of each micro-batch (training_step); a step's first includes its generation

        def on_train_begin(self, args, state, control, **kwargs):
            common.sync()
            self.t, self.retries = time.perf_counter(), alloc_retries()

        def on_step_begin(self, args, state, control, **kwargs):
            # TRL generates in a step's first micro-batch (steps_per_generation = gradient_accumulation_steps)
            if empty_cache_before_generation and torch.cuda.is_available():
                torch.cuda.empty_cache()

        def on_step_end(self, args, state, control, **kwargs):
            common.sync()
            now = time.perf_counter()
            row = {"step": state.global_step, "seconds": round(now - self.t, 3),
                   **{k: round(v, 3) for k, v in self.parts.items()},
                   "completion_tokens": sum(self.lengths),
                   "completions": len(self.lengths),
                   "min_len": min(self.lengths, default=0), "max_len": max(self.lengths, default=0),
                   "alloc_retries": alloc_retries() - self.retries}
            self.steps.append(row)
            log(f"step {json.dumps(row)}")
            self.parts, self.lengths, self.t, self.retries = {}, [], now, alloc_retries()
            if time.time() > deadline:
                log("time budget reached: stopping this config after this step")
                control.should_training_stop = True

    return StepTimer()


def checkpoint_every_n_layers(model, n: int) -> None:
    """Gradient checkpointing in every n-th decoder layer only, however it is turned on. The Trainer takes
    every_n_layers from gradient_checkpointing_kwargs, but TRL 1.15 turns checkpointing off around its no-grad
    forward and on again with those kwargs as they are (grpo_trainer.py:2560, trl/models/utils.py:405): every layer
    again, or, with every_n_layers among them, a ValueError from torch's checkpoint. So the model's own
    gradient_checkpointing_enable is wrapped, as TRL's selective checkpointing does
    (trl/models/selective_activation_checkpointing.py)."""
    original = model.gradient_checkpointing_enable

    def enable(gradient_checkpointing_kwargs=None, **kwargs):
        return original(gradient_checkpointing_kwargs, **{**kwargs, "every_n_layers": n})

    model.gradient_checkpointing_enable = enable


def restore_peft_lora_casts(model) -> int:
    """PEFT's own cast of each LoRA layer's input, as before training.skip_lora_input_casts_under_autocast; returns
    how many layers had it skipped."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    return sum(vars(m).pop("_cast_input_dtype", None) is not None
               for m in model.modules() if isinstance(m, BaseTunerLayer))


def checkpointed_layers(model) -> dict:
    """How many decoder layers recompute their forward in the backward pass, as the model holds it after training
    started (the Trainer sets it from gradient_checkpointing and gradient_checkpointing_kwargs' every_n_layers)."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    return {"layers": len(layers), "checkpointed": sum(bool(m.gradient_checkpointing) for m in layers)}


def wrap_timed(trainer, timer, name: str, key: str, lengths: bool = False) -> bool:
    """Time a GRPOTrainer method on the instance (works for TRL's class and Unsloth's patched copy)."""
    orig = getattr(trainer, name, None)
    if orig is None:
        return False

    def timed(*args, **kwargs):
        common.sync()
        start = time.perf_counter()
        out = orig(*args, **kwargs)
        common.sync()
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


def profile_summary(prof, top: int = 30) -> dict:
    """The operators of a torch.profiler run, by the time they took themselves on the GPU (on the CPU without one):
    where a training micro-batch's time goes, op by op."""
    import torch

    key = "self_device_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
    events = sorted(prof.key_averages(), key=lambda e: getattr(e, key), reverse=True)
    total = sum(getattr(e, key) for e in events)
    return {"clock": "gpu" if key.startswith("self_device") else "cpu", "total_ms": round(total / 1e3, 2),
            "ops": [{"op": e.key, "calls": e.count, "ms": round(getattr(e, key) / 1e3, 2),
                     "share": round(getattr(e, key) / total, 4) if total else 0.0} for e in events[:top]]}


def wrap_micro_batches(trainer, timer, profile_at: int | None = None, profiled: dict | None = None) -> None:
    """Log every micro-batch (Trainer.training_step) as it ends, so a step that never finishes still shows
    how far it got and how long each piece took. The micro-batch numbered `profile_at` runs under torch.profiler,
    its summary put in `profiled`: one inside the warm-up step, so that the timed steps carry no profiler."""
    from contextlib import nullcontext

    import torch

    orig = trainer.training_step

    def timed(*args, **kwargs):
        n = len(timer.micro) + 1
        context = nullcontext()
        if n == profile_at:
            context = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU] + (
                [torch.profiler.ProfilerActivity.CUDA] if torch.cuda.is_available() else []))
        common.sync()
        start = time.perf_counter()
        with context as prof:
            out = orig(*args, **kwargs)
            common.sync()
        if n == profile_at:
            profiled.update(micro_batch=n, **profile_summary(prof))
            log(f"profiled micro-batch {n}: {profiled['total_ms']} ms of {profiled['clock']} time in its ops")
        timer.micro.append(round(time.perf_counter() - start, 3))
        log(f"micro-batch {len(timer.micro)} in {timer.micro[-1]:.1f}s")
        return out

    trainer.training_step = timed


def summarise(steps: list[dict], warmup: int = 1) -> dict:
    """The timed steps' median and min-max (common.timing_summary), and where a mean step went: generation, the
    rest of generate-and-score (rewards, the scoring forward, bookkeeping), training (forward, backward, optimizer)."""
    summary = common.timing_summary([s["seconds"] for s in steps], warmup)
    timed = steps[summary["warmup_steps_excluded"]:] if summary["timed_steps"] else []
    if not timed:
        return summary
    n, secs = len(timed), sum(s["seconds"] for s in timed)
    gen = sum(s.get("generate_s", 0.0) for s in timed)
    score = sum(s.get("generate_and_score_s", 0.0) for s in timed)
    sections = sorted({k for s in timed for k in s if k.startswith("section_") and k.endswith("_s")})
    retries = sorted({k for s in timed for k in s if k.endswith("alloc_retries")})
    return {**summary, "first_step_s": steps[0]["seconds"],
            "completion_tokens_per_s": round(sum(s["completion_tokens"] for s in timed) / secs, 1) if secs else None,
            "generate_s_per_step": round(gen / n, 2), "rewards_and_bookkeeping_s_per_step": round((score - gen) / n, 2),
            "train_s_per_step": round((secs - score) / n, 2),
            "sections_s_per_step": {k: round(sum(s.get(k, 0.0) for s in timed) / n, 3) for k in sections},
            **({"alloc_retries_per_step": {k: round(sum(s.get(k, 0) for s in timed) / n, 1) for k in retries}}
               if retries else {})}


def parse_trainer_args(pairs: list[str]) -> dict:
    """GRPOConfig overrides from KEY=VALUE, each value read as JSON (1, 0.5, true, null) or else kept as text."""
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise SystemExit(f"--trainer-arg {pair!r}: expected KEY=VALUE, e.g. "
                             "vllm_importance_sampling_correction=false")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


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


def save_adapter(a, q: config.Params, trainer, policy) -> dict:
    """The last config's adapter, its LoRA B perturbed, with the record stages/merge.py builds the card from."""
    n = perturb_lora_b(trainer.model, a.noise_std, a.noise_seed)
    trainer.model.save_pretrained(a.save_adapter)
    policy.tokenizer.save_pretrained(a.save_adapter)
    Path(a.save_adapter, "training_run.json").write_text(json.dumps({
        "base_model": q.model.name, "backend": q.model.backend, "params": config.as_dict(q),
        "effective_grpo_config": trainer.args.to_dict(), "versions": modeling.package_versions(),
        "bench": f"{SCENARIO}, LoRA B perturbed (noise std {a.noise_std})"}, indent=1, default=str))
    log(f"adapter saved to {a.save_adapter} after perturbing {n} LoRA B matrices")
    return {"dir": a.save_adapter, "lora_b_perturbed": n, "noise_std": a.noise_std, "noise_seed": a.noise_seed,
            "files": sorted(os.listdir(a.save_adapter)),
            "adapter_config": json.loads(Path(a.save_adapter, "adapter_config.json").read_text())}


def status_of(runs: list[dict], wanted: int) -> str:
    if not any(r["summary"]["timed_steps"] for r in runs):
        return "failed"
    return "complete" if len(runs) == wanted and all(r["status"] == "complete" for r in runs) else "partial"


def parser() -> argparse.ArgumentParser:
    t = common.parser(SCENARIO, __doc__, standin=True)
    t.add_argument("--backend", choices=("unsloth", "transformers"), required=True)
    t.add_argument("--params", default=str(common.ROOT / "params.yaml"), help="the params each config starts from")
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
    t.add_argument("--out", default=None, help="the result's name: <results-dir>/<out>.json")
    t.add_argument("--results-dir", default=str(common.ROOT / "build/bench"))
    t.add_argument("--trainer-arg", action="append", default=[], metavar="KEY=VALUE",
                   help="a GRPOConfig override, e.g. vllm_importance_sampling_correction=false (repeatable)")
    t.add_argument("--profile", action="store_true",
                   help="run one training micro-batch of each config's warm-up step under torch.profiler (its ops "
                        "by GPU time in the result)")
    t.add_argument("--halve-on-oom", action="store_true",
                   help="a config that runs out of memory runs again in micro-batches half as large (same step)")
    return t


def main(argv: list[str] | None = None) -> None:
    argv = common.argv_or_sys(argv)
    a = parser().parse_args(argv)
    p = config.load(a.params)
    p = config.replace(p, model={"name": str(Path(a.model).resolve()), "backend": a.backend,
                                 "load_in_4bit": not a.bf16},
                       generation={"use_vllm": a.vllm, "vllm_mode": "colocate",
                                   **({"vllm_gpu_memory_utilization": a.gpu_memory} if a.gpu_memory else {})})
    engine = "vllm" if a.vllm else "hf"
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
    out_path = results_dir / f"{a.out or f'train_{a.backend}_{engine}'}.json"
    deadline_all = time.time() + a.budget_s
    records = common.load_records(Path(a.data) / "train.jsonl", p.data.system_prompt, "train")
    dataset = Dataset.from_list(records)
    sample = common.prompt_lengths(modeling.load_tokenizer(a.model), [r["prompt"] for r in records[:1000]])
    model_config = json.loads((Path(a.model) / "config.json").read_text())
    runs: list[dict] = []
    extra = {"backend": a.backend, "engine": engine,
             "base_precision": "4-bit" if p.model.load_in_4bit else p.model.dtype,
             "model": a.model, "model_config": {k: model_config.get(k) for k in standin.SHAPE_KEYS},
             "params_base": config.as_dict(p), "trainer_overrides": overrides,
             "train_prompt_tokens_mean": round(sum(sample) / len(sample), 1)}
    current = {}  # the config being trained, for a SIGTERM to record

    def write(status: str | None = None) -> None:
        data = common.result(SCENARIO, argv, vars(a), runs, status or status_of(runs, len(a.configs)), **extra)
        common.write_json(out_path, data)

    def finish(entry: dict, timer, trainer) -> dict:
        steps = timer.steps
        if not timer.lengths and not any(s["completion_tokens"] for s in steps):
            # lengths from TRL's own logs when the wrapper could not see them
            for s, row in zip(steps, trainer.state.log_history):
                if "completions/mean_length" in row:
                    per_step = entry["batch"]["completions_per_step"]
                    s["completion_tokens"] = round(row["completions/mean_length"] * per_step)
        if not entry.get("profile"):
            entry.pop("profile", None)
        entry.update(steps=steps, summary=summarise(steps, a.warmup), micro_batch_seconds=timer.micro,
                     checkpointed_layers=checkpointed_layers(trainer.model),
                     peak_memory_gib=common.peak_memory(),
                     trl_logs=[{k: v for k, v in row.items() if k.startswith(TRL_LOG_KEYS)}
                               for row in trainer.state.log_history])
        if "error" in entry:
            entry["status"] = "failed"
        elif "stopped" in entry or len(steps) < trainer.args.max_steps:
            entry["status"] = "partial"
        else:
            entry["status"] = "complete"
        return entry

    def on_sigterm(signum, frame):  # a timeout: keep what was measured, then go
        if current:
            current["entry"]["stopped"] = f"SIGTERM {time.time() - current['t0']:.0f}s into this config"
            runs.append(finish(current["entry"], current["timer"], current["trainer"]))
        write("partial")
        log(f"SIGTERM: wrote {out_path}")
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(124)

    signal.signal(signal.SIGTERM, on_sigterm)
    policy = None
    if a.vllm and a.backend == "transformers":
        share_vllm_engines()
    sections = {}  # the timer that TRL's timed sections report into
    time_trl_sections(sections)
    fitted = {}  # (checkpointing, trainer overrides, every n layers) -> the largest micro-batch that trained without
    # running out of memory
    for i, name in enumerate(a.configs):
        bc = batch_config(p, name, a.completion)
        spec = CONFIGS[name]
        base = config.replace(p, **spec.get("params", {}))
        setting = (base.model.gradient_checkpointing, json.dumps(spec.get("trainer", {}), sort_keys=True),
                   spec.get("checkpoint_every_n_layers"))
        if a.halve_on_oom:  # start from what fitted before at this setting, not from an OOM already seen
            while setting in fitted and bc["per_device_train_batch_size"] > fitted[setting]:
                bc = halved(bc, p.train.num_generations)
        started_at = bc["per_device_train_batch_size"]
        left = len(a.configs) - i
        if a.reserve_s:  # keep a fixed reserve for each config still to come
            deadline = deadline_all - a.reserve_s * (left - 1)
        else:  # split what is left equally
            deadline = min(deadline_all, time.time() + max(30.0, (deadline_all - time.time()) / left))
        out_of_memory = []  # micro-batch sizes that ran out of memory before this one
        while True:
            q = config.replace(base, train={"per_device_train_batch_size": bc["per_device_train_batch_size"],
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
            timer = make_timer(deadline, spec.get("empty_cache_before_generation", False))
            sections["timer"] = timer
            trainer = training.build_trainer(q, policy, dataset, f"/tmp/bench_{a.backend}_{name}", callbacks=[timer],
                                             generation_kwargs={FORCE_KEY[engine]: bc["completion_tokens"]},
                                             save_strategy="no", **{**spec.get("trainer", {}), **overrides})
            if spec.get("checkpoint_every_n_layers"):
                checkpoint_every_n_layers(trainer.model, spec["checkpoint_every_n_layers"])
            if spec.get("peft_lora_casts"):
                restore_peft_lora_casts(trainer.model)
            load_s = time.perf_counter() - t_load
            wrapped = {m: wrap_timed(trainer, timer, m, k, lengths=(k == "generate_s"))
                       for m, k in (("_generate_single_turn", "generate_s"),
                                    ("_generate_and_score_completions", "generate_and_score_s"))}
            profiled: dict = {}  # the 3rd micro-batch of the warm-up step (the 1st holds the step's generation)
            ga = bc["gradient_accumulation_steps"]
            wrap_micro_batches(trainer, timer, min(3, ga) if a.profile and a.warmup else None, profiled)
            entry = {"name": name, "batch": bc, "load_and_build_s": round(load_s, 1), "wrapped": wrapped,
                     "params": spec.get("params", {}), "trainer_config": spec.get("trainer", {}),
                     "out_of_memory_at_micro_batch": out_of_memory,  # this config's own attempts
                     "started_at_micro_batch": started_at,  # smaller than the config's: an earlier config's OOM
                     "trainer_class": type(trainer).__name__,
                     "checkpoint_every_n_layers": spec.get("checkpoint_every_n_layers"),
                     "empty_cache_before_generation": spec.get("empty_cache_before_generation", False),
                     "profile": profiled,  # filled by the profiled micro-batch, if any
                     "lora_input_casts": "peft" if spec.get("peft_lora_casts") else "skipped under autocast",
                     "effective_args": {k: getattr(trainer.args, k, None) for k in EFFECTIVE_ARGS}}
            log(f"built trainer in {load_s:.1f}s; args {entry['effective_args']}")
            current.update(entry=entry, timer=timer, trainer=trainer, t0=time.time())
            oom = False
            try:
                trainer.train()
            except torch.OutOfMemoryError as err:
                entry["error"] = f"OOM: {err}"[:500]
                log(entry["error"])
                oom = True
            except Exception as err:  # noqa: BLE001  (a lever that breaks is a result too; the next configs still run)
                entry["error"] = f"{type(err).__name__}: {err}"[:500]
                log(f"config {name} failed: {traceback.format_exc()}")
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
            fitted[setting] = bc["per_device_train_batch_size"]
        current.clear()
        sections["timer"] = None
        runs.append(finish(entry, timer, trainer))
        log(f"config {name}: summary {entry['summary']} peak memory {entry['peak_memory_gib']}")
        if a.save_adapter and name == a.configs[-1]:
            extra["adapter"] = save_adapter(a, q, trainer, policy)
        write()  # after every config: a later timeout keeps what was measured
        del trainer, timer
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    if a.backend != "unsloth":
        assert "unsloth" not in sys.modules, "unsloth was imported on the transformers path"
        extra["unsloth_imported"] = False
    write()
    log(f"wrote {out_path}")

