"""The shared grader: one table of edge cases, and every gold in the shipped GSM8K rows."""

import json
from decimal import Decimal
from pathlib import Path

import pytest

from grpo_gsm8k.grading import extract_answer, is_correct, is_correct_lenient, parse_gold, parse_number

FIXTURES = Path(__file__).parent / "fixtures" / "gsm8k"


def block(text: str) -> str:
    return f"<reasoning>\nwork\n</reasoning>\n<answer>\n{text}\n</answer>"


@pytest.mark.parametrize(
    "completion, gold, expected",
    [
        (block("1080"), "1,080", True),  # gold keeps GSM8K's thousands separator
        (block("1,080"), "1080", True),
        (block("$1,080.00"), "1,080", True),
        (block("5.00"), "5", True),  # numeric, not string, comparison
        (block("5.5"), "5", False),
        (block("-5"), "-5", True),
        (block("\u22125"), "-5", True),  # Unicode minus sign
        (block("\uff15"), "5", True),  # fullwidth digit, NFKC
        (block("5"), "-5", False),
        (block("18."), "18", True),  # trailing period
        (block("18 dollars"), "18", True),  # words around the one number are fine
        (block("50%"), "50", True),
        (block(".5"), "0.5", True),
        (block("999 or 1000"), "1000", False),  # hedged: two numbers fail closed
        (block("between 5 and 6"), "5", False),
        (block("5-6"), "5", False),  # range
        (block("5 to 6"), "6", False),
        (block("1e3"), "1000", False),  # e-notation fails closed
        (block("3/4"), "0.75", False),  # a fraction is not one plain number
        (block("1,00"), "100", False),  # malformed grouping is not a number
        (block(""), "0", False),  # empty answer
        (block("eighteen"), "18", False),  # no digits
        ("<answer>7</answer> then <answer>8</answer>", "8", True),  # the last block counts
        ("<answer>7</answer> then <answer>8</answer>", "7", False),
        ("<answer>7</answer> then <answer>8", "7", True),  # an unclosed block is not an answer
        ("<answer>8", "8", False),  # unclosed only: no answer at all
        ("The answer is 18", "18", False),  # no tags: never the whole text
        (block("18") + "\nHope this helps! 19", "18", True),  # text after </answer> is ignored
        ("<answer>\n18\n</answer>", "18", True),  # multi-line block
    ],
)
def test_is_correct_table(completion, gold, expected):
    assert is_correct(completion, gold) is expected


def test_extract_answer_is_last_complete_block_or_none():
    assert extract_answer("a <answer> 3 </answer> b <answer>\n4\n</answer>") == "4"
    assert extract_answer("no tags, just 42") is None
    assert extract_answer("<answer>unclosed 42") is None
    assert extract_answer("<answer></answer>") == ""
    assert extract_answer(None) is None


def test_parse_number_values():
    assert parse_number("1,234,567.50") == Decimal("1234567.50")
    assert parse_number("-0.25") == Decimal("-0.25")
    assert parse_number("12 apples and 3 pears") is None
    assert parse_number(None) is None


def test_lenient_reads_last_number_anywhere():
    assert is_correct_lenient("so she makes 9 * 2 = $18 per day", "18")
    assert not is_correct_lenient("so she makes 18, no wait, 20", "18")
    assert not is_correct_lenient("no numbers here", "18")


def test_gold_must_be_a_number():
    with pytest.raises(ValueError, match="not a single number"):
        parse_gold("eighteen")
    with pytest.raises(ValueError):
        is_correct(block("18"), "18 or 19")


def test_every_shipped_gold_parses_and_self_grades():
    rows = [json.loads(line) for split in ("train", "test") for line in (FIXTURES / f"{split}.jsonl").open()]
    assert len(rows) == 64
    golds = [row["answer"].split("#### ")[1].strip() for row in rows]
    assert {"1,080", "-7"} <= set(golds)  # commas and negatives are among them
    for gold in golds:
        value = parse_gold(gold)
        assert is_correct(block(gold.replace(",", "")), gold)
        assert is_correct(block(f"{value + 1}"), gold) is False


SHARED = Path(__file__).resolve().parents[2] / "shared" / "gsm8k"


@pytest.mark.skipif(not SHARED.is_dir(), reason="../shared/gsm8k (the full GSM8K files) is not beside this checkout")
def test_every_gsm8k_gold_parses():
    for split, count in (("train", 7473), ("test", 1319)):
        rows = [json.loads(line) for line in (SHARED / f"{split}.jsonl").open()]
        assert len(rows) == count
        for row in rows:
            parse_gold(row["answer"].split("#### ")[1])
