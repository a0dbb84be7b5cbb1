"""The real `dvc repro` on the tiny profile, in a fresh git + DVC copy of this repository."""

import hashlib
import json
import re
import runpy
import secrets
import shlex
import subprocess
from pathlib import Path

import pytest
import yaml

from grpo_gsm8k import hub, smoke
from grpo_gsm8k.grading import is_correct, parse_gold

pytestmark = pytest.mark.slow
STAGES = {"prepare", "train", "evaluate_base", "evaluate", "merge", "report", "push"}
TOKEN = f"hf_planted{secrets.token_hex(16)}"  # made at run time, so no file holds it unless we leak it


def dvc(ws: Path, *args: str) -> str:
    env = dict(smoke.workspace_env(), HF_TOKEN=TOKEN)
    proc = subprocess.run(["dvc", *args], cwd=ws, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, f"dvc {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}"
    assert TOKEN not in proc.stdout + proc.stderr
    return proc.stdout + proc.stderr


def ran(output: str) -> set[str]:
    return set(re.findall(r"Running stage '([\w-]+)'", output))


def git(ws: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=ws, env=smoke.workspace_env(), check=True,
                          capture_output=True, text=True).stdout


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    ws = smoke.make_workspace(tmp_path_factory.mktemp("pipeline") / "ws")
    out = dvc(ws, "repro")
    assert ran(out) == STAGES
    git(ws, "add", "-A")
    git(ws, "commit", "-qm", "first run")
    return ws


def test_prepare_writes_chat_prompts_and_stats(ws):
    params = yaml.safe_load((ws / "params.yaml").read_text())
    rows = [json.loads(line) for line in (ws / "data/prepared/train.jsonl").open()]
    assert len(rows) == 48
    for row in rows:
        assert [m["role"] for m in row["prompt"]] == ["system", "user"]
        assert row["prompt"][0]["content"] == params["data"]["system_prompt"]
        assert row["prompt"][1]["content"] == row["question"]
        parse_gold(row["answer"])
    assert "#### " not in "".join(r["answer"] for r in rows)
    for split in ("train", "test"):  # GSM8K's own rows, untouched, for lm-eval
        raw = [json.loads(line) for line in (ws / f"data/prepared/gsm8k/{split}.jsonl").open()]
        assert raw == [json.loads(line) for line in (ws / f"tests/fixtures/gsm8k/{split}.jsonl").open()]
    stats = json.loads((ws / "data/prepared/stats.json").read_text())
    assert stats["train"]["rows"] == 48 and stats["test"]["rows"] == 16
    assert 50 < stats["test"]["prompt_tokens_mean"] <= stats["test"]["prompt_tokens_max"]


def test_train_saves_adapter_effective_config_and_curves(ws):
    adapter = ws / "models/adapter"
    assert (adapter / "adapter_model.safetensors").stat().st_size > 0
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["r"] == 8 and set(config["target_modules"]) >= {"q_proj", "down_proj"}
    run = json.loads((adapter / "training_run.json").read_text())
    assert run["effective_grpo_config"]["num_generations"] == 4
    assert run["effective_grpo_config"]["logging_nan_inf_filter"] is False
    assert run["effective_grpo_config"]["optim"] == "adamw_torch"  # the CPU fallback is what is recorded
    assert run["importance_sampling_logprobs"] == "none: no vLLM importance-sampling correction"  # CPU: HF generate
    assert {"torch", "transformers", "trl", "peft"} <= set(run["versions"])
    metrics = json.loads((ws / "reports/train/metrics.json").read_text())
    assert metrics["step"] == 4 and set(metrics["rewards"]) == {"correctness", "format", "single_number", "tag_count"}
    curve = (ws / "reports/train/plots/metrics/reward.tsv").read_text().splitlines()
    assert curve[0].split("\t") == ["step", "reward"] and len(curve) == 5
    finished = json.loads((ws / "checkpoints/FINISHED.json").read_text())
    assert finished["step"] == 4 and finished["run_hash"] == run["run_hash"]


def test_evaluate_scores_base_and_trained_side_by_side(ws):
    metrics = json.loads((ws / "reports/eval/metrics.json").read_text())
    base = json.loads((ws / "reports/eval_base/metrics.json").read_text())
    base_lm_eval = base.pop("lm_eval")
    assert metrics["base"] == base
    # lm-eval's tasks (tiny profile: 2 problems, 24 new tokens) under one key, base beside trained
    lm_eval = metrics["lm_eval"]
    assert lm_eval["base"] == base_lm_eval["base"] and set(lm_eval["seconds"]) == {"base", "trained"}
    assert (lm_eval["backend"], lm_eval["capped_at"], lm_eval["max_new_tokens"]) == ("transformers", 2, 24)
    for side in ("base", "trained"):
        assert set(lm_eval[side]) == set(lm_eval["delta"]) == {"gsm8k_5shot_chat", "gsm8k_cot_zeroshot_0shot_chat"}
        for block in lm_eval[side].values():
            assert block["problems"] == 2 and set(block["filters"]) == {"strict-match", "flexible-extract"}
    for folder in ("eval_base", "eval"):  # lm-eval's response and verdicts per task and problem, beside its scores
        samples = [json.loads(line) for line in (ws / f"reports/{folder}/lm_eval_samples.jsonl").open()]
        assert sorted((r["label"], r["doc_id"]) for r in samples) == sorted(
            (label, i) for label in lm_eval["delta"] for i in (0, 1))
    for m in (base, metrics["trained"]):
        assert m["problems"] == 8 and m["capped_at"] == 8 and m["max_new_tokens"] == 24
        assert 0 <= m["accuracy"] <= 1 and 0 <= m["accuracy_lenient"] <= 1 and 0 <= m["format_adherence"] <= 1
        assert 0 < m["completion_tokens_mean"] <= 24
    assert metrics["delta"]["accuracy"] == pytest.approx(metrics["trained"]["accuracy"] - base["accuracy"])
    rows = [json.loads(line) for line in (ws / "reports/eval/predictions.jsonl").open()]
    assert len(rows) == 8
    assert {"prompt", "completion", "extracted", "gold", "correct"} <= set(rows[0])


def test_merged_model_loads_and_equals_base_plus_adapter(ws):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    merged = AutoModelForCausalLM.from_pretrained(ws / "models/merged")
    tokenizer = AutoTokenizer.from_pretrained(ws / "models/merged")
    base = AutoModelForCausalLM.from_pretrained(ws / "tiny-model", dtype=torch.float32)
    with_adapter = PeftModel.from_pretrained(base, ws / "models/adapter")
    ids = tokenizer("What is 2 + 2?", return_tensors="pt").input_ids
    with torch.no_grad():
        expected = with_adapter(ids).logits
        got = merged(ids).logits.float()
    assert torch.allclose(got, expected, atol=2e-2)  # merge.dtype is float32 in the tiny profile


def test_report_and_push_receipt(ws):
    png = (ws / "reports/summary.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    report = runpy.run_path(str(ws / "stages/report.py"))  # the figure the stage drew, from this run's curves
    rewards = report["summary_figure"](ws / report["CURVES"], json.loads((ws / report["EVAL"]).read_text())).axes[0]
    names = sorted(p.parent.name for p in (ws / report["CURVES"] / "rewards").glob("*/mean.tsv"))
    assert [line.get_label() for line in rewards.lines] == [
        "total (weighted sum)", *(f"{n} (unweighted)" for n in names)] and len(names) >= 2 and not rewards.texts
    receipt = json.loads((ws / "reports/push.json").read_text())
    assert receipt["uploaded"] is False  # no hub.repo_id in the tiny profile


def test_model_cards_on_disk_are_what_push_would_upload(ws):
    """The train and merge stages put the project's card (no results yet) in the model folders; the
    dry-run push leaves each repo's final card, with the model-index, where its receipt says."""
    from huggingface_hub import ModelCard

    metrics = json.loads((ws / "reports/eval/metrics.json").read_text())
    receipt = json.loads((ws / "reports/push.json").read_text())
    for kind, library in (("adapter", "peft"), ("merged", "transformers")):
        folder_card = ModelCard.load(ws / f"models/{kind}/README.md")
        assert (folder_card.data.base_model, folder_card.data.library_name) == ("tiny-model", library)
        assert not folder_card.data.eval_results and "More Information Needed" not in folder_card.text
        assert f'from_pretrained("models/{kind}"' in folder_card.text

        entry = receipt["repos"][kind]
        assert entry["files"]["README.md"] == f"reports/hub/{kind}/README.md"
        assert set(entry["files"]) == {p.name for p in (ws / f"models/{kind}").iterdir()} | {
            "assets/summary.png"} | ({"training_run.json"} if kind == "merged" else set())
        card = ModelCard.load(ws / entry["files"]["README.md"])
        assert (card.data.base_model, card.data.library_name) == ("tiny-model", library)
        lm_eval = [(side, label, f) for side in ("trained", "base") for label, block in metrics["lm_eval"][side].items()
                   for f in block["filters"]]
        assert [e.metric_value for e in card.data.eval_results] == [
            metrics["trained"]["accuracy"], metrics["base"]["accuracy"]] + [
            metrics["lm_eval"][side][label]["filters"][f]["exact_match"] for side, label, f in lm_eval]
        on_disk = {rel: hashlib.sha256((ws / src).read_bytes()).hexdigest() for rel, src in entry["files"].items()}
        assert hub.content_hash(on_disk) == entry["content_hash"]  # these bytes are what would be uploaded


def predict(ws: Path, *args: str) -> subprocess.CompletedProcess:
    # --no-print-directory: under CI's own `make test`, a nested make would add "Entering directory" lines
    proc = subprocess.run(["make", "--no-print-directory", "predict", f"ARGS={shlex.join(args)}"], cwd=ws,
                          env=smoke.workspace_env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return proc


def test_predict_shows_the_evaluated_models_side_by_side(ws):
    """`make predict` in the smoke workspace: on the evaluated problems it writes exactly the evaluate
    stages' greedy completions (base: reports/eval_base, trained: reports/eval), gold and verdicts."""
    out = predict(ws, "--test", "8", "--json").stdout
    results = json.loads(out[out.index("{"):])["results"]  # after make's echo of the command
    for label, folder in (("base", "eval_base"), ("trained", "eval")):
        rows = [json.loads(line) for line in (ws / f"reports/{folder}/predictions.jsonl").open()]
        assert [r["question"] for r in results] == [row["question"] for row in rows]
        assert [r["gold"] for r in results] == [row["gold"] for row in rows]
        assert [r[label]["completion"] for r in results] == [row["completion"] for row in rows]
        assert [r[label]["correct"] for r in results] == [row["correct"] for row in rows] == [
            is_correct(r[label]["completion"], r["gold"]) for r in results]

    question = "A pen costs $3. How much do 4 pens cost?"
    text = predict(ws, "--question", question).stdout
    assert question in text and "--- base ---" in text and "--- trained ---" in text
    assert "gold:" not in text and text.count("-> answer:") == 2


def test_planted_token_is_in_no_output_log_lock_or_params(ws):
    leaks = [str(path.relative_to(ws)) for path in ws.rglob("*")
             if path.is_file() and TOKEN.encode() in path.read_bytes()]
    assert leaks == []
    for ignore_file in (".gitignore", ".dockerignore"):
        assert ".env" in (ws / ignore_file).read_text().split()


def test_second_repro_reruns_nothing(ws):
    out = dvc(ws, "repro")
    assert ran(out) == set()
    assert "Data and pipelines are up to date" in dvc(ws, "status")


def test_knobs_that_do_not_change_training_rerun_nothing(ws):
    params = yaml.safe_load((ws / "params.yaml").read_text())
    params["train"] |= {"save_steps": 3, "save_total_limit": 5, "logging_steps": 2}
    (ws / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    try:
        assert "Data and pipelines are up to date" in dvc(ws, "status")
    finally:
        git(ws, "checkout", "--", "params.yaml")


def test_editing_the_local_data_in_place_reruns_prepare(ws):
    data = ws / "tests/fixtures/gsm8k/test.jsonl"
    data.write_text("".join(data.read_text().splitlines(keepends=True)[:-1]))  # one row fewer, same file
    try:
        status = json.loads(dvc(ws, "status", "--json"))
    finally:
        git(ws, "checkout", "--", str(data.relative_to(ws)))
    assert status == {"prepare": [{"changed deps": {"tests/fixtures/gsm8k/test.jsonl": "modified"}}]}


def test_unfinished_run_with_other_params_is_refused_then_discarded_when_asked(ws):
    (ws / "checkpoints/FINISHED.json").unlink()  # as if killed after its last checkpoint
    params = yaml.safe_load((ws / "params.yaml").read_text())
    params["train"]["learning_rate"] = 0.002
    (ws / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    try:
        refused = subprocess.run(["dvc", "repro", "train"], cwd=ws, env=smoke.workspace_env(), capture_output=True,
                                 text=True)
        assert refused.returncode != 0
        assert ("error: checkpoints/ holds an unfinished run (newest checkpoint: step 4) that differs from this one "
                "in train.learning_rate (0.001 there, 0.002 now). Restore them") in refused.stderr, refused.stderr
        assert (ws / "checkpoints/checkpoint-4").is_dir()
        fresh = subprocess.run(["dvc", "repro", "train"], cwd=ws, env=dict(smoke.workspace_env(), GRPO_FRESH="1"),
                               capture_output=True, text=True)
        assert fresh.returncode == 0, fresh.stderr
        assert "warning: starting fresh as asked: deleting checkpoints/ (newest complete checkpoint: step 4)" in fresh.stdout
        assert "starting fresh" in fresh.stdout and "resuming" not in fresh.stdout
        run = json.loads((ws / "models/adapter/training_run.json").read_text())
        assert run["params"]["train"]["learning_rate"] == 0.002 and run["resumed_from"] is None
        assert json.loads((ws / "checkpoints/FINISHED.json").read_text()) == {"run_hash": run["run_hash"], "step": 4}
    finally:
        git(ws, "checkout", "--", ".")  # back to the committed run for the tests below
        dvc(ws, "checkout")


def test_changed_train_param_reruns_train_and_what_follows(ws):
    params = yaml.safe_load((ws / "params.yaml").read_text())
    params["train"]["learning_rate"] = 0.002
    (ws / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    out = dvc(ws, "repro")
    assert ran(out) == {"train", "evaluate", "merge", "report", "push"}
    git(ws, "checkout", "--", ".")  # back to the committed run for the experiments below
    dvc(ws, "checkout")


def test_experiments_show_in_metrics_and_plots_diff(ws):
    dvc(ws, "exp", "run", "-n", "lr-high", "-S", "train.learning_rate=0.01")
    dvc(ws, "exp", "run", "-n", "longer", "-S", "train.max_steps=6")
    diff = json.loads(dvc(ws, "metrics", "diff", "lr-high", "longer", "--json"))
    assert diff["reports/train/summary.json"]["optimizer_steps"] == {"old": 4, "new": 6, "diff": 2}
    assert "reports/train/metrics.json" not in diff  # TRL's whole log is plots, not metrics to compare
    params = json.loads(dvc(ws, "params", "diff", "lr-high", "longer", "--json"))["params.yaml"]
    assert params["train.max_steps"]["old"] == 4 and params["train.max_steps"]["new"] == 6
    plots = json.loads(dvc(ws, "plots", "diff", "lr-high", "longer", "--json"))
    reward = plots["data"]["Reward (total and per function)"][0]
    steps = {(row["rev"], int(row["step"])) for row in reward["content"]["data"]["values"]}
    assert {("lr-high", 4), ("longer", 6)} <= steps and ("lr-high", 6) not in steps
