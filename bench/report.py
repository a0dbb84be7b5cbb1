"""BENCHMARKS.md and bench/results/INDEX.md from the results: one command, no GPU, no network.

    python -m bench report            # writes both
    python -m bench report --check    # exits 1 if either would change, or if the index finds a problem

Inputs: every result under bench/results/<scenario>/<run>/ (the bench result schema of bench/common.py, or the
layouts that predate it), bench/results/runs.yaml (what each run folder is: date, GPU, command, status of its
files, what was tried and what it measured, which figures of README.md and LEARNING.md it backs), and the
template bench/BENCHMARKS.in.md, whose lines `{{name}}` become the tables below (TABLES). A result folder that a
GPU session adds is picked up by its scenario's table as it is; one absent (issue 27's levers, issue 30's lm-eval,
issue 31's scaling) leaves a line that names the command that will fill it.
"""

from __future__ import annotations

import json
import re
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path

from bench import common, standin
from bench.train_speed import LEVERS

ROOT, RESULTS = common.ROOT, common.RESULTS
TEMPLATE = ROOT / "bench" / "BENCHMARKS.in.md"
QUOTING_DOCS = ("README.md", "LEARNING.md")
STATUS_WORDS = ("complete", "partial", "unfinished", "failed", "lost", "superseded", "notes")
LEGACY_KINDS = {"train": "train-speed", "eval": "eval-speed", "merge": "merge"}
FOLDER_SCENARIOS = {"train_speed": "train-speed", "eval_speed": "eval-speed", "merge": "merge", "pipeline": "pipeline",
                    "real_model": "real-model", "multi_gpu": "multi-gpu", "lm_eval": "lm-eval", "learning": "learning",
                    "checkpoint_verify": "checkpoint-verify", "install_check": "install-check"}
LEVER_CONFIGS = tuple(LEVERS)  # a result with any of them is tabled in the speed-levers section
# Measurements whose GPU runs have not happened yet: (table, what, the command, where its results go)
PENDING = (
    ("speed-levers", "issue 27's speed levers at the defaults' batch (one H200)", "bash bench/speed_levers.sh main",
     "train_speed/levers_h200"),
    ("lm-eval", "lm-evaluation-harness's GSM8K beside the project's grader on a GPU (issue 30)",
     "python -m bench lm-eval --adapter DIR --out $OUT/lm_eval", "lm_eval/<name>"),
    ("multi-gpu-scaling", "scaling at the defaults' per-GPU batch on 1 to 8 GPUs, server mode, and 1-vs-N agreement "
     "(issue 31)", "bash bench/multi_gpu.sh scale --gpus 1", "multi_gpu/scaling_<machine>"),
)


@dataclass
class Result:
    path: str  # relative to bench/results
    data: object
    scenario: str
    folder: dict  # the run folder's entry in runs.yaml
    file: dict = field(default_factory=dict)  # this file's entry there

    @property
    def run(self) -> str:
        """Its run folder, <scenario>/<run> (a file may sit deeper in it)."""
        return "/".join(self.path.split("/")[:2])

    @property
    def schema(self) -> bool:
        return isinstance(self.data, dict) and self.data.get("schema") == common.SCHEMA

    def gpu(self) -> str:
        if self.schema:
            g = self.data["gpu"]
            return f"{g['count']} x {g['name']}" if g.get("count", 0) > 1 else g["name"]
        if isinstance(self.data, dict) and isinstance(self.data.get("gpu"), str):
            return self.data["gpu"]
        return self.folder.get("gpu", "?")

    def label(self, default: str) -> str:
        return self.file.get("label") or default


def read(path: Path):
    if path.suffix == ".jsonl":
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return json.loads(path.read_text())


def scenario_of(rel: str, data) -> str:
    if isinstance(data, dict) and data.get("schema") == common.SCHEMA:
        return data["scenario"]
    if isinstance(data, dict) and data.get("kind") in LEGACY_KINDS:
        return LEGACY_KINDS[data["kind"]]
    top, name = rel.split("/", 1)[0], rel.rsplit("/", 1)[-1]
    if top == "real_model" and name == "summary.json":
        return "real-model"
    if top == "multi_gpu":
        return "ddp-check" if name == "ddp_check.json" else "multi-gpu"
    if top in ("pipeline", "learning", "checkpoint_verify"):
        return FOLDER_SCENARIOS[top]
    return "other"


def file_entry(folder: dict, name: str) -> dict:
    """A file's entry in runs.yaml: `name: "status: note"` or `name: {status, note, label, ...}`."""
    entry = folder.get("files", {}).get(name, {})
    if isinstance(entry, str):
        status, _, note = entry.partition(": ")
        entry = {"status": status, "note": note}
    return entry


class Results:
    """Every file under bench/results/, its run folder's manifest entry, and the loaded JSON results."""

    def __init__(self, root: Path = RESULTS, manifest: dict | None = None):
        from grpo_gsm8k import config

        self.root = root
        self.manifest = manifest if manifest is not None else config.read_yaml(root / "runs.yaml")
        self.folders = self.manifest.get("runs", {})
        self.problems: list[str] = []
        self.files = sorted(str(p.relative_to(root)) for p in root.rglob("*")
                            if p.is_file() and p.name not in ("runs.yaml", "INDEX.md"))
        self.runs: dict[str, list[str]] = {}
        for rel in self.files:
            parts = rel.split("/")
            if len(parts) < 3:
                self.problems.append(f"{rel}: not in a run folder (bench/results/<scenario>/<run>/)")
                continue
            self.runs.setdefault("/".join(parts[:2]), []).append("/".join(parts[2:]))
        self.results: list[Result] = []
        for run, names in sorted(self.runs.items()):
            folder = self.folders.get(run, {})
            for name in names:
                if name.endswith((".json", ".jsonl")):
                    data = read(root / run / name)
                    rel = f"{run}/{name}"
                    self.results.append(Result(rel, data, scenario_of(rel, data), folder, file_entry(folder, name)))
        for run in sorted(self.runs):
            schema = [r for r in self.results if r.run == run and r.schema]
            if run not in self.folders and not schema:
                self.problems.append(f"{run}/: not described in bench/results/runs.yaml (and no result in the schema)")
            for r in schema:
                self.problems += [f"{r.path}: lacks {m}" for m in common.check(r.data)]
        for run in self.folders:
            if run not in self.runs:
                self.problems.append(f"runs.yaml: {run}/ does not exist")
            statuses = {"": self.folders[run].get("status", "complete")}
            for name in self.folders[run].get("files", {}):
                statuses[name] = file_entry(self.folders[run], name).get("status") or "complete"
                if name not in self.runs.get(run, []):
                    self.problems.append(f"runs.yaml: {run}/{name} does not exist")
            self.problems += [f"runs.yaml: {run}/{name}: status {status!r} is none of {', '.join(STATUS_WORDS)}"
                              for name, status in statuses.items() if status not in STATUS_WORDS]
        self.used: dict[str, set[str]] = {}  # BENCHMARKS.md section -> results its tables read

    def of(self, scenario: str) -> list[Result]:
        """A scenario's results, current ones (runs.yaml `current: true`) first, then newest first."""
        chosen = [r for r in self.results if r.scenario == scenario and r.file.get("status") != "notes"]
        by_path = sorted(chosen, key=lambda r: r.path)
        newest = sorted(by_path, key=lambda r: self.folder_date(r.run), reverse=True)
        return sorted(newest, key=lambda r: not r.folder.get("current", False))

    def take(self, scenario: str, section: str) -> list[Result]:
        """``of(scenario)``, each recorded as read by BENCHMARKS.md's ``section`` (the index lists them)."""
        chosen = self.of(scenario)
        self.used.setdefault(section, set()).update(r.path for r in chosen)
        return chosen

    def folder_date(self, run: str) -> str:
        schema = [r.data["finished"][:10] for r in self.results if r.run == run and r.schema]
        return str(self.folders.get(run, {}).get("date", "")) or (schema[0] if schema else "?")

    def status(self, run: str, name: str | None = None) -> str:
        if name is not None:
            entry = file_entry(self.folders.get(run, {}), name)
            if entry.get("status"):
                return entry["status"]
            r = next((r for r in self.results if r.path == f"{run}/{name}" and r.schema), None)
            if r:
                return r.data["status"]
        if "status" in self.folders.get(run, {}):
            return self.folders[run]["status"]
        statuses = {r.data["status"] for r in self.results if r.run == run and r.schema}
        return next((s for s in ("failed", "partial") if s in statuses), "complete")

    def command(self, run: str) -> str:
        schema = sorted({r.data["command"] for r in self.results if r.run == run and r.schema})
        folder = self.folders.get(run, {})
        cmd = folder.get("command") or "; ".join(f"`{c}`" for c in schema) or "?"
        if folder.get("command"):
            cmd = f"`{cmd}`"
        if folder.get("code"):
            cmd += f" (the code as of {folder['code']})"
        return cmd


# ------------------------------------------------------------------------------------------- table helpers


def table(columns: list[str], rows: list[list]) -> list[str]:
    return ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns),
            *("| " + " | ".join("" if c is None else str(c) for c in row) + " |" for row in rows)]


def link(r: Result | str) -> str:
    return f"`{r.path if isinstance(r, Result) else r}`"


def landed(results: Results, name: str) -> bool:
    """Whether a PENDING measurement has a result its table reads."""
    if name == "speed-levers":
        return any(n in LEVER_CONFIGS for r in results.of("train-speed") for n, _ in train_runs(r))
    if name == "multi-gpu-scaling":
        return any(r.data.get("scaling") for r in results.of("multi-gpu"))
    return bool(results.of(name))


def pending(name: str) -> list[str]:
    _, what, command, where = next(p for p in PENDING if p[0] == name)
    return [f"Not measured yet: {what}. `{command}` writes it; kept in `bench/results/{where}/` (and described in "
            "`bench/results/runs.yaml`), `python -m bench report` fills this table in."]


def spread_text(s: dict, digits: int = 1, unit: str = "") -> str:
    return f"{s['median_s']:.{digits}f}{unit} ({s['min_s']:.{digits}f}-{s['max_s']:.{digits}f})"


def num(x: float) -> str:
    """1e-3, 5e-05 and 0.001 as people write them: 0.001, 5e-5."""
    return re.sub(r"e-0(\d)", r"e-\1", f"{x:g}")


# ------------------------------------------------------------------------------------------ training speed


def train_runs(r: Result) -> list[tuple[str, dict]]:
    """(config, entry) of a train-speed result: the schema's runs, or the older layout's configs."""
    if r.schema:
        return [(e["name"], e) for e in r.data["runs"]]
    return list(r.data["configs"].items())


def labelled_runs(r: Result) -> list[tuple[str, dict]]:
    """train_runs with a config that ran more than once in the result numbered in the order it ran ("levers_mb8 #2"),
    so that its rows and runs.yaml's `current` entries can tell the runs apart."""
    names = [n for n, _ in train_runs(r)]
    return [(f"{n} #{names[:i + 1].count(n)}" if names.count(n) > 1 else n, e)
            for i, (n, e) in enumerate(train_runs(r))]


def train_summary(r: Result, entry: dict) -> dict:
    """The timed steps' summary, from the steps themselves: the first `timed_from_step` - 1 steps of each config
    left out (runs.yaml, where a session timed from a later step than its warm-up flag said)."""
    from bench import train_speed

    if "timed_from_step" in r.file or "timed_from_step" in r.folder:
        warmup = r.file.get("timed_from_step", r.folder.get("timed_from_step")) - 1
    else:
        s = entry.get("summary", {})
        warmup = s.get("warmup_steps_excluded", 1) if s.get("timed_steps") else 1
    return train_speed.summarise(entry.get("steps", []), warmup)


def batch_text(b: dict, generations: int) -> str:
    return (f"{b['prompts_per_step']} prompts x {generations}; micro-batch {b['per_device_train_batch_size']}, "
            f"{b['gradient_accumulation_steps']} accumulation; {b['completion_tokens']} tokens")


def recomputed(r: Result, entry: dict) -> float:
    """The share of decoder layers whose forward gradient checkpointing recomputed in a run: the trainer's flag
    (older results without it ran the defaults of then, checkpointing on), every n-th layer where a lever said so;
    Unsloth checkpoints inside the model, as params.yaml's model.gradient_checkpointing says, with the trainer's off."""
    if r.data.get("backend") == "unsloth":
        return float(r.data["params_base"]["model"].get("gradient_checkpointing", True))
    on = (entry.get("effective_args") or {}).get("gradient_checkpointing", True)
    return on / (entry.get("checkpoint_every_n_layers") or 1)


def floors(r: Result, entry: dict) -> tuple[str, str]:
    data, b = r.data, entry["batch"]
    gpu = data["gpu"] if r.schema else data
    bw, fl = gpu.get("mem_bw"), gpu.get("matmul_flops")
    if not (bw and fl):
        return "n/a", "n/a"
    shape = standin.shape(data.get("model_config") or standin.QWEN25_3B)
    lora = data["params_base"]["lora"]
    precision = data.get("base_precision", "4-bit")
    f = standin.floor_seconds(shape, lora["r"], lora["target_modules"], b["completions_per_step"],
                              data.get("train_prompt_tokens_mean", 160.0), b["completion_tokens"], bw, fl,
                              4 if precision == "4-bit" else 16, True, recomputed(r, entry))
    return f"{f['total_s']:.2f} ({f['generate_s']:.2f} + {f['train_s']:.2f})", f["total_s"]


def train_rows(results: Results, chosen: list[Result], section: str) -> list[list]:
    rows = []
    for r in chosen:
        results.used.setdefault(section, set()).add(r.path)
        data = r.data
        engine, precision = data.get("engine", "hf"), data.get("base_precision", "4-bit")  # older results: HF, 4-bit
        generations = data["params_base"]["train"]["num_generations"]
        for name, entry in labelled_runs(r):
            s, m = train_summary(r, entry), entry.get("peak_memory_gib") or {
                k.split("_")[1]: v for k, v in entry.get("memory", {}).items()}
            what = r.label(f"{data['backend']}, {engine} ({precision})")
            head = [link(r), r.gpu(), what, name, batch_text(entry["batch"], generations)]
            if not s["timed_steps"]:
                why = entry.get("error") or entry.get("stopped") or "stopped"
                rows.append(head + [f"no timed step ({why[:60]})", "", "", "", "", "", ""])
                continue
            floor_text, floor_s = floors(r, entry)
            first = [round(st["seconds"]) for st in entry["steps"][:s["warmup_steps_excluded"]]]
            rows.append(head + [
                f"**{spread_text(s, unit=' s')}**, {s['timed_steps']} timed"
                + (f" (untimed: {', '.join(map(str, first))})" if first else ""),
                f"{s['completion_tokens_per_s']:,.0f}",
                f"{s['generate_s_per_step']} / {s['rewards_and_bookkeeping_s_per_step']} / {s['train_s_per_step']}",
                entry.get("load_and_build_s", "n/a"),
                f"{m.get('allocated', 'n/a')} / {m.get('reserved', 'n/a')}",
                floor_text, f"{s['mean_s'] / floor_s:.0f}x" if floor_s != "n/a" else "n/a"])
    return rows


TRAIN_COLUMNS = ["result", "GPU", "backend, generation (base)", "config", "batch (forced tokens)",
                 "s/step: median (min-max), timed steps", "completion tok/s (timed steps' mean)",
                 "generate / score / train s per step", "load + build s", "peak alloc / reserved GiB",
                 "floor s/step (gen + train)", "mean / floor"]


def table_train_speed(results: Results, section: str) -> list[str]:
    chosen = [r for r in results.of("train-speed") if r.folder.get("speed_table", True)
              and not any(name in LEVER_CONFIGS for name, _ in train_runs(r))]
    return table(TRAIN_COLUMNS, train_rows(results, chosen, section))


def table_speed_levers(results: Results, section: str) -> list[str]:
    chosen = [r for r in results.of("train-speed") if any(name in LEVER_CONFIGS for name, _ in train_runs(r))]
    if not landed(results, "speed-levers"):
        return pending("speed-levers")
    return table(TRAIN_COLUMNS, train_rows(results, chosen, section))


def table_train_sections(results: Results, section: str) -> list[str]:
    rows = []
    for r in results.of("train-speed"):
        for name, entry in labelled_runs(r):
            s = train_summary(r, entry)
            sec = s.get("sections_s_per_step")
            if not sec:
                continue
            results.used.setdefault(section, set()).add(r.path)
            sync_s, vllm_s = sec.get("section_sync_weights_s", 0.0), sec.get("section_vLLM_generate_s", 0.0)
            engine_s = vllm_s or sec.get("section_transformers_generate_s", 0.0)
            rewards = sum(v for k, v in sec.items() if k not in (
                "section_sync_weights_s", "section_vLLM_generate_s", "section_transformers_generate_s"))
            logs = [row for row in entry.get("trl_logs", [])
                    if "sampling/importance_sampling_ratio/mean" in row][-s["timed_steps"]:]
            diff = statistics.mean(row["sampling/sampling_logp_difference/mean"] for row in logs) if logs else None
            ratio = statistics.mean(row["sampling/importance_sampling_ratio/mean"] for row in logs) if logs else None
            rows.append([link(r), r.gpu(), name, f"{sync_s:.2f}", f"{engine_s:.2f}",
                         f"{s['generate_s_per_step'] - sync_s - engine_s:.2f}", f"{rewards:.2f}",
                         f"{s['rewards_and_bookkeeping_s_per_step'] - rewards:.2f}",
                         "n/a" if diff is None else f"{diff:.4f}", "n/a" if ratio is None else f"{ratio:.4f}"])
    if not rows:
        return ["No result has TRL's timed sections yet: `python -m bench train-speed` records them (weight sync, "
                "the engine's generate, each reward) since issue 27; the speed levers' run will be the first."]
    return table(["result", "GPU", "config", "weight sync (LoRA merge + push)", "engine's generate",
                  "rest of generation", "rewards", "scoring + bookkeeping", "sampling logp diff mean",
                  "IS ratio mean"], rows)


# ---------------------------------------------------------------------------------------- eval and merge


def eval_floor(r: Result) -> str:
    """The generation floor of an eval-speed result's batches (vLLM: one call)."""
    d = r.data
    gpu = d["gpu"] if r.schema else d
    if not gpu.get("mem_bw"):
        return "n/a"
    size = d["batch_size"] if isinstance(d["batch_size"], int) else d["problems"]
    shape = standin.shape(standin.QWEN25_3B)
    batches = [min(size, d["problems"] - k) for k in range(0, d["problems"], size)]
    return f"{sum(standin.floor_seconds(shape, 0, [], n, d['prompt_tokens_mean'], d['forced_completion_tokens'], gpu['mem_bw'], gpu['matmul_flops'], 16, False)['generate_s'] for n in batches):.1f}"  # noqa: E501


def eval_row(r: Result) -> list:
    d = r.data
    peak = (r.data["runs"][0]["peak_memory_gib"] or {}).get("allocated") if r.schema else d.get("peak_allocated_gib")
    full = d.get("full_test_set_seconds_estimate", d["generate_seconds"])
    est = " (estimate)" if "full_test_set_seconds_estimate" in d else ""
    return [link(r), r.gpu(), d.get("engine", "hf"), d["batch_size"], f"{d['problems']} ({d['subset']})",
            d["forced_completion_tokens"], d.get("load_seconds", "n/a"), d["generate_seconds"], d["problems_per_s"],
            f"{d['completion_tokens_per_s']:,}", f"**{full}**{est}",
            "n/a (engine process)" if d.get("engine") == "vllm" else peak, eval_floor(r)]


def table_eval_speed(results: Results, section: str) -> list[str]:
    return table(["result", "GPU", "engine", "batch size", "problems", "forced tokens", "load s", "generate s",
                  "problems/s", "completion tok/s", "whole test set (1,319) s", "peak alloc GiB",
                  "floor s (same problems)"], [eval_row(r) for r in results.take("eval-speed", section)])


def table_merge(results: Results, section: str) -> list[str]:
    rows = []
    for r in results.take("merge", section):
        d = r.data
        mu, bm, u32 = d["merged_vs_unmerged"], d["base_vs_merged"], d["unmerged_bf16_vs_fp32"]
        rows.append([link(r), r.gpu(), r.label(d["model"]), d["prompts"], d["tokens_compared"],
                     d["merge_stage_seconds"], f"{mu['max_abs']:.4f} / {mu['mean_abs']:.5f}",
                     f"{bm['max_abs']:.3f} / {bm['mean_abs']:.4f}", f"{u32['max_abs']:.4f}",
                     f"{mu['argmax_agree']:.4f}", d["pass"]])
    return table(["result", "GPU", "model and adapter", "prompts", "tokens", "merge s",
                  "merged vs unmerged (bf16) max / mean abs", "base vs merged max / mean abs",
                  "unmerged bf16 vs fp32 max abs", "argmax agreement merged/unmerged", "pass"], rows)


# ------------------------------------------------------------------------------------ pipeline, multi-GPU


def table_pipeline(results: Results, section: str) -> list[str]:
    rows, stages = [], []
    for r in results.take("pipeline", section):
        stages = stages or list(r.data["stages"])
        o = r.data["overrides"]
        flat = {f"{s}.{k}": v for s, kv in o.items() for k, v in kv.items()} if "train" in o else o
        batch = (f"{flat['train.per_device_train_batch_size'] * flat['train.gradient_accumulation_steps']} completions "
                 f"a step, {flat['train.max_completion_length']} tokens, {flat['train.max_steps']} steps; eval "
                 f"{flat['eval.max_problems']} problems")
        cells = [f"{s['seconds']} s" + ("" if s["returncode"] == 0 else f", **exit {s['returncode']}**")
                 for s in (r.data["stages"].get(stage, {"seconds": "", "returncode": "not run"}) for stage in stages)]
        rows.append([link(r), r.gpu(), batch, *cells])
    return table(["result", "GPU", "batch", *stages], rows)


def multi_gpu_legs(r: Result) -> list[tuple[str, dict]]:
    only = r.file.get("legs")
    return [(name, leg) for name, leg in r.data.items() if isinstance(leg, dict) and "checks" in leg
            and (only is None or name in only)]


def table_multi_gpu(results: Results, section: str) -> list[str]:
    rows = []
    for r in results.take("ddp-check", section):
        d = r.data
        rows.append([link(r), r.folder.get("gpu", "?"), r.label("ddp"), f"{d['gpus']} train",
                     f"{d['completions_per_step']} completions", "", f"{len(d['logged_steps'])} steps",
                     "passed (written once by rank 0)"])
    for r in results.of("multi-gpu"):
        for name, leg in multi_gpu_legs(r):
            if name.startswith(("scale_n", "server_n")):
                continue  # the scaling table
            results.used.setdefault(section, set()).add(r.path)
            speed, ea = leg["speed"], leg.get("effective_args", {})
            timing = f"{spread_text(speed, 2)}, {len(speed['timed_steps'])} steps" if speed.get("median_s") else "n/a"
            gpus = "1 train + 1 `trl vllm-serve`" if name == "vllm_server" else f"{leg.get('world_size')} train"
            failed = [k for k, ok in leg["checks"].items() if not ok]
            rows.append([link(r), r.gpu(), r.label(name) if len(multi_gpu_legs(r)) == 1 else name, gpus,
                         f"{leg['completions_per_step']} completions", ea.get("max_completion_length", ""), timing,
                         f"FAILED: {', '.join(failed)}" if failed else "all passed"])
    return table(["result", "GPU", "run", "GPUs", "per step", "tokens", "s/step: median (min-max)", "checks"], rows)


def table_multi_gpu_scaling(results: Results, section: str) -> list[str]:
    rows = []
    for r in results.of("multi-gpu"):
        for row in r.data.get("scaling", []):
            results.used.setdefault(section, set()).add(r.path)
            gpus = f"{row['train_ranks']} train + 1 server" if row["server"] else str(row["gpus"])
            eff = f"{row['scaling_efficiency']:.0%}" if row["scaling_efficiency"] is not None else "n/a"
            rows.append([link(r), r.gpu(), row["run"], gpus, row["completions_per_step"],
                         f"{row['median_s']} ({row['min_s']}-{row['max_s']})", len(row["timed_steps"]),
                         row["completion_tokens_per_s"], eff, "passed" if row["all_checks_passed"] else "FAILED"])
    if not rows:
        return pending("multi-gpu-scaling")
    return table(["result", "GPU", "run", "GPUs", "completions/step", "s/step, median (min-max)", "timed steps",
                  "completion tokens/s", "efficiency vs 1 GPU", "checks"], rows)


def table_checkpoint_verify(results: Results, section: str) -> list[str]:
    rows = []
    for r in results.take("checkpoint-verify", section):
        d = r.data
        cpu = lambda ts: f"{min(t['cpu_s'] for t in ts):.2f} ({min(t['wall_s'] for t in ts):.1f}-{max(t['wall_s'] for t in ts):.1f} wall)"  # noqa: E731,E501
        rows.append([link(r), r.gpu(), f"{d['lora_params']:,}", f"{d['checkpoint_bytes'] / 1e9:.2f}",
                     cpu(d["marker_at_save_s"]), cpu(d["verify_at_resume_s"]), d["cpu_s_per_gb"], d["wall_s_per_gb"],
                     ", ".join(f"{x:.1f}" for x in d["load_average"])])
    return table(["result", "machine", "LoRA parameters", "checkpoint GB", "marker at save: CPU s (wall s)",
                  "verify at resume: CPU s (wall s)", "CPU s per GB", "wall s per GB", "load average"], rows)


# --------------------------------------------------------------------------------------- learning, lm-eval


def prompts(train: dict) -> int:
    return train["per_device_train_batch_size"] * train["gradient_accumulation_steps"] // train["num_generations"]


def pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def table_real_model(results: Results, section: str) -> list[str]:
    rows = []
    for r in results.take("real-model", section):
        for run in r.data["runs"]:
            t, b, train = run["trained"], run["base"], run["params"]["train"]
            batch = f"{prompts(train)} prompts x {train['num_generations']}, {train['max_completion_length']} tokens"
            backend = run["params"]["model"]["backend"] + (", 4-bit" if run["params"]["model"]["load_in_4bit"] else "")
            rows.append([link(r), r.gpu(), run["recipe"], backend, run["seed"], train["max_steps"], batch,
                         f"{num(train['learning_rate'])} / {num(train['max_grad_norm'])}", run["train_minutes"],
                         f"{pct(b['accuracy'])} -> **{pct(t['accuracy'])}**",
                         f"{pct(b['accuracy_lenient'])} -> **{pct(t['accuracy_lenient'])}** "
                         f"({100 * run['delta']['accuracy_lenient']:+.1f})",
                         f"{pct(b['format_adherence'])} -> {pct(t['format_adherence'])}"])
    return table(["result", "GPU", "recipe", "backend", "seed", "steps", "batch: prompts x completions", "lr / clip",
                  "train min", "strict accuracy", "lenient accuracy (points)", "format"], rows)


def table_lm_eval(results: Results, section: str) -> list[str]:
    """Per result: the project's grader (strict, lenient) and each lm-eval task and filter, base -> trained."""
    rows = []
    for r in results.take("lm-eval", section):
        d, gpu = r.data, r.gpu()
        p = d["project"]
        rows.append([link(r), gpu, "the project's grader", "strict / lenient", p["base"]["problems"],
                     f"{pct(p['base']['accuracy'])} / {pct(p['base']['accuracy_lenient'])}",
                     f"{pct(p['trained']['accuracy'])} / {pct(p['trained']['accuracy_lenient'])}",
                     ", ".join(f"{stage} {seconds:g}" for stage, seconds in d["stage_seconds"].items())])
        lm = d.get("lm_eval") or {}
        seconds = lm.get("seconds", {})
        for task, block in sorted(lm.get("trained", {}).items()):
            base = lm.get("base", {}).get(task, {}).get("filters", {})
            for name, value in sorted(block["filters"].items()):
                before = base.get(name)
                rows.append([link(r), gpu, f"`{block['task']}` ({block['num_fewshot']}-shot"
                             + (", chat template)" if block.get("chat_template") else ")"), name, block["problems"],
                             f"{before['exact_match']:.3f} ± {before['stderr']:.3f}" if before else "n/a",
                             f"{value['exact_match']:.3f} ± {value['stderr']:.3f}",
                             " / ".join(str(seconds.get(side, {}).get(task, "n/a")) for side in ("base", "trained"))])
    if not rows:
        return pending("lm-eval")
    return table(["result", "GPU", "evaluation", "filter", "problems", "base", "trained",
                  "seconds: whole stages; a task's generation, base / trained"], rows)


def learning_runs(r: Result) -> list[dict]:
    return [e for e in r.data["runs"]] if r.schema else list(r.data)


def table_learning(results: Results, section: str) -> list[str]:
    rows = []
    for r in results.take("learning", section):
        runs = learning_runs(r)
        size = r.file.get("size") or runs[0]["size"]  # runs.yaml's where the file says "custom"
        batch = r.file.get("batch") or (r.data.get("batch", "?") if r.schema else "?")
        for lr in sorted({x.get("learning_rate") for x in runs}, key=lambda v: -(v or 0)):
            for control in (False, True):
                chosen = [x for x in runs if x["control"] == control and x.get("learning_rate") == lr]
                gains = [x["after"] - x["before"] for x in chosen]
                if gains:
                    seeds = sorted(x["seed"] for x in chosen)
                    rows.append([link(r), r.gpu(), size, batch, "n/a" if lr is None else num(lr),
                                 "shuffled control" if control else "GRPO", ", ".join(map(str, seeds)),
                                 f"{statistics.median(gains):+.3f} ({min(gains):+.3f} to {max(gains):+.3f})"])
    return table(["result", "GPU", "size", "batch", "lr", "run", "seeds", "held-out gain: median (min to max)"], rows)


# ---------------------------------------------------------------------------------------- current, history


def current_figure(results: Results, entry: dict) -> list:
    r = next((x for x in results.results if x.path == entry["result"]), None)
    if r is None:
        results.problems.append(f"runs.yaml current: {entry['result']} does not exist")
        return [entry["what"], "missing", "", "", link(entry["result"])]
    if r.scenario == "train-speed":
        name, e = next(((n, e) for n, e in labelled_runs(r) if entry.get("config") in (None, n, n.split(" #")[0])),
                       (None, None))
        if e is None:
            results.problems.append(f"runs.yaml current: {entry['result']} has no config {entry['config']}")
            return [entry["what"], "missing", "", "", link(entry["result"])]
        s = train_summary(r, e)
        figure = (f"**{spread_text(s, unit=' s')}** a step ({s['timed_steps']} timed), "
                  f"{s['completion_tokens_per_s']:,.0f} completion tok/s")
        batch = batch_text(e["batch"], r.data["params_base"]["train"]["num_generations"])
    elif r.scenario == "eval-speed":
        d = r.data
        figure = f"**{d['generate_seconds']} s** for {d['problems']} problems ({d['completion_tokens_per_s']:,} tok/s)"
        batch = f"{d['batch_size']}, {d['forced_completion_tokens']} tokens forced"
    elif r.scenario == "real-model":
        runs = [x for x in r.data["runs"] if x["recipe"] == entry.get("recipe", x["recipe"])]
        gains = ", ".join(f"{100 * x['delta']['accuracy_lenient']:+.1f}" for x in runs)
        t = runs[0]["params"]["train"]
        seeds = ", ".join(str(x["seed"]) for x in runs)
        figure = f"lenient accuracy **{gains} points** ({runs[0]['recipe']}, seeds {seeds})"
        batch = f"{prompts(t)} prompts x {t['num_generations']}, {t['max_steps']} steps, lr {num(t['learning_rate'])}"
    elif r.scenario == "checkpoint-verify":
        d = r.data
        figure = (f"**{min(t['cpu_s'] for t in d['verify_at_resume_s']):.2f} CPU s** to verify a "
                  f"{d['checkpoint_bytes'] / 1e9:.2f} GB checkpoint")
        batch = "the defaults' LoRA (r 64, 7 projections)"
    elif r.scenario == "learning":
        runs = learning_runs(r)
        gains = [x["after"] - x["before"] for x in runs if not x["control"]]
        figure = f"held-out gain **{min(gains):+.2f} to {max(gains):+.2f}** on {len(gains)} seeds"
        batch = entry.get("batch", "")
    else:
        figure, batch = entry.get("figure", ""), entry.get("batch", "")
    results.used.setdefault("Current figures", set()).add(r.path)
    return [entry["what"], figure, r.gpu(), batch, link(r)]


def table_current(results: Results, section: str) -> list[str]:
    rows = [current_figure(results, entry) for entry in results.manifest.get("current", [])]
    return table(["what", "figure", "GPU", "batch", "result"], rows)


def table_history(results: Results, section: str) -> list[str]:
    rows = []
    for run, folder in sorted(results.folders.items(), key=lambda kv: str(kv[1].get("date", ""))):  # then as listed
        if not folder.get("tried"):
            continue
        rows.append([results.folder_date(run), folder.get("gpu", "?"), folder["tried"], folder["measured"],
                     f"`{run}/`", results.status(run)])
    return table(["date", "GPU", "what was tried", "what it measured", "results", "status"], rows)


TABLES = {"current": table_current, "train-speed": table_train_speed, "speed-levers": table_speed_levers,
          "train-sections": table_train_sections, "eval-speed": table_eval_speed, "merge": table_merge,
          "pipeline": table_pipeline, "multi-gpu": table_multi_gpu, "multi-gpu-scaling": table_multi_gpu_scaling,
          "checkpoint-verify": table_checkpoint_verify, "real-model": table_real_model, "lm-eval": table_lm_eval,
          "learning": table_learning, "history": table_history}


# ------------------------------------------------------------------------------------------------ outputs


def benchmarks(results: Results, template: str) -> str:
    out, section = [], ""
    for line in template.splitlines():
        if line.startswith("## "):
            section = line[3:].strip()
        match = re.fullmatch(r"\{\{([a-z-]+)\}\}", line.strip())
        if match:
            if match.group(1) not in TABLES:
                raise SystemExit(f"{TEMPLATE.name}: unknown table {{{{{match.group(1)}}}}}; known: {', '.join(TABLES)}")
            out += TABLES[match.group(1)](results, section)
        else:
            out.append(line)
        for path in re.findall(r"bench/results/([\w./-]+)", line):
            if path.split("/")[0] in FOLDER_SCENARIOS:  # a result, not this index or runs.yaml
                results.used.setdefault(section, set()).add(path.rstrip("/.") + ("/" if path.endswith("/") else ""))
    return "\n".join(out) + "\n"


def normalise(text: str) -> str:
    return " ".join(text.replace("**", "").split())


def cited_paths(text: str) -> list[str]:
    return sorted({p.rstrip(".,") for p in re.findall(r"bench/results/[\w./*{},-]+", text)})


def index(results: Results, docs: dict[str, str]) -> str:
    lines = ["# bench/results: which command produced each figure, and where its raw result is", "",
             "Generated by `python -m bench report` from `bench/results/runs.yaml` and the results themselves: edit "
             "runs.yaml, not this file. Paths are relative to `bench/results/`. A command in backticks is the one that "
             "wrote the files; where that code has since gone, `(the code as of <commit>)` names the commit that has "
             "it (`git show <commit>:<path>`).", "",
             "Statuses: **complete** (ran to its end), **partial** (stopped early; what it measured is kept), "
             "**unfinished** (a log that ends before any result), **failed** (a check or the run failed), **lost** "
             "(the machine went back before the results came out; the logs up to then), **superseded** (a later run "
             "of the same measurement replaced it), **notes** (written by hand, not a measurement).", ""]
    for doc in QUOTING_DOCS:
        lines += [f"## Figures in {doc}", ""]
        rows = []
        text = normalise(docs.get(doc, ""))
        for fig in results.manifest.get("figures", {}).get(doc, []):
            found = normalise(fig["quote"]) in text
            if not found:
                results.problems.append(f"{doc} no longer contains {fig['quote']!r} (bench/results/runs.yaml figures)")
            sources = fig.get("results", [fig.get("result")] if fig.get("result") else [])
            for src in sources:
                if not (results.root / src).exists():
                    results.problems.append(f"runs.yaml figures: {src} does not exist")
            run = sources[0].rstrip("/").split("/") if sources else []
            run = "/".join(run[:2])
            where = ", ".join(f"`{s}`" for s in sources) or "no raw result kept"
            rows.append([fig.get("section", ""),
                         ("" if found else "**NOT FOUND** ") + "“" + fig["quote"].replace("|", "\\|") + "”",
                         where + (f" ({fig['note']})" if fig.get("note") else ""),
                         results.command(run) if run else ""])
        lines += table(["section", "figure", "result", "command"], rows) + [""]
        for path in cited_paths(docs.get(doc, "")):
            rel = path.removeprefix("bench/results/")
            if not list(results.root.glob(rel.rstrip("/"))):
                results.problems.append(f"{doc} cites {path}, which does not exist")
    lines += ["## BENCHMARKS.md", "", "Every row of its tables names its result; by section:", ""]
    lines += table(["section", "results"], [[section, ", ".join(f"`{p}`" for p in sorted(paths))]
                                            for section, paths in results.used.items() if paths]) + [""]
    lines += ["## Where new results land", "",
              "Each scenario's kept results go in their own folder here; `python -m bench report` tables every JSON "
              "it finds there in BENCHMARKS.md's section for that scenario, and lists the folder below (with its "
              "command, GPU and status from the files when they are in the bench result schema, or from runs.yaml).",
              ""]
    from bench.__main__ import SCENARIOS

    lines += table(["scenario", "what it measures", "results in"],
                   [[f"`python -m bench {name}`", what, f"`{folder}/`"] for name, (_, what, folder) in SCENARIOS.items()
                    if folder])
    lines += ["", "Waiting for their GPU runs:", ""]
    lines += table(["what", "command", "lands in", "now"],
                   [[what, f"`{command}`", f"`{where}/`", "landed" if landed(results, name) else "not yet"]
                    for name, what, command, where in PENDING]) + [""]
    lines += ["## Every run, by scenario", ""]
    by_top: dict[str, list[str]] = {}
    for run in results.runs:
        by_top.setdefault(run.split("/")[0], []).append(run)
    for top, runs in sorted(by_top.items()):
        lines += [f"### {top}/", ""]
        rows = []
        for run in sorted(runs, key=lambda x: (results.folder_date(x), x)):
            folder, status = results.folders.get(run, {}), results.status(run)
            files = []
            for name in results.runs[run]:
                note = file_entry(folder, name).get("note")
                extra = [results.status(run, name)] if results.status(run, name) != status else []
                said = extra + ([note] if note else [])
                files.append(f"`{name}`" + (f" ({': '.join(said)})" if said else ""))
            gpu = folder.get("gpu") or next((r.gpu() for r in results.results if r.run == run), "?")
            rows.append([f"`{run}/`", results.folder_date(run), gpu, status, results.command(run),
                         f"{len(files)}: " + ", ".join(files)])
        lines += table(["run", "date", "GPU", "status", "command", "files"], rows) + [""]
    if results.problems:
        lines += ["## Problems", "", *(f"- {p}" for p in results.problems), ""]
    return "\n".join(lines)


def render(root: Path = RESULTS, template: Path = TEMPLATE, docs_root: Path = ROOT) -> tuple[str, str, list[str]]:
    """(BENCHMARKS.md, INDEX.md, problems) for the results under ``root``."""
    results = Results(root)
    docs = {doc: (docs_root / doc).read_text() for doc in QUOTING_DOCS if (docs_root / doc).is_file()}
    bench_md = benchmarks(results, template.read_text())
    for path in cited_paths(template.read_text()):
        if path != "bench/results/INDEX.md" and not list(root.glob(path.removeprefix("bench/results/").rstrip("/"))):
            results.problems.append(f"{template.name} cites {path}, which does not exist")
    return bench_md, index(results, docs), results.problems


def main(argv: list[str] | None = None) -> None:
    argv = common.argv_or_sys(argv)
    ap = common.parser("report", __doc__)
    ap.add_argument("--check", action="store_true", help="write nothing; exit 1 if a file would change or a problem")
    a = ap.parse_args(argv)
    bench_md, index_md, problems = render()
    outputs = {ROOT / "BENCHMARKS.md": bench_md, RESULTS / "INDEX.md": index_md}
    stale = [path for path, text in outputs.items() if not path.is_file() or path.read_text() != text]
    for problem in problems:
        print(f"problem: {problem}", file=sys.stderr)
    if a.check:
        for path in stale:
            print(f"{path.relative_to(ROOT)} is not what `python -m bench report` writes", file=sys.stderr)
        sys.exit(1 if stale or problems else 0)
    for path in stale:
        path.write_text(outputs[path])
        print(f"wrote {path.relative_to(ROOT)}")
    if not stale:
        print("BENCHMARKS.md and bench/results/INDEX.md are up to date")
