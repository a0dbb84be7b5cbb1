"""Stage 3: greedy evaluation on the GSM8K test split with the shared grader.

`evaluate.py --base` scores the untrained base model (its own DVC stage, cached per base model and
eval params); plain `evaluate.py` scores base + adapter and puts both side by side.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from grpo_gsm8k import config, evaluation, modeling
from grpo_gsm8k.outputs import read_json, read_jsonl, write_json, write_jsonl

TEST_FILE = "data/prepared/test.jsonl"
ADAPTER = "models/adapter"


def evaluate(p: config.Params, adapter: str | None) -> tuple[list[dict], dict]:
    records = read_jsonl(TEST_FILE)[: p.eval.max_problems]
    [completions] = evaluation.generate(p, [adapter], [r["prompt"] for r in records])
    rows, metrics = evaluation.score(records, completions)
    metrics |= {"capped_at": p.eval.max_problems, "max_new_tokens": p.eval.max_new_tokens,
                "engine": "vllm" if p.generation.use_vllm else "transformers"}
    return rows, metrics


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--base", action="store_true", help="evaluate the base model without the adapter")
    base = parser.parse_args().base
    try:
        p = config.load()
        modeling.check_vllm(p)
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
