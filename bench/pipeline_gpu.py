"""The whole pipeline on a GPU: every stage of dvc.yaml, in order and exactly as DVC would run it, with the
random-weight Qwen2.5-3B stand-in and the default recipe at a benchmark's budget (OVERRIDES): the GPU code paths of
prepare, train, evaluate, merge, report and push (dry run) end to end. DVC's own orchestration is tested on CPU
(tests/test_pipeline.py); here the stages' commands run one after another without the `dvc` CLI, which the GPU
machine lacks.

    python -m bench standin --tokenizer <Qwen2.5 tokenizer + config.json> --out /tmp/standin
    python -m bench pipeline --model /tmp/standin --data <gsm8k> --out DIR

Writes DIR/pipeline_gpu.json (per-stage seconds and exit codes, the metrics, the recorded versions and effective
config), DIR/pipeline_gpu.log and DIR/summary.png. Random weights never stop on their own, so every completion runs
to its token budget.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

from bench import common
from grpo_gsm8k import config, smoke

SCENARIO = "pipeline"
# A few steps of the default recipe at a small batch; the budget of a benchmark, not of a real run.
OVERRIDES = {
    "data.source": "local", "data.train_limit": 64,
    "train.max_steps": 4, "train.per_device_train_batch_size": 16, "train.gradient_accumulation_steps": 1,
    "train.max_completion_length": 128, "train.save_steps": 2,
    "eval.max_problems": 64, "eval.batch_size": 64, "eval.max_new_tokens": 128,
}


def read(path: Path):
    return json.loads(path.read_text()) if path.is_file() else None


def main(argv: list[str] | None = None) -> None:
    argv = common.argv_or_sys(argv)
    parser = common.parser(SCENARIO, __doc__)
    parser.add_argument("--model", required=True, help="the stand-in (python -m bench standin)")
    parser.add_argument("--data", required=True, help="folder with GSM8K train.jsonl and test.jsonl")
    parser.add_argument("--workdir", default="/tmp/pipeline_gpu")
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    overrides = {**OVERRIDES, "model.name": str(Path(args.model).resolve()),
                 "data.local_dir": str(Path(args.data).resolve())}
    params = smoke.params_with(config.read_yaml(common.ROOT / "params.yaml"), overrides)
    ws = smoke.bench_workspace(Path(args.workdir), params)
    stages = config.read_yaml(ws / "dvc.yaml")["stages"]
    logfile = out / "pipeline_gpu.log"
    logfile.write_text("")
    timed = []
    for name in stages:
        try:
            timed.append({"step": name, "seconds": round(common.run_stage(ws, name, logfile), 1), "returncode": 0})
        except common.StageFailed as err:
            timed.append({"step": name, "seconds": round(err.seconds, 1), "returncode": err.returncode})
        print(name, timed[-1], flush=True)
        if timed[-1]["returncode"] != 0:
            break
    run = read(ws / "models/adapter/training_run.json") or {}
    effective = run.get("effective_grpo_config", {})
    ok = len(timed) == len(stages) and all(s["returncode"] == 0 for s in timed)
    report = common.result(SCENARIO, argv, vars(args), [common.run_entry("dvc.yaml's stages", timed)],
                           "complete" if ok else "failed", overrides=overrides, stages={
                               s["step"]: {"seconds": s["seconds"], "returncode": s["returncode"]} for s in timed})
    report |= {
        "data_stats": read(ws / "data/prepared/stats.json"),
        "train_metrics": read(ws / "reports/train/metrics.json"),
        "eval_metrics": read(ws / "reports/eval/metrics.json"),
        "push_receipt": read(ws / "reports/push.json"),
        "recorded_versions": run.get("versions"),
        "effective": {k: effective.get(k) for k in ("per_device_train_batch_size", "gradient_accumulation_steps",
                                                    "num_generations", "max_completion_length", "bf16", "optim",
                                                    "loss_type", "beta", "gradient_checkpointing")},
        "effective_lora": {k: run.get("effective_lora_config", {}).get(k)
                           for k in ("r", "lora_alpha", "target_modules")},
        "merged_files": sorted(f"{p.name} {p.stat().st_size}" for p in (ws / "models/merged").glob("*")
                               if p.is_file()) if (ws / "models/merged").is_dir() else None,
        "checkpoints": (sorted(p.name for p in (ws / "checkpoints").iterdir())
                        if (ws / "checkpoints").is_dir() else None),
    }
    common.write_json(out / "pipeline_gpu.json", report)
    if (ws / "reports/summary.png").is_file():
        shutil.copy(ws / "reports/summary.png", out / "summary.png")
    sys.exit(0 if ok else 1)
