"""train.reuse_training_logprobs (issue 27): vLLM's importance-sampling ratio from the training forward's own
log-probs instead of TRL's second forward over each generation batch. On the same batch it must train what TRL
trains (loss, gradients) and log the same sampling/* metrics, and leave TRL's path alone where the log-probs of
the sampling policy differ from the current ones.

vLLM needs CUDA, so a stand-in takes its place in the real trainer (``_generate_single_turn``, the one call TRL
makes to it): in each group one answer in the format with the gold number, one with a wrong number, two of seeded
random tokens (so the project's rewards differ within groups), and as vLLM's log-probs the policy's own plus seeded
noise (vLLM's bf16 mismatch, large enough that the sequence mask drops some completions), one token unscored."""

import copy
from pathlib import Path

import pytest
import torch

from grpo_gsm8k import config, gsm8k, modeling, training

FIXTURES = Path(__file__).parent / "fixtures" / "gsm8k"
SAMPLING_METRICS = ("sampling/sampling_logp_difference/mean", "sampling/sampling_logp_difference/max",
                    "sampling/importance_sampling_ratio/min", "sampling/importance_sampling_ratio/mean",
                    "sampling/importance_sampling_ratio/max")


class StandInVLLM:
    """Completions and their sampling log-probs, the same in every run with the same seed and policy."""

    def __init__(self, trainer, noise: float, rows: list[dict]):
        self.trainer, self.noise, self.rows = trainer, noise, rows
        self.gen = torch.Generator().manual_seed(11)
        self.tok = tok = trainer.processing_class
        special = set(tok.all_special_ids)
        self.allowed = torch.tensor([i for i in range(len(tok)) if i not in special])

    def completion(self, prompt: list[int], kind: int, max_len: int) -> list[int]:
        if kind < 2:
            text = self.tok.decode(prompt)
            gold = next(r["answer"] for r in self.rows if r["question"].strip() in text)
            answer = gold if kind == 0 else gold + "1"  # a wrong number
            ids = self.tok(f"<reasoning>\n1 + 1\n</reasoning>\n<answer>\n{answer}\n</answer>",
                           add_special_tokens=False)["input_ids"]
            return (ids + [self.tok.eos_token_id])[:max_len]
        length = int(torch.randint(max_len // 3, max_len + 1, (1,), generator=self.gen))
        ids = self.allowed[torch.randint(len(self.allowed), (length,), generator=self.gen)].tolist()
        if length < max_len:
            ids[-1] = self.tok.eos_token_id
        return ids

    def __call__(self, prompt_ids, images, multimodal_fields, num_generations, has_tool_images=False):
        max_len = self.trainer.max_completion_length
        completions, logprobs = [], []
        for i, prompt in enumerate(prompt_ids):  # a group's completions are consecutive
            ids = self.completion(prompt, i % self.trainer.num_generations, max_len)
            length = len(ids)
            with torch.no_grad():
                logits = self.trainer.model(input_ids=torch.tensor([prompt + ids])).logits[0, len(prompt) - 1:-1]
            own = torch.log_softmax(logits.float() / self.trainer.temperature, -1).gather(
                -1, torch.tensor(ids).unsqueeze(-1)).squeeze(-1)
            noisy = (own + self.noise * torch.randn(length, generator=self.gen)).tolist()
            completions.append(ids)
            logprobs.append(noisy)
        logprobs[1][2] = None  # vLLM reports None for a token it could not score
        return completions, logprobs


class Record:
    """What one optimizer step did: the policy forwards (with or without grad, rows), the micro-batch losses, the
    generation batch's keys, the gradients before the optimizer step, and the logged metrics."""

    def __init__(self):
        self.forwards, self.losses, self.batch_keys, self.grads = [], [], [], None


def one_step(tiny_model, tiny_params, tmp_path, reuse: bool, noise: float = 0.15, train: dict | None = None,
             model: dict | None = None, **overrides) -> Record:
    from datasets import Dataset
    from transformers import TrainerCallback, set_seed

    raw = copy.deepcopy(tiny_params)
    raw["model"].update(name=str(tiny_model), **(model or {}))
    raw["train"].update({"reuse_training_logprobs": reuse, "max_steps": 1, "gradient_accumulation_steps": 2,
                         **(train or {})})
    p = config.parse(raw)
    rows = gsm8k.validate_rows(gsm8k.read_jsonl(FIXTURES / "train.jsonl"), "train")
    dataset = Dataset.from_list([{"prompt": gsm8k.build_prompt(r["question"], p.data.system_prompt),
                                  "answer": r["answer"]} for r in rows])
    record = Record()

    class Capture(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, **kwargs):
            gen = torch.Generator().manual_seed(5)  # LoRA B starts at zero: make the policy differ from the base
            with torch.no_grad():
                for name, param in model.named_parameters():
                    if "lora_B" in name:
                        param.add_(0.05 * torch.randn(param.shape, generator=gen))

        def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
            record.grads = {n: q.grad.detach().clone() for n, q in model.named_parameters() if q.requires_grad}

    set_seed(p.train.seed)
    out = tmp_path / f"out-{reuse}-{len(list(tmp_path.glob('out-*')))}"
    trainer = training.build_trainer(p, modeling.load_policy(p), dataset, str(out),
                                     callbacks=[Capture()], save_strategy="no", max_grad_norm=1e9,
                                     vllm_importance_sampling_mode=overrides.pop("mode", "sequence_mask"),
                                     **overrides)
    trainer.use_vllm = True  # as with vLLM: the correction on, its log-probs from the stand-in
    trainer._generate_single_turn = StandInVLLM(trainer, noise, rows)

    def wrap(name, note):
        original = getattr(trainer, name)

        def wrapped(*args, **kwargs):
            out = original(*args, **kwargs)
            note(args, out)
            return out

        setattr(trainer, name, wrapped)

    wrap("_get_per_token_logps_and_entropies",
         lambda args, out: record.forwards.append((torch.is_grad_enabled(), len(out[0]))))
    wrap("compute_loss", lambda args, out: record.losses.append(out.item()))
    wrap("_generate_and_score_completions", lambda args, out: record.batch_keys.append(set(out)))
    trainer.train()
    record.source = training.logprob_source(trainer)
    record.logs = next(row for row in trainer.state.log_history if "loss" in row)
    record.args = trainer.args
    return record


@pytest.mark.parametrize("mode", ["sequence_mask", "token_truncate"])
def test_training_logprobs_train_what_trl_trains_without_the_second_forward(tiny_model, tiny_params, tmp_path,
                                                                            mode):
    """One optimizer step of two micro-batches from one generation batch of 16 completions (TRL buffers the
    batch, shuffles it, trains its halves in turn under the same parameters)."""
    trl_path = one_step(tiny_model, tiny_params, tmp_path, reuse=False, mode=mode)
    reused = one_step(tiny_model, tiny_params, tmp_path, reuse=True, mode=mode)

    assert trl_path.args.steps_per_generation == trl_path.args.gradient_accumulation_steps == 2
    # TRL: one no-grad forward over all 16 completions, then one per micro-batch with grad; reused: the latter
    assert trl_path.forwards == [(False, 16), (True, 8), (True, 8)]
    assert reused.forwards == [(True, 8), (True, 8)]
    assert (trl_path.source, reused.source) == ("TRL's scoring forward",
                                                "the training forward (train.reuse_training_logprobs)")
    assert {"old_per_token_logps", "importance_sampling_ratio"} <= trl_path.batch_keys[0]
    assert not {"old_per_token_logps", "importance_sampling_ratio"} & reused.batch_keys[0]

    assert reused.losses == pytest.approx(trl_path.losses, rel=1e-5, abs=1e-7)
    assert any(abs(loss) > 1e-4 for loss in trl_path.losses)  # a loss that trains something
    assert reused.grads.keys() == trl_path.grads.keys()
    total = sum(g.norm() ** 2 for g in trl_path.grads.values()).sqrt()
    assert total > 1e-4
    for name, grad in trl_path.grads.items():
        torch.testing.assert_close(reused.grads[name], grad, rtol=1e-4, atol=1e-6 * total.item(), msg=name)

    for key in SAMPLING_METRICS:
        assert reused.logs[key] == pytest.approx(trl_path.logs[key], rel=1e-5, abs=1e-7), key
    if mode == "sequence_mask":  # the noise is large enough that the mask drops some completions
        assert trl_path.logs["sampling/importance_sampling_ratio/min"] == 0.0
    assert trl_path.logs["sampling/sampling_logp_difference/mean"] > 0.05
    assert reused.logs["loss"] == pytest.approx(trl_path.logs["loss"], rel=1e-5, abs=1e-7)


@pytest.mark.parametrize("overrides", [{"num_iterations": 2}, {"steps_per_generation": 4}],
                         ids=["generation-batch-trained-twice", "generation-batch-spans-two-steps"])
def test_trl_computes_the_old_logprobs_where_the_policy_moves_between_generation_and_loss(
        tiny_model, tiny_params, tmp_path, overrides):
    """Reusing the training forward would take a moved policy's log-probs for the sampling policy's: TRL's path."""
    reused = one_step(tiny_model, tiny_params, tmp_path, reuse=True, **overrides)
    assert not reused.forwards[0][0]  # TRL's scoring forward, no grad, over the whole generation batch
    assert reused.source == "TRL's scoring forward"  # what training_run.json records, not the request
    assert {"old_per_token_logps", "importance_sampling_ratio"} <= reused.batch_keys[0]
    assert all(key in reused.logs for key in SAMPLING_METRICS)


def test_micro_batches_and_checkpointing_change_memory_not_the_update(tiny_model, tiny_params, tmp_path):
    """The GPU default trains its 256 completions a step in micro-batches of 8 without gradient checkpointing
    (issue 27), where issue 26's runs used 32 with it: the same optimizer step. DAPO's loss sums token losses over
    the whole generation batch, the advantages come from that batch, and recomputing activations recomputes the
    same values; here one generation batch of 16 completions as 1 x 16 with checkpointing, 2 x 8 and 4 x 4 without."""
    runs = {split: one_step(tiny_model, tiny_params, tmp_path, reuse=True,
                            train={"per_device_train_batch_size": 16 // split, "gradient_accumulation_steps": split},
                            model={"gradient_checkpointing": split == 1})
            for split in (1, 2, 4)}
    whole = runs[1]
    assert [rows for _, rows in whole.forwards] == [16] and [rows for _, rows in runs[4].forwards] == [4] * 4
    assert whole.args.gradient_checkpointing and not runs[4].args.gradient_checkpointing
    total = sum(g.norm() ** 2 for g in whole.grads.values()).sqrt()
    assert total > 1e-4
    for split in (2, 4):
        assert runs[split].args.generation_batch_size == whole.args.generation_batch_size == 16
        assert sum(runs[split].losses) == pytest.approx(sum(whole.losses), rel=1e-4, abs=1e-6)
        for name, grad in whole.grads.items():
            torch.testing.assert_close(runs[split].grads[name], grad, rtol=1e-4, atol=1e-5 * total.item(), msg=name)
        for key in SAMPLING_METRICS:
            assert runs[split].logs[key] == pytest.approx(whole.logs[key], rel=1e-5, abs=1e-7), key
