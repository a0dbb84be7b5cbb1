"""The prepare stage on good GSM8K files: prompts, stats, duplicated questions counted and kept."""

import json
import subprocess
import sys
from pathlib import Path

from grpo_gsm8k.config import write_yaml

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "tests" / "fixtures" / "gsm8k"


def run_prepare(workdir: Path, params: dict) -> subprocess.CompletedProcess:
    write_yaml(workdir / "params.yaml", params)
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


# Bad rows, missing, empty or malformed files and an offline Hub: tests/test_bad_inputs.py runs them
# through the stage commands with the other bad inputs.
