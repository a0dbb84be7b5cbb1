"""Stage 3: greedy evaluation on the GSM8K test split with the shared grader.

`evaluate.py --base` scores the untrained base model (its own DVC stage, cached per base model and
eval params); plain `evaluate.py` scores base + adapter and puts both side by side.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

from grpo_gsm8k import config, evaluation, modeling
from grpo_gsm8k.outputs import read_json, read_jsonl, write_json, write_jsonl

TEST_FILE = "data/prepared/test.jsonl"
ADAPTER = "models/adapter"


def evaluate(p: config.Params, adapter: str | None) -> tuple[list[dict], dict]:
    records = read_jsonl(TEST_FILE)[: p.eval.max_problems]
    cuda = modeling.cuda_available()
    if cuda and importlib.util.find_spec("vllm"):
        completions = evaluation.generate_vllm(p.model.name, adapter, [r["prompt"] for r in records],
                                               p.eval.max_new_tokens, p.model.max_seq_length,
                                               p.generation.vllm_gpu_memory_utilization, p.lora.r)
    else:
        model = modeling.load_merged(p.model.name, adapter, p.model.dtype if cuda else "float32")
        tokenizer = modeling.load_tokenizer(p.model.name)
        completions = evaluation.generate_hf(model, tokenizer, [r["prompt"] for r in records],
                                             p.eval.batch_size, p.eval.max_new_tokens)
    rows, metrics = evaluation.score(records, completions)
    metrics |= {"capped_at": p.eval.max_problems, "max_new_tokens": p.eval.max_new_tokens}
    return rows, metrics


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--base", action="store_true", help="evaluate the base model without the adapter")
    base = parser.parse_args().base
    try:
        p = config.load()
        modeling.check_model(p.model.name)
    except config.UserError as err:
        sys.exit(f"error: {err}")
    out = Path("reports/eval_base" if base else "reports/eval")
    rows, metrics = evaluate(p, None if base else ADAPTER)
    write_jsonl(out / "predictions.jsonl", rows)
    if not base:
        before = read_json("reports/eval_base/metrics.json")
        metrics = {"trained": metrics, "base": before,
                   "delta": {k: round(metrics[k] - before[k], 4)
                             for k in ("accuracy", "accuracy_lenient", "format_adherence")}}
    write_json(out / "metrics.json", metrics)
    print(metrics)


if __name__ == "__main__":
    main()
