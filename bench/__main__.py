"""python -m bench <scenario> [args]: one entry point for every measurement of the project.

Each scenario is one module of bench/, takes its own arguments (`python -m bench <scenario> --help`) and writes one
JSON in the bench result schema (bench/common.py: scenario, command, params, GPU, versions, status, runs with
per-step timings, their median and min-max, and peak memory). Results kept for the docs go in
bench/results/<scenario folder>/<run>/, described in bench/results/runs.yaml; `python -m bench report` writes
BENCHMARKS.md and bench/results/INDEX.md from them. On the GPU machine, bench/device.sh sets up the carried
environment and runs a long scenario in the background (`start`, then `wait` from each later call).
"""

from __future__ import annotations

import importlib
import sys

# scenario -> (module, what it measures, where its kept results go under bench/results/)
SCENARIOS = {
    "train-speed": ("train_speed", "GRPO step time: HF or vLLM generation, either backend, 4-bit or 16-bit, batch "
                                   "configs and speed levers, on the stand-in", "train_speed"),
    "eval-speed": ("eval_speed", "the evaluate stage's generation over the test set (vLLM or HF), forced lengths",
                   "eval_speed"),
    "merge": ("merge_check", "stages/merge.py, then merged against unmerged logits", "merge"),
    "pipeline": ("pipeline_gpu", "every stage of dvc.yaml in order on a GPU, with the stand-in", "pipeline"),
    "real-model": ("real_model", "real-model learning: recipes x seeds through the stages on Qwen2.5-Coder-0.5B",
                   "real_model"),
    "multi-gpu": ("multi_gpu", "several GPUs: DDP, ZeRO-2, vLLM server, scaling, 1-vs-N agreement", "multi_gpu"),
    "lm-eval": ("lm_eval_gpu", "lm-evaluation-harness's GSM8K beside the project's grader, on a GPU", "lm_eval"),
    "learning": ("learning", "the synthetic-task learning experiment (GRPO vs shuffled rewards)", "learning"),
    "checkpoint-verify": ("checkpoint_verify", "what verifying a checkpoint's hashes costs (CPU)",
                          "checkpoint_verify"),
    "standin": ("standin", "build the random-weight Qwen2.5-3B stand-in the speed scenarios use", None),
    "report": ("report", "BENCHMARKS.md and bench/results/INDEX.md from bench/results/", None),
}


def usage() -> str:
    width = max(map(len, SCENARIOS))
    rows = [f"  {name:<{width}}  {what}" for name, (_, what, _) in SCENARIOS.items()]
    return "usage: python -m bench <scenario> [args]   (python -m bench <scenario> --help)\n\n" + "\n".join(rows)


def main(argv: list[str]) -> None:
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return
    if argv[0] not in SCENARIOS:
        sys.exit(f"error: unknown scenario {argv[0]!r}\n\n{usage()}")
    importlib.import_module(f"bench.{SCENARIOS[argv[0]][0]}").main(argv[1:])


if __name__ == "__main__":
    main(sys.argv[1:])
