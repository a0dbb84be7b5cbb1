"""Stage 2: GRPO with a (Q)LoRA adapter on the prepared GSM8K prompts, resuming after a crash.

Reads top to bottom: params, seed, data, model, rewards, trainer, train, save (adapter, run record and
the model card, in place of PEFT's template).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from grpo_gsm8k import config, modeling

TRAIN_FILE = Path("data/prepared/train.jsonl")
TEST_FILE = Path("data/prepared/test.jsonl")  # its first eval.during_training_problems: the held-out curve
CHECKPOINTS = Path("checkpoints")
ADAPTER = Path("models/adapter")
LIVE = "reports/train"
CURVE = Path("reports/train/eval_curve.tsv")
SUMMARY = "reports/train/summary.json"  # the train stage's DVC metrics: what a user compares between runs
OOM_ADVICE = ("CUDA ran out of memory. Set model.gradient_checkpointing: true (activations recomputed: less memory, "
              "slower steps), or lower train.per_device_train_batch_size (keep it a multiple of "
              "train.num_generations) and raise train.gradient_accumulation_steps to keep the batch, or lower "
              "train.max_completion_length or generation.vllm_gpu_memory_utilization; then rerun to resume.")


def train(p: config.Params, fresh: bool = False) -> dict:
    modeling.check_backend(p)
    modeling.check_tracker(p)
    modeling.import_backend(p)  # unsloth must patch TRL before TRL is imported
    import torch
    from accelerate import PartialState
    from datasets import Dataset
    from transformers import set_seed

    from grpo_gsm8k import training
    from grpo_gsm8k.model_card import folder_card
    from grpo_gsm8k.outputs import atomic_path, read_jsonl, write_json

    training.require_git_commit()
    modeling.check_model(p.model.name)
    set_seed(p.train.seed)
    dataset = Dataset.from_list(read_jsonl(TRAIN_FILE))
    training.check_enough_rows(len(dataset), training.grpo_args(p, str(CHECKPOINTS), modeling.cuda_available()))
    identity = training.run_identity(p, TRAIN_FILE)
    # Under `accelerate launch`, join the process group now (the trainer would later), so that the ranks
    # agree on the checkpoints before rank 0 deletes any.
    PartialState()
    run_id = identity["run_hash"]
    checkpoint = training.resume_checkpoint(CHECKPOINTS, identity, training.fresh_requested(fresh))
    print(f"run {run_id}: " + (f"resuming from {checkpoint}" if checkpoint else "starting fresh"), flush=True)

    policy = modeling.load_policy(p)
    curve = training.HeldOutCurve(p, read_jsonl(TEST_FILE)[: p.eval.during_training_problems], CURVE,
                                  resume=checkpoint is not None)
    trainer = training.build_trainer(p, policy, dataset, str(CHECKPOINTS), callbacks=[
        training.CheckpointMarker(identity),
        training.MetricsLogger(LIVE, resume=checkpoint is not None),
        training.Guards(list(p.train.reward_weights)),
        curve,
    ])
    curve.bind(trainer)
    try:
        result = trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
        training.require_all_steps(trainer.state.global_step, p.train.max_steps)
    except torch.OutOfMemoryError as err:
        raise SystemExit(f"error: {OOM_ADVICE}") from err
    except training.TrainingStopped as err:
        raise SystemExit(f"error: {err}") from err
    except KeyboardInterrupt:
        newest = training.complete_checkpoints(CHECKPOINTS)
        kept = f"newest checkpoint: step {newest[-1][0]}" if newest else "no checkpoint yet"
        print(f"\nstopped at step {trainer.state.global_step} ({kept}); rerun to resume", file=sys.stderr, flush=True)
        raise SystemExit(130) from None

    if trainer.is_world_process_zero():
        with atomic_path(ADAPTER) as tmp:
            trainer.model.save_pretrained(tmp)
            policy.tokenizer.save_pretrained(tmp)
            run = {
                "run_hash": run_id,
                "base_model": p.model.name,
                "backend": p.model.backend,
                "resumed_from": str(checkpoint) if checkpoint else None,
                "world_size": trainer.args.world_size,
                "base_weights": base_weights(trainer.model),
                "params": config.as_dict(p),
                "effective_grpo_config": trainer.args.to_dict(),  # after TRL's and Unsloth's own overrides
                "effective_lora_config": trainer.model.peft_config["default"].to_dict(),
                "importance_sampling_logprobs": training.logprob_source(trainer),
                "versions": modeling.package_versions(),
            }
            write_json(tmp / "training_run.json", run)
            # The card's wording (model_card.py) is deliberately no DVC dependency of train or merge: a new
            # wording must not retrain; push, which depends on it, always publishes the current card.
            (tmp / "README.md").write_text(folder_card("adapter", str(ADAPTER), run), encoding="utf-8")
        training.mark_finished(CHECKPOINTS, run_id, trainer.state.global_step)
        write_json(SUMMARY, {"train_minutes": round(result.metrics["train_runtime"] / 60, 2),
                             "optimizer_steps": trainer.state.global_step})
    return {"global_step": trainer.state.global_step, **{k: v for k, v in result.metrics.items()}}


def base_weights(model) -> dict:
    """How the trained base was held: 4-bit or not, and its dtype (on CPU float32 whatever the params say)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    quantizer = getattr(base, "hf_quantizer", None)
    return {"load_in_4bit": bool(quantizer and getattr(quantizer.quantization_config, "load_in_4bit", False)),
            "dtype": str(base.dtype).removeprefix("torch.")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--fresh", action="store_true",
                        help="discard the checkpoints of an unfinished run and start over (under dvc: GRPO_FRESH=1)")
    args = parser.parse_args()
    try:
        p = config.load()
        metrics = train(p, fresh=args.fresh)
    except config.UserError as err:
        sys.exit(f"error: {err}")
    except KeyboardInterrupt:  # before training began (loading): nothing to resume from yet
        sys.exit("\nstopped before training began; rerun to start")
    print(f"done: {metrics['global_step']} steps; adapter in {ADAPTER}/, curves in {LIVE}/")


if __name__ == "__main__":
    main()
