"""Several GPUs on existing engines (issue 17): DDP against DeepSpeed ZeRO-2, a ZeRO-2 run killed after
its first checkpoint and resumed, and vLLM server mode against colocate. Every run is the unchanged
train stage in its own scratch workspace, launched the way users launch it (scripts/train_multi_gpu.sh;
colocate: `python stages/train.py` on one GPU). Each phase merges its results into <work>/multi_gpu.json
and copies it, with the logs, to --out.

  zero2  DDP on 2 GPUs, then ZeRO-2 on 2 GPUs killed once a complete checkpoint exists and rerun: it must
         resume from that checkpoint and finish, each step logged once; step times of both.
  vllm   `trl vllm-serve` on GPU 1 and training on GPU 0 (VLLM_SERVER=1), then colocated vLLM on GPU 0
         alone, same batch: sampling/* curves (trainer vs vLLM log-probs of the sampled tokens, importance
         ratios) and throughput.

The model: Qwen2.5-3B-Instruct's architecture (--arch: its config.json) with random weights and a
516-token tokenizer in which the four format tags are single tokens (grpo_gsm8k/tiny.py). A random model
over Qwen's 151k vocabulary never writes a tag, so every reward is 0, every gradient too, and nothing
would show whether ZeRO-2 reduces gradients or the server follows the trainer; here tag_count rewards
vary within a group and the LoRA moves (lr 1e-3). The vocabulary is ~10% of the real model's compute.

`--cpu` is the dry run (tests/test_multi_gpu.py): tiny dimensions, one process per run (`python
stages/train.py`), the zero2 phase only; everything else (workspaces, kill and resume, summary) is real.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from grpo_gsm8k import config, smoke, training  # noqa: E402

NO_MULTICAST = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
STEPS, SAVE_STEPS, KILL_AT = 6, 2, 2
TINY_DIMS = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
             "num_key_value_heads": 2}
COMMON = {"data.source": "local", "data.train_limit": 256, "model.backend": "transformers",
          "train.learning_rate": 1e-3, "train.max_steps": STEPS, "train.save_steps": SAVE_STEPS,
          "train.logging_steps": 1, "train.gradient_accumulation_steps": 1, "train.num_generations": 8,
          "train.reward_weights": {"correctness": 1.0, "format": 0.2, "tag_count": 0.5}}
HF = {"model.load_in_4bit": True, "generation.use_vllm": False, "train.per_device_train_batch_size": 8,
      "train.max_completion_length": 64}
VLLM = {"model.load_in_4bit": False, "generation.use_vllm": True, "train.per_device_train_batch_size": 32,
        "train.max_completion_length": 128}
CURVES = ("step_time", "reward", "rewards/tag_count/mean", "loss", "grad_norm", "entropy", "completions/mean_length",
          "sampling/sampling_logp_difference/mean", "sampling/sampling_logp_difference/max",
          "sampling/importance_sampling_ratio/mean", "sampling/importance_sampling_ratio/min",
          "sampling/importance_sampling_ratio/max")


def log(msg: str) -> None:
    print(f"[multi_gpu {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def build_model(arch: Path, data: Path, out: Path, tiny: bool) -> Path:
    """The architecture of ``arch``/config.json, random bf16 weights, the tag-token tokenizer."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    from grpo_gsm8k.tiny import build_tokenizer

    if (out / "config.json").is_file():
        return out
    questions = [json.loads(line)["question"] for line in (data / "train.jsonl").open()]
    tok = build_tokenizer(questions, out)
    raw = json.loads((arch / "config.json").read_text()) | (TINY_DIMS if tiny else {})
    raw.pop("layer_types", None)  # sized for the original layer count
    raw |= {"vocab_size": len(tok), "bos_token_id": None, "eos_token_id": tok.eos_token_id,
            "pad_token_id": tok.pad_token_id}
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(raw.pop("model_type"), **raw),
                                                 dtype=torch.bfloat16)
    model.generation_config = GenerationConfig(eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    model.save_pretrained(out)
    log(f"model {out}: {sum(p.numel() for p in model.parameters()) / 1e9:.2f}B parameters, vocabulary {len(tok)}")
    return out


def workspace(work: Path, name: str, overrides: dict, prepared: Path | None) -> Path:
    """A git workspace with this repository's files and params.yaml + overrides, its data prepared (copied
    from ``prepared``, a workspace with the same data params, when given: prepare reads only those)."""
    params = smoke.params_with(config.read_yaml(ROOT / "params.yaml"), overrides)
    ws = smoke.bench_workspace(work / name, params)
    if prepared:
        shutil.copytree(prepared / "data/prepared", ws / "data/prepared")
    else:
        subprocess.run([sys.executable, "stages/prepare.py"], cwd=ws, env=smoke.workspace_env(), check=True)
    return ws


class Leg:
    """One launch of the train stage in a workspace, its output appended to ``logfile``."""

    def __init__(self, ws: Path, logfile: Path, cmd: list[str], env: dict | None = None):
        self.ws, self.logfile = ws, logfile
        with logfile.open("a") as out:
            out.write(f"\n===== {ws.name}: {' '.join(cmd)} {json.dumps(env or {})}\n")
        self.out = logfile.open("a")
        self.start = time.perf_counter()
        # Its own session: a kill reaches the launcher and every rank (a vLLM server sits in a session of its
        # own and is stopped by train_multi_gpu.sh's trap, which SIGTERM lets run).
        self.proc = subprocess.Popen(cmd, cwd=ws, env={**smoke.workspace_env(), **(env or {})}, stdout=self.out,
                                     stderr=subprocess.STDOUT, start_new_session=True)

    def kill_tree(self) -> None:
        """SIGKILL to the launcher and every process under it, as a crash of the machine would: torchrun starts
        each rank in a session of its own, so killing the launcher's group left both ranks training to the
        end on 2 GPUs."""
        import psutil

        try:
            tree = psutil.Process(self.proc.pid)
            procs = [tree, *tree.children(recursive=True)]
        except psutil.NoSuchProcess:
            return
        for proc in procs:
            try:
                proc.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(procs, timeout=30)

    def wait(self, timeout_s: float, until=None) -> dict:
        """Wait for the exit, or for ``until()`` to hold (then SIGKILL it, as a crash would), or time out (then
        SIGTERM, SIGKILL 30 s later)."""
        deadline, how = time.perf_counter() + timeout_s, "exited"
        while self.proc.poll() is None:
            if until is not None and until():
                self.kill_tree()
                how = "killed"
                break
            if time.perf_counter() > deadline:
                os.killpg(self.proc.pid, signal.SIGTERM)
                try:
                    self.proc.wait(30)
                except subprocess.TimeoutExpired:
                    self.kill_tree()
                how = "timed out"
                break
            time.sleep(0.05)
        rc = self.proc.wait()
        self.out.close()
        result = {"how": how, "rc": rc, "wall_s": round(time.perf_counter() - self.start, 1)}
        if how != "killed" and rc != 0:
            result["log_tail"] = self.logfile.read_text(errors="replace").splitlines()[-25:]
        log(f"{self.ws.name}: {result['how']}, rc {rc}, {result['wall_s']} s")
        return result


def time_left(a) -> float:
    """A launch's limit: its own, cut to what the phase's budget leaves (one device command is 10 minutes)."""
    return max(10.0, min(a.leg_timeout_s, a.deadline - time.perf_counter()))


def train_cmd(cpu: bool, gpus: int) -> list[str]:
    return [sys.executable, "stages/train.py"] if cpu or gpus == 1 else ["scripts/train_multi_gpu.sh"]


def complete_checkpoint(ws: Path, step: int):
    # the marker's existence only, not training.complete_checkpoints: polled while a rank may be writing it
    return lambda: any(int(m.parent.name.split("-")[1]) >= step
                       for m in (ws / "checkpoints").glob(f"checkpoint-*/{training.MARKER}"))


# ------------------------------------------------------------------------------------------ summary


def timing(step_time: list[list], first_steps: set[int]) -> dict:
    """TRL's step_time (generation + forward/backward of one optimizer step) without the first step of each
    process (model warm-up, compilation, allocator growth)."""
    timed = [[step, s] for step, s in step_time if step not in first_steps]
    seconds = [s for _, s in timed]
    if not seconds:
        return {"timed_steps": []}
    return {"timed_steps": [step for step, _ in timed], "median_s": round(statistics.median(seconds), 3),
            "min_s": round(min(seconds), 3), "max_s": round(max(seconds), 3)}


def summarize(ws: Path, completions_per_step: int, resumed_at: int | None = None) -> dict:
    """What one workspace's train stage left behind: outputs, curves, step times, throughput."""
    def read(path):
        return json.loads((ws / path).read_text()) if (ws / path).is_file() else None

    curves = training.read_curves(ws / "reports/train", CURVES)
    run = read("models/adapter/training_run.json") or {}
    first_steps = {1} | ({resumed_at + 1} if resumed_at is not None else set())
    speed = timing(curves.get("step_time", []), first_steps)
    lengths = dict(map(tuple, curves.get("completions/mean_length", [])))
    times = dict(map(tuple, curves.get("step_time", [])))
    rates = [lengths[s] * completions_per_step / times[s] for s in speed["timed_steps"] if s in lengths]
    if rates:
        speed["completion_tokens_per_s_median"] = round(statistics.median(rates), 1)
    finished = read(f"checkpoints/{training.FINISHED}")
    return {
        "world_size": run.get("world_size"),
        "resumed_from": run.get("resumed_from"),
        "finished_step": finished and finished["step"],
        "logged_steps": [step for step, _ in curves.get("reward", [])],
        "checkpoints": sorted((p.name for p in (ws / "checkpoints").glob("checkpoint-*")),
                              key=lambda name: int(name.split("-")[1])),
        "complete_checkpoints": [step for step, _, _ in training.complete_checkpoints(ws / "checkpoints")],
        "adapter_files": sorted(p.name for p in (ws / "models/adapter").iterdir()) if run else [],
        "stray_outputs": sorted(str(p.relative_to(ws)) for p in ws.glob("**/.*.tmp")),
        "completions_per_step": completions_per_step,
        "speed": speed,
        "curves": curves,
        "effective_args": {k: run.get("effective_grpo_config", {}).get(k) for k in (
            "per_device_train_batch_size", "gradient_accumulation_steps", "num_generations",
            "max_completion_length", "learning_rate", "optim", "bf16", "use_vllm", "vllm_mode")},
        "versions": run.get("versions"),
    }


def checks(s: dict, world_size: int) -> dict[str, bool]:
    """What every finished run must show: written once by rank 0, complete, and the policy really moved."""
    return {"finished": s["finished_step"] == STEPS,
            "each_step_logged_once": s["logged_steps"] == list(range(1, STEPS + 1)),
            "world_size": s["world_size"] == world_size,
            "adapter_written": "adapter_model.safetensors" in s["adapter_files"],
            "no_stray_outputs": not s["stray_outputs"],
            "gradients_nonzero": any(v > 0 for _, v in s["curves"].get("grad_norm", []))}


def resume_checks(killed: dict, resumed: dict, s: dict) -> dict[str, bool]:
    """The rerun after a SIGKILL resumed from the newest complete checkpoint the kill left, and finished."""
    newest = max(killed["complete_checkpoints"], default=None)
    return {"killed_before_the_end": killed["how"] == "killed" and killed["finished_step"] is None,
            "resumed_from_newest_complete_checkpoint":
                newest is not None and s["resumed_from"] == f"checkpoints/checkpoint-{newest}",
            "rerun_succeeded": resumed["rc"] == 0}


# ------------------------------------------------------------------------------------------- phases


def phase_zero2(a, model: Path, work: Path, logfile: Path) -> dict:
    gpus = 1 if a.cpu else 2
    common = {**COMMON, **HF, "model.name": str(model), "data.local_dir": str(a.data)}
    per_step = HF["train.per_device_train_batch_size"] * gpus
    results = {}

    ws = workspace(work, "ddp", common, None)
    leg = Leg(ws, logfile, train_cmd(a.cpu, gpus), {"N": str(gpus), "ACCEL": "ddp"}).wait(time_left(a))
    s = summarize(ws, per_step)
    results["ddp"] = {**leg, **s, "checks": checks(s, gpus)}

    ws = workspace(work, "zero2", common, work / "ddp")
    env = {"N": str(gpus), "ACCEL": "zero2"}
    killed = Leg(ws, logfile, train_cmd(a.cpu, gpus), env).wait(time_left(a), until=complete_checkpoint(ws, KILL_AT))
    killed |= {k: v for k, v in summarize(ws, per_step).items() if k in ("complete_checkpoints", "finished_step")}
    resumed = Leg(ws, logfile, train_cmd(a.cpu, gpus), env).wait(time_left(a))
    s = summarize(ws, per_step, resumed_at=max(killed["complete_checkpoints"], default=None))
    results["zero2"] = {"killed_run": killed, "resumed_run": resumed, **s,
                        "checks": checks(s, gpus) | resume_checks(killed, resumed, s)}
    return results


def phase_vllm(a, model: Path, work: Path, logfile: Path) -> dict:
    common = {**COMMON, **VLLM, "model.name": str(model), "data.local_dir": str(a.data)}
    per_step = VLLM["train.per_device_train_batch_size"]  # one training process in both runs
    server_log = work / "vllm-serve.log"
    results = {}

    ws = workspace(work, "vllm_server", common | {"generation.vllm_mode": "server"}, None)
    env = {"N": "2", "VLLM_SERVER": "1", "VLLM_LOG": str(server_log), "VLLM_WAIT_S": "240",
           "PATH": f"{trl_shim(work)}{os.pathsep}{smoke.workspace_env()['PATH']}"}
    leg = Leg(ws, logfile, train_cmd(False, 2), env).wait(time_left(a))
    s = summarize(ws, per_step)
    served = server_log.read_text(errors="replace") if server_log.is_file() else ""
    results["vllm_server"] = {**leg, **s, "checks": checks(s, 1) | sampling_checks(s),
                              "server_weight_updates": served.count("POST /update_weights")}

    ws = workspace(work, "vllm_colocate", common | {"generation.vllm_mode": "colocate"}, work / "vllm_server")
    leg = Leg(ws, logfile, train_cmd(False, 1), {"CUDA_VISIBLE_DEVICES": "0"}).wait(time_left(a))
    s = summarize(ws, per_step)
    results["vllm_colocate"] = {**leg, **s, "checks": checks(s, 1) | sampling_checks(s)}
    return results


def sampling_checks(s: dict) -> dict[str, bool]:
    """TRL compared the trainer's log-probs of vLLM's samples with vLLM's own at every step."""
    logged = [step for step, _ in s["curves"].get("sampling/sampling_logp_difference/mean", [])]
    return {"sampling_logged_every_step": logged == list(range(1, STEPS + 1))}


def trl_shim(work: Path) -> Path:
    """A `trl` command for this interpreter: console scripts of a carried site-packages name the interpreter
    that built it, which the GPU machine lacks."""
    bin_dir = work / "bin"
    bin_dir.mkdir(parents=True, exist_ok=True)
    (bin_dir / "trl").write_text(f'#!/bin/sh\nexec "{sys.executable}" -m trl.cli.main "$@"\n')
    (bin_dir / "trl").chmod(0o755)
    return bin_dir


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("phase", choices=("zero2", "vllm"))
    ap.add_argument("--arch", type=Path, required=True, help="folder with the real model's config.json")
    ap.add_argument("--data", type=Path, required=True, help="folder with GSM8K train.jsonl and test.jsonl")
    ap.add_argument("--work", type=Path, default=Path("/tmp/multi_gpu"))
    ap.add_argument("--out", type=Path, required=True, help="where multi_gpu.json and the logs are copied")
    ap.add_argument("--leg-timeout-s", type=float, default=300, help="per launch of the train stage")
    ap.add_argument("--budget-s", type=float, default=480, help="the whole phase, model build included")
    ap.add_argument("--cpu", action="store_true", help="dry run: tiny model, one process, zero2 phase only")
    a = ap.parse_args()
    a.deadline = time.perf_counter() + a.budget_s
    a.arch, a.data, a.work, a.out = (p.resolve() for p in (a.arch, a.data, a.work, a.out))
    for path in (a.arch / "config.json", a.data / "train.jsonl", a.data / "test.jsonl"):
        if not path.is_file():
            sys.exit(f"error: {path} not found")
    if a.cpu and a.phase == "vllm":
        sys.exit("error: the vllm phase needs GPUs (vLLM does not run on CPU)")
    unsafe = {k: os.environ.get(k) for k, v in NO_MULTICAST.items() if os.environ.get(k) != v}
    if not a.cpu and unsafe:
        sys.exit(f"error: NVLink multicast must stay off in every process: export "
                 f"{' '.join(f'{k}={v}' for k, v in NO_MULTICAST.items())} (now {unsafe})")
    a.work.mkdir(parents=True, exist_ok=True)
    a.out.mkdir(parents=True, exist_ok=True)
    logfile = a.work / f"{a.phase}.log"
    model = build_model(a.arch, a.data, a.work / "model", tiny=a.cpu)
    start = time.perf_counter()
    results = (phase_zero2 if a.phase == "zero2" else phase_vllm)(a, model, a.work, logfile)
    summary_path = a.work / "multi_gpu.json"
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
    summary |= results | {"model": {"architecture": str(a.arch / "config.json"), "tiny": a.cpu,
                                    "vocab_size": json.loads((model / "config.json").read_text())["vocab_size"]},
                          f"{a.phase}_phase_s": round(time.perf_counter() - start, 1)}
    summary_path.write_text(json.dumps(summary, indent=1) + "\n")
    for path in (summary_path, logfile, a.work / "vllm-serve.log"):
        if path.is_file():
            shutil.copy(path, a.out / path.name)
    failed = [f"{leg}.{name}" for leg, r in results.items() for name, ok in r["checks"].items() if not ok]
    log(f"wrote {a.out / summary_path.name}; " + (f"FAILED: {', '.join(failed)}" if failed else "all checks passed"))
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
