"""`python -m grpo_gsm8k.predict` (make predict): bad input fails in one line before any model
loads; with the real tiny model and a real LoRA adapter, the trained column is base + adapter.

The run in the `make smoke` workspace, compared with the evaluate stage's predictions, is in
tests/test_pipeline.py (it needs the pipeline's outputs).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from grpo_gsm8k.grading import extract_answer, is_correct

ROOT = Path(__file__).resolve().parent.parent
QUESTIONS = [  # one with its gold answer, one without
    {"question": "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
                 "How many clips did Natalia sell altogether in April and May?", "answer": "72"},
    {"question": "What is 7 times 6?"},
]


def predict(ws: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "grpo_gsm8k.predict", *args], cwd=ws, capture_output=True,
                          text=True, timeout=300)


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


@pytest.fixture
def ws(tmp_path, tiny_params):
    """The tiny params, a stand-in adapter folder and the prepared test split: enough to get past the
    input checks (no model is ever loaded for bad input)."""
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(tiny_params))
    (tmp_path / "models/adapter").mkdir(parents=True)
    (tmp_path / "models/adapter/adapter_config.json").write_text("{}")
    (tmp_path / "data/prepared").mkdir(parents=True)
    shutil.copy(ROOT / "tests/fixtures/gsm8k/test.jsonl", tmp_path / "data/prepared/test.jsonl")
    return tmp_path


@pytest.mark.parametrize("setup,args,message", [
    (lambda ws: shutil.rmtree(ws / "models"), ["--question", "What is 2 + 2?"],
     "error: models/adapter: no trained adapter yet; train first (`dvc repro train`)"),
    (lambda ws: write_jsonl(ws / "q.jsonl", ["", "  "]), ["--file", "q.jsonl"],
     "error: --file q.jsonl: no questions in it"),
    (lambda ws: write_jsonl(ws / "q.jsonl", [QUESTIONS[0], '{"question": "cut off'] ), ["--file", "q.jsonl"],
     "error: q.jsonl:2: malformed JSON"),
    (lambda ws: write_jsonl(ws / "q.jsonl", [{"text": "What is 2 + 2?"}]), ["--file", "q.jsonl"],
     'error: --file q.jsonl: row 1: needs a non-empty text field "question"'),
    (lambda ws: write_jsonl(ws / "q.jsonl", [{"question": "2 + 2?", "answer": "four"}]), ["--file", "q.jsonl"],
     "error: --file q.jsonl: row 1: \"answer\" 'four' is not a single number"),
    (lambda ws: None, ["--file", "missing.jsonl"], "error: --file missing.jsonl: file not found"),
    (lambda ws: None, ["--test", "17"], "error: --test 17: data/prepared/test.jsonl has only 16 problems"),
    (lambda ws: shutil.rmtree(ws / "data"), ["--test", "2"],
     "error: --test: data/prepared/test.jsonl not found; run the prepare stage first"),
])
def test_bad_input_is_one_clear_line(ws, setup, args, message):
    setup(ws)
    proc = predict(ws, *args)
    assert proc.returncode == 1 and proc.stdout == ""
    assert proc.stderr.startswith(message) and proc.stderr.count("\n") == 1, proc.stderr


@pytest.fixture(scope="module")
def trained_ws(tmp_path_factory, tiny_model):
    """The tiny model and a LoRA adapter with random (non-zero) B matrices, so that the adapter
    visibly changes what the model writes."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    ws = tmp_path_factory.mktemp("predict")
    params = yaml.safe_load((ROOT / "profiles/tiny.yaml").read_text())
    params["model"]["name"] = str(tiny_model)
    (ws / "params.yaml").write_text(yaml.safe_dump(params))
    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model),
                           LoraConfig(r=4, lora_alpha=32, target_modules="all-linear", init_lora_weights=False))
    model.save_pretrained(ws / "models/adapter")
    write_jsonl(ws / "q.jsonl", QUESTIONS)
    return ws


def test_trained_column_is_base_plus_adapter(trained_ws, tiny_model):
    """Greedy answers equal the evaluation code's own generation with PEFT's adapter loading, and
    the gold and verdicts are the grader's."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from grpo_gsm8k import config
    from grpo_gsm8k.evaluation import generate_hf
    from grpo_gsm8k.gsm8k import build_prompt
    from grpo_gsm8k.modeling import load_tokenizer

    proc = predict(trained_ws, "--file", "q.jsonl", "--json")
    assert proc.returncode == 0, proc.stderr
    results = json.loads(proc.stdout)["results"]

    p = config.load(trained_ws / "params.yaml")
    prompts = [build_prompt(q["question"], p.data.system_prompt) for q in QUESTIONS]
    tokenizer = load_tokenizer(str(tiny_model))
    base = AutoModelForCausalLM.from_pretrained(tiny_model)
    expected = {"base": generate_hf(base, tokenizer, prompts, p.eval.batch_size, p.eval.max_new_tokens)}
    with_adapter = PeftModel.from_pretrained(base, trained_ws / "models/adapter")
    expected["trained"] = generate_hf(with_adapter, tokenizer, prompts, p.eval.batch_size, p.eval.max_new_tokens)

    assert [r["question"] for r in results] == [q["question"] for q in QUESTIONS]
    assert [r["gold"] for r in results] == ["72", None]
    for label in ("base", "trained"):
        assert [r[label]["completion"] for r in results] == [c.text for c in expected[label]]
        for r in results:
            assert r[label]["answer"] == extract_answer(r[label]["completion"])
        assert results[0][label]["correct"] == is_correct(results[0][label]["completion"], "72")
        assert results[1][label]["correct"] is None
    assert [r["base"]["completion"] for r in results] != [r["trained"]["completion"] for r in results]


def test_sampling_is_seeded_and_the_text_view_shows_both_completions(trained_ws):
    greedy = json.loads(predict(trained_ws, "--file", "q.jsonl", "--json").stdout)["results"]
    sampled_args = ("--file", "q.jsonl", "--temperature", "1.0", "--seed", "3")
    sampled = json.loads(predict(trained_ws, *sampled_args, "--json").stdout)["results"]
    text = predict(trained_ws, *sampled_args)
    assert text.returncode == 0, text.stderr
    out = text.stdout

    assert [r["trained"]["completion"] for r in sampled] != [r["trained"]["completion"] for r in greedy]
    assert "sampling at temperature 1, seed 3" in out.splitlines()[0]
    blocks = out.split("=== ")[1:]
    assert len(blocks) == 2
    for block, r in zip(blocks, sampled):
        assert r["question"] in block
        assert ("gold: 72" in block) == (r["gold"] == "72")
        base_part, trained_part = block.split("--- base ---")[1].split("--- trained ---")
        for part, label in ((base_part, "base"), (trained_part, "trained")):
            text = r[label]["completion"]
            shown = text.strip().replace("\r", "\n") or ("(only whitespace)" if text else "(empty)")  # \r: text mode
            assert shown in part  # same seed, same samples
            verdict = {True: "CORRECT", False: "WRONG", None: ""}[r[label]["correct"]]
            answer = r[label]["answer"] if r[label]["answer"] is not None else "none"
            assert f"-> answer: {answer}" in part and verdict in part
    assert f"trained {int(sampled[0]['trained']['correct'])}/1" in out.splitlines()[-1]  # only row 1 has gold
