"""Every stage of dvc.yaml, in order and exactly as DVC would run it, on a GPU with a random-weight
Qwen2.5-3B stand-in: the GPU code paths of prepare, train (4-bit QLoRA), evaluate, merge, report and
push (dry run) end to end. DVC's own orchestration is tested on CPU (tests/test_pipeline.py); here the
stages' commands run one after another without the `dvc` CLI, which the GPU machine lacks.

    python bench/bench_grpo.py build-standin --tokenizer .carry/tok --out /tmp/standin
    python bench/pipeline_gpu.py --model /tmp/standin --data .carry/gsm8k --out OUT

Writes OUT/pipeline_gpu.json (per-stage seconds and exit codes, the metrics, the recorded versions
and effective config), OUT/pipeline_gpu.log and OUT/summary.png. Random weights never stop on
their own, so every completion runs to its token budget.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from grpo_gsm8k.config import read_yaml, write_yaml  # noqa: E402  (params read as DVC reads them)

# A few steps of the default recipe at a small batch; the budget of a benchmark, not of a real run.
OVERRIDES = {
    "data": {"source": "local", "train_limit": 64},
    "train": {"max_steps": 4, "per_device_train_batch_size": 16, "gradient_accumulation_steps": 1,
              "max_completion_length": 128, "save_steps": 2},
    "eval": {"max_problems": 64, "batch_size": 64, "max_new_tokens": 128},
}
SKIP = shutil.ignore_patterns(".git", ".carry", ".venv", ".whl", "build", "__pycache__", "data", "models",
                              "checkpoints", "reports")


def read(path: Path):
    return json.loads(path.read_text()) if path.is_file() else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="the stand-in (bench_grpo.py build-standin)")
    parser.add_argument("--data", required=True, help="folder with GSM8K train.jsonl and test.jsonl")
    parser.add_argument("--workdir", default="/tmp/pipeline_gpu")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    ws, out = Path(args.workdir), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if ws.exists():
        shutil.rmtree(ws)
    shutil.copytree(ROOT, ws, ignore=SKIP)
    params = read_yaml(ws / "params.yaml")
    params["model"]["name"] = str(Path(args.model).resolve())
    params["data"]["local_dir"] = str(Path(args.data).resolve())
    for section, values in OVERRIDES.items():
        params[section].update(values)
    write_yaml(ws / "params.yaml", params)
    git = ["git", "-c", "user.name=bench", "-c", "user.email=bench@localhost"]
    for cmd in (["init", "-q"], ["add", "-A"], ["commit", "-qm", "pipeline_gpu workspace"]):
        subprocess.run(git + cmd, cwd=ws, check=True)

    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ws), os.environ.get("PYTHONPATH", "")]),
               PYTHONUNBUFFERED="1")
    stages = yaml.safe_load((ws / "dvc.yaml").read_text())["stages"]
    report = {"overrides": OVERRIDES, "stages": {}}
    with open(out / "pipeline_gpu.log", "w") as log:
        for name, stage in stages.items():
            log.write(f"\n===== {name}: {stage['cmd']}\n")
            log.flush()
            start = time.perf_counter()
            rc = subprocess.run(stage["cmd"], shell=True, cwd=ws, env=env, stdout=log, stderr=subprocess.STDOUT).returncode
            report["stages"][name] = {"seconds": round(time.perf_counter() - start, 1), "returncode": rc}
            print(name, report["stages"][name], flush=True)
            if rc != 0:
                break
    run = read(ws / "models/adapter/training_run.json") or {}
    effective = run.get("effective_grpo_config", {})
    report |= {
        "data_stats": read(ws / "data/prepared/stats.json"),
        "train_metrics": read(ws / "reports/train/metrics.json"),
        "eval_metrics": read(ws / "reports/eval/metrics.json"),
        "push_receipt": read(ws / "reports/push.json"),
        "versions": run.get("versions"),
        "effective": {k: effective.get(k) for k in ("per_device_train_batch_size", "gradient_accumulation_steps",
                                                    "num_generations", "max_completion_length", "bf16", "optim",
                                                    "loss_type", "beta", "gradient_checkpointing")},
        "effective_lora": {k: run.get("effective_lora_config", {}).get(k) for k in ("r", "lora_alpha", "target_modules")},
        "merged_files": sorted(f"{p.name} {p.stat().st_size}" for p in (ws / "models/merged").glob("*")
                               if p.is_file()) if (ws / "models/merged").is_dir() else None,
        "checkpoints": sorted(p.name for p in (ws / "checkpoints").iterdir()) if (ws / "checkpoints").is_dir() else None,
    }
    (out / "pipeline_gpu.json").write_text(json.dumps(report, indent=1, default=str))
    if (ws / "reports/summary.png").is_file():
        shutil.copy(ws / "reports/summary.png", out / "summary.png")
    sys.exit(0 if all(s["returncode"] == 0 for s in report["stages"].values()) and len(report["stages"]) == len(stages)
             else 1)


if __name__ == "__main__":
    main()
