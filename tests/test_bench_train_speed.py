"""`python -m bench train-speed` and `merge` on CPU with the tiny model (the tiny profile's batch): the result they
write (the bench result schema), what a timeout leaves, the adapter through the merge stage, and a new result
picked up by `python -m bench report` where its scenario's table is."""

import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bench import common, report, train_speed
from grpo_gsm8k import config

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "tests" / "fixtures" / "gsm8k"
TINY = ["--backend", "transformers", "--params", str(ROOT / "profiles/tiny.yaml"), "--data", str(DATA),
        "--completion", "8"]
pytestmark = pytest.mark.slow


def bench(*args: str) -> None:
    proc = subprocess.run([sys.executable, "-m", "bench", *args], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


@pytest.fixture(scope="module")
def trained(tiny_model, tmp_path_factory):
    """Issue 27's `today` lever config for 3 steps, its adapter saved (LoRA B perturbed), as speed_levers.sh runs it."""
    out = tmp_path_factory.mktemp("train_speed")
    bench("train-speed", *TINY, "--model", str(tiny_model), "--configs", "today", "--steps-big", "3",
          "--results-dir", str(out), "--out", "levers", "--save-adapter", str(out / "adapter"), "--budget-s", "300")
    return out, json.loads((out / "levers.json").read_text())


def test_a_run_writes_one_result_of_the_schema_with_its_timed_steps(trained):
    out, result = trained
    assert common.check(result) == [] and result["scenario"] == "train-speed" and result["status"] == "complete"
    assert result["command"].startswith("python -m bench train-speed --backend transformers ")
    [run] = result["runs"]
    assert run["name"] == "today" and run["status"] == "complete" and [s["step"] for s in run["steps"]] == [1, 2, 3]
    seconds = [s["seconds"] for s in run["steps"][1:]]  # the first step is warm-up
    assert run["summary"]["timed_steps"] == 2
    assert run["summary"]["median_s"] == pytest.approx(sum(seconds) / 2, abs=1e-3)
    assert run["summary"]["min_s"] == min(seconds) and run["summary"]["max_s"] == max(seconds)
    assert all(s["completion_tokens"] == s["completions"] * 8 for s in run["steps"])  # every completion forced to 8
    # the lever's params were applied, and TRL's own sections were timed
    assert run["params"] == train_speed.LEVERS["today"]["params"]
    assert run["effective_args"]["gradient_checkpointing"] is True
    layers = json.loads((Path(result["model"]) / "config.json").read_text())["num_hidden_layers"]
    assert run["checkpointed_layers"] == {"layers": layers, "checkpointed": layers}
    assert "section_transformers_generate_s" in run["summary"]["sections_s_per_step"]
    assert result["model_config"]["hidden_size"] == json.loads((Path(result["model"]) / "config.json").read_text())[
        "hidden_size"]


def test_a_bench_adapter_goes_through_the_merge_stage_with_its_card(trained, tiny_model, tmp_path):
    """`train-speed --save-adapter` then `merge`: the merge stage reads the adapter's training_run.json for the
    model card, which the H100 run once found missing."""
    out, _ = trained
    run = json.loads((out / "adapter/training_run.json").read_text())
    assert run["backend"] == "transformers" and run["base_model"] == str(tiny_model.resolve())
    assert run["effective_grpo_config"]["vllm_importance_sampling_correction"] is True

    bench("merge", "--model", str(tiny_model), "--adapter", str(out / "adapter"), "--data", str(DATA),
          "--workdir", str(tmp_path / "work"), "--results-dir", str(tmp_path), "--out", "merge")
    merge = json.loads((tmp_path / "merge.json").read_text())
    assert common.check(merge) == [] and merge["runs"][0]["steps"][0]["step"] == "merge"
    assert merge["pass"] and merge["base_vs_merged"]["max_abs"] > 0  # the perturbed LoRA changed the logits
    card = (tmp_path / "work/models/merged/README.md").read_text()
    assert "| backend | transformers |" in card


def test_the_report_tables_a_new_levers_result_where_it_lands(trained, tmp_path):
    """speed_levers.sh's result copied into a results tree is picked up by the levers table as it is, with the
    command, GPU and status the index reads from the file itself; without it, the table names the command."""
    out, result = trained
    template = tmp_path / "BENCHMARKS.in.md"
    template.write_text("# B\n\n## Levers\n\n{{speed-levers}}\n\n## Training speed\n\n{{train-speed}}\n")
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "runs.yaml").write_text("runs: {}\n")
    bench_md, _, problems = report.render(empty, template, tmp_path)
    assert "Not measured yet: issue 27's speed levers" in bench_md and "bash bench/speed_levers.sh main" in bench_md
    assert problems == []

    results = tmp_path / "results"
    (results / "train_speed/levers_cpu").mkdir(parents=True)
    (results / "train_speed/levers_cpu/levers.json").write_text(json.dumps(result))
    (results / "runs.yaml").write_text("runs: {}\n")
    bench_md, index_md, problems = report.render(results, template, tmp_path)
    assert problems == [] and "Not measured yet" not in bench_md
    levers, speed = bench_md.split("## Training speed")
    summary = result["runs"][0]["summary"]
    row = next(line for line in levers.splitlines() if "`train_speed/levers_cpu/levers.json`" in line)
    assert f"**{summary['median_s']:.1f} s ({summary['min_s']:.1f}-{summary['max_s']:.1f})**, 2 timed" in row
    assert "| today |" in row and "levers.json" not in speed  # levers have their own table
    folder = next(line for line in index_md.splitlines() if line.startswith("| `train_speed/levers_cpu/` |"))
    assert f"`{result['command']}`" in folder and "| complete |" in folder
    assert f"| {result['finished'][:10]} |" in folder

    later = {**result, "runs": [{**result["runs"][0], "name": "levers_mb8"}]}  # a lever added later
    (results / "train_speed/levers_cpu/later.json").write_text(json.dumps(later))
    levers, speed = report.render(results, template, tmp_path)[0].split("## Training speed")
    assert "| levers_mb8 |" in levers and "later.json" not in speed

    # a config on both sides of another in one call (speed_levers.sh next): its rows numbered in the order they ran,
    # and a `current` entry takes the run it names
    run = result["runs"][0]
    slower = {**run, "name": "levers_mb8", "steps": [{**st, "seconds": st["seconds"] + 100} for st in run["steps"]]}
    both = {**result, "runs": [{**run, "name": "levers_mb8"}, run, slower]}
    (results / "train_speed/levers_cpu/later.json").write_text(json.dumps(both))
    (results / "runs.yaml").write_text(
        "runs: {}\ncurrent:\n  - {what: last, result: train_speed/levers_cpu/later.json, config: 'levers_mb8 #2'}\n"
        "  - {what: none, result: train_speed/levers_cpu/later.json, config: 'levers_mb8 #3'}\n")
    template.write_text(template.read_text() + "\n## Now\n\n{{current}}\n")
    bench_md, _, problems = report.render(results, template, tmp_path)
    rows = [line for line in bench_md.split("## Training speed")[0].splitlines() if "later.json" in line]
    assert [line.split(" | ")[3] for line in rows] == ["levers_mb8 #1", "today", "levers_mb8 #2"]
    last = next(line for line in bench_md.split("## Now")[1].splitlines() if line.startswith("| last |"))
    median = train_speed.summarise(slower["steps"], 1)["median_s"]
    assert f"**{median:.1f} s" in last and median > 100
    assert problems == ["runs.yaml current: train_speed/levers_cpu/later.json has no config levers_mb8 #3"]


def test_speed_levers_sh_prints_the_summary_of_a_result_in_the_schema(trained):
    """bench/speed_levers.sh's own summary lines (its inline Python) over a train-speed result: what a GPU call
    prints of each lever, read here from a CPU run of one."""
    out, result = trained
    script = (ROOT / "bench/speed_levers.sh").read_text()
    code = script.split("train_speed_levers_$mode.json\" <<'EOF'\n", 1)[1].split("\nEOF\n", 1)[0]
    proc = subprocess.run([sys.executable, "-c", code, str(out / "levers.json")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    status, line = proc.stdout.splitlines()
    s = result["runs"][0]["summary"]
    assert status == "status complete"
    assert line.startswith(f"today complete 8 x 1 | s/step median {s['median_s']} [{s['min_s']}, {s['max_s']}] |")


def test_speed_levers_sh_runs_the_levers_at_the_batch_of_their_earlier_results():
    """The levers that set no batch run at 32 x 8, as on 2026-12-06, though params.yaml's defaults moved to 8 x 32
    (issue 27); nothing else of params.yaml changes."""
    script = (ROOT / "bench/speed_levers.sh").read_text()
    code = script.split("python - <<'EOF'\n", 1)[1].split("\nEOF\n", 1)[0]
    assert "/tmp/levers_params.yaml" in code and "--params /tmp/levers_params.yaml" in script
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    levers = config.read_yaml("/tmp/levers_params.yaml")  # as the bench reads --params (YAML 1.2: 5e-5 a float)
    shipped = config.read_yaml(ROOT / "params.yaml")
    assert (levers["train"]["per_device_train_batch_size"], levers["train"]["gradient_accumulation_steps"]) == (32, 8)
    shipped["train"].update(per_device_train_batch_size=32, gradient_accumulation_steps=8)
    assert levers == shipped


def test_every_speed_levers_sh_mode_names_only_configs_the_bench_knows():
    """A mode's configs reach `train-speed --configs` on the GPU only: a misspelt one would cost a device call."""
    script = (ROOT / "bench/speed_levers.sh").read_text()
    modes = dict(re.findall(r"^  (\w+)\) configs=\(([^)]*)\) ;;$", script, re.M))
    assert {"main", "next", "pair", "h200", "prepare"} <= modes.keys()
    assert modes["prepare"] == "" and modes["pair"].split() == ["levers_mb8", "today"]
    for mode, names in modes.items():
        assert set(names.split()) <= train_speed.CONFIGS.keys(), mode
    usage = re.search(r"usage: \$0 \[([^]]*)\]", script).group(1)
    assert usage.split("|") == list(modes)  # every mode in the usage line, in the order of the case


def test_the_gpu_session_scripts_parse():
    for script in sorted((ROOT / "bench").glob("*.sh")):
        proc = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
        assert proc.returncode == 0, f"{script.name}: {proc.stderr}"


def test_a_timeout_keeps_what_was_measured_as_a_partial_result(tiny_model, tmp_path):
    log_path = tmp_path / "train.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "bench", "train-speed", *TINY, "--model", str(tiny_model), "--configs", "defaults",
             "--steps-big", "1000", "--results-dir", str(tmp_path), "--out", "stopped", "--budget-s", "3000"],
            stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    deadline = time.time() + 300
    while "] step {" not in log_path.read_text():  # a step measured; the timeout lands in a later one
        assert proc.poll() is None and time.time() < deadline, log_path.read_text()[-3000:]
        time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)  # what `timeout` sends (speed_levers.sh)
    assert proc.wait(timeout=60) == 124, log_path.read_text()[-3000:]

    result = json.loads((tmp_path / "stopped.json").read_text())
    assert common.check(result) == [] and result["status"] == "partial"
    [run] = result["runs"]
    assert run["stopped"].startswith("SIGTERM") and run["status"] == "partial"
    assert run["steps"] and run["micro_batch_seconds"] and all(s > 0 for s in run["micro_batch_seconds"])


def test_trainer_args_are_typed_like_yaml_values():
    pairs = ["vllm_gpu_memory_utilization=0.3", "optim=adamw_torch", "vllm_importance_sampling_correction=false",
             "max_steps=2", "vllm_max_model_length=null"]
    assert train_speed.parse_trainer_args(pairs) == {
        "vllm_gpu_memory_utilization": 0.3, "vllm_importance_sampling_correction": False, "max_steps": 2,
        "vllm_max_model_length": None, "optim": "adamw_torch"}
    with pytest.raises(SystemExit, match="expected KEY=VALUE"):
        train_speed.parse_trainer_args(["vllm_importance_sampling_correction"])


def test_summary_gives_the_median_and_spread_of_the_timed_steps_not_only_the_mean():
    steps = [{"seconds": s, "completion_tokens": 100, "generate_s": 1.0, "generate_and_score_s": 2.0}
             for s in (70.0, 68.0, 38.0, 37.0, 39.0)]  # two slow early steps: a mean alone would hide them
    summary = train_speed.summarise(steps, warmup=1)
    assert summary["timed_steps"] == 4 and summary["mean_s"] == 45.5
    assert summary["median_s"] == 38.5 and (summary["min_s"], summary["max_s"]) == (37.0, 68.0)
    assert summary["generate_s_per_step"] == 1.0 and summary["train_s_per_step"] == 43.5
    assert train_speed.summarise(steps, warmup=2)["median_s"] == 38.0
    # TRL's sections in seconds, apart from the caching allocator's retries counted in them
    for st, retries in zip(steps, (9, 9, 0, 2, 1)):
        st.update(section_vLLM_generate_s=0.5, section_vLLM_generate_alloc_retries=retries, alloc_retries=retries + 1)
    summary = train_speed.summarise(steps, warmup=1)
    assert summary["sections_s_per_step"] == {"section_vLLM_generate_s": 0.5}
    assert summary["alloc_retries_per_step"] == {"alloc_retries": 4.0, "section_vLLM_generate_alloc_retries": 3.0}


def test_halving_keeps_the_step_and_never_splits_a_group():
    bc = {"per_device_train_batch_size": 32, "gradient_accumulation_steps": 8, "completion_tokens": 512,
          "completions_per_step": 256, "prompts_per_step": 32}
    half = train_speed.halved(bc, num_generations=8)
    assert (half["per_device_train_batch_size"], half["gradient_accumulation_steps"]) == (16, 16)
    assert half["completions_per_step"] == 256
    quarter = train_speed.halved(half, 8)
    assert quarter["per_device_train_batch_size"] == 8 and quarter["completions_per_step"] == 256
    assert train_speed.halved(quarter, num_generations=8) is None  # 4 rows would split a group of 8


@pytest.mark.parametrize("name", sorted(train_speed.LEVERS))
def test_every_lever_trains_the_defaults_step_and_pins_what_it_changes(name):
    """A lever is compared with `today` step for step: the same 256 completions of 32 prompts; and each config says
    both settings that the levers move, so its result does not depend on what params.yaml holds at the time."""
    from grpo_gsm8k import config

    p = config.load(ROOT / "params.yaml")
    bc = train_speed.batch_config(p, name, 512)
    assert (bc["completions_per_step"], bc["prompts_per_step"]) == (256, 32)
    assert bc["per_device_train_batch_size"] % p.train.num_generations == 0
    params = train_speed.LEVERS[name]["params"]
    assert set(params["train"]) == {"reuse_training_logprobs"} and set(params["model"]) == {"gradient_checkpointing"}
    q = config.replace(p, **params)  # the keys exist and validate
    assert q.train.reuse_training_logprobs == params["train"]["reuse_training_logprobs"]


def test_checkpointing_every_other_layer_recomputes_half_of_them(tiny_model, tmp_path):
    """The partial-checkpointing levers: layers 0, 2, ... recompute, still after TRL's no-grad forward has turned
    checkpointing off and on again around each generation batch (which alone would checkpoint every layer again);
    with checkpointing off, none."""
    bench("train-speed", *TINY, "--model", str(tiny_model), "--configs", "ckpt_every2", "no_checkpointing",
          "--steps-big", "1", "--warmup", "0", "--results-dir", str(tmp_path), "--out", "partial", "--budget-s", "300")
    result = json.loads((tmp_path / "partial.json").read_text())
    every2, off = result["runs"]
    layers = json.loads((tiny_model / "config.json").read_text())["num_hidden_layers"]
    assert layers >= 2 and every2["checkpoint_every_n_layers"] == 2
    assert every2["checkpointed_layers"] == {"layers": layers, "checkpointed": (layers + 1) // 2}
    assert off["checkpointed_layers"] == {"layers": layers, "checkpointed": 0}
    assert every2["status"] == off["status"] == "complete"


def test_a_lever_that_breaks_is_recorded_and_the_next_configs_still_run(tiny_model, tmp_path):
    """Liger's kernels cannot run on this CPU (Triton; the package is not even installed here): that config fails
    with its error in the result, and the config after it is measured as usual."""
    bench("train-speed", *TINY, "--model", str(tiny_model), "--configs", "liger", "today", "--steps-big", "1",
          "--warmup", "0", "--results-dir", str(tmp_path), "--out", "broken", "--budget-s", "300")
    result = json.loads((tmp_path / "broken.json").read_text())
    liger, today = result["runs"]
    assert liger["status"] == "failed" and liger["error"] and not liger["steps"]
    assert liger["effective_args"] and train_speed.LEVERS["liger"]["trainer"] == {"use_liger_kernel": True}
    assert today["status"] == "complete" and [s["step"] for s in today["steps"]] == [1]
    assert result["status"] == "partial" and common.check(result) == []


def test_profile_takes_one_micro_batch_of_the_warm_up_step_and_ranks_its_ops(tiny_model, tmp_path):
    """--profile: one training micro-batch of each config's untimed warm-up step runs under torch.profiler, so the
    timed steps carry none; the result ranks its operators by their own time (the CPU's here, the GPU's on one), the
    matrix products among the first."""
    bench("train-speed", *TINY, "--model", str(tiny_model), "--configs", "today", "--steps-big", "2",
          "--profile", "--results-dir", str(tmp_path), "--out", "profiled", "--budget-s", "300")
    [run] = json.loads((tmp_path / "profiled.json").read_text())["runs"]
    profile, ga = run["profile"], run["batch"]["gradient_accumulation_steps"]
    assert profile["clock"] == "cpu" and profile["micro_batch"] == min(3, ga)  # inside step 1, the warm-up
    ms = [op["ms"] for op in profile["ops"]]
    assert ms == sorted(ms, reverse=True) and 0 < sum(ms) <= profile["total_ms"] + 0.1
    assert "aten::mm" in [op["op"] for op in profile["ops"][:5]]
    script = (ROOT / "bench/speed_levers.sh").read_text()  # its summary prints the ranking
    code = script.split("train_speed_levers_$mode.json\" <<'EOF'\n", 1)[1].split("\nEOF\n", 1)[0]
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path / "profiled.json")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"profiled micro-batch {profile['micro_batch']} (" in proc.stdout
    assert f"{profile['ops'][0]['ms']:9.2f} ms" in proc.stdout and profile["ops"][0]["op"][:40] in proc.stdout
    bench("train-speed", *TINY, "--model", str(tiny_model), "--configs", "today", "--steps-big", "1",
          "--warmup", "0", "--profile", "--results-dir", str(tmp_path), "--out", "timed_only", "--budget-s", "300")
    assert "profile" not in json.loads((tmp_path / "timed_only.json").read_text())["runs"][0]  # no warm-up step
