"""A tiny random-weight Qwen2-architecture model with its own small tokenizer, built offline.

It stands in for Qwen2.5 wherever no weights can be downloaded: tests, `make smoke`. The
tokenizer is a byte-level BPE trained on the given texts with Qwen's chat special tokens and a
ChatML template, so prompts go through the same chat-template path as the real model.
"""

from __future__ import annotations

from pathlib import Path

from .rewards import TAGS

CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
FORMAT_WORDS = ["Respond in the following format:"]


def build_tokenizer(texts: list[str], out_dir: str | Path, vocab_size: int = 512):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(list(texts) + FORMAT_WORDS * 50, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                        chat_template=CHAT_TEMPLATE, padding_side="left")
    # One token per format tag: a random model then emits tags now and then, so the format rewards
    # vary within a group and even the tiny profile's GRPO steps have non-zero advantages.
    tokenizer.add_tokens(list(TAGS))
    tokenizer.save_pretrained(out_dir)
    return tokenizer


def build_model(tokenizer, out_dir: str | Path, seed: int = 0, hidden_size: int = 64, layers: int = 2):
    import torch
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    config = Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
        num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
        tie_word_embeddings=True, bos_token_id=None, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = Qwen2ForCausalLM(config)
    model.generation_config = GenerationConfig(eos_token_id=tokenizer.eos_token_id,
                                               pad_token_id=tokenizer.pad_token_id)
    model.save_pretrained(out_dir)
    return model


def build_tiny(texts: list[str], out_dir: str | Path, seed: int = 0) -> Path:
    """Tokenizer and model in one folder that AutoModelForCausalLM/AutoTokenizer load."""
    out_dir = Path(out_dir)
    tokenizer = build_tokenizer(texts, out_dir)
    build_model(tokenizer, out_dir, seed=seed)
    return out_dir
