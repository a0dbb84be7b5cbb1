"""Ask the base model and the trained one (base + models/adapter) the same questions, side by side.

    python -m grpo_gsm8k.predict --question "A pen costs $3. How much do 4 pens cost?"
    python -m grpo_gsm8k.predict --file questions.jsonl   # {"question": ..., "answer": optional gold}
    python -m grpo_gsm8k.predict --test 5                  # data/prepared/test.jsonl, with gold and verdict
    ... --temperature 0.8 --seed 1                         # sample instead of greedy decoding
    ... --json                                             # one JSON document on stdout

Run from the project folder (or a `make smoke` workspace) after training: it reads params.yaml (model,
eval.max_new_tokens, eval.batch_size), builds prompts with the training prompt builder, generates like
the evaluate stage (vLLM on a GPU where installed, transformers otherwise) and grades with the
project's one grader. `make predict ARGS='...'` runs it.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from . import config, gsm8k, modeling
from .grading import extract_answer, is_correct, parse_number

ADAPTER = Path("models/adapter")
TEST_FILE = Path("data/prepared/test.jsonl")


def _file_questions(path: Path, system_prompt: str) -> list[dict]:
    """{"question", "answer"?} rows -> items; the answer may be a number or a GSM8K '#### ' solution."""
    if not path.is_file():
        raise gsm8k.DataError(f"--file {path}: file not found")
    rows = gsm8k.read_jsonl(path)
    if not rows:
        raise gsm8k.DataError(f"--file {path}: no questions in it; write one JSON object per line, "
                              'e.g. {"question": "...", "answer": "18"}')
    items = []
    for n, row in enumerate(rows, start=1):
        where = f"--file {path}: row {n}"
        if not isinstance(row, dict) or not isinstance(row.get("question"), str) or not row["question"].strip():
            raise gsm8k.DataError(f'{where}: needs a non-empty text field "question"')
        gold = row.get("answer")
        if gold is not None:
            gold = str(gold)
            gold = gsm8k.gold_answer(gold, where) if "####" in gold else gold.strip()
            if parse_number(gold) is None:
                raise gsm8k.DataError(f'{where}: "answer" {row["answer"]!r} is not a single number; '
                                      "give the final number or leave the field out")
        items.append({"question": row["question"].strip(), "gold": gold,
                      "prompt": gsm8k.build_prompt(row["question"], system_prompt)})
    return items


def _test_questions(n: int) -> list[dict]:
    """The first n prepared test problems, with the prompts the evaluate stage used."""
    if not TEST_FILE.is_file():
        raise gsm8k.DataError(f"--test: {TEST_FILE} not found; run the prepare stage first (`dvc repro prepare`)")
    rows = gsm8k.read_jsonl(TEST_FILE)
    if n > len(rows):
        raise gsm8k.DataError(f"--test {n}: {TEST_FILE} has only {len(rows)} problems; ask for at most {len(rows)}")
    return [{"question": r["question"], "gold": r["answer"], "prompt": r["prompt"]} for r in rows[:n]]


def questions(args: argparse.Namespace, p: config.Params) -> list[dict]:
    """The items to answer ({question, gold or None, prompt}), checked before any model loads."""
    if not (ADAPTER / "adapter_config.json").is_file():
        raise config.UserError(f"{ADAPTER}: no trained adapter yet; train first (`dvc repro train`), "
                               "then rerun from the project folder")
    if args.question is not None:
        if not args.question.strip():
            raise config.UserError("--question is empty; give the question text")
        return [{"question": args.question.strip(), "gold": None,
                 "prompt": gsm8k.build_prompt(args.question, p.data.system_prompt)}]
    if args.file is not None:
        return _file_questions(args.file, p.data.system_prompt)
    return _test_questions(args.test)


def _answer(completion, gold: str | None) -> dict:
    return {"completion": completion.text, "answer": extract_answer(completion.text),
            "correct": None if gold is None else is_correct(completion.text, gold),
            "tokens": completion.tokens, "truncated": completion.truncated}


def predict(p: config.Params, items: list[dict], temperature: float, seed: int) -> list[dict]:
    from .evaluation import generate

    prompts = [item["prompt"] for item in items]
    base, trained = generate(p, [None, str(ADAPTER)], prompts, temperature, seed)
    return [{"question": item["question"], "gold": item["gold"], "base": _answer(b, item["gold"]),
             "trained": _answer(t, item["gold"])} for item, b, t in zip(items, base, trained, strict=True)]


def _verdict(r: dict) -> str:
    answer = r["answer"] if r["answer"] is not None else "none (no complete <answer> block)"
    verdict = "" if r["correct"] is None else "  CORRECT" if r["correct"] else "  WRONG"
    cut = "  (cut at the token limit)" if r["truncated"] else ""
    return f"-> answer: {answer}{verdict}{cut}"


def render(results: list[dict], header: str) -> str:
    """The terminal view: each question, the gold if known, both completions, their answers, verdicts."""
    lines = [header]
    for i, r in enumerate(results, start=1):
        lines += ["", f"=== {i}/{len(results)} " + "=" * 60, r["question"]]
        if r["gold"] is not None:
            lines.append(f"gold: {r['gold']}")
        for label in ("base", "trained"):
            text = r[label]["completion"]
            lines += [f"--- {label} ---", text.strip() or ("(only whitespace)" if text else "(empty)"),
                      _verdict(r[label])]
    graded = [r for r in results if r["gold"] is not None]
    if graded:
        score = {label: sum(r[label]["correct"] for r in graded) for label in ("base", "trained")}
        lines += ["", f"correct (strict grader): base {score['base']}/{len(graded)}, "
                      f"trained {score['trained']}/{len(graded)}"]
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m grpo_gsm8k.predict", description=__doc__.split("\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--question", help="one question")
    source.add_argument("--file", type=Path, help='JSONL, one {"question": ..., "answer": optional gold} a line')
    source.add_argument("--test", type=int, metavar="N", help=f"the first N problems of {TEST_FILE}")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 (default): greedy; > 0: sampling")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    parser.add_argument("--json", action="store_true", help="print one JSON document instead of text")
    args = parser.parse_args(argv)
    if args.test is not None and args.test < 1:
        parser.error(f"--test {args.test}: give a number of problems >= 1")
    if args.temperature < 0:
        parser.error(f"--temperature {args.temperature}: must be >= 0 (0 is greedy)")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    try:
        p = config.load()
        items = questions(args, p)
        modeling.check_vllm(p)
        modeling.check_model(p.model.name)
    except config.UserError as err:
        sys.exit(f"error: {err}")
    results = predict(p, items, args.temperature, args.seed)
    decoding = f"sampling at temperature {args.temperature:g}, seed {args.seed}" if args.temperature else "greedy"
    if args.json:
        print(json.dumps({"model": p.model.name, "adapter": str(ADAPTER), "temperature": args.temperature,
                          "seed": args.seed, "max_new_tokens": p.eval.max_new_tokens, "results": results},
                         indent=2, ensure_ascii=False))
    else:
        print(render(results, f"base: {p.model.name}   trained: {p.model.name} + {ADAPTER}   {decoding}, "
                              f"up to {p.eval.max_new_tokens} new tokens"))


if __name__ == "__main__":
    main()
