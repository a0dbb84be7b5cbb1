"""Merge: stages/merge.py on an adapter (in a scratch workspace), then the merged model's logits on GSM8K test
prompts against base + adapter unmerged (PeftModel, bf16), against base alone, and against float32 unmerged, the
yardstick of what bf16 rounding alone moves. `pass`: merging adds no more error than bf16 itself, and the adapter
moves the logits far more than merged and unmerged differ.

    python -m bench train-speed ... --save-adapter /tmp/adapter      # a stand-in adapter, LoRA B perturbed
    python -m bench merge --model /tmp/standin --adapter /tmp/adapter --data <gsm8k> --results-dir DIR --out NAME
"""

from __future__ import annotations

import gc
import importlib.util
import json
import os
import shutil
import time
from pathlib import Path

from bench import common
from grpo_gsm8k import config, modeling

SCENARIO = "merge"
log = common.logger("bench")


def main(argv: list[str] | None = None) -> None:
    argv = common.argv_or_sys(argv)
    ap = common.parser(SCENARIO, __doc__, standin=True)
    ap.add_argument("--adapter", required=True)
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--workdir", default="/tmp/bench_merge")
    ap.add_argument("--results-dir", default=str(common.ROOT / "build/bench"))
    ap.add_argument("--out", default="merge", help="the result's name")
    a = ap.parse_args(argv)
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model_path = str(Path(a.model).resolve())
    p = config.replace(config.load(common.ROOT / "params.yaml"), model={"name": model_path})
    test = common.load_records(Path(a.data) / "test.jsonl", p.data.system_prompt, "test")[: a.prompts]
    work = Path(a.workdir)
    if work.exists():
        shutil.rmtree(work)
    (work / "models").mkdir(parents=True)
    shutil.copytree(a.adapter, work / "models" / "adapter")
    spec = importlib.util.spec_from_file_location("merge_stage", common.ROOT / "stages" / "merge.py")
    stage = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(stage)
    cwd = os.getcwd()
    os.chdir(work)
    try:
        start = time.perf_counter()
        stage.merge(p)  # stages/merge.py: models/adapter -> models/merged (p.merge.dtype)
        merge_s = time.perf_counter() - start
    finally:
        os.chdir(cwd)
    merged_dir = work / "models" / "merged"
    log(f"stages/merge.py merged in {merge_s:.1f}s: {sorted(os.listdir(merged_dir))}")

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = modeling.torch_dtype(p.merge.dtype)
    tok = modeling.load_tokenizer(str(merged_dir))
    texts = [tok.apply_chat_template(r["prompt"], add_generation_prompt=True, tokenize=False) for r in test]
    enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
    mask = enc["attention_mask"].bool()

    def logits(model):
        with torch.inference_mode():
            return model(**enc).logits.float()[mask]  # [real tokens, vocab]

    def load(path, dt):
        return AutoModelForCausalLM.from_pretrained(path, dtype=dt, device_map=device).eval()

    def compare(x, y) -> dict:
        d = (x - y).abs()
        return {"max_abs": float(d.max()), "mean_abs": float(d.mean()),
                "argmax_agree": float((x.argmax(-1) == y.argmax(-1)).float().mean())}

    merged = load(str(merged_dir), dtype)
    lm = logits(merged)
    del merged
    base = load(model_path, dtype)
    lb = logits(base)
    peft = PeftModel.from_pretrained(base, str(work / "models" / "adapter")).eval()
    lp = logits(peft)
    del peft, base
    gc.collect()
    # float32 unmerged as the yardstick: how far bf16 alone moves the logits
    base32 = load(model_path, torch.float32)
    l32 = logits(PeftModel.from_pretrained(base32, str(work / "models" / "adapter")).eval())
    del base32
    r = {"model": a.model, "adapter": a.adapter, "merge_dtype": p.merge.dtype, "merge_stage_seconds": round(merge_s, 1),
         "prompts": len(texts), "tokens_compared": int(mask.sum()),
         "logit_scale": {"mean_abs_logit": float(lp.abs().mean()), "max_abs_logit": float(lp.abs().max())},
         "merged_vs_unmerged": compare(lm, lp), "base_vs_merged": compare(lb, lm),
         "unmerged_bf16_vs_fp32": compare(lp, l32), "merged_bf16_vs_unmerged_fp32": compare(lm, l32)}
    r["pass"] = bool(r["merged_bf16_vs_unmerged_fp32"]["max_abs"] <= 2 * r["unmerged_bf16_vs_fp32"]["max_abs"] + 1e-3
                     and r["base_vs_merged"]["max_abs"] > 4 * r["merged_vs_unmerged"]["max_abs"])
    run = common.run_entry("stages/merge.py", [{"step": "merge", "seconds": round(merge_s, 1)}],
                           peak_memory_gib=common.peak_memory())
    data = common.result(SCENARIO, argv, vars(a), [run], "complete", **r)
    log(json.dumps(r, indent=1))
    common.write_json(Path(a.results_dir) / f"{a.out}.json", data)
