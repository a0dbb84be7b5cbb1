"""The prepare stage on good and bad GSM8K files: bad rows are named, nothing half-written."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "tests" / "fixtures" / "gsm8k"
GOOD = {"question": "Tom has 3 apples and buys 2. How many now?", "answer": "3 + 2 = 5\n#### 5"}


def run_prepare(workdir: Path, params: dict) -> subprocess.CompletedProcess:
    (workdir / "params.yaml").write_text(yaml.safe_dump(params))
    return subprocess.run([sys.executable, str(ROOT / "stages" / "prepare.py")], cwd=workdir,
                          capture_output=True, text=True, timeout=300)


def write_split(folder: Path, split: str, lines: list) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{split}.jsonl").write_text(
        "".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))


def test_prepare_writes_prompts_and_counts_duplicates(tmp_path, tiny_model, tiny_params):
    data = tmp_path / "gsm8k"
    rows = [json.loads(line) for line in (FIXTURES / "train.jsonl").open()]
    write_split(data, "train", rows + rows[:2])  # two duplicated questions
    write_split(data, "test", [json.loads(line) for line in (FIXTURES / "test.jsonl").open()])
    tiny_params["data"]["local_dir"] = str(data)
    tiny_params["model"]["name"] = str(tiny_model)
    proc = run_prepare(tmp_path, tiny_params)
    assert proc.returncode == 0, proc.stderr
    assert "train has 2 duplicate question(s)" in proc.stdout
    stats = json.loads((tmp_path / "data/prepared/stats.json").read_text())
    assert stats["train"] == {**stats["train"], "rows": 50, "duplicate_questions": 2}
    prepared = [json.loads(line) for line in (tmp_path / "data/prepared/train.jsonl").open()]
    assert prepared[0]["answer"] == rows[0]["answer"].split("#### ")[1]
    assert prepared[0]["prompt"][1]["content"] == rows[0]["question"].strip()


@pytest.mark.parametrize("bad_line, message", [
    ("{not json", r"train\.jsonl:2: malformed JSON"),
    ({"question": "Q?"}, r"train row 2: missing or non-text field\(s\) answer"),
    ({"question": "   ", "answer": "#### 5"}, r"train row 2: question is empty"),
    ({"question": "Q?", "answer": "it is 5"}, r"train row 2: answer must contain exactly one '#### ' marker, found 0"),
    ({"question": "Q?", "answer": "#### 5\n#### 6"}, r"train row 2: answer must contain exactly one '#### '"),
    ({"question": "Q?", "answer": "#### five"}, r"train row 2: final answer 'five' after '#### ' is not a number"),
])
def test_bad_rows_are_named_and_nothing_is_written(tmp_path, tiny_params, bad_line, message):
    import re

    data = tmp_path / "gsm8k"
    write_split(data, "train", [GOOD, bad_line])
    write_split(data, "test", [GOOD])
    tiny_params["data"]["local_dir"] = str(data)
    proc = run_prepare(tmp_path, tiny_params)
    assert proc.returncode != 0
    assert re.search(message, proc.stderr), proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "data").exists()


def test_empty_split_and_missing_file(tmp_path, tiny_params):
    data = tmp_path / "gsm8k"
    write_split(data, "train", [GOOD])
    write_split(data, "test", [])
    tiny_params["data"]["local_dir"] = str(data)
    proc = run_prepare(tmp_path, tiny_params)
    assert "error: test: no rows" in proc.stderr and not (tmp_path / "data").exists()
    (data / "test.jsonl").unlink()
    proc = run_prepare(tmp_path, tiny_params)
    assert "test.jsonl: file not found" in proc.stderr and not (tmp_path / "data").exists()


def test_hub_unreachable_offline_says_what_to_do(tmp_path, tiny_params):
    tiny_params["data"]["source"] = "hub"
    proc = run_prepare(tmp_path, tiny_params)  # conftest set HF_HUB_OFFLINE=1 for every child process
    assert proc.returncode != 0
    assert "could not load openai/gsm8k" in proc.stderr and "data.source: local" in proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "data").exists()
