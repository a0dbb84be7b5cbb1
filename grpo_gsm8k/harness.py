"""EleutherAI lm-evaluation-harness's own GSM8K tasks on the base model and on base + adapter.

The project's strict and lenient accuracies grade its own XML format; published tables (model cards,
leaderboards, papers) come from lm-eval. So the evaluate stages also run lm-eval's task YAMLs
(their prompts, few-shot examples, stop sequences and regex filters, none of it copied here) through
the model's chat template, offline: each task's config is lm-eval's own file with only the dataset
swapped for the GSM8K rows that the prepare stage copied to data/prepared/gsm8k (`dataset_path: json`),
never the Hub. vLLM on a GPU (the adapter as a LoRA per request), transformers + PEFT otherwise.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

from .config import Params, UserError
from .gsm8k import RAW_DIR, SPLITS  # lm-eval draws gsm8k's 5 shots from train

CHAT = {"apply_chat_template": True, "fewshot_as_multiturn": True}  # instruct models, as published tables run them


def data_files(data_dir: str | Path = RAW_DIR) -> dict[str, str]:
    """The raw split files, checked to exist (before any model loads)."""
    files = {split: Path(data_dir) / f"{split}.jsonl" for split in SPLITS}
    for path in files.values():
        if not path.is_file():
            raise UserError(f"{path}: not found; lm-eval reads GSM8K's own rows there, which the prepare stage "
                            f"writes: run `dvc repro prepare` (or set lm_eval.tasks: [] to skip lm-eval)")
    return {split: str(path.resolve()) for split, path in files.items()}


def task_configs(tasks: list[str], files: dict[str, str], folder: Path) -> None:
    """One YAML per task in ``folder``: lm-eval's own task file, included whole, reading ``files``."""
    import lm_eval.tasks
    from lm_eval.tasks import TaskManager

    shipped = Path(lm_eval.tasks.__file__).parent / "gsm8k"
    index = TaskManager(include_path=shipped, include_defaults=False).task_index  # that folder alone: fast
    for task in tasks:
        if task not in index:  # config.py lists the tasks; this lm-eval release must still ship them
            raise UserError(f"lm_eval.tasks: lm-eval {_version()} has no task {task!r} in {shipped}")
        override = {"include": str(index[task].yaml_path), "task": task, "dataset_path": "json",
                    "dataset_name": None, "dataset_kwargs": {"data_files": files}}
        (folder / f"{task}.yaml").write_text(json.dumps(override, indent=1) + "\n")  # JSON is YAML


def load_lm(p: Params, adapter: str | None):
    """lm-eval's model wrapper: vLLM (CUDA, generation.use_vllm) or transformers + PEFT."""
    adapter = adapter and str(Path(adapter).resolve())  # a relative path would send PEFT to the Hub
    if p.generation.use_vllm:
        from lm_eval.models.vllm_causallms import VLLM

        # max_model_len left to the model: 5 shots in a chat are longer than model.max_seq_length allows
        lora = {"lora_local_path": adapter, "max_lora_rank": p.lora.r} if adapter else {}
        return VLLM(pretrained=p.model.name, dtype=p.model.dtype,
                    gpu_memory_utilization=p.generation.vllm_gpu_memory_utilization, **lora)
    from lm_eval.models.huggingface import HFLM

    from .modeling import cuda_available

    cuda = cuda_available()
    return HFLM(pretrained=p.model.name, peft=adapter, device="cuda" if cuda else "cpu",
                dtype=p.model.dtype if cuda else "float32", batch_size=p.eval.batch_size)


def evaluate(p: Params, adapter: str | None, data_dir: str | Path = RAW_DIR) -> tuple[dict, dict, list[dict]]:
    """(results, seconds, samples) of params' lm_eval.tasks for one model. results: {label: {task, shots,
    filters, ...}}, the label naming task, shots and chat template (e.g. gsm8k_5shot_chat); seconds: the
    model's load and each task's wall time; samples: one row per task and problem (samples())."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    files = data_files(data_dir)
    seconds = {}
    with tempfile.TemporaryDirectory() as folder:
        task_configs(p.lm_eval.tasks, files, Path(folder))
        manager = TaskManager(include_path=folder, include_defaults=False)  # the 15 s index of every task skipped
        start = time.perf_counter()
        lm = load_lm(p, adapter)
        seconds["load"] = round(time.perf_counter() - start, 1)
        results, rows = {}, []
        for task in p.lm_eval.tasks:
            start = time.perf_counter()
            out = simple_evaluate(model=lm, tasks=[task], task_manager=manager, limit=p.lm_eval.max_problems,
                                  gen_kwargs=_gen_kwargs(p), log_samples=True, **CHAT)
            label, results[label] = summarize(out, task)
            rows += samples(out["samples"][task], label)
            seconds[label] = round(time.perf_counter() - start, 1)
    return results, seconds, rows


def samples(logged: list[dict], label: str) -> list[dict]:
    """lm-eval's logged samples (one per problem and filter) as one row per problem: the question, the gold
    answer, the model's response, and each filter's extracted answer and verdict, so a strict-match far below
    flexible-extract can be read off the completions."""
    rows = {}
    for sample in logged:
        row = rows.setdefault(sample["doc_id"], {
            "label": label, "doc_id": sample["doc_id"], "question": sample["doc"]["question"],
            "target": sample["target"], "response": sample["resps"][0][0], "extracted": {}, "exact_match": {}})
        row["extracted"][sample["filter"]] = sample["filtered_resps"][0]
        row["exact_match"][sample["filter"]] = sample["exact_match"]
    return [rows[doc_id] for doc_id in sorted(rows)]


def summarize(out: dict, task: str) -> tuple[str, dict]:
    """lm-eval's result for one task as (label, block): exact match and its standard error per filter."""
    shots = out["n-shot"][task]
    scores = out["results"][task]
    filters = {}
    for key, value in scores.items():
        metric, _, name = key.partition(",")
        if name and metric == "exact_match":
            stderr = scores[f"exact_match_stderr,{name}"]  # "N/A" from a single problem
            filters[name] = {"exact_match": round(float(value), 4),
                             "stderr": round(stderr, 4) if isinstance(stderr, float) else None}
    block = {"task": task, "num_fewshot": shots, "chat_template": True, "fewshot_as_multiturn": True,
             "problems": out["n-samples"][task]["effective"], "task_version": out["versions"][task],
             "filters": filters}
    return f"{task}_{shots}shot_chat", block


def run(p: Params, adapter: str | None, side: str) -> tuple[dict, list[dict]]:
    """(block, samples) of one evaluate stage: the `lm_eval` block (what ran, the side's results and how long
    it took) and each problem's response and verdicts (samples())."""
    results, seconds, rows = evaluate(p, adapter)
    print(f"lm-eval ({side}): {seconds} s")
    return {"version": _version(), "backend": "vllm" if p.generation.use_vllm else "transformers",
            "capped_at": p.lm_eval.max_problems, "max_new_tokens": p.lm_eval.max_new_tokens,
            side: results, "seconds": {side: seconds}}, rows


def side_by_side(base: dict, trained: dict) -> dict:
    """The evaluate stage's block: the base stage's results beside the trained ones, and trained - base
    exact match per label and filter."""
    if not trained or "base" not in base:
        return trained
    merged = {**trained, "base": base["base"], "seconds": {**base["seconds"], **trained["seconds"]}}
    merged["delta"] = {label: {f: round(score["exact_match"] - base["base"][label]["filters"][f]["exact_match"], 4)
                               for f, score in block["filters"].items() if f in base["base"][label]["filters"]}
                       for label, block in trained["trained"].items() if label in base["base"]}
    return merged


def _gen_kwargs(p: Params) -> dict | None:
    """None keeps each task's own generation settings (gsm8k: greedy, 256 new tokens), as published runs do."""
    return {"max_gen_toks": p.lm_eval.max_new_tokens} if p.lm_eval.max_new_tokens else None


def _version() -> str:
    from importlib.metadata import version

    return version("lm_eval")
