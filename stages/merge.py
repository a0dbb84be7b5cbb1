"""Stage 4: the base model in 16-bit (not the 4-bit training copy) with the adapter merged in,
saved as a folder that AutoModelForCausalLM/AutoTokenizer.from_pretrained load, with the model card."""

from __future__ import annotations

import sys

from grpo_gsm8k import config, modeling
from grpo_gsm8k.model_card import folder_card
from grpo_gsm8k.outputs import atomic_path, read_json

ADAPTER = "models/adapter"
MERGED = "models/merged"


def merge(p: config.Params) -> None:
    model = modeling.load_merged(p.model.name, ADAPTER, p.merge.dtype)
    tokenizer = modeling.load_tokenizer(ADAPTER)
    with atomic_path(MERGED) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        run = read_json(f"{ADAPTER}/training_run.json")
        (tmp / "README.md").write_text(folder_card("merged", MERGED, run, merged_dtype=p.merge.dtype), encoding="utf-8")


def main() -> None:
    try:
        p = config.load()
        modeling.check_model(p.model.name)
    except config.UserError as err:
        sys.exit(f"error: {err}")
    merge(p)
    print(f"merged {p.model.name} + {ADAPTER} -> {MERGED} ({p.merge.dtype})")


if __name__ == "__main__":
    main()
