"""lm-eval on a GPU (issue 30): lm-evaluation-harness's GSM8K beside the project's own grader, on a real model and an
adapter.

In a git workspace of this repository (params.yaml with the overrides below), dvc.yaml's own commands for
prepare, evaluate_base and evaluate, one after another, each timed: the evaluate stages score the whole
test split with the project's grader (vLLM) and then run lm-eval's `gsm8k` (5-shot) and `gsm8k_cot_zeroshot`
through lm-eval's vLLM backend (the adapter as a LoRA, max_lora_rank from its adapter_config.json).
Writes into --out, as each stage ends: the stages' metrics.json and logs, and summary.json:
{"model", "adapter", "stage_seconds", "project": {"base", "trained"}, "lm_eval": (the stage's block)} in the bench
result schema (bench/common.py; its one run's steps are the stages' seconds). Kept results go in
bench/results/lm_eval/NAME/, where `python -m bench report` tables them.

  python -m bench lm-eval --adapter DIR --out $OUT/lm_eval        # after `source bench/device.sh`
  python -m bench lm-eval --tiny --out /tmp/lm_eval_dry           # CPU dry run: tiny model, fixture rows

--only base / --only trained split the work over two calls on one warm machine (the workspace stays in --work).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

from bench import common
from bench.common import ROOT, run_stage
from grpo_gsm8k import config, smoke

SCENARIO = "lm-eval"
log = common.logger("lm_eval")

PROJECT = ("problems", "accuracy", "accuracy_lenient", "format_adherence", "completion_tokens_mean",
           "truncation_rate", "engine")


def build_real_model(a) -> None:
    if not (Path(a.model) / "config.json").is_file():
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "bench", "real-model", "build", "--gguf", a.gguf,
                        "--tokenizer", a.tokenizer, "--out", a.model], check=True, cwd=ROOT)
        log(f"built {a.model} in {time.perf_counter() - start:.0f} s")


def tiny_inputs(a) -> None:
    """The CPU dry run's model and adapter: the tiny model and a LoRA on it with non-zero B."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from grpo_gsm8k.tiny import build_tiny

    model = Path(a.model)
    if not (model / "config.json").is_file():
        build_tiny([json.loads(line)["question"] for line in (ROOT / "tests/fixtures/gsm8k/train.jsonl").open()], model)
    lora = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], init_lora_weights=False,
                      task_type="CAUSAL_LM")
    get_peft_model(AutoModelForCausalLM.from_pretrained(model), lora).save_pretrained(a.adapter)


def main(argv: list[str] | None = None) -> None:
    argv = common.argv_or_sys(argv)
    ap = common.parser(SCENARIO, __doc__)
    ap.add_argument("--adapter", help="a trained adapter folder (adapter_config.json, adapter_model.safetensors)")
    ap.add_argument("--model", default="/tmp/coder05", help="transformers folder; built from --gguf if missing")
    ap.add_argument("--model-label", default="Qwen/Qwen2.5-Coder-0.5B-Instruct (Q4_K_M GGUF, dequantized to bf16)")
    ap.add_argument("--gguf", default="/tmp/model.gguf")
    ap.add_argument("--tokenizer", default="/tmp/carry/data/tokenizer")
    ap.add_argument("--data", default="/tmp/carry/data/gsm8k", help="folder with GSM8K's train.jsonl and test.jsonl")
    ap.add_argument("--set", nargs="*", default=[], help="more params overrides, e.g. lm_eval.max_problems=100")
    ap.add_argument("--only", choices=("all", "base", "trained"), default="all")
    ap.add_argument("--work", default="/tmp/lm_eval_ws")
    ap.add_argument("--out", required=True)
    ap.add_argument("--tiny", action="store_true", help="CPU dry run: tiny model, fixture rows, tiny profile")
    a = ap.parse_args(argv)
    out, ws = Path(a.out).resolve(), Path(a.work).resolve()
    out.mkdir(parents=True, exist_ok=True)
    if a.tiny:
        a.model, a.data = str(ws.parent / "tiny-model"), str(ROOT / "tests/fixtures/gsm8k")
        a.adapter = a.adapter or str(ws.parent / "tiny-adapter")
        tiny_inputs(a)
    elif not a.adapter and a.only != "base":
        sys.exit("error: --adapter DIR is required (a trained adapter folder), unless --only base")
    else:
        build_real_model(a)
    overrides = {"model.name": str(Path(a.model).resolve()), "data.source": "local",
                 "data.local_dir": str(Path(a.data).resolve())}
    lora_r = None
    if a.adapter:  # lm-eval's max_lora_rank comes from lora.r
        lora_r = json.loads((Path(a.adapter) / "adapter_config.json").read_text())["r"]
        overrides["lora.r"] = lora_r
    if not a.tiny:  # the whole test split, vLLM on the 16-bit base (the LoRA per request)
        overrides |= {"model.load_in_4bit": False, "generation.use_vllm": True, "eval.max_problems": None,
                      "lm_eval.max_problems": None}
    overrides |= common.parse_sets(a.set)
    params = smoke.params_with(config.read_yaml(ROOT / ("profiles/tiny.yaml" if a.tiny else "params.yaml")), overrides)
    config.parse(params)  # a bad override stops here, before any work
    logfile = out / "stages.log"
    # beside the workspace, which outlives a call on a warm machine ($OUT does not): --only trained reads it
    times_file = ws.parent / f"{ws.name}_stage_seconds.json"
    times = json.loads(times_file.read_text()) if a.only == "trained" else {}

    def timed(stage: str) -> None:
        times[stage] = round(run_stage(ws, stage, logfile), 1)
        log(f"{stage}: {times[stage]} s")
        for path in (times_file, out / "stage_seconds.json"):
            path.write_text(json.dumps(times, indent=1) + "\n")

    if a.only in ("all", "base"):
        smoke.bench_workspace(ws, params)
        for stage in ("prepare", "evaluate_base"):
            timed(stage)
        shutil.copy(ws / "reports/eval_base/metrics.json", out / "eval_base_metrics.json")
    if a.only in ("all", "trained"):
        shutil.copytree(a.adapter, ws / "models/adapter", dirs_exist_ok=True)
        timed("evaluate")
        metrics = json.loads((ws / "reports/eval/metrics.json").read_text())
        shutil.copy(ws / "reports/eval/metrics.json", out / "eval_metrics.json")
        steps = [{"step": stage, "seconds": seconds} for stage, seconds in times.items()]
        summary = common.result(SCENARIO, argv, vars(a), [common.run_entry("stages", steps)], "complete",
                                model=a.model_label if not a.tiny else "tiny-model", adapter=str(a.adapter),
                                lora_r=lora_r, stage_seconds=times,
                                project={side: {k: metrics[side].get(k) for k in PROJECT}
                                         for side in ("base", "trained")},
                                lm_eval=metrics.get("lm_eval"))
        common.write_json(out / "summary.json", summary)
        log(f"wrote {out / 'summary.json'}")
