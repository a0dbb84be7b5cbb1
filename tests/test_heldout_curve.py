"""The train stage's held-out curve (eval.during_training_*): greedy accuracy on a fixed slice of the test set
before training, every N steps and at the last one, with the evaluate stage's prompt, grader and engine; DVC
plots it by step and by training minutes; it changes nothing that is trained; a resumed run measures each
step once."""

import json
import shutil
import subprocess
from pathlib import Path

import pytest
from safetensors.torch import load_file

from grpo_gsm8k import config, smoke, training

pytestmark = pytest.mark.slow
CURVE = Path("reports/train/eval_curve.tsv")
SLICE = {"train.max_steps": 4, "eval.max_problems": 6, "eval.during_training_problems": 6,
         "eval.during_training_every": 3}


def dvc(ws: Path, *args: str) -> subprocess.CompletedProcess:
    proc = subprocess.run(["dvc", *args], cwd=ws, env=smoke.workspace_env(), capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return proc


def rows(ws: Path) -> list[dict]:
    header, *lines = (ws / CURVE).read_text().splitlines()
    assert header.split("\t") == list(training.CURVE_COLUMNS)
    return [dict(zip(header.split("\t"), map(float, line.split("\t")), strict=True)) for line in lines]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    ws = smoke.make_workspace(tmp_path_factory.mktemp("curve") / "ws", SLICE)
    dvc(ws, "repro", "train", "evaluate_base")
    return ws


def test_curve_has_the_steps_and_starts_at_the_evaluate_stages_base_numbers(trained):
    points = rows(trained)
    assert [p["step"] for p in points] == [0, 3, 4]  # before training, every 3 steps, and the last step
    minutes = [p["minutes"] for p in points]
    assert minutes[0] == 0 and minutes == sorted(minutes) and minutes[-1] > 0
    base = json.loads((trained / "reports/eval_base/metrics.json").read_text())
    assert base["problems"] == 6
    for key in ("accuracy", "accuracy_lenient", "format_adherence", "completion_tokens_mean", "problems"):
        assert points[0][key] == base[key], key  # step 0 is the base model on the same slice, same grader


def test_dvc_plots_the_curve_by_step_and_by_training_minutes(trained):
    shown = json.loads(dvc(trained, "plots", "show", "--json").stdout)["data"]
    for title, x in (("Held-out accuracy during training, by step", "step"),
                     ("Held-out accuracy during training, by training minutes", "minutes")):
        [plot] = shown[title]
        points = plot["content"]["data"]["values"]
        assert sorted(p["field"] for p in points) == ["accuracy"] * 3 + ["accuracy_lenient"] * 3, title
        assert plot["content"]["encoding"]["x"]["field"] == x, title
        assert sorted(float(p[x]) for p in points if p["field"] == "accuracy") == [r[x] for r in rows(trained)]
    assert "reports/train/eval_curve.tsv" not in shown  # only the two plots above, not DVC's row-index default


def test_the_curve_changes_nothing_that_is_trained(trained, tmp_path):
    off = smoke.make_workspace(tmp_path / "off", {**SLICE, "eval.during_training_problems": 0})
    dvc(off, "repro", "train")
    assert rows(off) == []  # header only: the DVC output exists, nothing measured
    a, b = (load_file(ws / "models/adapter/adapter_model.safetensors") for ws in (trained, off))
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)
    curves = [(ws / "reports/train/plots/metrics/rewards/correctness/mean.tsv").read_text() for ws in (trained, off)]
    assert curves[0] == curves[1]


def test_a_resumed_run_measures_each_step_once(trained, tmp_path):
    """The checkpoint at step 2 of the finished run stands in for a killed run's: its curve rows after step 2
    are dropped and measured again, giving the uninterrupted run's curve."""
    ws = tmp_path / "resumed"
    shutil.copytree(trained, ws, symlinks=True)
    shutil.rmtree(ws / "checkpoints/checkpoint-4")
    (ws / "checkpoints" / training.FINISHED).unlink()
    proc = subprocess.run(["python", "stages/train.py"], cwd=ws, env=smoke.workspace_env(), capture_output=True,
                          text=True)
    assert proc.returncode == 0 and "resuming from checkpoints/checkpoint-2" in proc.stdout, proc.stderr[-2000:]
    resumed, clean = rows(ws), rows(trained)
    assert [p["step"] for p in resumed] == [0, 3, 4]
    for a, b in zip(resumed, clean, strict=True):
        assert {k: v for k, v in a.items() if k != "minutes"} == {k: v for k, v in b.items() if k != "minutes"}


@pytest.mark.parametrize("generation, model, engine", [
    ({"use_vllm": True, "vllm_mode": "colocate"}, {}, "vllm"),
    ({"use_vllm": True, "vllm_mode": "server"}, {}, "transformers"),  # the server is another process
    ({"use_vllm": True, "vllm_mode": "colocate"}, {"backend": "unsloth"}, "transformers"),  # LoRA per request
    ({"use_vllm": False}, {}, "transformers")])
def test_the_curve_uses_the_colocated_engine_where_the_trainer_has_one_else_the_policy(
        tiny_params, generation, model, engine):
    tiny_params["generation"] |= generation
    tiny_params["model"] |= {"load_in_4bit": False, **model}
    assert training.curve_engine(config.parse(tiny_params)) == engine
