"""The stand-in model: a random-weight model of Qwen2.5-3B-Instruct's exact architecture (its config.json, bf16)
with the real tokenizer files. No weights can be downloaded on the GPU machine; speed and memory are those of
the real model as long as completions are as long, so the speed scenarios force every completion's length.

    python -m bench standin --tokenizer <folder with Qwen2.5's config.json and tokenizer files> --out /tmp/standin

`--tiny` shrinks it to a toy model of the same family and vocabulary: every speed scenario then runs on a CPU
as a dry run.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from bench import common

log = common.logger("bench")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "generation_config.json", "vocab.json", "merges.txt")
TINY_DIMS = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
             "num_key_value_heads": 2}  # same family and vocabulary, toy sizes
# config.json's keys the floors read (shape); a train-speed result records them of its model
SHAPE_KEYS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
              "vocab_size", "head_dim")
# Qwen2.5-3B-Instruct's config.json, the shape behind the floors of results that predate recording it
QWEN25_3B = {"hidden_size": 2048, "intermediate_size": 11008, "num_hidden_layers": 36, "num_attention_heads": 16,
             "num_key_value_heads": 2, "vocab_size": 151936}


def random_weights(raw: dict, out: Path, generation_config) -> int:
    """A model of config ``raw`` (config.json's keys) with seeded random bf16 weights, saved to ``out``;
    returns its parameter count."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    raw = dict(raw)
    raw.pop("layer_types", None)  # sized for the original layer count
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(raw.pop("model_type"), **raw),
                                                 dtype=torch.bfloat16)
    model.generation_config = generation_config
    model.save_pretrained(out)
    return sum(t.numel() for t in model.parameters())


def build(tokenizer: Path, out: Path, tiny: bool = False) -> Path:
    from transformers import GenerationConfig

    start = time.perf_counter()
    raw = json.loads((tokenizer / "config.json").read_text()) | (TINY_DIMS if tiny else {})
    if out.exists():
        shutil.rmtree(out)
    params = random_weights(raw, out, GenerationConfig.from_pretrained(tokenizer))
    for name in TOKENIZER_FILES:
        if (tokenizer / name).is_file():
            shutil.copy(tokenizer / name, out / name)
    log(f"stand-in {out}: {params / 1e9:.3f}B parameters, {raw['num_hidden_layers']} layers, "
        f"built in {time.perf_counter() - start:.1f}s")
    return out


def shape(config: dict) -> dict:
    """What the floors need of a model: its matrices per layer, LM head and KV cache per token."""
    h, i = config["hidden_size"], config["intermediate_size"]
    layers, v = config["num_hidden_layers"], config["vocab_size"]
    heads, kv = config["num_attention_heads"], config["num_key_value_heads"]
    hd = config.get("head_dim") or h // heads
    proj = {"q_proj": (h, heads * hd), "k_proj": (h, kv * hd), "v_proj": (h, kv * hd), "o_proj": (heads * hd, h),
            "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}
    return {"proj": proj, "layers": layers, "linear": layers * sum(a * b for a, b in proj.values()),
            "lm_head": v * h, "kv_bytes_per_token": layers * 2 * kv * hd * 2}


def floor_seconds(shape: dict, lora_r: int, targets: list[str], completions: int, prompt_len: float, length: int,
                  bw: float, flops: float, weight_bits: int, training: bool, recomputed: float = 0.0) -> dict:
    """Lower bounds: each decode step reads every weight once (4-bit linears or 16-bit, 16-bit LM head and
    LoRA) and the KV cache. Training a LoRA costs 2*N FLOPs per token forward and 2*N for the input gradients
    backward (N counts matrix parameters, LM head and LoRA included), 2*N_lora for the LoRA's weight gradients (the
    frozen base needs none), and 2*N more for the decoder layers' forward that gradient checkpointing recomputes, times
    the share of layers it recomputes (`recomputed`: 1 every layer, 0.5 every other one, 0 off)."""
    lora = shape["layers"] * lora_r * sum(sum(shape["proj"][t]) for t in targets) if training else 0
    n_mm = shape["linear"] + shape["lm_head"] + lora
    weight_bytes = shape["linear"] * weight_bits / 8 + shape["lm_head"] * 2 + lora * 2
    gen = 2 * n_mm * completions * prompt_len / flops  # prefill
    for t in range(length):
        kv = completions * (prompt_len + t) * shape["kv_bytes_per_token"]
        gen += max((weight_bytes + kv) / bw, 2 * n_mm * completions / flops)
    per_token = 4 * n_mm + 2 * lora + 2 * recomputed * (shape["linear"] + lora)  # the LM head is not recomputed
    train = per_token * completions * (prompt_len + length) / flops if training else 0.0
    return {"generate_s": gen, "train_s": train, "total_s": gen + train}


def main(argv: list[str] | None = None) -> None:
    ap = common.parser("standin", __doc__)
    ap.add_argument("--tokenizer", required=True, type=Path, help="folder with config.json and the tokenizer files")
    ap.add_argument("--out", default=Path("/tmp/standin"), type=Path)
    ap.add_argument("--tiny", action="store_true")
    a = ap.parse_args(argv)
    build(a.tokenizer, a.out, a.tiny)
