"""GRPO reward functions, in TRL's calling convention.

Each takes ``completions`` (conversational: a list of messages per completion, or plain strings)
and the dataset's extra columns as keyword arguments, returns one float per completion, never
raises on odd text and never touches a random number generator. Weights live in params.yaml
(``train.reward_weights``); the function's name is the key there and in TRL's logged metrics.
"""

from __future__ import annotations

import re

from .grading import ANSWER_BLOCK, extract_answer, is_correct, parse_number

TAGS = ("<reasoning>", "</reasoning>", "<answer>", "</answer>")
# The prompted layout, whole: reasoning block, then answer block, then nothing but whitespace.
FORMAT = re.compile(r"\s*<reasoning>(?P<reasoning>.*?)</reasoning>\s*<answer>(?P<answer>.*?)</answer>\s*", re.DOTALL)


def completion_text(completion) -> str:
    """The generated text of one completion, whether conversational or plain."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, list) and completion and isinstance(completion[-1], dict):
        content = completion[-1].get("content")
        return content if isinstance(content, str) else ""
    return ""


def _texts(completions) -> list[str]:
    return [completion_text(c) for c in completions]


def has_format(text: str) -> bool:
    """The exact prompted layout, each tag once: no duplicated, nested or stray tags."""
    return FORMAT.fullmatch(text) is not None and all(text.count(tag) == 1 for tag in TAGS)


def correctness(completions, answer, **kwargs) -> list[float]:
    """1 when the <answer> block equals the gold number (the shared grader): the goal itself."""
    rewards = []
    for text, gold in zip(_texts(completions), answer):
        try:
            rewards.append(1.0 if is_correct(text, str(gold)) else 0.0)
        except ValueError:  # a gold that is not a number: prepare rejects these, never crash mid-run
            rewards.append(0.0)
    return rewards


def format(completions, **kwargs) -> list[float]:  # noqa: A001 - the reward's name in params and logs
    """1 for exactly <reasoning>..</reasoning><answer>..</answer>: makes answers extractable."""
    return [1.0 if has_format(text) else 0.0 for text in _texts(completions)]


def single_number(completions, **kwargs) -> list[float]:
    """1 when the answer block holds one number (negatives, commas, decimals): no hedging."""
    return [1.0 if parse_number(extract_answer(text)) is not None else 0.0 for text in _texts(completions)]


def tag_count(completions, **kwargs) -> list[float]:
    """0.25 per tag used exactly once, minus 0.001 per character after </answer>: dense early signal."""
    rewards = []
    for text in _texts(completions):
        score = sum(0.25 for tag in TAGS if text.count(tag) == 1)
        blocks = list(ANSWER_BLOCK.finditer(text))
        if blocks:  # penalise only what trails the answer, never the whole text
            score -= 0.001 * len(text[blocks[-1].end():].strip())
        rewards.append(max(score, 0.0))
    return rewards


REWARD_FUNCS = {f.__name__: f for f in (correctness, format, single_number, tag_count)}
