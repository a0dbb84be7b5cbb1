"""lm-evaluation-harness's GSM8K tasks through the real lm-eval on the tiny model, offline (grpo_gsm8k/harness.py).

The tiny random model cannot do maths: these tests check what is measured and how it is labelled, that
the adapter goes in, and that nothing reaches the network; the numbers themselves come from a GPU run.
"""

from __future__ import annotations

import json
import runpy
import socket
from pathlib import Path

import pytest

from grpo_gsm8k import config, harness, smoke

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "tests" / "fixtures" / "gsm8k"
LABELS = {"gsm8k_5shot_chat": ("gsm8k", 5), "gsm8k_cot_zeroshot_0shot_chat": ("gsm8k_cot_zeroshot", 0)}


@pytest.fixture
def no_network(monkeypatch):
    """Every attempt to open an internet socket, refused and recorded (local Unix sockets pass)."""
    attempts = []
    real_connect = socket.socket.connect

    def connect(self, address):
        if self.family in (socket.AF_INET, socket.AF_INET6):
            attempts.append(address)
            raise OSError(f"network access in a test: {address}")
        return real_connect(self, address)

    monkeypatch.setattr(socket.socket, "connect", connect)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    return attempts


def tiny_adapter(model_dir: Path, out: Path, r: int) -> Path:
    """A LoRA on the tiny model with non-zero B, so base + adapter differs from the base."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    lora = LoraConfig(r=r, lora_alpha=2 * r, target_modules=["q_proj", "v_proj"], init_lora_weights=False,
                      task_type="CAUSAL_LM")
    get_peft_model(model, lora).save_pretrained(out)
    return out


def test_lm_eval_scores_base_and_adapter_offline_with_labels_and_stderr(tiny_model, tiny_params, tmp_path,
                                                                        no_network, monkeypatch):
    raw = smoke.params_with(tiny_params, {"model.name": str(tiny_model)})  # 2 problems, 24 new tokens
    p = config.parse(raw)
    monkeypatch.chdir(tmp_path)  # the stage's relative data folder: GSM8K's own rows, as prepare writes them
    (tmp_path / harness.RAW_DIR).mkdir(parents=True)
    for split in ("train", "test"):
        (tmp_path / harness.RAW_DIR / f"{split}.jsonl").write_text((FIXTURES / f"{split}.jsonl").read_text())
    adapter = tiny_adapter(tiny_model, tmp_path / "adapter", p.lora.r)

    base, base_rows = harness.run(p, None, "base")
    trained, trained_rows = harness.run(p, str(adapter), "trained")
    both = harness.side_by_side(base, trained)

    assert no_network == []
    assert both["version"] == harness._version() and both["backend"] == "transformers"
    assert (both["capped_at"], both["max_new_tokens"]) == (2, 24)
    assert set(both) == {"version", "backend", "capped_at", "max_new_tokens", "base", "trained", "delta", "seconds"}
    assert both["base"] == base["base"]
    for side in ("base", "trained"):
        assert set(both[side]) == set(LABELS)
        assert set(both["seconds"][side]) == {"load", *LABELS}
        for label, (task, shots) in LABELS.items():
            block = both[side][label]
            assert (block["task"], block["num_fewshot"], block["problems"]) == (task, shots, 2)
            assert block["chat_template"] is True and block["fewshot_as_multiturn"] is True
            assert set(block["filters"]) == {"strict-match", "flexible-extract"}
            for score in block["filters"].values():
                assert 0 <= score["exact_match"] <= 1 and score["stderr"] >= 0
    for label in LABELS:
        assert set(both["delta"][label]) == {"strict-match", "flexible-extract"}
        assert both["delta"][label]["strict-match"] == pytest.approx(
            both["trained"][label]["filters"]["strict-match"]["exact_match"]
            - both["base"][label]["filters"]["strict-match"]["exact_match"])

    # each problem's response and verdicts, one row per task and problem: the scores are their means
    questions = [json.loads(line)["question"] for line in (FIXTURES / "test.jsonl").open()][:2]
    for side, rows in (("base", base_rows), ("trained", trained_rows)):
        assert [(r["label"], r["doc_id"]) for r in rows] == [(label, i) for label in LABELS for i in (0, 1)]
        for label in LABELS:
            mine = [r for r in rows if r["label"] == label]
            assert [r["question"] for r in mine] == questions and all(r["response"] for r in mine)
            for name, score in both[side][label]["filters"].items():
                assert sum(r["exact_match"][name] for r in mine) / len(mine) == pytest.approx(score["exact_match"])
                assert all(isinstance(r["extracted"][name], str) for r in mine)
    assert {r["response"] for r in trained_rows} != {r["response"] for r in base_rows}


def test_every_task_params_allow_is_an_lm_eval_gsm8k_task_on_openai_gsm8k(tmp_path):
    """The local rows stand in for exactly the dataset lm-eval's own file names."""
    from lm_eval.tasks._yaml_loader import load_yaml

    files = harness.data_files(FIXTURES)
    harness.task_configs(list(config.LM_EVAL_TASKS), files, tmp_path)
    for task in config.LM_EVAL_TASKS:
        ours = load_yaml(tmp_path / f"{task}.yaml", resolve_func=False)  # lm-eval's file merged in
        original = load_yaml(load_yaml(tmp_path / f"{task}.yaml", recursive=False)["include"], resolve_func=False)
        assert (original["task"], original["dataset_path"], original["dataset_name"]) == (task, "openai/gsm8k", "main")
        assert ours["dataset_path"] == "json" and ours["dataset_kwargs"] == {"data_files": files}
        assert {k: v for k, v in ours.items() if not k.startswith("dataset_")} == {
            k: v for k, v in original.items() if not k.startswith("dataset_")}


def lm_eval_block(strict: float, flexible: float) -> dict:
    return {"gsm8k_5shot_chat": {"task": "gsm8k", "num_fewshot": 5, "chat_template": True, "fewshot_as_multiturn": True,
                                 "problems": 1319, "task_version": 3.0,
                                 "filters": {"strict-match": {"exact_match": strict, "stderr": 0.0131},
                                             "flexible-extract": {"exact_match": flexible, "stderr": 0.0137}}}}


METRICS = {
    "trained": {"problems": 1319, "accuracy": 0.236, "accuracy_lenient": 0.236, "format_adherence": 0.964,
                "capped_at": None, "max_new_tokens": 512},
    "base": {"problems": 1319, "accuracy": 0.044, "accuracy_lenient": 0.18, "format_adherence": 0.038,
             "capped_at": None, "max_new_tokens": 512},
    "delta": {"accuracy": 0.192, "accuracy_lenient": 0.056, "format_adherence": 0.926},
    "lm_eval": {"version": "0.4.13", "backend": "vllm", "capped_at": None, "max_new_tokens": None,
                "base": lm_eval_block(0.3002, 0.3351), "trained": lm_eval_block(0.3101, 0.3412),
                "seconds": {}, "delta": {"gsm8k_5shot_chat": {"strict-match": 0.0099, "flexible-extract": 0.0061}}},
}


def test_model_card_lists_lm_eval_scores_labelled_apart_from_the_projects_own():
    from grpo_gsm8k.model_card import build_card

    card = build_card("adapter", repo_id="someone/x", local_folder="models/adapter", base_model="Qwen/Base",
                      system_prompt="Respond ... <answer>", metrics=METRICS, training_run={})
    results = [(e.metric_type, e.metric_name, e.metric_value) for e in card.data.eval_results]
    assert results[:2] == [("accuracy", "accuracy (GRPO fine-tuned, greedy)", 0.236),
                           ("accuracy", "accuracy of the base model Qwen/Base (greedy)", 0.044)]
    name = "lm-eval 0.4.13 gsm8k, 5-shot, chat template"
    assert results[2:] == [
        ("exact_match", f"{name}, strict-match (GRPO fine-tuned)", 0.3101),
        ("exact_match", f"{name}, flexible-extract (GRPO fine-tuned)", 0.3412),
        ("exact_match", f"{name}, strict-match (base model Qwen/Base)", 0.3002),
        ("exact_match", f"{name}, flexible-extract (base model Qwen/Base)", 0.3351)]
    assert f"| {name}, strict-match | 0.3002 ± 0.0131 | 0.3101 ± 0.0131 |" in card.text
    assert "lm-evaluation-harness's own GSM8K tasks" in card.text
    without = build_card("adapter", repo_id="someone/x", local_folder="models/adapter", base_model="Qwen/Base",
                         system_prompt="Respond ... <answer>", metrics={k: METRICS[k] for k in ("trained", "base")},
                         training_run={})
    assert len(without.data.eval_results) == 2 and "lm-eval" not in without.text  # lm_eval.tasks: [] keeps the card


def test_summary_figure_has_an_lm_eval_panel_labelled_by_task_shots_filter_and_template(tmp_path):
    summary_figure = runpy.run_path(str(ROOT / "stages/report.py"))["summary_figure"]
    fig = summary_figure(tmp_path, METRICS)
    rewards, _, panel = fig.axes
    assert [t.get_text() for t in rewards.texts] == [f"no reward curves in {tmp_path}"]  # none written under it
    assert [t.get_text() for t in panel.get_xticklabels()] == [
        "gsm8k\n5-shot, chat template\nstrict-match", "gsm8k\n5-shot, chat template\nflexible-extract"]
    assert panel.get_title() == "lm-evaluation-harness 0.4.13 (1319 problems)"
    heights = sorted(round(b.get_height(), 4) for b in panel.patches)
    assert heights == [0.3002, 0.3101, 0.3351, 0.3412]
    assert len(summary_figure(tmp_path, {k: METRICS[k] for k in ("trained", "base")}).axes) == 2
