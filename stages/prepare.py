"""Stage 1: GSM8K -> chat prompts with the system prompt and gold answers, plus row/token stats."""

from __future__ import annotations

import statistics
import sys

from grpo_gsm8k import config, gsm8k
from grpo_gsm8k.modeling import check_model, load_tokenizer
from grpo_gsm8k.outputs import write_json, write_jsonl

OUT = "data/prepared"


def prepare(p: config.Params) -> dict:
    d = p.data
    raw = {s: gsm8k.load_split(s, d.source, d.hub_id, d.hub_config, d.local_dir) for s in gsm8k.SPLITS}
    splits = {s: gsm8k.validate_rows(rows, s) for s, rows in raw.items()}
    if d.train_limit:
        splits["train"] = splits["train"][: d.train_limit]
    check_model(p.model.name)
    tokenizer = load_tokenizer(p.model.name)
    stats = {"source": d.hub_id if d.source == "hub" else d.local_dir}
    for split, rows in splits.items():
        records = [{"prompt": gsm8k.build_prompt(r["question"], d.system_prompt), "answer": r["answer"],
                    "question": r["question"]} for r in rows]
        texts = [tokenizer.apply_chat_template(r["prompt"], add_generation_prompt=True, tokenize=False)
                 for r in records]
        lengths = [len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]
        write_jsonl(f"{OUT}/{split}.jsonl", records)
        # GSM8K's own rows, whole (train_limit aside: lm-eval's 5 shots come from all of train), for lm-eval
        write_jsonl(f"{gsm8k.RAW_DIR}/{split}.jsonl",
                    [{"question": r["question"], "answer": r["answer"]} for r in raw[split]])
        dups = gsm8k.duplicate_questions(rows)
        if dups:
            print(f"note: {split} has {dups} duplicate question(s) (kept; GSM8K itself has a few)")
        stats[split] = {"rows": len(records), "duplicate_questions": dups,
                        "prompt_tokens_mean": round(statistics.fmean(lengths), 1),
                        "prompt_tokens_max": max(lengths)}
    return stats


def main() -> None:
    try:
        stats = prepare(config.load())
    except config.UserError as err:
        sys.exit(f"error: {err}")
    write_json(f"{OUT}/stats.json", stats)
    print({s: stats[s]["rows"] for s in gsm8k.SPLITS})


if __name__ == "__main__":
    main()
