"""The one answer grader: used by the correctness reward (training) and by evaluation.

Rule: the answer is the content of the last complete ``<answer>...</answer>`` block. After
normalising (NFKC, Unicode minus, ``$``, ``%``, thousands separators, trailing period) exactly one
plain decimal number must remain; it is compared numerically with the gold. Anything else (no
block, no number, two numbers, e-notation, a range) is no answer: a grader that guesses rewards
hedging during training and inflates the reported accuracy.
"""

from __future__ import annotations

import re
import unicodedata
from decimal import Decimal, InvalidOperation

ANSWER_BLOCK = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
# A number: optional sign, digits with optional comma groups, optional decimals; or ".5".
_NUMBER = r"[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|[-+]?\.\d+"
NUMBER = re.compile(rf"(?<![\w.])(?<!\d,)(?:{_NUMBER})(?!\d|,\d|\.\d)")
# Things that look like numbers but must fail closed rather than be half-read.
_E_NOTATION = re.compile(r"\d(?:\.\d+)?[eE][-+]?\d")
_RANGE = re.compile(r"\d\s*(?:-|–|—|to)\s*[-+]?\$?\d")
_DIGIT = re.compile(r"\d")
_MINUS_SIGNS = {"\u2212": "-", "\u2012": "-", "\u2013": "-", "\ufe63": "-", "\uff0d": "-"}


def extract_answer(completion: str) -> str | None:
    """Content of the last complete <answer> block, stripped; None when there is none."""
    if not isinstance(completion, str):
        return None
    blocks = ANSWER_BLOCK.findall(completion)
    return blocks[-1].strip() if blocks else None


def _normalise(text: str) -> str:
    text = unicodedata.normalize("NFKC", text)
    for sign, ascii_minus in _MINUS_SIGNS.items():
        text = text.replace(sign, "-")
    text = text.replace("$", "").replace("%", "").strip()
    return text.rstrip(".").strip()


def parse_number(text: str | None) -> Decimal | None:
    """The single number in ``text`` as a Decimal, or None if there is not exactly one."""
    if text is None:
        return None
    text = _normalise(text)
    if _E_NOTATION.search(text) or _RANGE.search(text):
        return None
    numbers = NUMBER.findall(text)
    # Digits that the number pattern did not claim (e.g. "1,00", "3/4") make it ambiguous.
    if len(numbers) != 1 or len(_DIGIT.findall(text)) != len(_DIGIT.findall(numbers[0])):
        return None
    try:
        return Decimal(numbers[0].replace(",", ""))
    except InvalidOperation:
        return None


def parse_gold(gold: str) -> Decimal:
    """GSM8K's final answer text (after '#### ') as a number; raises ValueError otherwise."""
    value = parse_number(gold)
    if value is None:
        raise ValueError(f"gold answer {gold!r} is not a single number")
    return value


def is_correct(completion: str, gold: str) -> bool:
    predicted = parse_number(extract_answer(completion))
    return predicted is not None and predicted == parse_gold(gold)


def last_number(completion: str) -> Decimal | None:
    """Lenient reading for untrained models that ignore the format: the last number anywhere."""
    if not isinstance(completion, str):
        return None
    numbers = NUMBER.findall(_normalise(completion.replace("$", "")))
    return Decimal(numbers[-1].replace(",", "")) if numbers else None


def is_correct_lenient(completion: str, gold: str) -> bool:
    predicted = last_number(completion)
    return predicted is not None and predicted == parse_gold(gold)
