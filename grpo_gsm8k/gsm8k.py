"""GSM8K as this project uses it: loading, row validation and the chat prompt.

The prompt is built here and only here; training and evaluation both read the prompts that the
prepare stage wrote with it.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from .config import UserError
from .grading import parse_number

SPLITS = ("train", "test")
RAW_DIR = "data/prepared/gsm8k"  # the splits' own {question, answer} rows, as lm-eval reads them (harness.py)


class DataError(UserError):
    """A dataset row or file that cannot be used, named precisely."""


def build_prompt(question: str, system_prompt: str) -> list[dict]:
    return [
        {"role": "system", "content": system_prompt},
        {"role": "user", "content": question.strip()},
    ]


def gold_answer(answer: str, where: str) -> str:
    """The final answer after GSM8K's '#### ' marker, checked to be a single number."""
    parts = answer.split("#### ")
    if len(parts) != 2:
        raise DataError(f"{where}: answer must contain exactly one '#### ' marker, found {len(parts) - 1}")
    gold = parts[1].strip()
    if parse_number(gold) is None:
        raise DataError(f"{where}: final answer {gold!r} after '#### ' is not a number")
    return gold


def validate_rows(rows: Iterable[dict], split: str) -> list[dict]:
    """GSM8K rows -> [{question, answer (gold number text), solution}]; fails on the first bad row."""
    out = []
    for i, row in enumerate(rows):
        where = f"{split} row {i + 1}"
        if not isinstance(row, dict):
            raise DataError(f"{where}: expected a JSON object with 'question' and 'answer'")
        missing = [k for k in ("question", "answer") if not isinstance(row.get(k), str)]
        if missing:
            raise DataError(f"{where}: missing or non-text field(s) {', '.join(missing)}")
        if not row["question"].strip():
            raise DataError(f"{where}: question is empty")
        out.append({"question": row["question"].strip(), "answer": gold_answer(row["answer"], where),
                    "solution": row["answer"]})
    if not out:
        raise DataError(f"{split}: no rows; GSM8K's {split} split must not be empty")
    return out


def read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        raise DataError(f"{path}: file not found (data.local_dir must hold train.jsonl and test.jsonl)")
    rows = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as err:
            raise DataError(f"{path}:{n}: malformed JSON ({err.msg})") from err
    return rows


def load_split(split: str, source: str, hub_id: str, hub_config: str, local_dir: str | None) -> list[dict]:
    """Raw rows of one split: from local JSONL files, or from the Hub with `datasets`."""
    if source == "local":
        return read_jsonl(Path(local_dir) / f"{split}.jsonl")
    from datasets import load_dataset  # heavy import, and only this path needs it

    try:
        return list(load_dataset(hub_id, hub_config, split=split))
    except (OSError, ConnectionError) as err:  # offline, unreachable Hub, unknown dataset id
        raise DataError(
            f"could not load {hub_id} ({hub_config}, {split}) from the Hugging Face Hub: {err}. "
            f"Check the network and data.hub_id, or set data.source: local and data.local_dir to a folder "
            f"with GSM8K's train.jsonl and test.jsonl"
        ) from err


def duplicate_questions(rows: list[dict]) -> int:
    seen, dups = set(), 0
    for row in rows:
        key = " ".join(row["question"].lower().split())
        dups += key in seen
        seen.add(key)
    return dups
