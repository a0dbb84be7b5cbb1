"""Real-model learning: GRPO on a real instruct model through the project's own stages and the real GSM8K, for
recipes x seeds (LEARNING.md).

  build  Qwen2.5-Coder-0.5B-Instruct's GGUF (shared/device/real-model.sh) -> a transformers folder in
         bf16, with the real Qwen2.5 tokenizer files beside it.
  run    for every (recipe, seed): a git workspace holding this repository's files and params.yaml with
         the recipe's overrides, then dvc.yaml's own commands for prepare, evaluate_base, train and
         evaluate. evaluate_base is greedy and seed-independent, so it runs once and is copied. The trainings
         go in parallel processes (a 0.5B model leaves most of an H200 idle), their vLLM engines started
         one at a time; each is evaluated when it ends, one evaluation at a time. A failed run leaves the
         others running and out of summary.json, and the command exits non-zero. With --hf-agreement, the base is also
         evaluated with HF generate, to compare with vLLM problem by problem. Writes <out>/summary.json (the
         bench result schema, bench/common.py): {"model", "runs": [{"name", "recipe", "seed", "params",
         "train_minutes", "base", "trained", "curves", "heldout", "steps", "summary"}], "agreement"};
         "heldout" is the train stage's own held-out curve (reports/train/eval_curve.tsv), "steps" TRL's
         step_time per step.
  summarize  summary.json again from the workspaces of an earlier run.
  plot   the curves of one or more summary.json files as a PNG.

    python -m bench real-model build --gguf /tmp/model.gguf --tokenizer <qwen2.5 tokenizer> --out /tmp/coder05
    python -m bench real-model run --model /tmp/coder05 --data <gsm8k> --runs defaults:0 lr5e-5:0 --out DIR

`run --tiny` is the CPU dry run (tests/test_real_model.py): the tiny model, the fixture rows, HF generate.
"""

from __future__ import annotations

import argparse
import gzip
import json
import re
import shutil
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from bench import common
from bench.common import ROOT, run_stage
from grpo_gsm8k import config, smoke  # training (transformers) where it is used: a refusal stays instant

SCENARIO = "real-model"
log = common.logger("real_model")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "generation_config.json")
# Recipes: params overrides on top of params.yaml, shared by every seed. LEARNING.md says why each exists.
RECIPES = {
    "defaults": {},  # params.yaml as shipped
    # the learning-rate sweep at the defaults' batch (issue 26), grad clip stated so the names stay true
    "lr5e-6": {"train.learning_rate": 5e-6, "train.max_grad_norm": 0.1},
    "lr1e-5": {"train.learning_rate": 1e-5, "train.max_grad_norm": 0.1},
    "lr2e-5": {"train.learning_rate": 2e-5, "train.max_grad_norm": 0.1},
    "lr5e-5": {"train.learning_rate": 5e-5, "train.max_grad_norm": 0.1},
    "lr5e-5-clip1": {"train.learning_rate": 5e-5, "train.max_grad_norm": 1.0},
    "collapse": {"train.reward_weights": {"correctness": 2.0, "format": 0.5, "single_number": 0.5, "tag_count": 0.5},
                 "train.learning_rate": 5.0e-5},
    "correctness": {"train.reward_weights": {"correctness": 1.0}, "train.learning_rate": 2.0e-5},
    "batch_scaled": {"train.reward_weights": {"correctness": 1.0, "format": 0.2}, "train.scale_rewards": "batch",
                     "train.learning_rate": 2.0e-5},
}
CURVES = ("reward", "rewards/correctness/mean", "rewards/format/mean", "completions/mean_length",
          "sampling/sampling_logp_difference/mean", "sampling/importance_sampling_ratio/mean", "entropy", "step_time")


def cmd_build(a) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    gguf = Path(a.gguf)
    start = time.perf_counter()
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.bfloat16)
    raw = loaded.config.to_dict()
    raw.pop("quantization_config", None)  # a GGUF-loaded model refuses save_pretrained
    clean = AutoModelForCausalLM.from_config(AutoConfig.for_model(raw.pop("model_type"), **raw), dtype=torch.bfloat16)
    clean.load_state_dict(loaded.state_dict())
    out = Path(a.out)
    clean.save_pretrained(out)
    for name in TOKENIZER_FILES:
        shutil.copy(Path(a.tokenizer) / name, out / name)
    log(f"{out}: {sum(t.numel() for t in clean.parameters()) / 1e6:.0f}M parameters in "
        f"{time.perf_counter() - start:.0f}s")


def keep_predictions(src: Path, dest: Path) -> None:
    with src.open("rb") as f, dest.open("wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as g:
        shutil.copyfileobj(f, g)  # mtime 0: a rerun over the same predictions gives the same bytes


def agreement(vllm_rows: list[dict], hf_rows: list[dict]) -> dict:
    n = len(vllm_rows)
    same = lambda key: sum(v[key] == h[key] for v, h in zip(vllm_rows, hf_rows, strict=True)) / n  # noqa: E731
    return {"problems": n, "same_extracted_answer": round(same("extracted"), 4),
            "same_strict_verdict": round(same("correct"), 4), "same_lenient_verdict": round(same("correct_lenient"), 4),
            "identical_completion": round(same("completion"), 4)}


def cmd_run(a) -> None:
    unknown = {run.split(":")[0] for run in a.runs} - set(RECIPES)
    if unknown:
        sys.exit(f"error: unknown recipe(s) {', '.join(sorted(unknown))}; known: {', '.join(RECIPES)}")
    work, out = Path(a.work).resolve(), Path(a.out).resolve()
    work.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    base = config.read_yaml(ROOT / ("profiles/tiny.yaml" if a.tiny else "params.yaml"))
    model = Path(a.model).resolve()
    if a.tiny:
        from grpo_gsm8k.tiny import build_tiny

        data = ROOT / "tests/fixtures/gsm8k"
        if not (model / "config.json").is_file():
            build_tiny([json.loads(line)["question"] for line in (data / "train.jsonl").open()], model)
    else:
        data = Path(a.data).resolve()
    shared = {"model.name": str(model), "data.source": "local", "data.local_dir": str(data),
              **common.parse_sets(a.set)}
    runs = [(recipe, int(seed)) for recipe, seed in (run.split(":") for run in a.runs)]
    spaces = {}
    for recipe, seed in runs:
        params = smoke.params_with(base, {**shared, **RECIPES[recipe], "train.seed": seed})
        spaces[recipe, seed] = smoke.bench_workspace(work / f"{recipe}-s{seed}", params)
    first = spaces[runs[0]]
    logs = {key: out / f"{key[0]}-s{key[1]}.log" for key in runs}
    for key in runs:
        logs[key].write_text("")
    if a.base_from:
        reuse_base(Path(a.base_from), first, a.model_label or str(model))
    with ThreadPoolExecutor(max_workers=len(runs)) as pool:  # CPU only: 6 in a row took minutes on real GSM8K
        for job in [pool.submit(run_stage, spaces[key], "prepare", logs[key]) for key in runs]:
            job.result()

    def hf_base_eval():
        hf = smoke.bench_workspace(work / "hf-base", smoke.params_with(config.read_yaml(first / "params.yaml"),
                                                          {"generation.use_vllm": False}))
        run_stage(hf, "prepare", out / "hf-base.log")
        run_stage(hf, "evaluate_base", out / "hf-base.log")

    # vLLM sizes its KV cache from the free memory it sees while it profiles: another process that allocates or
    # frees memory meanwhile makes it fail ("No available memory for the cache blocks", "Error in memory
    # profiling"; 2 of 6 runs on 2026-12-04 with fixed 20 s staggers). So one engine starts at a time: the base
    # evaluation alone, then each training once the one before has finished its first step (its memory settled),
    # and the evaluations one after another, each as its training ends (the later trainings' memory settled).
    if not a.base_from:
        run_stage(first, "evaluate_base", logs[runs[0]])
    log(f"base: {json.loads((first / 'reports/eval_base/metrics.json').read_text())}")
    if a.hf_agreement:
        hf_base_eval()
    for key, ws in spaces.items():
        if ws != first:
            shutil.copytree(first / "reports/eval_base", ws / "reports/eval_base", dirs_exist_ok=True)

    failed = {}
    with ThreadPoolExecutor(max_workers=len(runs)) as pool:
        jobs = {}
        for i, key in enumerate(runs):
            if i:
                wait_first_step(logs[runs[i - 1]], jobs[runs[i - 1]])
            jobs[key] = pool.submit(run_stage, spaces[key], "train", logs[key], 29600 + i)
        # trainings started in order end in order: each is evaluated once it ends, while the later ones train;
        # summary.json is rewritten after each (status partial, the rest under "pending"), so a machine lost
        # before the last evaluation still leaves the finished runs' results wherever <out> was copied
        done, retry = [], []
        for i, (key, job) in enumerate(jobs.items()):
            if job.exception():
                failed[key] = str(job.exception())
                continue
            beside = any(not jobs[later].done() for later in runs[i + 1:])
            try:
                run_stage(spaces[key], "evaluate", logs[key])
                done.append(key)
            except RuntimeError as err:
                if not beside:
                    failed[key] = str(err)
                    continue
                # a training beside it may have freed memory while this engine profiled (2026-12-07: "Error in
                # memory profiling" as seed 3407's training ended): once more when every training has ended
                log(f"{key[0]} seed {key[1]}: its evaluation failed beside other trainings; again after them")
                retry.append(key)
            if done:
                summarize(work, done, out, a.model_label or str(model), first, a, failed,
                          pending=retry + runs[i + 1:])
        for key in retry:
            try:
                run_stage(spaces[key], "evaluate", logs[key])
                done.append(key)
            except RuntimeError as err:
                failed[key] = str(err)
    for key, why in failed.items():
        log(f"FAILED {key[0]} seed {key[1]}: {why}")
    done.sort(key=runs.index)
    if done and (failed or retry):  # the last word: which runs failed, none pending
        summarize(work, done, out, a.model_label or str(model), first, a, failed)
    if failed:
        sys.exit(f"{len(failed)} of {len(runs)} runs failed; summary.json holds the others")


def reuse_base(results: Path, ws: Path, model_label: str) -> None:
    """evaluate_base's outputs from an earlier run's results folder (summary.json, base-eval_base.jsonl.gz) into
    the workspace, as DVC's run-cache would restore them: the same model and the same eval params, or refused."""
    summary = json.loads((results / "summary.json").read_text())
    base = summary["runs"][0]["base"]
    p = config.parse(config.read_yaml(ws / "params.yaml"))
    wanted = {"model": model_label, "max_new_tokens": p.eval.max_new_tokens, "capped_at": p.eval.max_problems,
              "engine": "vllm" if p.generation.use_vllm else "transformers"}
    found = {"model": summary["model"], **{k: base.get(k) for k in wanted if k != "model"}}
    if found != wanted:
        sys.exit(f"error: --base-from {results}: its base evaluation was {found}, this run's would be {wanted}")
    (ws / "reports/eval_base").mkdir(parents=True, exist_ok=True)
    (ws / "reports/eval_base/metrics.json").write_text(json.dumps(base, indent=2) + "\n")
    with gzip.open(results / "base-eval_base.jsonl.gz", "rb") as f:
        (ws / "reports/eval_base/predictions.jsonl").write_bytes(f.read())
    log(f"base evaluation reused from {results}")


def wait_first_step(logfile: Path, job, poll_s: float = 2.0) -> None:
    """Until the train stage writing ``logfile`` has printed a step's line (training.StepLine) or ended."""
    while not job.done() and not re.search(r"^step \d+/", logfile.read_text(), re.MULTILINE):
        time.sleep(poll_s)


def summarize(work: Path, runs: list[tuple[str, int]], out: Path, model_label: str, first: Path | None = None,
              a: argparse.Namespace | None = None, failed: dict | None = None, pending: list | None = None) -> dict:
    """summary.json from the runs' workspaces (the stages' own metrics), with their predictions beside it: the bench
    result schema, each run's steps TRL's step_time (the first one, warm-up, left out of the summary)."""
    from grpo_gsm8k import training

    results = []
    for recipe, seed in runs:
        ws = work / f"{recipe}-s{seed}"
        metrics = json.loads((ws / "reports/eval/metrics.json").read_text())
        train_metrics = json.loads((ws / "reports/train/metrics.json").read_text())
        run_info = json.loads((ws / "models/adapter/training_run.json").read_text())
        curves = training.read_curves(ws / "reports/train", CURVES)
        steps = [{"step": step, "seconds": seconds} for step, seconds in curves.get("step_time", [])]
        results.append({**common.run_entry(f"{recipe}-s{seed}", steps, untimed=1),
                        "recipe": recipe, "seed": seed, "params": run_info["params"],
                        "effective_grpo_config": {k: run_info["effective_grpo_config"].get(k) for k in (
                            "learning_rate", "max_steps", "per_device_train_batch_size", "gradient_accumulation_steps",
                            "num_generations", "reward_weights", "scale_rewards", "loss_type", "beta", "use_vllm",
                            "vllm_mode", "temperature", "max_completion_length")},
                        "importance_sampling_logprobs": run_info.get("importance_sampling_logprobs"),
                        "train_minutes": round(train_metrics["train_runtime"] / 60, 2),
                        "base": metrics["base"], "trained": metrics["trained"], "delta": metrics["delta"],
                        "lm_eval": metrics.get("lm_eval"),
                        "curves": curves,
                        "heldout": heldout_curve(ws / "reports/train/eval_curve.tsv")})
        log(f"{recipe} seed {seed}: {metrics['delta']}")
        keep_predictions(ws / "reports/eval/predictions.jsonl", out / f"{recipe}-s{seed}-eval.jsonl.gz")
    first = first or work / f"{runs[0][0]}-s{runs[0][1]}"  # the workspace that ran evaluate_base
    keep_predictions(first / "reports/eval_base/predictions.jsonl", out / "base-eval_base.jsonl.gz")
    a = a or argparse.Namespace(argv=[])
    params = {k: v for k, v in vars(a).items() if k != "argv"}
    summary = {**common.result(SCENARIO, a.argv, params, results, "partial" if failed or pending else "complete"),
               "model": model_label, "versions": run_info["versions"],
               "failed": {f"{recipe}-s{seed}": why for (recipe, seed), why in (failed or {}).items()},
               "pending": [f"{recipe}-s{seed}" for recipe, seed in pending or []]}
    hf = work / "hf-base"
    if (hf / "reports/eval_base/metrics.json").is_file():  # vLLM's greedy evaluation against HF's, problem by problem
        rows = lambda ws: [json.loads(line) for line in (ws / "reports/eval_base/predictions.jsonl").open()]  # noqa: E731
        summary["agreement"] = {
            "evaluate_base": json.loads((first / "reports/eval_base/metrics.json").read_text()),
            "evaluate_base_hf": json.loads((hf / "reports/eval_base/metrics.json").read_text()),
            **agreement(rows(first), rows(hf))}
        keep_predictions(hf / "reports/eval_base/predictions.jsonl", out / "hf-base-eval_base.jsonl.gz")
        log(f"agreement: {summary['agreement']}")
    (out / "summary.json").write_text(json.dumps(summary, indent=1, default=str) + "\n")
    log(f"wrote {out / 'summary.json'}")
    return summary


def heldout_curve(tsv: Path) -> list[dict]:
    from grpo_gsm8k import training

    return [{k: float(v) for k, v in row.items()} for row in training.read_curve(tsv)]


def plot(summary: dict, path: Path) -> None:
    """Per run: the correctness and format rewards and the completion length (moving averages over 5 steps),
    and the train stage's held-out strict and lenient accuracy; the legend gives each run's lr, grad clip,
    seed and whole-test-set accuracies before and after."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("rewards/correctness/mean", "correctness reward (fraction right)"),
              ("rewards/format/mean", "format reward"), ("completions/mean_length", "mean completion tokens"),
              ("accuracy", "held-out strict accuracy (train stage)"),
              ("accuracy_lenient", "held-out lenient accuracy (train stage)")]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.8))
    for i, r in enumerate(summary["runs"]):
        t, b, train = r["trained"], r["base"], r["params"]["train"]
        label = (f"{r['recipe']} (lr {train['learning_rate']:g}, clip {train['max_grad_norm']:g}) seed {r['seed']}: "
                 f"strict {b['accuracy']:.1%} -> {t['accuracy']:.1%}, "
                 f"lenient {b['accuracy_lenient']:.1%} -> {t['accuracy_lenient']:.1%}")
        style = dict(color=f"C{i}", linestyle="-" if r["recipe"] == "defaults" else "--", linewidth=1.3)
        for ax, (key, title) in zip(axes, panels):
            if key in r["curves"]:
                points = r["curves"][key]
                xs, ys = [step for step, _ in points], common.moving_average([v for _, v in points], 5)
            else:
                xs, ys = [row["step"] for row in r.get("heldout", [])], [row[key] for row in r.get("heldout", [])]
            if xs:
                ax.plot(xs, ys, marker="o" if key not in r["curves"] else None, markersize=3,
                        label=label if ax is axes[0] else None, **style)
            ax.set(title=title, xlabel="GRPO step")
    fig.legend(loc="lower center", ncol=2, fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.06 * ((len(summary["runs"]) + 1) // 2) + 0.02, 1, 1))
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    argv = common.argv_or_sys(argv)
    ap = common.parser(SCENARIO, __doc__)
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build")
    b.add_argument("--gguf", required=True)
    b.add_argument("--tokenizer", required=True, help="folder with the Qwen2.5 tokenizer files")
    b.add_argument("--out", required=True)
    r = sub.add_parser("run")
    r.add_argument("--model", required=True, help="transformers folder (built here with --tiny)")
    r.add_argument("--model-label", default=None, help="the model's name in summary.json")
    r.add_argument("--data", default=None, help="folder with GSM8K train.jsonl and test.jsonl")
    r.add_argument("--runs", nargs="+", default=["batch_scaled:0", "batch_scaled:1"],
                   help=f"recipe:seed pairs; recipes: {', '.join(RECIPES)}")
    r.add_argument("--set", nargs="*", default=[], help="more params overrides, e.g. train.max_steps=60")
    r.add_argument("--hf-agreement", action="store_true", help="also evaluate the base with HF generate")
    r.add_argument("--base-from", default=None, help="an earlier results folder of the same model and eval params: "
                   "its base evaluation instead of evaluate_base (the device budget)")
    r.add_argument("--tiny", action="store_true", help="CPU dry run: tiny model, fixture rows, tiny profile")
    r.add_argument("--work", default="/tmp/real_model")
    r.add_argument("--out", default=str(ROOT / "build/bench/real_model"),
                   help="where summary.json, the predictions and the logs go (kept: bench/results/real_model/NAME/)")
    m = sub.add_parser("summarize", help="summary.json again from the workspaces of an earlier run")
    m.add_argument("--work", required=True)
    m.add_argument("--runs", nargs="+", required=True)
    m.add_argument("--model-label", required=True)
    m.add_argument("--out", default=str(ROOT / "build/bench/real_model"))
    g = sub.add_parser("plot", help="the curves of summary.json as a PNG")
    g.add_argument("--summary", nargs="+", default=[str(ROOT / "bench/results/real_model/80steps/summary.json")])
    g.add_argument("--recipe", default=None, help="only this recipe's runs")
    g.add_argument("--png", default=str(ROOT / "docs/real_model_curves.png"))
    a = ap.parse_args(argv)
    a.argv = argv
    if a.cmd == "plot":  # several summaries: their runs in one figure (e.g. two backends on one recipe)
        summaries = [json.loads(Path(path).read_text()) for path in a.summary]
        plot({"runs": [r for s in summaries for r in s["runs"] if a.recipe in (None, r["recipe"])]}, Path(a.png))
        return
    if a.cmd == "summarize":
        runs = [(recipe, int(seed)) for recipe, seed in (run.split(":") for run in a.runs)]
        Path(a.out).mkdir(parents=True, exist_ok=True)
        summarize(Path(a.work), runs, Path(a.out), a.model_label, a=a)
        return
    {"build": cmd_build, "run": cmd_run}[a.cmd](a)
