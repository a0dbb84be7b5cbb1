"""What every scenario shares: paths, logging, the GPU and versions a result records, timing summaries, the one
result schema and its writer, the stages' commands in a workspace, and params overrides from the command line.

Nothing here imports torch at module level: `python -m bench report` and the drivers that only start stages
stay light.
"""

from __future__ import annotations

import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
SCHEMA = "bench-result/1"
STATUSES = ("complete", "partial", "failed")
# Peak rates for the floors: memory bandwidth (bytes/s) and dense bf16 matrix rate (FLOP/s), by GPU name.
GPU_PEAKS = {"H100 PCIe": (2.0e12, 756e12), "H100": (3.35e12, 989e12), "H200": (4.8e12, 989e12)}


def logger(tag: str):
    """``log(msg)`` printing ``[tag HH:MM:SS] msg``, flushed: the lines `bench/device.sh wait` shows."""
    def log(msg: str) -> None:
        print(f"[{tag} {time.strftime('%H:%M:%S')}] {msg}", flush=True)

    return log


def gpu() -> dict:
    """The machine's GPUs as nvidia-smi lists them (no torch needed), with the peak rates the floors use."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.TimeoutExpired):
        out = ""
    rows = [line.split(", ") for line in out.strip().splitlines() if ", " in line]
    if not rows:
        return {"name": "cpu", "count": 0, "memory_gib": None, "mem_bw": None, "matmul_flops": None}
    name = rows[0][0]
    bw, flops = next((v for k, v in GPU_PEAKS.items() if k in name), (None, None))
    return {"name": name, "count": len(rows), "memory_gib": round(float(rows[0][1]) / 1024, 1),
            "mem_bw": bw, "matmul_flops": flops}


def versions() -> dict:
    from grpo_gsm8k import modeling

    return modeling.package_versions()


def command_line(scenario: str, argv: list[str]) -> str:
    return shlex.join(["python", "-m", "bench", scenario, *argv])


def spread(seconds: list[float]) -> dict:
    """Median and min-max of some timings."""
    return {"median_s": round(statistics.median(seconds), 3), "min_s": round(min(seconds), 3),
            "max_s": round(max(seconds), 3)}


def timing_summary(seconds: list[float], warmup: int = 0) -> dict:
    """The steady state of per-step timings: the first ``warmup`` steps (compilation, allocator growth) left out;
    with no more steps than that, only the last one is kept."""
    warmup = max(0, min(warmup, len(seconds) - 1))
    timed = seconds[warmup:]
    if not timed:
        return {"timed_steps": 0, "warmup_steps_excluded": 0}
    return {"timed_steps": len(timed), "warmup_steps_excluded": warmup, **spread(timed),
            "mean_s": round(sum(timed) / len(timed), 3)}


def run_entry(name: str, steps: list[dict], untimed: int = 0, peak_memory_gib: dict | None = None, **fields) -> dict:
    """One measured run of a result: its per-step timings ({"step", "seconds", ...}), their summary (the first
    ``untimed`` steps left out), peak memory, and the scenario's own ``fields``."""
    return {**fields, "name": name, "steps": steps,
            "summary": timing_summary([s["seconds"] for s in steps], untimed), "peak_memory_gib": peak_memory_gib}


def result(scenario: str, argv: list[str], params: dict, runs: list[dict], status: str, **extra) -> dict:
    """The one result schema every scenario writes: which scenario and command, its params, the GPU and versions
    it ran with, whether it finished, and its runs (per-step timings, median and min-max, peak memory)."""
    assert status in STATUSES, status
    return {"schema": SCHEMA, "scenario": scenario, "command": command_line(scenario, argv), "params": params,
            "gpu": gpu(), "versions": versions(), "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "status": status, "runs": runs, **extra}


def check(data: dict) -> list[str]:
    """What a result lacks of the schema (empty: it is one)."""
    missing = [k for k in ("schema", "scenario", "command", "params", "gpu", "versions", "status", "runs")
               if k not in data]
    if data.get("status") not in STATUSES:
        missing.append(f"status one of {STATUSES}")
    for run in data.get("runs", []):
        missing += [f"runs[{run.get('name')}].{k}" for k in ("name", "steps", "summary", "peak_memory_gib")
                    if k not in run]
    return missing


def write_json(path: Path, data) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1, sort_keys=True, default=str) + "\n")
    return path


def moving_average(values: list[float], window: int) -> list[float]:
    chunks = [values[max(0, i - window + 1):i + 1] for i in range(len(values))]
    return [sum(chunk) / len(chunk) for chunk in chunks]


def parse_sets(pairs: list[str]) -> dict:
    """``section.key=value`` params overrides from a command line, each value read as YAML 1.2 (1e-5 is a float)."""
    from grpo_gsm8k import config

    return {key: config.read_yaml_text(value) for key, value in (kv.split("=", 1) for kv in pairs)}


class StageFailed(RuntimeError):
    def __init__(self, message: str, returncode: int, seconds: float):
        super().__init__(message)
        self.returncode, self.seconds = returncode, seconds


def run_stage(ws: Path, stage: str, logfile: Path, port: int = 29500) -> float:
    """dvc.yaml's command for the stage, in the workspace; returns wall seconds, raises StageFailed if it fails.
    ``port``: torch.distributed's rendezvous port, which TRL's colocated vLLM opens in every training process: one
    per parallel run."""
    from grpo_gsm8k import config, smoke

    cmd = config.read_yaml(ws / "dvc.yaml")["stages"][stage]["cmd"]
    env = smoke.workspace_env()
    env.update(PYTHONPATH=os.pathsep.join(filter(None, [str(ws), env.get("PYTHONPATH")])), PYTHONUNBUFFERED="1",
               MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    start = time.perf_counter()
    with Path(logfile).open("a") as out:
        out.write(f"\n===== {stage}: {cmd}\n")
        out.flush()
        proc = subprocess.run(cmd, shell=True, cwd=ws, env=env, stdout=out, stderr=subprocess.STDOUT)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise StageFailed(f"{ws.name}: stage {stage} failed (exit {proc.returncode}); see {logfile}", proc.returncode,
                          seconds)
    return seconds


def load_records(path: Path, system_prompt: str, split: str) -> list[dict]:
    from grpo_gsm8k import gsm8k

    rows = gsm8k.validate_rows(gsm8k.read_jsonl(path), split)
    return [{"prompt": gsm8k.build_prompt(r["question"], system_prompt), "answer": r["answer"],
             "question": r["question"]} for r in rows]


def prompt_lengths(tok, prompts: list[list[dict]]) -> list[int]:
    texts = [tok.apply_chat_template(p, add_generation_prompt=True, tokenize=False) for p in prompts]
    return [len(ids) for ids in tok(texts, add_special_tokens=False)["input_ids"]]


def sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def peak_memory() -> dict | None:
    import torch

    if not torch.cuda.is_available():
        return None
    return {"allocated": round(torch.cuda.max_memory_allocated() / 2**30, 2),
            "reserved": round(torch.cuda.max_memory_reserved() / 2**30, 2)}


def argv_or_sys(argv: list[str] | None) -> list[str]:
    return sys.argv[1:] if argv is None else list(argv)


def parser(scenario: str, doc: str, standin: bool = False):
    """A scenario's argument parser, its help the module's docstring; ``standin``: the --model and --data of the
    scenarios that run the stand-in (`python -m bench standin`) on GSM8K's rows."""
    import argparse

    ap = argparse.ArgumentParser(prog=f"python -m bench {scenario}", description=doc,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    if standin:
        ap.add_argument("--model", default="/tmp/standin", help="the stand-in (python -m bench standin)")
        ap.add_argument("--data", default=".carry/gsm8k", help="folder with GSM8K's train.jsonl and test.jsonl")
    return ap
