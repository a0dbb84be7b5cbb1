"""What the train stage wires together: TRL's GRPOConfig from params, checkpoints that resume
safely, metric logging for DVC plots, and guards that stop a run going bad."""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import time
from pathlib import Path

from transformers import TrainerCallback

from . import checkpoint_integrity
from .config import ConfigError, Params, UserError, as_dict
from .rewards import REWARD_FUNCS

MARKER = "grpo_gsm8k_checkpoint.json"  # written last into a checkpoint folder: it is complete, with these files
UNVERIFIED = "unverified"  # the checkpoints folder's subfolder for checkpoints a resume found damaged
FINISHED = "FINISHED.json"  # written into the checkpoints folder when the run completed
FRESH_ENV = "GRPO_FRESH"  # =1: discard the checkpoints of an unfinished run (one run; see fresh_requested)
# Knobs that do not change what is trained, so a run may resume across them.
# (reuse_training_logprobs: the same objective, its old log-probs computed once, not twice: _reusing_training_logprobs)
_RESUMABLE = {"save_steps", "save_total_limit", "logging_steps", "report_to", "reuse_training_logprobs"}


class TrainingStopped(RuntimeError):
    """Training was stopped on purpose (non-finite loss, useless rewards); the message says why."""


def run_identity(p: Params, train_file: Path) -> dict:
    """What makes two runs the same run: every param that shapes training and the exact training data.
    Checkpoint markers store it, so a refused resume can say what differs."""
    params = as_dict(p)
    relevant = {k: params[k] for k in ("data", "model", "lora", "generation")}
    relevant["train"] = {k: v for k, v in params["train"].items() if k not in _RESUMABLE}
    identity = {"params": relevant, "train_data_sha256": hashlib.sha256(Path(train_file).read_bytes()).hexdigest()}
    return {"run_hash": hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16], **identity}


def grpo_args(p: Params, output_dir: str, cuda: bool, **overrides):
    from trl import GRPOConfig

    t = p.train
    names = [name for name in t.reward_weights]
    bf16 = cuda and p.model.dtype == "bfloat16"
    kwargs = dict(
        output_dir=output_dir,
        seed=t.seed,
        data_seed=t.seed,
        learning_rate=t.learning_rate,
        optim=t.optim if cuda else "adamw_torch",  # bitsandbytes' 8-bit optimisers need CUDA
        lr_scheduler_type=t.lr_scheduler_type,
        warmup_steps=t.warmup_ratio,  # transformers 5 reads a value below 1 as a ratio of max_steps
        weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm,
        adam_beta1=t.adam_beta1,
        adam_beta2=t.adam_beta2,
        max_steps=t.max_steps,
        per_device_train_batch_size=t.per_device_train_batch_size,
        gradient_accumulation_steps=t.gradient_accumulation_steps,
        num_generations=t.num_generations,
        max_completion_length=t.max_completion_length,
        temperature=t.temperature,
        beta=t.beta,
        loss_type=t.loss_type,
        epsilon=t.epsilon,
        epsilon_high=t.epsilon_high,
        scale_rewards=t.scale_rewards,
        mask_truncated_completions=t.mask_truncated_completions,
        reward_weights=[t.reward_weights[n] for n in names],
        logging_steps=t.logging_steps,
        logging_nan_inf_filter=False,  # a NaN must be seen (and stop the run), not filtered out
        save_strategy="steps",
        save_steps=t.save_steps,
        save_total_limit=t.save_total_limit,
        bf16=bf16,
        fp16=cuda and p.model.dtype == "float16",
        use_cpu=not cuda,
        gradient_checkpointing=p.model.gradient_checkpointing and p.model.backend != "unsloth",
        use_vllm=p.generation.use_vllm,
        vllm_mode=p.generation.vllm_mode,
        vllm_gpu_memory_utilization=p.generation.vllm_gpu_memory_utilization,
        vllm_max_model_length=p.model.max_seq_length,  # TRL's default is the model's 32k: KV cache wasted
        # TRL's default, stated because importing Unsloth turns it off: both backends then train the same
        # objective, and both log the trainer-vs-vLLM log-prob gap that shows the weight sync is right
        vllm_importance_sampling_correction=True,
        report_to=t.report_to,  # an extra tracker (checked installed up front); DVCLive logs either way
        disable_tqdm=False,
    )
    kwargs.update(overrides)
    return GRPOConfig(**kwargs)


def reward_funcs(p: Params) -> list:
    return [REWARD_FUNCS[name] for name in p.train.reward_weights]


def build_trainer(p: Params, policy, dataset, output_dir: str, callbacks=(), reward_funcs_override=None,
                  **arg_overrides):
    """GRPOTrainer with the project's rewards, LoRA and config: the one construction every caller uses."""
    from trl import GRPOTrainer

    from . import cpu_logprob
    from .modeling import cuda_available

    cpu_logprob.install_if_needed()
    args = grpo_args(p, output_dir, cuda_available(), model_init_kwargs=policy.model_init_kwargs, **arg_overrides)
    trainer_cls = _resumable(GRPOTrainer)
    if p.train.reuse_training_logprobs and p.model.backend == "transformers":  # Unsloth has its own loss
        trainer_cls = _reusing_training_logprobs(trainer_cls)
    trainer = trainer_cls(
        model=policy.model,
        reward_funcs=reward_funcs_override or reward_funcs(p),
        args=args,
        train_dataset=dataset,
        processing_class=policy.tokenizer,
        peft_config=policy.peft_config,
        quantization_config=policy.quantization_config,
        callbacks=list(callbacks),
    )
    if p.model.backend == "transformers":  # Unsloth runs its own LoRA kernels
        skip_lora_input_casts_under_autocast(trainer.model)
    return trainer


def skip_lora_input_casts_under_autocast(model) -> int:
    """Each LoRA layer's input left as it is while autocast runs, PEFT's cast of it kept everywhere else; returns how
    many layers. PEFT keeps a 16-bit base's LoRA weights in float32 and casts every LoRA layer's input to float32
    before the adapter's matmuls (peft/tuners/lora/layer.py Linear.forward, _cast_input_dtype). Under the trainer's
    bf16 autocast those matmuls cast it straight back, a lossless round trip, so every LoRA layer copied its input
    twice a forward and its gradient twice a backward for the same numbers: a fifth of a training micro-batch's GPU
    time at the defaults on an H100 (BENCHMARKS.md, speed levers). The LoRA weights stay float32 for the optimizer;
    autocast casts them to bf16 for the matmul either way."""
    from types import MethodType

    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
    for layer in layers:  # a bound method: a deepcopy of the model binds it to the copied layer
        layer._cast_input_dtype = MethodType(_cast_input_unless_autocast, layer)
    return len(layers)


def _cast_input_unless_autocast(layer, x, dtype):
    import torch

    if x is not None and torch.is_autocast_enabled(x.device.type):
        return x
    return type(layer)._cast_input_dtype(layer, x, dtype)  # PEFT's own


def _resumable(trainer_cls):
    """``trainer_cls`` (TRL's GRPOTrainer, or Unsloth's patched copy of it) resuming exactly: each pass
    over the data in its own seeded order, and the current save and logging intervals."""

    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    class ResumableGRPOTrainer(trainer_cls):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.add_callback(_CurrentIntervals)
            # one line per logged step in place of the Trainer's dict of every metric (DVCLive keeps them all)
            self.remove_callback(ProgressCallback)
            self.remove_callback(PrinterCallback)
            self.add_callback(StepLine)

        def _get_train_sampler(self, dataset=None):
            return _PassSeededSampler(super()._get_train_sampler(dataset))

        def create_model_card(self, *args, **kwargs):
            """TRL writes its template README.md into checkpoints/ at every save: the project's own cards
            are in models/ (model_card.py)."""

        def _save_checkpoint(self, model, trial):
            super()._save_checkpoint(model, trial)
            # PEFT's template card in the checkpoint, removed before on_save (CheckpointMarker) vouches for it
            if self.args.should_save:
                readme = Path(self._get_output_dir(trial=trial)) / f"checkpoint-{self.state.global_step}" / "README.md"
                readme.unlink(missing_ok=True)

    return ResumableGRPOTrainer


def logprob_source(trainer) -> str:
    """Where this trainer takes the policy's log-probs for vLLM's importance-sampling ratio from, as it computes
    them (train.reuse_training_logprobs is a request: Unsloth, no vLLM or a moving policy leave TRL's path)."""
    if not (getattr(trainer, "use_vllm", False) and getattr(trainer, "vllm_importance_sampling_correction", False)):
        return "none: no vLLM importance-sampling correction"
    if getattr(trainer, "_reuses_training_logprobs", lambda: False)():
        return "the training forward (train.reuse_training_logprobs)"
    return "TRL's scoring forward"


def _reusing_training_logprobs(trainer_cls):
    """``trainer_cls`` (TRL's GRPOTrainer) without its second forward pass over each generation batch.

    With vLLM's importance-sampling correction on, TRL 1.15 runs a no-grad forward over every completion
    for the log-probs of the policy that sampled them (trl/trainer/grpo_trainer.py:2568-2581), then the
    vLLM ratio exp(those - vLLM's log-probs) (2586-2633) and its ``sampling/*`` metrics (2786-2821). When
    each generation batch is trained within one optimizer step (num_iterations 1, gradient_accumulation_steps
    a multiple of steps_per_generation: TRL's own test at 2569), the parameters do not change between
    generation and the loss, so those log-probs are the training forward's own, detached: TRL then uses
    ``per_token_logps.detach()`` as the old log-probs already (2991-2992). Here the vLLM ratio and its
    metrics come from that same forward, one micro-batch at a time, and the metrics are logged once per
    generation batch over all of its tokens, as TRL logs them (the approach of trl PR 5413). Under any
    other setting TRL's own path runs unchanged."""

    class TrainingLogprobsGRPOTrainer(trainer_cls):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self._sampling_stats = {}  # mode -> _SamplingStats of the generation batch being trained
            self._ratio_pending = None  # the micro-batch whose policy forward is running

        def _reuses_training_logprobs(self) -> bool:
            args = self.args
            return (self.use_vllm and self.vllm_importance_sampling_correction and self.num_iterations == 1
                    and args.gradient_accumulation_steps % args.steps_per_generation == 0)

        def _generate_and_score_completions(self, inputs):
            if not self._reuses_training_logprobs():
                return super()._generate_and_score_completions(inputs)
            self.vllm_importance_sampling_correction = False  # TRL skips its scoring forward and the ratio
            try:
                output = super()._generate_and_score_completions(inputs)
            finally:
                self.vllm_importance_sampling_correction = True
            mode = "train" if self.model.training else "eval"
            self._sampling_stats[mode] = _SamplingStats(len(output["completion_ids"]))
            return output

        def _compute_loss(self, model, inputs):
            if "importance_sampling_ratio" in inputs or "sampling_per_token_logps" not in inputs:
                return super()._compute_loss(model, inputs)  # TRL's own path made the ratio (or there is none)
            self._ratio_pending = inputs = dict(inputs)  # the ratio goes into this micro-batch's copy
            try:
                return super()._compute_loss(model, inputs)
            finally:
                self._ratio_pending = None

        def _get_per_token_logps_and_entropies(self, *args, **kwargs):
            out = super()._get_per_token_logps_and_entropies(*args, **kwargs)
            inputs, self._ratio_pending = self._ratio_pending, None
            if inputs is not None:  # the policy forward of _compute_loss, before anything reads the ratio
                inputs["importance_sampling_ratio"] = self._vllm_ratio(out[0].detach(), inputs)
            return out

        def _vllm_ratio(self, logps, inputs):
            """TRL's vLLM importance-sampling ratio (grpo_trainer.py:2586-2633), from ``logps``."""
            import torch

            mask = inputs["completion_mask"] if "tool_mask" not in inputs else (
                inputs["completion_mask"] * inputs["tool_mask"])
            sampling = inputs["sampling_per_token_logps"]
            diff = torch.nan_to_num((logps - sampling) * mask, nan=0.0)  # a token vLLM could not score: ratio 1
            mode_name = self.vllm_importance_sampling_mode
            sequence_level = mode_name in ("sequence_mask", "sequence_truncate")
            ratio = torch.exp(diff.sum(dim=-1, keepdim=True) if sequence_level else diff)
            low, high = self.vllm_importance_sampling_clip_min, self.vllm_importance_sampling_clip_max
            if mode_name in ("sequence_truncate", "token_truncate"):
                ratio = torch.clamp(ratio, min=low, max=high)
            elif mode_name in ("sequence_mask", "token_mask"):
                low = -math.inf if low is None else low
                high = math.inf if high is None else high
                ratio = ratio.masked_fill((ratio < low) | (ratio > high), value=0.0)
            else:
                raise ValueError(f"unknown vllm_importance_sampling_mode {mode_name!r}")
            mode = "train" if self.model.training else "eval"
            stats = self._sampling_stats[mode]
            delta = torch.abs(logps - sampling)
            delta = delta[mask.bool() & ~torch.isnan(delta)]
            stats.add(len(logps), delta, ratio.flatten() if sequence_level else ratio[mask.bool()])
            if stats.complete():
                stats.log(self, mode)
            return ratio

    return TrainingLogprobsGRPOTrainer


class _SamplingStats:
    """TRL's ``sampling/*`` metrics of one generation batch (grpo_trainer.py:2786-2821), gathered one
    micro-batch at a time: the logged values are those of the whole batch, as TRL computes them."""

    def __init__(self, rows: int):
        self.rows, self.seen = rows, 0
        self.delta, self.ratio = [], []

    def add(self, rows: int, delta, ratio) -> None:
        self.seen += rows
        self.delta.append(delta)
        self.ratio.append(ratio)

    def complete(self) -> bool:
        return self.seen >= self.rows

    def log(self, trainer, mode: str) -> None:
        import torch
        from trl.trainer.utils import nanmax, nanmin

        device = trainer.accelerator.device
        gather, metrics = trainer.accelerator.gather, trainer._metrics[mode]
        zero = torch.tensor(0.0, device=device)
        delta, ratio = torch.cat(self.delta), torch.cat(self.ratio)
        metrics["sampling/sampling_logp_difference/mean"].append(
            gather(delta.mean() if delta.numel() else zero).mean().item())
        metrics["sampling/sampling_logp_difference/max"].append(
            gather(delta.max() if delta.numel() else zero).max().item())
        metrics["sampling/importance_sampling_ratio/min"].append(
            nanmin(gather(ratio.min() if ratio.numel() else zero)).item())
        metrics["sampling/importance_sampling_ratio/mean"].append(
            gather(ratio.mean() if ratio.numel() else zero).nanmean().item())
        metrics["sampling/importance_sampling_ratio/max"].append(
            nanmax(gather(ratio.max() if ratio.numel() else zero)).item())


class _PassSeededSampler:
    """TRL's RepeatSampler draws the order of every pass from one generator seeded once, so a run resumed
    in its second pass (a new generator) would replay the first pass's order. The Trainer calls
    ``set_epoch`` before each pass: reseeding there from the seed and the pass makes the order depend
    on the pass alone. The first pass keeps TRL's order."""

    def __init__(self, sampler):
        self.sampler = sampler
        if sampler.shuffle:
            self.generator = sampler.generator  # accelerate keeps it in step across processes

    def set_epoch(self, epoch: int) -> None:
        if self.sampler.shuffle:
            self.sampler.generator.manual_seed(self.sampler.seed + epoch)

    def __iter__(self):
        return iter(self.sampler)

    def __len__(self):
        return len(self.sampler)


class StepLine(TrainerCallback):
    """``step 3/8  reward 0.412  correctness 0.125  12.3 s/step``: one line per logged step."""

    def on_train_begin(self, args, state, control, **kwargs):
        self.last = (time.monotonic(), state.global_step)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        now, step = time.monotonic(), state.global_step
        if "reward" in logs:
            seconds = (now - self.last[0]) / max(step - self.last[1], 1)
            self.last = (now, step)
            correct = logs.get("rewards/correctness/mean")
            print(f"step {step}/{state.max_steps}  reward {logs['reward']:.3f}"
                  + (f"  correctness {correct:.3f}" if correct is not None else "")
                  + f"  {seconds:.1f} s/step", flush=True)
        elif "train_runtime" in logs:
            print(f"trained to step {step} in {logs['train_runtime'] / 60:.1f} min", flush=True)
        else:  # another log (an evaluation, say): its numbers, compactly
            print(f"step {step}: " + "  ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                                              for k, v in logs.items()), flush=True)


class _CurrentIntervals(TrainerCallback):
    """A resumed Trainer takes save_steps and logging_steps from the checkpoint's trainer_state.json,
    silently ignoring changed params: apply the current ones."""

    def on_train_begin(self, args, state, control, **kwargs):
        state.compute_steps(args, state.max_steps)


def check_enough_rows(rows: int, args) -> None:
    """TRL's sampler drops a generation batch that is not full, so with fewer training rows than one
    batch's prompts a run would train 0 steps: refuse before the model loads. ``args``: the GRPOConfig."""
    need = args.generation_batch_size // args.num_generations
    if rows < need:
        raise ConfigError(
            f"data.train_limit: {rows} training row(s), fewer than the {need} prompts of one optimizer step "
            f"(train.per_device_train_batch_size {args.per_device_train_batch_size} x gradient_accumulation_steps "
            f"{args.steps_per_generation} x {args.world_size} process(es) / num_generations {args.num_generations}); "
            f"set data.train_limit to at least {need} (or null for all rows), or lower that batch")


def require_all_steps(done: int, max_steps: int) -> None:
    if done < max_steps:
        raise TrainingStopped(f"training ended after {done} of train.max_steps {max_steps} optimizer steps, so no "
                              f"adapter was written; the checkpoints were kept, rerun to resume")


def fresh_requested(flag: bool) -> bool:
    """Discarding an unfinished run is asked for one run at a time (``--fresh``, or GRPO_FRESH=1 since
    `dvc repro` passes no arguments), never by a param that would stay and strike after the next crash."""
    value = os.environ.get(FRESH_ENV, "")
    if value not in ("", "0", "1"):
        raise UserError(f"{FRESH_ENV}={value!r}: set {FRESH_ENV}=1 to discard the checkpoints of an unfinished "
                        f"run, or leave it unset")
    return flag or value == "1"


def complete_checkpoints(ckpt_dir: Path) -> list[tuple[int, Path, dict]]:
    """(step, folder, marker) of every checkpoint whose marker says it is complete, oldest first."""
    return [(step, path, marker) for step, path, marker in _checkpoint_folders(ckpt_dir) if marker is not None]


def _checkpoint_folders(ckpt_dir: Path) -> list[tuple[int, Path, dict | None]]:
    """(step, folder, marker or None) of every checkpoint folder, oldest first; an unreadable marker is none."""
    found = []
    for path in ckpt_dir.glob("checkpoint-*"):
        if path.is_dir() and path.name.split("-")[-1].isdigit():
            try:
                marker = json.loads((path / MARKER).read_text())
            except (OSError, ValueError):  # none, or cut short (killed while writing it, an interrupted copy)
                marker = None
            found.append((int(path.name.split("-")[-1]), path, marker))
    return sorted(found, key=lambda item: item[0])


def resume_checkpoint(ckpt_dir: Path, identity: dict, fresh: bool = False) -> Path | None:
    """The newest complete checkpoint of this run (``run_identity``), or None to start over.

    Checkpoints of a finished run are history, not work to resume: a new run starts over. An
    unfinished run with other params or data is refused unless ``fresh``, since discarding it could
    throw away hours of GPU time. Under several processes (process group initialized) every one decides
    from the same files, then rank 0 alone deletes them.

    A checkpoint is resumed only if its files are still those its marker lists (``_newest_that_verifies``).
    """
    checkpoint, discard, rejected = _resume_decision(ckpt_dir, identity, fresh)
    if discard:
        _on_rank_zero_after_everyone_decided(lambda: shutil.rmtree(ckpt_dir))
    elif rejected:
        _on_rank_zero_after_everyone_decided(lambda: _set_aside(ckpt_dir, rejected))
    return checkpoint


def _resume_decision(ckpt_dir: Path, identity: dict, fresh: bool) -> tuple[Path | None, bool, list[Path]]:
    """(checkpoint to resume or None, whether ckpt_dir is to be deleted, damaged checkpoints newer than the
    one resumed); reads, changes nothing."""
    if not ckpt_dir.exists():
        return None, False, []
    if (ckpt_dir / FINISHED).exists():
        return None, True, []
    complete = complete_checkpoints(ckpt_dir)
    if fresh:
        newest = f"newest complete checkpoint: step {complete[-1][0]}" if complete else "no complete checkpoint"
        if _rank() == 0:
            print(f"warning: starting fresh as asked: deleting {ckpt_dir}/ ({newest})", flush=True)
        return None, True, []
    if complete and not any(info.get("run_hash") == identity["run_hash"] for _, _, info in complete):
        step, _, info = complete[-1]
        raise ConfigError(
            f"{ckpt_dir}/ holds an unfinished run (newest checkpoint: step {step}) that differs from this one in "
            f"{'; '.join(_differences(info, identity))}. Restore them to resume it, or discard it with "
            f"{_fresh_hint()}.")
    if not _checkpoint_folders(ckpt_dir):
        return None, True, []  # no checkpoint folder: nothing worth keeping
    return _newest_that_verifies(ckpt_dir, identity["run_hash"])


def _newest_that_verifies(ckpt_dir: Path, run_hash: str) -> tuple[Path, bool, list[Path]]:
    """The newest checkpoint of run ``run_hash`` whose files are those its marker lists, and the newer
    checkpoint folders passed over (damaged, or without a marker), with one warning line naming them.
    Raises UserError, deleting nothing, when none verifies."""
    rejected = []
    for step, path, marker in reversed(_checkpoint_folders(ckpt_dir)):
        if marker is None:
            rejected.append((path, f"{path / MARKER} is missing or cut short (killed while saving, or copied "
                                   f"without it)"))
        elif marker.get("run_hash") == run_hash:
            if (found := checkpoint_integrity.problem(path, marker)) is None:
                if rejected and _rank() == 0:
                    print(f"warning: {'; '.join(why for _, why in rejected)}; resuming from step {step}, the "
                          f"checkpoint(s) passed over moved to {ckpt_dir / UNVERIFIED}/", flush=True)
                return path, False, [folder for folder, _ in rejected]
            rejected.append((path, found))
    raise UserError(
        f"no checkpoint in {ckpt_dir}/ can be resumed from: {'; '.join(why for _, why in rejected)}. Nothing was "
        f"deleted. Copy the checkpoints in again to resume, or start over with {_fresh_hint()}.")


def _fresh_hint() -> str:
    """How to discard an unfinished run from where this one was started (inside `dvc exp run`, `dvc repro`
    would run the workspace's params, not the experiment's)."""
    if os.environ.get("DVC_EXP_NAME"):
        return f"`{FRESH_ENV}=1 dvc exp run` and this experiment's -S options"
    return f"`{FRESH_ENV}=1 dvc repro train` (or `python stages/train.py --fresh`)"


def _set_aside(ckpt_dir: Path, rejected: list[Path]) -> None:
    """Moves damaged checkpoints out of the Trainer's sight: its save_total_limit rotation keeps the highest
    step (when mtimes are unreliable) and would delete the good checkpoints the resumed run writes while
    keeping a damaged one; a save into a damaged folder would mix its stale files with the new ones."""
    aside = ckpt_dir / UNVERIFIED
    aside.mkdir(exist_ok=True)
    for path in rejected:
        target, n = aside / path.name, 1
        while target.exists():  # damaged at the same step once before
            target, n = aside / f"{path.name}.{n}", n + 1
        path.rename(target)


def _rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _on_rank_zero_after_everyone_decided(action) -> None:
    """``action`` once, by rank 0, after every process got here and before any goes on (on 2 GPUs, both
    ranks deleting the same folder crashed the one that came second)."""
    import torch.distributed as dist

    several = dist.is_available() and dist.is_initialized()
    if several:
        dist.barrier()
    if _rank() == 0:
        action()
    if several:
        dist.barrier()


def _differences(marker: dict, identity: dict) -> list[str]:
    if "params" not in marker:  # a marker written before markers recorded params
        return [f"params or data (run {marker.get('run_hash')}, this one is {identity['run_hash']})"]
    old, new = _flat(marker["params"]), _flat(json.loads(json.dumps(identity["params"])))
    found = [f"{key} ({old.get(key, 'absent')!r} there, {new.get(key, 'absent')!r} now)"
             for key in sorted(old.keys() | new.keys()) if old.get(key) != new.get(key)]
    if marker.get("train_data_sha256") != identity["train_data_sha256"]:
        found.append("the training data (data/prepared/train.jsonl)")
    return found or [f"run hash ({marker.get('run_hash')} there, {identity['run_hash']} now)"]


def _flat(tree: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def mark_finished(ckpt_dir: Path, run_id: str, step: int) -> None:
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    (ckpt_dir / FINISHED).write_text(json.dumps({"run_hash": run_id, "step": step}) + "\n")


class CheckpointMarker(TrainerCallback):
    """Writes the marker last, after the Trainer saved model, optimizer, scheduler and RNG states: the
    size and SHA-256 of each of those files, which a resume checks (``_newest_that_verifies``)."""

    def __init__(self, identity: dict):
        self.identity = identity

    def on_save(self, args, state, control, **kwargs):
        import torch.distributed as dist

        # Every process writes its own RNG state into the checkpoint with no barrier after it (DeepSpeed also
        # its optimizer shard): rank 0 must not vouch for the folder before the others are done.
        if dist.is_available() and dist.is_initialized():
            dist.barrier()
        if state.is_world_process_zero:
            path = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if path.is_dir():
                files = checkpoint_integrity.manifest(path, skip={MARKER, f".{MARKER}.tmp"})
                tmp = path / f".{MARKER}.tmp"  # a kill mid-write leaves no marker rather than half of one
                tmp.write_text(json.dumps({**self.identity, "step": state.global_step, "files": files}))
                os.replace(tmp, path / MARKER)


def require_git_commit() -> None:
    """DVCLive (MetricsLogger) fails in a git repository without a commit ("Empty git repo"), and
    only once training begins, after the model has loaded: say so before anything loads."""
    from scmrepo.exceptions import SCMError
    from scmrepo.git import Git

    try:
        scm = Git()  # the repository around the working directory, as DVCLive finds it
    except SCMError:
        return  # not in a git repository: DVCLive logs without one
    try:
        if scm.no_commits:
            raise UserError(f"the git repository at {scm.root_dir} has no commits, and DVCLive (the training "
                            "curves) cannot log in it: commit once (`git add -A && git commit -m init`), then rerun")
    finally:
        scm.close()


class MetricsLogger(TrainerCallback):
    """Every numeric metric TRL logs goes to a DVCLive folder (``dvc plots show`` renders it).
    Call ``require_git_commit`` before loading anything."""

    def __init__(self, live_dir: str, resume: bool):
        self.live_dir, self.resume, self.live = live_dir, resume, None

    def on_train_begin(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            from dvclive import Live

            if self.resume:  # steps logged after the checkpoint are about to be redone
                _truncate_curves(Path(self.live_dir), state.global_step)
            self.live = Live(self.live_dir, resume=self.resume, save_dvc_exp=False, dvcyaml=False)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.live is None or not logs:
            return
        self.live.step = state.global_step
        for key, value in logs.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                self.live.log_metric(key, value)
        self.live.make_summary()

    def on_train_end(self, args, state, control, **kwargs):
        if self.live is not None:
            self.live.end()


def read_curves(live_dir: Path, names) -> dict[str, list[list]]:
    """The named metrics that MetricsLogger wrote to ``live_dir`` (e.g. ``rewards/format/mean``), each as
    [[step, value], ...]; names never logged are left out."""
    curves = {}
    for name in names:
        tsv = Path(live_dir) / "plots/metrics" / f"{name}.tsv"
        if tsv.is_file():
            header, *rows = (row.split("\t") for row in tsv.read_text().splitlines())
            step, value = header.index("step"), header.index(name.split("/")[-1])
            curves[name] = [[int(row[step]), float(row[value])] for row in rows]
    return curves


def _truncate_curves(live_dir: Path, last_step: int) -> None:
    for tsv in live_dir.glob("plots/metrics/**/*.tsv"):
        header, *rows = tsv.read_text().splitlines()
        step = header.split("\t").index("step")
        kept = [row for row in rows if int(row.split("\t")[step]) <= last_step]
        tsv.write_text("\n".join([header, *kept]) + "\n")


CURVE_COLUMNS = ("step", "minutes", "accuracy", "accuracy_lenient", "format_adherence", "completion_tokens_mean",
                 "problems")


def read_curve(tsv: Path) -> list[dict[str, str]]:
    """HeldOutCurve's TSV as one {column: text} per point."""
    header, *lines = Path(tsv).read_text().splitlines()
    return [dict(zip(header.split("\t"), line.split("\t"), strict=True)) for line in lines]


def curve_engine(p: Params) -> str:
    """The held-out curve's engine: TRL's colocated vLLM engine where the trainer has one in this process (the
    evaluate stage's engine), else HF generate on the policy itself (a `trl vllm-serve` server, Unsloth's
    fast_inference engine with its per-request LoRA, or no vLLM): slower, never a different model."""
    colocated = p.generation.use_vllm and p.generation.vllm_mode == "colocate" and p.model.backend == "transformers"
    return "vllm" if colocated else "transformers"


class HeldOutCurve(TrainerCallback):
    """Greedy accuracy on the first ``eval.during_training_problems`` test problems before training, every
    ``eval.during_training_every`` optimizer steps and at the last one, so a user sees when training stops paying.
    The evaluate stage's prompt, grader and engine: its own generate_vllm on TRL's colocated vLLM engine (synced
    to the current weights first, which TRL would do before the next rollout anyway) or generate_hf on the
    policy itself (``curve_engine``). One TSV row per point: the step, the minutes of training so far (evaluation time excluded)
    and the evaluate stage's metrics. Call ``bind(trainer)`` before training."""

    def __init__(self, p: Params, records: list[dict], path: Path, resume: bool):
        self.p, self.records, self.path, self.resume = p, records, Path(path), resume
        self.trainer, self.train_seconds, self.last_clock = None, 0.0, None

    def bind(self, trainer) -> HeldOutCurve:
        self.trainer = trainer
        return self

    def on_train_begin(self, args, state, control, **kwargs):
        rows = self._rows()
        if self.resume:  # the points after the checkpoint are about to be measured again
            rows = [row for row in rows if int(row["step"]) <= state.global_step]
            self.train_seconds = 60 * float(rows[-1]["minutes"]) if rows else 0.0
        else:
            rows = []
        if state.is_world_process_zero:
            self._write(rows)
            if not rows:
                self._measure(state.global_step)
        self.last_clock = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        step = state.global_step
        if step % self.p.eval.during_training_every == 0 or step == state.max_steps:
            self._measure(step)

    def _measure(self, step: int) -> None:
        if not self.records:  # eval.during_training_problems: 0 (the TSV stays, header only, for DVC)
            return
        from .evaluation import generate_hf, generate_vllm, score

        now = time.perf_counter()
        if self.last_clock is not None:
            self.train_seconds += now - self.last_clock
        trainer, prompts = self.trainer, [r["prompt"] for r in self.records]
        if trainer.is_world_process_zero():
            if curve_engine(self.p) == "vllm":
                if trainer.state.global_step != trainer._last_loaded_step:
                    trainer.vllm_generation.sync_weights()
                    trainer._last_loaded_step = trainer.state.global_step
                completions = generate_vllm(trainer.vllm_generation.llm, prompts, self.p.eval.max_new_tokens)
            else:
                model, tokenizer = trainer.accelerator.unwrap_model(trainer.model), trainer.processing_class
                side, training = tokenizer.padding_side, model.training
                model.eval()
                try:
                    completions = generate_hf(model, tokenizer, prompts, self.p.eval.batch_size,
                                              self.p.eval.max_new_tokens)
                finally:
                    tokenizer.padding_side = side
                    model.train(training)
            _, metrics = score(self.records, completions)
            row = {"step": step, "minutes": round(self.train_seconds / 60, 3),
                   **{key: metrics[key] for key in CURVE_COLUMNS[2:]}}
            self._write([*self._rows(), row])
            print(f"step {step}: held-out accuracy {metrics['accuracy']:.1%} strict, "
                  f"{metrics['accuracy_lenient']:.1%} lenient on {metrics['problems']} test problems", flush=True)
        self.last_clock = time.perf_counter()

    def _rows(self) -> list[dict]:
        return read_curve(self.path) if self.path.is_file() else []

    def _write(self, rows: list[dict]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        lines = ["\t".join(CURVE_COLUMNS), *("\t".join(str(row[c]) for c in CURVE_COLUMNS) for row in rows)]
        self.path.write_text("\n".join(lines) + "\n")


class Guards(TrainerCallback):
    """Stops on a non-finite loss or gradient norm before the next checkpoint, keeping the last good
    one, and reports a reward that scored every completion zero for ``patience`` logged steps."""

    def __init__(self, reward_names: list[str], patience: int = 20):
        self.reward_names, self.patience = reward_names, patience
        self.silent_steps = dict.fromkeys(reward_names, 0)
        self.warned = set()

    def on_log(self, args, state, control, logs=None, **kwargs):
        logs = logs or {}
        for key in ("loss", "grad_norm"):
            if key in logs and not math.isfinite(float(logs[key])):
                raise TrainingStopped(
                    f"non-finite {key} ({logs[key]}) at step {state.global_step}; training stopped and the last "
                    f"good checkpoint in {args.output_dir}/ was kept. Lower train.learning_rate or "
                    f"train.max_grad_norm, or use model.dtype: bfloat16, then rerun to resume."
                )
        for name in self.reward_names:
            mean, std = logs.get(f"rewards/{name}/mean"), logs.get(f"rewards/{name}/std")
            if mean is None:
                continue
            self.silent_steps[name] = self.silent_steps[name] + 1 if mean == 0 and not std else 0
            if self.silent_steps[name] >= self.patience and name not in self.warned:
                self.warned.add(name)
                print(f"WARNING: reward '{name}' gave 0 to every completion for {self.patience} logged steps "
                      f"(up to step {state.global_step}): it is not steering training. Check the prompt format "
                      f"and train.max_completion_length.", flush=True)
