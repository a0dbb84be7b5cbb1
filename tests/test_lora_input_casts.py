"""training.skip_lora_input_casts_under_autocast: under the trainer's bf16 autocast each LoRA layer's input is no
longer cast to its float32 weights' dtype and straight back; the loss and every gradient stay bit for bit what
PEFT's own casts give, with fewer copies, and outside autocast PEFT's cast still applies."""

import pytest
import torch
from peft import LoraConfig, get_peft_model
from peft.tuners.tuners_utils import BaseTunerLayer
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import Qwen2Config, Qwen2ForCausalLM

from grpo_gsm8k import training

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


class CountCopies(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.copies = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.copies += func.__name__.startswith("_to_copy")
        return func(*args, **(kwargs or {}))


def lora_model(skip: bool):
    """A small Qwen2 in bf16 with a LoRA on the 7 projections, its weights float32 as PEFT keeps them."""
    torch.manual_seed(0)
    config = Qwen2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=300, max_position_embeddings=64)
    model = get_peft_model(Qwen2ForCausalLM(config).to(torch.bfloat16),
                           LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS, init_lora_weights=False))
    assert {p.dtype for n, p in model.named_parameters() if "lora_" in n} == {torch.float32}
    if skip:
        assert training.skip_lora_input_casts_under_autocast(model) == 2 * len(TARGETS)
    return model


def loss_and_grads(model, autocast: bool):
    ids = torch.randint(0, 300, (2, 12), generator=torch.Generator().manual_seed(1))
    counter = CountCopies()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast), counter:
        loss = torch.nn.functional.cross_entropy(model(input_ids=ids).logits.float().flatten(0, 1), ids.flatten())
        loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}, counter.copies


def test_under_autocast_the_loss_and_gradients_are_the_same_bits_with_four_copies_fewer_a_layer():
    peft_loss, peft_grads, peft_copies = loss_and_grads(lora_model(skip=False), autocast=True)
    loss, grads, copies = loss_and_grads(lora_model(skip=True), autocast=True)
    assert torch.equal(loss, peft_loss)
    assert grads.keys() == peft_grads.keys() and len(grads) == 4 * len(TARGETS)  # A and B of 14 layers
    for name, grad in grads.items():
        assert grad.dtype == torch.float32 and torch.equal(grad, peft_grads[name]), name
    # 4 copies fewer a LoRA layer (forward: PEFT's cast to float32 and autocast's back to bf16; backward: the two
    # gradient casts), less the backward pair in layer 0's q, k and v, whose input (the frozen embeddings,
    # normalised) needs no gradient
    assert peft_copies - copies == 4 * 2 * len(TARGETS) - 2 * 3


def test_a_copy_of_the_model_skips_them_in_its_own_layers():
    import copy

    model = lora_model(skip=True)
    twin = copy.deepcopy(model)
    layers = [m for m in twin.modules() if isinstance(m, BaseTunerLayer)]
    assert all(vars(layer)["_cast_input_dtype"].__self__ is layer for layer in layers)
    assert torch.equal(loss_and_grads(twin, autocast=True)[0], loss_and_grads(model, autocast=True)[0])


def test_without_autocast_peft_casts_as_before():
    peft_loss, peft_grads, peft_copies = loss_and_grads(lora_model(skip=False), autocast=False)
    loss, grads, copies = loss_and_grads(lora_model(skip=True), autocast=False)
    assert torch.equal(loss, peft_loss) and copies == peft_copies
    assert all(torch.equal(g, peft_grads[n]) for n, g in grads.items())


@pytest.mark.slow
def test_the_trainer_every_caller_builds_skips_them_in_every_lora_layer(tiny_model, tiny_params, tmp_path):
    from datasets import Dataset

    from grpo_gsm8k import config, modeling

    tiny_params["model"]["name"] = str(tiny_model)
    p = config.parse(tiny_params)
    rows = [{"prompt": [{"role": "user", "content": "1+1?"}], "answer": "2"}] * 8
    trainer = training.build_trainer(p, modeling.load_policy(p), Dataset.from_list(rows), str(tmp_path))
    layers = [m for m in trainer.model.modules() if isinstance(m, BaseTunerLayer)]
    assert len(layers) == len(p.lora.target_modules) * trainer.model.config.num_hidden_layers
    assert all("_cast_input_dtype" in vars(layer) for layer in layers)


def test_the_bench_restores_pefts_casts_for_its_comparison():
    """bench/train_speed.py's levers_mb8_lora_casts: the default as it ran before, PEFT's casts back in every layer."""
    from bench import train_speed

    model = lora_model(skip=True)
    assert train_speed.restore_peft_lora_casts(model) == 2 * len(TARGETS)
    assert loss_and_grads(model, autocast=True)[2] == loss_and_grads(lora_model(skip=False), autocast=True)[2]
