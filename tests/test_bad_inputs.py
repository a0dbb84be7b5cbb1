"""Bad inputs through the real stage commands in a tiny DVC workspace.

Each case edits a copy of the workspace (params.yaml, data files, environment), runs the stage
commands of dvc.yaml, and checks three things: one `error:` line that names the key or file and
the fix, exit code 1 without a traceback, and not one file written or changed in the workspace.
Every stage fails before it loads a model, so each case takes a second or two (the train stage,
which imports torch first, about eight).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from grpo_gsm8k import config, smoke

ROOT = Path(__file__).resolve().parent.parent
DELETE = object()  # a params key to remove

PREPARE = ["python", "stages/prepare.py"]
TRAIN = ["python", "stages/train.py"]
EVAL_BASE = ["python", "stages/evaluate.py", "--base"]
EVALUATE = ["python", "stages/evaluate.py"]
MERGE = ["python", "stages/merge.py"]
PUSH = ["python", "stages/push.py"]
EVERY_STAGE = [PREPARE, TRAIN, EVAL_BASE, EVALUATE, MERGE, PUSH]  # report reads no params
MODEL_STAGES = [PREPARE, TRAIN, EVAL_BASE, EVALUATE, MERGE]       # those that load model.name

GOOD = {"question": "Tom has 3 apples and buys 2. How many now?", "answer": "3 + 2 = 5\n#### 5"}


def jsonl(*rows) -> str:
    return "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows)


@dataclass
class Case:
    id: str
    message: str                                   # regex for the `error: ...` line
    cmds: list = field(default_factory=lambda: [TRAIN])
    params: dict = field(default_factory=dict)     # dotted key -> value (or DELETE)
    text: tuple = ()                               # (old, new): params.yaml edited as text, as a person would
    files: dict = field(default_factory=dict)      # workspace files to write before the run
    env: dict = field(default_factory=dict)        # None removes a variable
    skip: str | None = None


def local_data(train: str, test: str | None = jsonl(GOOD)) -> dict:
    files = {"bad-data/train.jsonl": train}
    if test is not None:
        files["bad-data/test.jsonl"] = test
    return files


CASES = [
    # ---- params.yaml: keys, types, ranges, consistency
    Case("typo-key", r"^train\.learning_rat: unknown key \(did you mean learning_rate\?\); valid keys here are: seed, ",
         EVERY_STAGE, text=("  learning_rate:", "  learning_rat:")),
    Case("misspelled-section", r"^trian: unknown section \(did you mean train\?\); valid sections are: data, model, ",
         EVERY_STAGE, text=("\ntrain:\n", "\ntrian:\n")),
    Case("missing-key", r"^model\.backend: missing from params\.yaml \(section model\); add `backend: <value>` there$",
         EVERY_STAGE, params={"model.backend": DELETE}),
    Case("missing-section", r"^lora: section missing from params\.yaml; the sections are data, model, lora, ",
         params={"lora": DELETE}),
    Case("wrong-type-text", r"^train\.max_steps: expected int, got 'many' \(str\); write a whole number",
         params={"train.max_steps": "many"}),
    Case("wrong-type-fraction", r"^train\.max_steps: expected int, got 2\.5 \(float\)", params={"train.max_steps": 2.5}),
    Case("bool-as-number", r"^train\.learning_rate: expected float, got True \(bool\)",
         params={"train.learning_rate": True}),
    Case("number-as-bool", r"^model\.load_in_4bit: expected true or false, got 1 \(int\)",
         params={"model.load_in_4bit": 1}),
    Case("quoted-number", r"^train\.learning_rate: expected float, got '1e-5' \(str\); .*without quotes",
         text=("  learning_rate: 0.001", "  learning_rate: '1e-5'")),
    Case("negative-learning-rate", r"^train\.learning_rate: must be in \(0, 1\) \(e\.g\. 5e-6\)$",
         params={"train.learning_rate": -1e-5}),
    Case("zero-max-steps", r"^train\.max_steps: must be a positive integer$", params={"train.max_steps": 0}),
    Case("negative-lora-r", r"^lora\.r: must be a positive integer \(e\.g\. 64\)$", [TRAIN, MERGE],
         params={"lora.r": -8}),
    Case("zero-eval-batch", r"^eval\.batch_size: must be a positive integer$", [EVAL_BASE, EVALUATE],
         params={"eval.batch_size": 0}),
    Case("zero-vllm-share", r"^generation\.vllm_gpu_memory_utilization: must be in \(0, 1\)",
         params={"generation.vllm_gpu_memory_utilization": 0}),
    Case("one-generation", r"^train\.num_generations: must be at least 2 \(GRPO's advantage compares",
         params={"train.num_generations": 1}),
    Case("batch-not-divisible", r"^train\.per_device_train_batch_size: 6 is not divisible by train\.num_generations "
                                r"\(4\); use a multiple such as 4$", params={"train.per_device_train_batch_size": 6}),
    Case("duplicate-key", r"^params\.yaml: not valid YAML \(line \d+\): found duplicate key \"max_steps\"",
         EVERY_STAGE, text=("  max_steps: 4\n", "  max_steps: 4\n  max_steps: 400\n")),
    Case("malformed-yaml", r"^params\.yaml: not valid YAML \(line \d+\): ", text=("\ntrain:\n", "\ntrain: [\n")),
    Case("empty-params", r"^params: expected a mapping of the sections data, model, .* got nothing \(null\)$",
         text=(None, "# nothing here\n")),
    Case("unknown-tracker", r"^train\.report_to: 'mlflow' is not one of none, wandb, tensorboard, trackio$",
         params={"train.report_to": "mlflow"}),
    Case("tracker-not-installed", r"^train\.report_to: wandb is not installed in this environment; `pip install "
                                  r"wandb` or set train\.report_to: none", params={"train.report_to": "wandb"},
         skip="wandb is installed here" if importlib.util.find_spec("wandb") else None),
    Case("lm-eval-unknown-task", r"^lm_eval\.tasks: unknown task 'gsm8k_5shot'; lm-eval's GSM8K tasks here are gsm8k, "
                                 r"gsm8k_cot, gsm8k_cot_llama, gsm8k_cot_zeroshot \(an empty list turns lm-eval off\)$",
         [EVAL_BASE, EVALUATE], params={"lm_eval.tasks": ["gsm8k", "gsm8k_5shot"]}),
    # the project's own test rows are there, lm-eval's copy of GSM8K's test split is not
    Case("lm-eval-data-missing", r"^data/prepared/gsm8k/test\.jsonl: not found; lm-eval reads GSM8K's own rows there, "
                                 r"which the prepare stage writes: run `dvc repro prepare`", [EVAL_BASE, EVALUATE],
         files={"data/prepared/test.jsonl": jsonl(GOOD), "data/prepared/gsm8k/train.jsonl": jsonl(GOOD)}),
    Case("local-source-without-dir", r"^data\.local_dir: must name a folder with train\.jsonl and test\.jsonl",
         [PREPARE], params={"data.local_dir": None}),
    Case("bad-repo-id", r"^hub\.repo_id: 'no-owner' must look like 'owner/name'", [PUSH],
         params={"hub.repo_id": "no-owner"}),
    Case("push-without-token", r"^hub\.repo_id set but HF_TOKEN is not in the environment: export HF_TOKEN", [PUSH],
         params={"hub.repo_id": "someone/tiny-grpo"}, env={"HF_TOKEN": None}),
    # ---- model.name
    Case("model-folder-missing", r"^model\.name: local folder \./no-such-model not found \(from .*\); point "
                                 r"model\.name at a folder with config\.json or at a Hub id", MODEL_STAGES,
         params={"model.name": "./no-such-model"}),
    Case("model-folder-without-config", r"^model\.name: half-model has no config\.json, so it is not a saved model",
         MODEL_STAGES, params={"model.name": "half-model"}, files={"half-model/tokenizer.json": "{}"}),
    Case("hub-model-offline", r"^model\.name: Qwen/Qwen2\.5-0\.5B-Instruct is not a local folder, the Hub is "
                              r"switched off \(HF_HUB_OFFLINE=1\) and the Hugging Face cache \(.*\) has no copy of "
                              r"it; download it once with network", MODEL_STAGES,
         params={"model.name": "Qwen/Qwen2.5-0.5B-Instruct"}, env={"HF_HUB_OFFLINE": "1", "HF_HOME": "{tmp}/hf"}),
    # ---- data.local_dir files (the prepare stage)
    Case("data-folder-missing", r"^nowhere/train\.jsonl: file not found \(data\.local_dir must hold", [PREPARE],
         params={"data.local_dir": "nowhere"}),
    Case("data-file-missing", r"^bad-data/test\.jsonl: file not found", [PREPARE],
         params={"data.local_dir": "bad-data"}, files=local_data(jsonl(GOOD), test=None)),
    Case("data-empty-split", r"^test: no rows; GSM8K's test split must not be empty$", [PREPARE],
         params={"data.local_dir": "bad-data"}, files=local_data(jsonl(GOOD), test="\n")),
    Case("data-malformed-json", r"^bad-data/train\.jsonl:2: malformed JSON", [PREPARE],
         params={"data.local_dir": "bad-data"}, files=local_data(jsonl(GOOD, "{not json"))),
    Case("data-not-an-object", r"^train row 2: expected a JSON object with 'question' and 'answer'$", [PREPARE],
         params={"data.local_dir": "bad-data"}, files=local_data(jsonl(GOOD, [1, 2]))),
    Case("data-missing-field", r"^train row 2: missing or non-text field\(s\) answer$", [PREPARE],
         params={"data.local_dir": "bad-data"}, files=local_data(jsonl(GOOD, {"question": "Q?"}))),
    Case("data-empty-question", r"^train row 2: question is empty$", [PREPARE],
         params={"data.local_dir": "bad-data"}, files=local_data(jsonl(GOOD, {"question": "  ", "answer": "#### 5"}))),
    Case("data-no-marker", r"^train row 2: answer must contain exactly one '#### ' marker, found 0$", [PREPARE],
         params={"data.local_dir": "bad-data"}, files=local_data(jsonl(GOOD, {"question": "Q?", "answer": "it is 5"}))),
    Case("data-two-markers", r"^test row 1: answer must contain exactly one '#### ' marker, found 2$", [PREPARE],
         params={"data.local_dir": "bad-data"},
         files=local_data(jsonl(GOOD), test=jsonl({"question": "Q?", "answer": "#### 5\n#### 6"}))),
    Case("data-non-numeric-gold", r"^train row 2: final answer 'five' after '#### ' is not a number$", [PREPARE],
         params={"data.local_dir": "bad-data"}, files=local_data(jsonl(GOOD, {"question": "Q?", "answer": "#### five"}))),
    Case("data-hub-offline", r"^could not load openai/gsm8k .* set data\.source: local and data\.local_dir", [PREPARE],
         params={"data.source": "hub"}, env={"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HOME": "{tmp}/hf"}),
]


def snapshot(ws: Path) -> dict[str, str]:
    """Every file of the workspace (git's and DVC's own folders aside) with its content hash."""
    return {str(p.relative_to(ws)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(ws.rglob("*"))
            if p.is_file() and not p.relative_to(ws).parts[0] in (".git", ".dvc") and "__pycache__" not in p.parts}


def set_params(ws: Path, case: Case) -> None:
    path = ws / "params.yaml"
    raw = config.read_yaml(path)
    for dotted, value in case.params.items():
        *parents, last = dotted.split(".")
        node = raw
        for key in parents:
            node = node[key]
        if value is DELETE:
            del node[last]
        else:
            node[last] = value
    config.write_yaml(path, raw)
    if case.text:
        old, new = case.text
        text = path.read_text()
        assert old is None or text.count(old) == 1, f"{old!r} must occur once in params.yaml"
        path.write_text(new if old is None else text.replace(old, new))


@pytest.fixture(scope="module")
def base_ws(tmp_path_factory) -> Path:
    return smoke.make_workspace(tmp_path_factory.mktemp("bad-inputs") / "ws")


def workspace_for(case: Case, base_ws: Path, tmp_path: Path) -> tuple[Path, dict]:
    ws = tmp_path / "ws"
    shutil.copytree(base_ws, ws, symlinks=True)
    set_params(ws, case)
    for rel, content in case.files.items():
        (ws / rel).parent.mkdir(parents=True, exist_ok=True)
        (ws / rel).write_text(content)
    env = smoke.workspace_env()
    env["PYTHONPATH"] = str(ROOT)  # the package under test, whatever the venv's editable install points at
    for key, value in case.env.items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value.replace("{tmp}", str(tmp_path))
    return ws, env


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_stops_the_stage_with_one_line_and_writes_nothing(case, base_ws, tmp_path):
    if case.skip:
        pytest.skip(case.skip)
    ws, env = workspace_for(case, base_ws, tmp_path)
    before = snapshot(ws)
    for cmd in case.cmds:
        proc = subprocess.run(cmd, cwd=ws, env=env, capture_output=True, text=True, timeout=300)
        where = f"{' '.join(cmd)}:\n{proc.stderr[-3000:]}"
        assert proc.returncode == 1, where
        assert "Traceback" not in proc.stderr, where
        errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
        assert len(errors) == 1, where
        assert re.search(case.message, errors[0].removeprefix("error: ")), where
        assert snapshot(ws) == before, f"{' '.join(cmd)} wrote or changed files"


def test_dvc_repro_stops_at_the_first_stage_and_records_nothing(base_ws, tmp_path):
    """Through DVC itself: the stage's own line reaches the user, and no stage is locked or cached."""
    case = Case("missing-folder-via-dvc", "", params={"model.name": "./no-such-model"})
    ws, env = workspace_for(case, base_ws, tmp_path)
    before = snapshot(ws)
    proc = subprocess.run(["dvc", "repro"], cwd=ws, env=env, capture_output=True, text=True, timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "error: model.name: local folder ./no-such-model not found" in out
    assert "failed to reproduce 'prepare'" in out and "Running stage 'train'" not in out
    assert snapshot(ws) == before and not (ws / "dvc.lock").exists()


# ------------------------------------------------------------------- model.name on the Hub, resolved for real

def check_model_in_child(name: str, hf_env: dict, cwd: Path) -> subprocess.CompletedProcess:
    """huggingface_hub reads HF_HOME / HF_ENDPOINT / HF_HUB_OFFLINE at import: check in a fresh process."""
    import os

    code = ("import sys\nfrom grpo_gsm8k import config, modeling\ntry:\n    modeling.check_model(sys.argv[1])\n"
            "except config.ConfigError as err:\n    sys.exit(f'error: {err}')\nprint('ok')\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_"))}
    env |= {"PYTHONPATH": str(ROOT), "HF_HUB_DISABLE_TELEMETRY": "1", **hf_env}
    return subprocess.run([sys.executable, "-c", code, name], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=120)


def test_hub_id_in_the_local_cache_passes_offline(tmp_path):
    sha = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hf" / "hub" / "models--someone--cached-model"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(sha)
    (repo / "snapshots" / sha).mkdir(parents=True)
    (repo / "snapshots" / sha / "config.json").write_text('{"model_type": "qwen2"}')
    env = {"HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"}
    ok = check_model_in_child("someone/cached-model", env, tmp_path)
    assert ok.returncode == 0 and ok.stdout.strip() == "ok", ok.stderr
    missing = check_model_in_child("someone/other-model", env, tmp_path)
    assert missing.returncode == 1 and "someone/other-model is not a local folder, the Hub is switched off" in missing.stderr


@pytest.fixture
def hub(httpserver):
    """The Hub's resolve endpoint for config.json: one public model, one gated, one without config.json."""
    from werkzeug import Response

    sha = "89abcdef0123456789abcdef0123456789abcdef"
    body = b'{"model_type": "qwen2"}'

    def resolve(request):
        repo = request.path.split("/resolve/")[0].strip("/")
        if repo == "someone/public-model":
            headers = {"X-Repo-Commit": sha, "ETag": '"cfg1"', "Content-Length": str(len(body))}
            return Response(b"" if request.method == "HEAD" else body, 200, headers=headers)
        if repo == "someone/gated-model":
            return Response("gated", 403, headers={"X-Error-Code": "GatedRepo", "X-Error-Message": "gated"})
        if repo == "someone/gguf-only":
            return Response("no file", 404, headers={"X-Error-Code": "EntryNotFound", "X-Repo-Commit": sha})
        return Response("not found", 404, headers={"X-Error-Code": "RepoNotFound"})

    httpserver.expect_request(re.compile(r"^/.+/resolve/main/config\.json$")).respond_with_handler(resolve)
    return httpserver.url_for("").rstrip("/")


@pytest.mark.parametrize("name, message", [
    ("someone/public-model", None),
    ("someone/typo-modle", r"someone/typo-modle is not a model on the Hub \(http://.*\) nor a local folder; check "
                           r"the spelling \(for a private model pass HF_TOKEN\)"),
    ("someone/gated-model", r"someone/gated-model is gated on the Hub; accept its terms on .* and pass HF_TOKEN"),
    ("someone/gguf-only", r"the Hub repo someone/gguf-only has no config\.json on its main branch"),
])
def test_hub_id_resolved_against_a_fake_hub(hub, tmp_path, name, message):
    env = {"HF_ENDPOINT": hub, "HF_HOME": str(tmp_path / "hf")}
    proc = check_model_in_child(name, env, tmp_path)
    if message is None:
        assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr
        return
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    (line,) = proc.stderr.strip().splitlines()
    assert re.search(rf"^error: model\.name: {message}", line), line
