"""Each reward: the known bugs of the public GRPO-GSM8K notebooks, and the score each case gets."""

import random

import pytest

from grpo_gsm8k.rewards import REWARD_FUNCS, correctness, format, single_number, tag_count

GOOD = "<reasoning>\n9 * 2 = 18\n</reasoning>\n<answer>\n18\n</answer>"


def conv(text):
    """A completion as TRL passes conversational ones."""
    return [{"role": "assistant", "content": text}]


def test_trl_calling_convention_and_extra_columns():
    prompts = [[{"role": "user", "content": "q"}]] * 2
    out = correctness(prompts=prompts, completions=[conv(GOOD), conv(GOOD)], answer=["18", "1,080"],
                      completion_ids=[[1], [2]], trainer_state=None)
    assert out == [1.0, 0.0]
    for name, fn in REWARD_FUNCS.items():
        scores = fn(prompts=prompts, completions=[conv(GOOD), "plain string " + GOOD], answer=["18", "18"])
        assert len(scores) == 2 and all(isinstance(s, float) for s in scores), name


@pytest.mark.parametrize("text, gold, score", [
    (GOOD, "18", 1.0),
    (GOOD.replace("18\n</answer>", "1,080\n</answer>"), "1080", 1.0),  # notebook: exact string vs "1,080"
    (GOOD.replace("18\n</answer>", "1080\n</answer>"), "1,080", 1.0),
    ("18", "18", 0.0),  # notebook: no tags returned the whole text, so a bare "18" scored
    (GOOD.replace("18\n</answer>", "17 or 18\n</answer>"), "18", 0.0),
    (GOOD.replace("18\n</answer>", "18.0\n</answer>"), "18", 1.0),
])
def test_correctness(text, gold, score):
    assert correctness([conv(text)], answer=[gold]) == [score]


@pytest.mark.parametrize("text, score", [
    (GOOD, 1.0),  # notebook "soft" regex (re.match without DOTALL) never matched this multi-line format
    (GOOD + "\n", 1.0),  # notebook "strict" regex demanded exactly a newline after </answer>
    ("<reasoning>r</reasoning><answer>18</answer>", 1.0),  # single line is the same layout
    (GOOD + "<|endoftext|>", 0.0),  # trailing text is not the prompted format
    (GOOD + "\n" + GOOD, 0.0),  # duplicated blocks
    ("<reasoning>\n<reasoning>x</reasoning>\n</reasoning>\n<answer>1</answer>", 0.0),  # nested
    ("<reasoning>x<answer>1</answer></reasoning><answer>1</answer>", 0.0),  # answer nested in reasoning
    ("<answer>18</answer>", 0.0),  # no reasoning block
    ("Sure! " + GOOD, 0.0),  # preamble
])
def test_format(text, score):
    assert format([conv(text)]) == [score]


@pytest.mark.parametrize("answer, score", [
    ("18", 1.0), ("-5", 1.0), ("1,000", 1.0), ("5.5", 1.0),  # notebook isdigit() rejected the last three
    ("$18", 1.0), ("five", 0.0), ("5 or 6", 0.0), ("", 0.0),
])
def test_single_number(answer, score):
    assert single_number([conv(f"<answer>{answer}</answer>")]) == [score]


@pytest.mark.parametrize("text, score", [
    (GOOD, 1.0),  # notebook: ending right at </answer> counted the whole text as trailing (~-0.05)
    (GOOD + "\n", 1.0),
    (GOOD + "x" * 100, pytest.approx(0.9)),  # only what trails </answer> is penalised
    ("<answer>18</answer>", 0.5),
    ("nothing", 0.0),
    (GOOD + GOOD, 0.0),  # each tag twice: no credit for spamming tags
    (GOOD + "y" * 5000, 0.0),  # floors at zero
])
def test_tag_count(text, score):
    assert tag_count([conv(text)]) == [score]


@pytest.mark.parametrize("odd", [None, 42, [], [{}], [{"role": "assistant"}], "", "<answer>", "\x00\ud800",
                                 "<answer>" * 1000, "9" * 10000])
def test_rewards_never_crash_on_odd_completions(odd):
    for fn in REWARD_FUNCS.values():
        assert fn([odd], answer=["18"]) in ([0.0], [0.25])


def test_rewards_leave_global_rngs_alone():
    import torch

    random.seed(1)
    torch.manual_seed(1)
    expected = (random.random(), torch.rand(1).item())
    random.seed(1)
    torch.manual_seed(1)
    for fn in REWARD_FUNCS.values():
        fn([conv(GOOD), conv("junk")], answer=["18", "3"])
    assert (random.random(), torch.rand(1).item()) == expected
