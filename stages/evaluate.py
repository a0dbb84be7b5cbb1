"""Stage 3: greedy evaluation on the GSM8K test split with the shared grader, and lm-eval's GSM8K tasks.

`evaluate.py --base` scores the untrained base model (its own DVC stage, cached per base model and
eval params); plain `evaluate.py` scores base + adapter and puts both side by side. lm-eval's numbers
(grpo_gsm8k/harness.py, lm_eval params) go under one `lm_eval` key: base, trained and their delta.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from grpo_gsm8k import config, evaluation, harness, modeling
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
        if p.lm_eval.tasks:
            harness.data_files()
    except config.UserError as err:
        sys.exit(f"error: {err}")
    out = Path("reports/eval_base" if base else "reports/eval")
    adapter = None if base else ADAPTER
    rows, metrics = evaluate(p, adapter)
    write_jsonl(out / "predictions.jsonl", rows)
    lm_eval, samples = harness.run(p, adapter, "base" if base else "trained") if p.lm_eval.tasks else ({}, [])
    write_jsonl(out / "lm_eval_samples.jsonl", samples)  # a DVC out: empty when lm_eval.tasks is []
    if not base:
        before = read_json("reports/eval_base/metrics.json")
        lm_eval = harness.side_by_side(before.pop("lm_eval", {}), lm_eval)
        metrics = {"trained": metrics, "base": before,
                   "delta": {k: round(metrics[k] - before[k], 4)
                             for k in ("accuracy", "accuracy_lenient", "format_adherence")}}
    if lm_eval:
        metrics["lm_eval"] = lm_eval
    write_json(out / "metrics.json", metrics)
    print(metrics)


if __name__ == "__main__":
    main()
