"""Several GPUs (issues 17 and 31): DDP against DeepSpeed ZeRO-2, a ZeRO-2 run killed after
its first checkpoint and resumed, and vLLM server mode against colocate. Every run is the unchanged
train stage in its own scratch workspace, launched the way users launch it (scripts/train_multi_gpu.sh;
colocate: `python stages/train.py` on one GPU). Each phase merges its results into <work>/multi_gpu.json (the
bench result schema: one run per launch, its steps TRL's step_time) and copies it, with the logs, to --out.

    python -m bench multi-gpu PHASE --arch <Qwen2.5-3B config.json folder> --data <gsm8k> --out DIR
    bash bench/multi_gpu.sh PHASE [--gpus ...]     # on the GPU machine: the carried environment, then this

  zero2  DDP on 2 GPUs, then ZeRO-2 on 2 GPUs killed once a complete checkpoint exists and rerun: it must
         resume from that checkpoint and finish, each step logged once; step times of both.
  vllm   `trl vllm-serve` on GPU 1 and training on GPU 0 (server mode), then colocated vLLM on GPU 0
         alone, same batch: sampling/* curves (trainer vs vLLM log-probs of the sampled tokens, importance
         ratios) and throughput.
  scale  (issue 31) colocated vLLM on every rank at the defaults' per-GPU batch (32 prompts x 8 completions,
         512 tokens, 16-bit base) on each N of --gpus (default 1,2,4,8, up to the visible GPUs), one run each,
         SCALE_STEPS steps (step 1 is warm-up): s/step median (min-max), completion tokens/s, and the scaling
         efficiency against the 1-GPU run of the same machine. The model: Qwen2.5-3B with its real 151k-token
         vocabulary (--arch must hold its tokenizer files), random weights: the real model's compute, and
         completions that run to 512 tokens (its two end tokens are 2 of 151,936, so about 1% of completions
         stop early; each row shows the mean length it measured).
  server the same per-GPU batch in server mode on the largest N of --gpus: N-1 ranks train, one
         `trl vllm-serve` generates for all of them.
  agree  the same seed and global batch (32 prompts x 8, 128 tokens) on 1 GPU (8 accumulation steps) and on
         the largest N of --gpus (8/N): reward and loss of the first steps side by side; the N-rank run is
         killed once checkpoint 2 is complete and rerun, and must resume and finish (not on CPU, see there).

The model: Qwen2.5-3B-Instruct's architecture (--arch: its config.json) with random weights and a
516-token tokenizer in which the four format tags are single tokens (grpo_gsm8k/tiny.py). A random model
over Qwen's 151k vocabulary never writes a tag, so every reward is 0, every gradient too, and nothing
would show whether ZeRO-2 reduces gradients or the server follows the trainer; here tag_count rewards
vary within a group and the LoRA moves (lr 1e-3). The vocabulary is ~10% of the real model's compute.

`--cpu` is the dry run (tests/test_multi_gpu.py): tiny dimensions, the tag-token vocabulary, HF generate
in place of vLLM (which needs CUDA), small batches; zero2 runs one process per run, scale and agree run N
gloo processes under torchrun. Everything else (workspaces, the split, kill and resume, summary) is real.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

from bench import common, standin
from bench.common import ROOT
from grpo_gsm8k import config, launch, smoke  # training (transformers) where it is used: refusals stay instant

SCENARIO = "multi-gpu"
log = common.logger("multi_gpu")

NO_MULTICAST = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
STEPS, SAVE_STEPS, KILL_AT = 6, 2, 2
COMMON = {"data.source": "local", "data.train_limit": 256, "model.backend": "transformers",
          "train.learning_rate": 1e-3, "train.max_steps": STEPS, "train.save_steps": SAVE_STEPS,
          "train.logging_steps": 1, "train.gradient_accumulation_steps": 1, "train.num_generations": 8,
          "train.reward_weights": {"correctness": 1.0, "format": 0.2, "tag_count": 0.5}}
HF = {"model.load_in_4bit": True, "generation.use_vllm": False, "train.per_device_train_batch_size": 8,
      "train.max_completion_length": 64}
# micro-batches of 32 with gradient checkpointing, as measured on 2 H200s (the defaults then)
VLLM = {"model.load_in_4bit": False, "generation.use_vllm": True, "train.per_device_train_batch_size": 32,
        "model.gradient_checkpointing": True, "train.max_completion_length": 128}
# issue 31: the defaults' per-GPU batch and checkpointing (read from params.yaml) with colocated vLLM; CPU: the
# same split, tiny
SCALE_STEPS = 4


def scale_overrides() -> dict:
    """The scaling runs' params, read when they start (not at import: the launcher's refusals stay instant)."""
    defaults = config.read_yaml(ROOT / "params.yaml")
    micro, accum = (defaults["train"][k] for k in ("per_device_train_batch_size", "gradient_accumulation_steps"))
    return {"model.load_in_4bit": False, "generation.use_vllm": True, "generation.vllm_mode": "colocate",
            "model.gradient_checkpointing": defaults["model"]["gradient_checkpointing"],
            "train.per_device_train_batch_size": micro, "train.gradient_accumulation_steps": accum,
            "train.max_completion_length": 512, "train.max_steps": SCALE_STEPS, "train.save_steps": 100,
            "data.train_limit": micro * accum * SCALE_STEPS}


SCALE_CPU = {"generation.use_vllm": False, "train.per_device_train_batch_size": 8,
             "train.gradient_accumulation_steps": 2, "train.max_completion_length": 16}
AGREE = {**VLLM, "generation.vllm_mode": "colocate", "train.gradient_accumulation_steps": 8}  # 256 completions
AGREE_CPU = {**HF, "model.load_in_4bit": False, "train.max_completion_length": 16,
             "train.gradient_accumulation_steps": 2}  # 16 completions
CURVES = ("step_time", "reward", "rewards/tag_count/mean", "loss", "grad_norm", "entropy", "completions/mean_length",
          "sampling/sampling_logp_difference/mean", "sampling/sampling_logp_difference/max",
          "sampling/importance_sampling_ratio/mean", "sampling/importance_sampling_ratio/min",
          "sampling/importance_sampling_ratio/max", "reward_std", "completions/clipped_ratio")


def build_model(arch: Path, data: Path, out: Path, tiny: bool, real_vocab: bool = False) -> Path:
    """The architecture of ``arch``/config.json, random bf16 weights, the tag-token tokenizer (``real_vocab``:
    the tokenizer files in ``arch``, so the vocabulary and its compute are the real model's)."""
    from transformers import AutoTokenizer, GenerationConfig

    from grpo_gsm8k.tiny import build_tokenizer

    if (out / "config.json").is_file():
        return out
    if real_vocab:
        tok = AutoTokenizer.from_pretrained(arch)
        tok.save_pretrained(out)
    else:
        questions = [json.loads(line)["question"] for line in (data / "train.jsonl").open()]
        tok = build_tokenizer(questions, out)
    raw = json.loads((arch / "config.json").read_text()) | (standin.TINY_DIMS if tiny else {})
    if not real_vocab:
        raw |= {"vocab_size": len(tok), "bos_token_id": None, "eos_token_id": tok.eos_token_id,
                "pad_token_id": tok.pad_token_id}
    params = standin.random_weights(raw, out, GenerationConfig(eos_token_id=tok.eos_token_id,
                                                               pad_token_id=tok.pad_token_id))
    log(f"model {out}: {params / 1e9:.2f}B parameters, vocabulary {len(tok)}")
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
    """One GPU: the stage itself, as `dvc repro train` runs it; several: the launcher users run. On CPU, N > 1:
    torchrun's N gloo processes (accelerate's CPU launcher needs MPI), as `accelerate launch` runs N ranks."""
    if gpus == 1:
        return [sys.executable, "stages/train.py"]
    if cpu:
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(gpus),
                "stages/train.py"]
    return ["scripts/train_multi_gpu.sh"]


def machine() -> dict:
    """Which machine a run ran on: efficiencies compare runs of one machine only."""
    try:
        gpus = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=60).stdout.splitlines()
    except (OSError, subprocess.TimeoutExpired):
        gpus = []
    return {"host": socket.gethostname(), "gpus": gpus}


def complete_checkpoint(ws: Path, step: int):
    from grpo_gsm8k import training

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
    return {"timed_steps": [step for step, _ in timed], **common.spread(seconds)}


def summarize(ws: Path, completions_per_step: int, resumed_at: int | None = None) -> dict:
    """What one workspace's train stage left behind: outputs, curves, step times, throughput."""
    from grpo_gsm8k import training

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
            "generation_batch_size", "steps_per_generation", "seed",
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
    env = {"N": "2", "VLLM_LOG": str(server_log), "VLLM_WAIT_S": "240",
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


# ------------------------------------------------------------------------------------ issue 31 phases


def scale_run(a, name: str, model: Path, work: Path, logfile: Path, gpus: int, overrides: dict,
              prepared: Path | None) -> dict:
    """One run of the train stage on ``gpus`` GPUs (server mode: gpus - 1 of them train) at the per-GPU batch
    of ``overrides``; its speed, what it generated, and the run's checks."""
    common = {**COMMON, **overrides, "model.name": str(model), "data.local_dir": str(a.data)}
    if a.cpu:
        common |= SCALE_CPU
    server = common["generation.use_vllm"] and common["generation.vllm_mode"] == "server"
    ranks = gpus - 1 if server else gpus
    ws = workspace(work, name, common, prepared)
    env = {"N": str(gpus), "ACCEL": "ddp"}
    if server:
        env |= {"VLLM_LOG": str(work / f"{name}-vllm-serve.log"), "VLLM_WAIT_S": "300",
                "PATH": f"{trl_shim(work)}{os.pathsep}{smoke.workspace_env()['PATH']}"}
    per_rank = common["train.per_device_train_batch_size"] * common["train.gradient_accumulation_steps"]
    leg = Leg(ws, logfile, train_cmd(a.cpu, gpus), env).wait(time_left(a))
    s = summarize(ws, per_rank * ranks)
    steps = common["train.max_steps"]
    lengths = [v for step, v in s["curves"].get("completions/mean_length", []) if step in s["speed"]["timed_steps"]]
    run_checks = {"finished": s["finished_step"] == steps,
                  "each_step_logged_once": s["logged_steps"] == list(range(1, steps + 1)),
                  "world_size": s["world_size"] == ranks,
                  "timed_steps_at_least_3": len(s["speed"]["timed_steps"]) >= 3}
    if not a.cpu:  # the rows compare the same work: completions that ran (almost) to the limit
        run_checks["completions_near_the_limit"] = bool(lengths) and min(lengths) >= 0.98 * common[
            "train.max_completion_length"]
    return {**leg, **s, "gpus": gpus, "train_ranks": ranks, "server": server, "machine": machine(),
            "checks": run_checks}


def phase_scale(a, model: Path, work: Path, logfile: Path) -> dict:
    results, prepared = {}, None
    for n in a.gpus:
        name = f"scale_n{n}"
        results[name] = scale_run(a, name, model, work, logfile, n, scale_overrides(), prepared)
        prepared = work / name
        a.save(results)
    return results


def phase_server(a, model: Path, work: Path, logfile: Path) -> dict:
    n = max(a.gpus)
    name = f"server_n{n}"
    return {name: scale_run(a, name, model, work, logfile, n, scale_overrides() | {"generation.vllm_mode": "server"},
                             None)}


def scaling_table(summary: dict) -> list[dict]:
    """Every scale_n* and server_n* run of this summary, with the efficiency against scale_n1 where that ran on
    the same machine: completion tokens/s per GPU used, over the 1-GPU run's."""
    runs = {k: v for k, v in summary.items() if k.startswith(("scale_n", "server_n")) and isinstance(v, dict)}
    base = runs.get("scale_n1")
    base_rate = base and base["speed"].get("completion_tokens_per_s_median")
    rows = []
    for name, r in sorted(runs.items(), key=lambda kv: (kv[1]["server"], kv[1]["gpus"])):
        speed = r["speed"]
        rate = speed.get("completion_tokens_per_s_median")
        same = base is not None and base["machine"] == r["machine"]
        lengths = dict(map(tuple, r["curves"].get("completions/mean_length", [])))
        rows.append({
            "run": name, "gpus": r["gpus"], "train_ranks": r["train_ranks"], "server": r["server"],
            "completions_per_step": r["completions_per_step"], "timed_steps": speed["timed_steps"],
            "median_s": speed.get("median_s"), "min_s": speed.get("min_s"), "max_s": speed.get("max_s"),
            "completion_tokens_per_s": rate,
            "mean_completion_tokens": [lengths.get(step) for step in speed["timed_steps"]],
            "scaling_efficiency": round(rate / (r["gpus"] * base_rate), 3) if same and rate and base_rate else None,
            "all_checks_passed": all(r["checks"].values())})
    return rows


def scaling_markdown(rows: list[dict]) -> str:
    lines = ["| run | GPUs | completions/step | s/step, median (min-max) | timed steps | completion tokens/s "
             "| efficiency vs 1 GPU | checks |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        gpus = f"{r['train_ranks']} train + 1 server" if r["server"] else str(r["gpus"])
        timing = f"{r['median_s']} ({r['min_s']}-{r['max_s']})" if r["median_s"] is not None else "n/a"
        eff = f"{r['scaling_efficiency']:.0%}" if r["scaling_efficiency"] is not None else "n/a"
        lines.append(f"| {r['run']} | {gpus} | {r['completions_per_step']} | {timing} | {len(r['timed_steps'])} "
                     f"| {r['completion_tokens_per_s']} | {eff} | {'passed' if r['all_checks_passed'] else 'FAILED'} |")
    return "\n".join(lines) + "\n"


def phase_agree(a, model: Path, work: Path, logfile: Path) -> dict:
    """The same seed and global batch on 1 and N ranks; the N-rank run killed after checkpoint 2, resumed."""
    n = max(a.gpus)
    base = {**COMMON, **(AGREE_CPU if a.cpu else AGREE), "model.name": str(model), "data.local_dir": str(a.data)}
    accumulation = base["train.gradient_accumulation_steps"]
    if accumulation % n:
        sys.exit(f"error: agree needs N to divide {accumulation} (the accumulation steps of 1 GPU), got N={n}")
    completions = base["train.per_device_train_batch_size"] * accumulation  # the global batch of both runs
    results = {}

    ws = workspace(work, "agree_n1", base, None)
    leg = Leg(ws, logfile, train_cmd(a.cpu, 1), {}).wait(time_left(a))
    s = summarize(ws, completions)
    results["agree_n1"] = one = {**leg, **s, "machine": machine(), "checks": checks(s, 1)}

    many = base | {"train.gradient_accumulation_steps": accumulation // n}
    ws = workspace(work, f"agree_n{n}", many, work / "agree_n1")
    env = {"N": str(n), "ACCEL": "ddp"}
    if a.cpu:
        # No kill and resume on CPU: under gloo the Trainer loads the optimizer state onto args.device, "cpu:<rank>"
        # (transformers trainer.py:3822), which torch.load cannot map. On GPUs it is "cuda:<rank>".
        leg = Leg(ws, logfile, train_cmd(a.cpu, n), env).wait(time_left(a))
        s = summarize(ws, completions)
        results[f"agree_n{n}"] = {**leg, **s, "machine": machine(), "step1_reward_z": step1_reward_z(one, s),
                                  "checks": checks(s, n) | agreement(one, s)}
        return results
    killed = Leg(ws, logfile, train_cmd(a.cpu, n), env).wait(time_left(a), until=complete_checkpoint(ws, KILL_AT))
    killed |= {k: v for k, v in summarize(ws, completions).items() if k in ("complete_checkpoints", "finished_step")}
    resumed = Leg(ws, logfile, train_cmd(a.cpu, n), env).wait(time_left(a))
    s = summarize(ws, completions, resumed_at=max(killed["complete_checkpoints"], default=None))
    results[f"agree_n{n}"] = {"killed_run": killed, "resumed_run": resumed, **s, "machine": machine(),
                              "step1_reward_z": step1_reward_z(one, s),
                              "checks": checks(s, n) | resume_checks(killed, resumed, s) | agreement(one, s)}
    return results


def step1_reward_z(one: dict, many: dict) -> float | None:
    """How many standard errors apart the two runs' step-1 mean rewards are. Both sample the same initial policy
    on the same prompts, but the ranks' engines draw with other seeds (seed = rank), so completions differ and
    equality is not expected. Noise: each run's reward_std over the square root of its prompts (prompts, not
    completions, are the independent units)."""
    def first(s, name):
        curve = s["curves"].get(name, [])
        return curve[0][1] if curve and curve[0][0] == 1 else None

    prompts = one["completions_per_step"] // (one["effective_args"]["num_generations"] or 1)
    r1, rn, s1, sn = first(one, "reward"), first(many, "reward"), first(one, "reward_std"), first(many, "reward_std")
    if None in (r1, rn, s1, sn):
        return None
    se = ((s1 ** 2 + sn ** 2) / prompts) ** 0.5
    return round(abs(r1 - rn) / se, 2) if se > 0 else (0.0 if r1 == rn else float("inf"))


def agreement(one: dict, many: dict, z_max: float = 3.0) -> dict[str, bool]:
    """The same global batch (TRL's generation_batch_size), and step-1 rewards within sampling noise."""
    batches = {one["effective_args"]["generation_batch_size"], many["effective_args"]["generation_batch_size"]}
    z = step1_reward_z(one, many)
    return {"same_global_batch": len(batches) == 1 and None not in batches,
            "step1_reward_within_noise": z is not None and z <= z_max}


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


def main(argv: list[str] | None = None) -> None:
    argv = common.argv_or_sys(argv)
    ap = common.parser(SCENARIO, __doc__)
    ap.add_argument("phase", choices=tuple(PHASES))
    ap.add_argument("--arch", type=Path, required=True, help="folder with the real model's config.json")
    ap.add_argument("--data", type=Path, required=True, help="folder with GSM8K train.jsonl and test.jsonl")
    ap.add_argument("--work", type=Path, default=Path("/tmp/multi_gpu"))
    ap.add_argument("--out", type=Path, required=True, help="where multi_gpu.json and the logs are copied")
    ap.add_argument("--leg-timeout-s", type=float, default=300, help="per launch of the train stage")
    ap.add_argument("--budget-s", type=float, default=480, help="the whole phase, model build included")
    ap.add_argument("--cpu", action="store_true", help="dry run: tiny model, HF generate, gloo processes")
    ap.add_argument("--gpus", default=None, help="scale: the GPU counts to run, e.g. 1,2 (default 1,2,4,8 up to "
                                                  "the visible GPUs); server, agree: the largest is N")
    a = ap.parse_args(argv)
    a.argv = argv
    a.deadline = time.perf_counter() + a.budget_s
    a.arch, a.data, a.work, a.out = (p.resolve() for p in (a.arch, a.data, a.work, a.out))
    for path in (a.arch / "config.json", a.data / "train.jsonl", a.data / "test.jsonl"):
        if not path.is_file():
            sys.exit(f"error: {path} not found")
    if a.cpu and a.phase in ("vllm", "server"):
        sys.exit(f"error: the {a.phase} phase needs GPUs (vLLM does not run on CPU)")
    unsafe = {k: os.environ.get(k) for k, v in NO_MULTICAST.items() if os.environ.get(k) != v}
    if not a.cpu and unsafe:
        sys.exit(f"error: NVLink multicast must stay off in every process: export "
                 f"{' '.join(f'{k}={v}' for k, v in NO_MULTICAST.items())} (now {unsafe})")
    if a.phase in ("scale", "server", "agree"):
        visible = 2 if a.cpu else len(launch.visible_gpus(os.environ))
        try:
            a.gpus = sorted({int(n) for n in a.gpus.split(",")}) if a.gpus else [n for n in (1, 2, 4, 8)
                                                                                 if n <= visible]
        except ValueError:
            sys.exit(f"error: --gpus {a.gpus}: give GPU counts such as 1,2,4,8")
        if not a.gpus or min(a.gpus) < 1 or max(a.gpus) > visible:
            sys.exit(f"error: --gpus {a.gpus}: between 1 and the {visible} visible GPU(s)")
    a.work.mkdir(parents=True, exist_ok=True)
    a.out.mkdir(parents=True, exist_ok=True)
    logfile = a.work / f"{a.phase}.log"
    real_vocab = a.phase in ("scale", "server") and not a.cpu
    model = build_model(a.arch, a.data, a.work / ("model_real_vocab" if real_vocab else "model"), a.cpu, real_vocab)
    start = time.perf_counter()
    a.save = lambda partial: write_summary(a, model, partial, logfile, start)  # after each run: a cut call keeps them
    results = PHASES[a.phase](a, model, a.work, logfile)
    write_summary(a, model, results, logfile, start)
    failed = [f"{leg}.{name}" for leg, r in results.items() for name, ok in r["checks"].items() if not ok]
    log(f"wrote {a.out / 'multi_gpu.json'}; " + (f"FAILED: {', '.join(failed)}" if failed else "all checks passed"))
    sys.exit(1 if failed else 0)


def write_summary(a, model: Path, results: dict, logfile: Path, start: float) -> None:
    """Merge ``results`` into <work>/multi_gpu.json (earlier phases' runs stay), table the scaling runs, copy
    to --out."""
    summary_path = a.work / "multi_gpu.json"
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
    summary |= results | {"model": {"architecture": str(a.arch / "config.json"), "tiny": a.cpu,
                                    "vocab_size": json.loads((model / "config.json").read_text())["vocab_size"]},
                          f"{a.phase}_phase_s": round(time.perf_counter() - start, 1)}
    summary[f"{a.phase}_model"] = summary["model"]  # scale and server: the real vocabulary; the others: tags
    summary["scaling"] = scaling_table(summary)
    summary["phase_commands"] = summary.get("phase_commands", {}) | {a.phase: common.command_line(SCENARIO, a.argv)}
    summary = {**summary, **envelope(a, summary)}
    summary_path.write_text(json.dumps(summary, indent=1) + "\n")
    (a.work / "scaling.md").write_text(scaling_markdown(summary["scaling"]))
    for path in (summary_path, logfile, a.work / "scaling.md", *a.work.glob("*vllm-serve.log")):
        if path.is_file():
            shutil.copy(path, a.out / path.name)


def envelope(a, summary: dict) -> dict:
    """The bench result schema's fields for a summary of launches: one run per launch (its steps TRL's step_time,
    the first step of each process left out as in ``timing``), failed where a check failed."""
    launches = {name: r for name, r in summary.items() if isinstance(r, dict) and "checks" in r}
    runs = []
    for name, r in sorted(launches.items()):
        timed = set(r.get("speed", {}).get("timed_steps", []))
        steps = [{"step": step, "seconds": s, "timed": step in timed}
                 for step, s in r.get("curves", {}).get("step_time", [])]
        spread = {k: r["speed"][k] for k in ("median_s", "min_s", "max_s")} if timed else {}
        runs.append({"name": name, "steps": steps, "peak_memory_gib": None, "checks_passed": all(r["checks"].values()),
                     "summary": {"timed_steps": len(timed), **spread}})
    params = {k: str(v) if isinstance(v, Path) else v for k, v in vars(a).items()
              if k not in ("argv", "deadline", "save")}
    status = "complete" if all(r["checks_passed"] for r in runs) else "failed"
    return common.result(SCENARIO, a.argv, params, runs, status)


PHASES = {"zero2": phase_zero2, "vllm": phase_vllm, "scale": phase_scale, "server": phase_server,
          "agree": phase_agree}
