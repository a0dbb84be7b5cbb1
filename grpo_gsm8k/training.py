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

from .config import ConfigError, Params, UserError, as_dict
from .rewards import REWARD_FUNCS

MARKER = "grpo_gsm8k_checkpoint.json"  # written last into a checkpoint folder: it is complete
FINISHED = "FINISHED.json"  # written into the checkpoints folder when the run completed
FRESH_ENV = "GRPO_FRESH"  # =1: discard the checkpoints of an unfinished run (one run; see fresh_requested)
# Knobs that do not change what is trained, so a run may resume across them.
_RESUMABLE = {"save_steps", "save_total_limit", "logging_steps", "report_to"}


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
    return _resumable(GRPOTrainer)(
        model=policy.model,
        reward_funcs=reward_funcs_override or reward_funcs(p),
        args=args,
        train_dataset=dataset,
        processing_class=policy.tokenizer,
        peft_config=policy.peft_config,
        quantization_config=policy.quantization_config,
        callbacks=list(callbacks),
    )


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
    found = []
    for path in ckpt_dir.glob("checkpoint-*"):
        marker = path / MARKER
        if marker.is_file():
            found.append((int(path.name.split("-")[-1]), path, json.loads(marker.read_text())))
    return sorted(found, key=lambda item: item[0])


def resume_checkpoint(ckpt_dir: Path, identity: dict, fresh: bool = False) -> Path | None:
    """The newest complete checkpoint of this run (``run_identity``), or None to start over.

    Checkpoints of a finished run are history, not work to resume: a new run starts over. An
    unfinished run with other params or data is refused unless ``fresh``, since discarding it could
    throw away hours of GPU time. Under several processes (process group initialized) every one decides
    from the same files, then rank 0 alone deletes them.
    """
    checkpoint, discard = _resume_decision(ckpt_dir, identity, fresh)
    if discard:
        _on_rank_zero_after_everyone_decided(lambda: shutil.rmtree(ckpt_dir))
    return checkpoint


def _resume_decision(ckpt_dir: Path, identity: dict, fresh: bool) -> tuple[Path | None, bool]:
    """(checkpoint to resume or None, whether ckpt_dir is to be deleted); reads, changes nothing."""
    if not ckpt_dir.exists():
        return None, False
    if (ckpt_dir / FINISHED).exists():
        return None, True
    complete = complete_checkpoints(ckpt_dir)
    if fresh:
        newest = f"newest complete checkpoint: step {complete[-1][0]}" if complete else "no complete checkpoint"
        if _rank() == 0:
            print(f"warning: starting fresh as asked: deleting {ckpt_dir}/ ({newest})", flush=True)
        return None, True
    matching = [path for _, path, info in complete if info.get("run_hash") == identity["run_hash"]]
    if matching:
        return matching[-1], False
    if complete:
        step, _, info = complete[-1]
        raise ConfigError(
            f"{ckpt_dir}/ holds an unfinished run (newest checkpoint: step {step}) that differs from this one in "
            f"{'; '.join(_differences(info, identity))}. Restore them to resume it, or discard it with "
            + (f"`{FRESH_ENV}=1 dvc exp run` and this experiment's -S options" if os.environ.get("DVC_EXP_NAME")
               else f"`{FRESH_ENV}=1 dvc repro train` (or `python stages/train.py --fresh`)") + ".")
    return None, True  # only incomplete checkpoints: nothing worth keeping


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
    """Writes the marker last, after the Trainer saved model, optimizer, scheduler and RNG states."""

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
                (path / MARKER).write_text(json.dumps({**self.identity, "step": state.global_step}))


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
