"""The several-GPUs scenario (`python -m bench multi-gpu`, bench/multi_gpu.py) dry-run on CPU, the pieces of its
summary, and the checkpoint marker's wait for every process, with two real CPU processes."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest

from bench import common, multi_gpu
from grpo_gsm8k import training

ROOT = Path(__file__).resolve().parent.parent
SCENARIO = [sys.executable, "-m", "bench", "multi-gpu"]


@pytest.fixture(scope="module")
def arch(tmp_path_factory) -> Path:
    """A Qwen2 config.json in place of Qwen2.5-3B's (the GPU run's --arch); --cpu shrinks it anyway."""
    from transformers import Qwen2Config

    folder = tmp_path_factory.mktemp("arch")
    Qwen2Config().to_json_file(folder / "config.json")
    return folder


def test_marker_waits_for_every_process_before_vouching_for_the_checkpoint(tmp_path):
    """Rank 1 is still writing its RNG state when rank 0 gets to on_save: the marker must come after it."""
    rank_script = tmp_path / "rank.py"
    rank_script.write_text(textwrap.dedent(f"""\
        import sys, time
        from pathlib import Path
        from types import SimpleNamespace
        import torch.distributed as dist
        from grpo_gsm8k import training
        rank = int(sys.argv[1])
        dist.init_process_group("gloo", init_method="file://{tmp_path / 'rendezvous'}", rank=rank, world_size=2)
        folder = Path("{tmp_path}") / "checkpoint-2"
        folder.mkdir(exist_ok=True)
        if rank == 1:
            time.sleep(1.5)  # a slow disk: the Trainer writes each process's RNG state with no barrier after it
            (folder / "rng_state_1.pth").write_bytes(b"rng")
        state = SimpleNamespace(global_step=2, is_world_process_zero=rank == 0)
        training.CheckpointMarker({{"run_hash": "x"}}).on_save(SimpleNamespace(output_dir="{tmp_path}"), state, None)
        dist.destroy_process_group()
        """))
    ranks = [subprocess.Popen([sys.executable, str(rank_script), str(r)], cwd=ROOT) for r in (0, 1)]
    assert [p.wait(120) for p in ranks] == [0, 0]
    folder = tmp_path / "checkpoint-2"
    assert (folder / training.MARKER).stat().st_mtime_ns >= (folder / "rng_state_1.pth").stat().st_mtime_ns


def test_only_rank_zero_deletes_old_checkpoints_and_only_after_every_rank_decided(tmp_path):
    """A rerun under 2 processes finds a finished run's checkpoints: both must start over, one deletes them,
    and not before the slower one has read them (on 2 GPUs both deleted, and the second crashed)."""
    ckpts = tmp_path / "checkpoints"
    (ckpts / "checkpoint-2").mkdir(parents=True)
    (ckpts / "checkpoint-2" / training.MARKER).write_text(json.dumps({"run_hash": "x", "step": 2}))
    training.mark_finished(ckpts, "x", 2)
    rank_script = tmp_path / "rank.py"
    rank_script.write_text(textwrap.dedent(f"""\
        import json, shutil, sys, time
        from pathlib import Path
        import torch.distributed as dist
        from grpo_gsm8k import training
        rank = int(sys.argv[1])
        dist.init_process_group("gloo", init_method="file://{tmp_path / 'rendezvous'}", rank=rank, world_size=2)
        log = Path("{tmp_path}") / f"rank{{rank}}.json"
        deleted = []
        real_rmtree = shutil.rmtree
        def rmtree(path, *args, **kwargs):
            deleted.append(time.time())
            real_rmtree(path, *args, **kwargs)
        shutil.rmtree = rmtree
        if rank == 1:
            time.sleep(1.5)  # a slower process reaches the decision later
        entered = time.time()
        found = training.resume_checkpoint(Path("{ckpts}"), {{"run_hash": "x"}})
        log.write_text(json.dumps({{"entered": entered, "found": found and str(found), "deleted": deleted,
                                    "exists_after": Path("{ckpts}").exists()}}))
        dist.destroy_process_group()
        """))
    ranks = [subprocess.Popen([sys.executable, str(rank_script), str(r)], cwd=ROOT) for r in (0, 1)]
    assert [p.wait(120) for p in ranks] == [0, 0]
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r0["found"] is None and r1["found"] is None
    assert r1["deleted"] == [] and len(r0["deleted"]) == 1
    assert r0["deleted"][0] >= r1["entered"], "rank 0 deleted the checkpoints before rank 1 had read them"
    assert not r0["exists_after"] and not r1["exists_after"]


def test_the_simulated_crash_kills_ranks_in_sessions_of_their_own(tmp_path):
    """torchrun starts each rank with start_new_session: the kill must reach them, not only the launcher."""
    launcher = tmp_path / "launcher.py"
    launcher.write_text(textwrap.dedent(f"""\
        import subprocess, sys, time
        rank = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"], start_new_session=True)
        open("{tmp_path / 'rank.pid'}", "w").write(str(rank.pid))
        time.sleep(600)
        """))
    pid_file = tmp_path / "rank.pid"
    leg = multi_gpu.Leg(tmp_path, tmp_path / "leg.log", [sys.executable, str(launcher)])
    result = leg.wait(60, until=lambda: pid_file.is_file() and pid_file.read_text() != "")
    assert result["how"] == "killed"
    import psutil

    rank_pid = int(pid_file.read_text())
    assert not psutil.pid_exists(rank_pid) or psutil.Process(rank_pid).status() == psutil.STATUS_ZOMBIE


def test_step_times_leave_out_the_first_step_of_each_process():
    step_time = [[1, 9.0], [2, 2.0], [3, 8.0], [4, 3.0], [5, 4.0]]
    assert multi_gpu.timing(step_time, {1, 3}) == {"timed_steps": [2, 4, 5], "median_s": 3.0, "min_s": 2.0,
                                                   "max_s": 4.0}
    assert multi_gpu.timing([[1, 9.0]], {1}) == {"timed_steps": []}


def test_a_run_that_finished_before_the_kill_fails_the_resume_check():
    finished = {"how": "exited", "finished_step": 6, "complete_checkpoints": [4, 6]}
    summary = {"resumed_from": None}
    result = multi_gpu.resume_checks(finished, {"rc": 0}, summary)
    assert result == {"killed_before_the_end": False, "resumed_from_newest_complete_checkpoint": False,
                      "rerun_succeeded": True}
    killed = {"how": "killed", "finished_step": None, "complete_checkpoints": [2]}
    assert not multi_gpu.resume_checks(killed, {"rc": 0}, {"resumed_from": None})[
        "resumed_from_newest_complete_checkpoint"], "a rerun that started over did not resume"
    assert all(multi_gpu.resume_checks(killed, {"rc": 0}, {"resumed_from": "checkpoints/checkpoint-2"}).values())


def test_sampling_curves_are_read_as_dvclive_writes_them(tmp_path):
    """TRL's sampling/* metrics through the train stage's own logger, back through the summary."""
    ws = tmp_path / "ws"
    logger = training.MetricsLogger(str(ws / "reports/train"), resume=False)
    state = SimpleNamespace(is_world_process_zero=True, global_step=0)
    logger.on_train_begin(None, state, None)
    for step in range(1, multi_gpu.STEPS + 1):
        state.global_step = step
        logger.on_log(None, state, None, logs={
            "reward": 0.1 * step, "step_time": 2.0 + step, "completions/mean_length": 100.0, "grad_norm": 0.5,
            "sampling/sampling_logp_difference/mean": 0.01 * step, "sampling/importance_sampling_ratio/min": 0.9})
    logger.on_train_end(None, state, None)
    summary = multi_gpu.summarize(ws, completions_per_step=32)
    assert summary["curves"]["sampling/sampling_logp_difference/mean"][2] == [3, 0.03]
    assert summary["curves"]["sampling/importance_sampling_ratio/min"][0] == [1, 0.9]
    assert multi_gpu.sampling_checks(summary) == {"sampling_logged_every_step": True}
    assert summary["speed"]["timed_steps"] == [2, 3, 4, 5, 6]
    assert summary["speed"]["completion_tokens_per_s_median"] == round(100 * 32 / 6.0, 1)  # step 4: 6 s
    assert summary["finished_step"] is None and summary["logged_steps"] == [1, 2, 3, 4, 5, 6]


@pytest.mark.parametrize("argv, env, message", [
    (["vllm", "--cpu"], {}, "the vllm phase needs GPUs"),
    (["zero2"], {"NCCL_NVLS_ENABLE": "1"}, "NVLink multicast must stay off"),
    (["zero2", "--data", "nowhere"], {}, "nowhere/train.jsonl not found"),
])
def test_refusals_before_any_work(tmp_path, arch, argv, env, message):
    args = [*SCENARIO, argv[0], "--arch", str(arch), "--data", str(ROOT / "tests/fixtures/gsm8k"),
            "--work", str(tmp_path / "work"), "--out", str(tmp_path / "out"), *argv[1:]]
    proc = subprocess.run(args, capture_output=True, text=True, cwd=ROOT,
                          env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), **env})
    assert proc.returncode != 0 and message in proc.stderr, proc.stderr
    assert not (tmp_path / "work").exists()


def _cpu_phases(base: Path, arch: Path, *phases: str) -> tuple[Path, dict]:
    """`python -m bench multi-gpu`'s phases with --cpu, one after the other in one work folder (as device calls on one
    warm machine), and the summary they leave."""
    for phase in phases:
        proc = subprocess.run([*SCENARIO, phase, "--cpu", "--arch", str(arch),
                               "--data", str(ROOT / "tests/fixtures/gsm8k"), "--work", str(base / "work"),
                               "--out", str(base / "out")], capture_output=True, text=True, cwd=ROOT)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return base, json.loads((base / "out/multi_gpu.json").read_text())


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory, arch):
    return _cpu_phases(tmp_path_factory.mktemp("multi_gpu"), arch, "zero2")


@pytest.mark.slow
def test_dry_run_trains_kills_resumes_and_reports(dry_run):
    base, summary = dry_run
    assert (base / "out/zero2.log").is_file()
    ddp, zero2 = summary["ddp"], summary["zero2"]
    assert all(ddp["checks"].values()) and all(zero2["checks"].values()), (ddp["checks"], zero2["checks"])
    assert zero2["killed_run"]["how"] == "killed" and zero2["killed_run"]["complete_checkpoints"] == [2]
    assert zero2["resumed_from"] == "checkpoints/checkpoint-2"
    assert zero2["speed"]["timed_steps"] == [2, 4, 5, 6], "step 1 and the resumed run's first step are warm-up"
    assert ddp["speed"]["timed_steps"] == [2, 3, 4, 5, 6]
    assert zero2["checkpoints"] == ["checkpoint-4", "checkpoint-6"]  # save_total_limit 2, after the resume
    # same seed, same data, same weights: the first step is the same in both runs
    assert ddp["curves"]["reward"][0] == zero2["curves"]["reward"][0]
    assert summary["model"]["tiny"] and summary["model"]["vocab_size"] < 1000
    # the bench result schema: one run per launch, its steps TRL's step_time, passed where its checks passed
    assert common.check(summary) == [] and summary["status"] == "complete" and summary["scenario"] == "multi-gpu"
    runs = {r["name"]: r for r in summary["runs"]}
    assert set(runs) == {"ddp", "zero2"} and all(r["checks_passed"] for r in runs.values())
    assert runs["ddp"]["summary"]["median_s"] == ddp["speed"]["median_s"] and len(runs["ddp"]["steps"]) == 6
    assert summary["phase_commands"]["zero2"].startswith("python -m bench multi-gpu zero2 --cpu ")


# ------------------------------------------------------------ the launcher's pre-flight (issue 31)

def _launch(tmp_path, vllm_mode="colocate", overrides=None, **env):
    from test_packaging import _fake_multi_gpu_repo

    repo, base = _fake_multi_gpu_repo(tmp_path, vllm_mode, overrides)
    return subprocess.run(["bash", "scripts/train_multi_gpu.sh"], cwd=repo, env={**base, **env},
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("mode, overrides, env, key, fix", [
    ("server", {}, {"N": "1"}, "generation.vllm_mode: server", "needs N >= 2 (N=1 here)"),
    ("colocate", {"train.per_device_train_batch_size": 12}, {}, "train.per_device_train_batch_size",
     "not divisible by train.num_generations (8)"),
    ("colocate", {}, {"N": "8"}, "N=8: only 4 GPU(s) visible (nvidia-smi -L)", "set N=4 or fewer"),
    ("colocate", {}, {"N": "2", "CUDA_VISIBLE_DEVICES": "5"}, "N=2: only 1 GPU(s) visible (CUDA_VISIBLE_DEVICES=5)",
     "set N=1 or fewer"),
    ("colocate", {}, {"N": "two"}, "N=two", "set N=1 to N=4"),
    ("colocate", {}, {"ACCEL": "zero3"}, "ACCEL=zero3", "set ACCEL=ddp or ACCEL=zero2"),
    ("colocate", {"model.load_in_4bit": True}, {}, "generation.use_vllm", "Set model.load_in_4bit: false"),
    ("colocate", {"model.backend": "unsloth"}, {"N": "2"}, "model.backend: unsloth", "set model.backend: transformers"),
    # 200 prepared rows: one step on 4 ranks with 64 accumulation steps of 8 completions takes 4 x 64 prompts
    ("colocate", {"train.gradient_accumulation_steps": 64}, {}, "data.train_limit: 200 prepared training row(s)",
     "takes 256 prompts (64 a rank)"),
])
def test_launcher_refuses_what_cannot_work_in_one_line_before_starting_anything(tmp_path, mode, overrides, env,
                                                                                key, fix):
    res = _launch(tmp_path, mode, overrides, **env)
    errors = [line for line in res.stderr.splitlines() if line.startswith("error:")]
    assert res.returncode == 2 and len(errors) == 1, res.stdout + res.stderr
    assert key in errors[0] and fix in errors[0], errors[0]
    assert "ACCELERATE" not in res.stdout and not (tmp_path / "trl.args").exists(), "something was started"


def test_launcher_dry_run_prints_the_colocate_plan_and_per_rank_split(tmp_path):
    """The defaults on 2 of 4 GPUs with ZeRO-2: each rank generates its own 32 prompts x 8 with its own engine."""
    res = _launch(tmp_path, "colocate", None, N="2", ACCEL="zero2", DRY_RUN="1")
    assert res.returncode == 0, res.stderr
    assert res.stdout.splitlines() == ["would run: CUDA_VISIBLE_DEVICES=0,1 accelerate launch --config_file "
                                       "configs/accelerate/zero2.yaml --num_processes 2 stages/train.py"]
    assert "plan: colocate, 2 training process(es) on GPU(s) 0,1, DeepSpeed ZeRO-2" in res.stderr
    assert ("per optimizer step 64 prompts x 8 = 512 completions; each rank 32 prompts (256 completions) "
            "generated by its own vLLM engine") in res.stderr
    assert "rank 0: prompts 0-31, rank 1: prompts 32-63" in res.stderr


def test_launcher_dry_run_in_server_mode_keeps_the_last_gpu_for_the_server(tmp_path):
    res = _launch(tmp_path, "server", None, DRY_RUN="1")
    assert res.returncode == 0, res.stderr
    assert res.stdout.splitlines() == [
        "would run: CUDA_VISIBLE_DEVICES=3 trl vllm-serve --model tiny/model --port 8000",
        "would run: CUDA_VISIBLE_DEVICES=0,1,2 accelerate launch --config_file configs/accelerate/ddp.yaml "
        "--num_processes 3 stages/train.py"]
    assert "per optimizer step 96 prompts x 8 = 768 completions" in res.stderr
    assert not (tmp_path / "trl.args").exists()


SPLIT_RANK = """\
import json, os, sys
from pathlib import Path
from datasets import Dataset
from grpo_gsm8k import config, gsm8k, modeling, training
p = config.load(sys.argv[1])
out = Path(sys.argv[2])
rank = int(os.environ.get("RANK", "0"))
rows = [json.loads(line) for line in open(sys.argv[3])]
dataset = Dataset.from_list([{"prompt": gsm8k.build_prompt(r["question"], p.data.system_prompt), "answer": r["answer"]}
                             for r in rows])
def record(prompts, completions, **kwargs):  # called once a generation, with this rank's share
    with (out / f"rank{rank}.jsonl").open("a") as f:
        f.write(json.dumps([messages[-1]["content"] for messages in prompts]) + "\\n")
    return [float(len(c[0]["content"]) % 3) for c in completions]
trainer = training.build_trainer(p, modeling.load_policy(p), dataset, str(out / "checkpoints"),
                                 reward_funcs_override=[record])
trainer.train()
"""


def _split_run(tmp_path, tiny_model, tiny_params, ranks: int, accumulation: int) -> list[list[list[str]]]:
    """The real trainer (build_trainer) on ``ranks`` gloo processes: each rank's prompts, one list a generation."""
    from grpo_gsm8k.config import write_yaml

    out = tmp_path / f"ranks{ranks}"
    out.mkdir()
    params = tiny_params | {"model": {**tiny_params["model"], "name": str(tiny_model)}}
    params["train"] = {**params["train"], "gradient_accumulation_steps": accumulation, "max_steps": 2,
                       "save_steps": 100, "reward_weights": {"correctness": 1.0}}
    write_yaml(out / "params.yaml", params)
    (out / "rank.py").write_text(SPLIT_RANK)
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(ranks)]
    proc = subprocess.run([*launcher, str(out / "rank.py"), str(out / "params.yaml"), str(out),
                           str(ROOT / "tests/fixtures/gsm8k/train.jsonl")], cwd=out, capture_output=True, text=True,
                          timeout=600, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return [[json.loads(line) for line in (out / f"rank{r}.jsonl").read_text().splitlines()] for r in range(ranks)]


@pytest.mark.slow
def test_two_gloo_ranks_split_the_same_global_batch_into_whole_groups(tmp_path, tiny_model, tiny_params):
    """What every rank's colocated vLLM engine is handed (vllm_generation.py generates exactly its rank's
    prompts): on 2 ranks with half the accumulation, rank 0 holds the first half of the one-process batch and
    rank 1 the second, each prompt's num_generations copies on one rank."""
    group = tiny_params["train"]["num_generations"]  # 4; 8 completions a micro-batch: 2 prompts
    one = _split_run(tmp_path, tiny_model, tiny_params, ranks=1, accumulation=2)[0]
    rank0, rank1 = _split_run(tmp_path, tiny_model, tiny_params, ranks=2, accumulation=1)
    assert len(one) == len(rank0) == len(rank1) == 2, "one generation per optimizer step, on every rank"
    for step, batch in enumerate(one):
        halves = (batch[:len(batch) // 2], batch[len(batch) // 2:])
        assert (rank0[step], rank1[step]) == halves, f"step {step + 1}: ranks got another split of the batch"
        for share in halves:
            groups = [share[i:i + group] for i in range(0, len(share), group)]
            assert all(len(set(g)) == 1 and len(g) == group for g in groups), "a prompt group spans ranks"
        assert not set(halves[0]) & set(halves[1])


# ------------------------------------------------------------ the scaling bench (issue 31)

def _run(gpus, server=False, rate=None, host="h", median=2.0):
    return {"gpus": gpus, "train_ranks": gpus - server, "server": server, "completions_per_step": 256 * (gpus - server),
            "machine": {"host": host, "gpus": [f"GPU {i}" for i in range(8)]}, "checks": {"finished": True},
            "speed": {"timed_steps": [2, 3, 4], "median_s": median, "min_s": median, "max_s": median,
                      **({"completion_tokens_per_s_median": rate} if rate else {})},
            "curves": {"completions/mean_length": [[2, 512.0], [3, 511.0], [4, 512.0]]}}


def test_scaling_efficiency_is_per_gpu_throughput_against_one_gpu_of_the_same_machine():
    summary = {"scale_n1": _run(1, rate=1000.0), "scale_n2": _run(2, rate=1800.0),
               "scale_n4": _run(4, rate=3000.0, host="other"), "server_n4": _run(4, server=True, rate=1200.0),
               "zero2": {"checks": {}}}
    rows = {r["run"]: r for r in multi_gpu.scaling_table(summary)}
    assert rows["scale_n1"]["scaling_efficiency"] == 1.0
    assert rows["scale_n2"]["scaling_efficiency"] == 0.9
    assert rows["scale_n4"]["scaling_efficiency"] is None, "another machine: no efficiency against this 1 GPU"
    assert rows["server_n4"]["scaling_efficiency"] == 0.3 and rows["server_n4"]["train_ranks"] == 3
    assert [r["run"] for r in multi_gpu.scaling_table(summary)] == ["scale_n1", "scale_n2", "scale_n4", "server_n4"]
    table = multi_gpu.scaling_markdown(list(rows.values()))
    assert "| server_n4 | 3 train + 1 server | 768 | 2.0 (2.0-2.0) | 3 | 1200.0 | 30% | passed |" in table


def test_agreement_allows_sampling_noise_and_catches_a_different_batch():
    def run(reward, std, batch):
        return {"completions_per_step": 256, "effective_args": {"num_generations": 8, "generation_batch_size": batch},
                "curves": {"reward": [[1, reward]], "reward_std": [[1, std]]}}
    one = run(0.30, 0.2, 256)
    assert multi_gpu.agreement(one, run(0.34, 0.2, 256)) == {"same_global_batch": True,
                                                            "step1_reward_within_noise": True}
    assert not multi_gpu.agreement(one, run(0.50, 0.2, 256))["step1_reward_within_noise"]
    assert not multi_gpu.agreement(one, run(0.30, 0.2, 512))["same_global_batch"]


@pytest.fixture(scope="module")
def scaling_dry_run(tmp_path_factory, arch):
    return _cpu_phases(tmp_path_factory.mktemp("scaling"), arch, "scale", "agree")


@pytest.mark.slow
def test_scaling_dry_run_keeps_the_per_gpu_batch_and_compares_one_with_two_ranks(scaling_dry_run):
    base, summary = scaling_dry_run
    n1, n2 = summary["scale_n1"], summary["scale_n2"]
    assert (n1["world_size"], n2["world_size"]) == (1, 2)
    assert (n1["effective_args"]["generation_batch_size"], n2["effective_args"]["generation_batch_size"]) == (16, 32)
    assert n1["speed"]["timed_steps"] == n2["speed"]["timed_steps"] == [2, 3, 4]
    assert all(n1["checks"].values()) and all(n2["checks"].values())
    assert [r["run"] for r in summary["scaling"]] == ["scale_n1", "scale_n2"]
    assert summary["scaling"][0]["scaling_efficiency"] == 1.0 and summary["scaling"][1]["scaling_efficiency"]
    assert (base / "out/scaling.md").read_text().count("\n| scale_n") == 2
    one, two = summary["agree_n1"], summary["agree_n2"]
    assert all(one["checks"].values()) and all(two["checks"].values()), (one["checks"], two["checks"])
    assert (one["effective_args"]["steps_per_generation"], two["effective_args"]["steps_per_generation"]) == (2, 1)
    assert one["effective_args"]["generation_batch_size"] == two["effective_args"]["generation_batch_size"] == 16
    assert two["world_size"] == 2 and two["step1_reward_z"] is not None


def test_scaling_bench_refuses_the_server_phase_on_cpu_and_more_gpus_than_visible(tmp_path, arch):
    for argv, message in ((["server", "--cpu"], "the server phase needs GPUs"),
                          (["scale", "--cpu", "--gpus", "1,4"], "between 1 and the 2 visible GPU(s)")):
        proc = subprocess.run([*SCENARIO, argv[0], "--arch", str(arch), "--data",
                               str(ROOT / "tests/fixtures/gsm8k"), "--work", str(tmp_path / "work"),
                               "--out", str(tmp_path / "out"), *argv[1:]], capture_output=True, text=True, cwd=ROOT)
        assert proc.returncode != 0 and message in proc.stderr, proc.stderr
    assert not (tmp_path / "work").exists()
