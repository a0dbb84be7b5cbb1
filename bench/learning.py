"""The learning experiment: does the training loop learn? A controlled experiment on a task small enough to run in CI.

A small Qwen2-architecture model is built from scratch (``tiny.py``'s builders), warmed up with a
short supervised run on synthetic additions ("What is 23 + 45?") written in the project's
``<reasoning>...</reasoning>\\n<answer>...</answer>`` format until its greedy answers are right only
some of the time, and then trained with the project's own GRPO wiring: ``training.build_trainer``
with a ``config.Params`` built from ``profiles/tiny.yaml``, the project's rewards, prompts made by
``gsm8k.build_prompt`` and a LoRA adapter from the params. Accuracy on held-out problems (never
seen in warm-up or GRPO) is measured before and after with the project's greedy generation and
grader (``evaluation.generate_hf`` + ``evaluation.score``).

The negative control runs the same budget with every reward permuted across the completions of
the batch (one seeded ``random.Random`` per run, never the global RNG): the rewards keep their
distribution but no longer say which completion earned them, so nothing should be learned.

    python -m bench learning --size cpu --seeds 0 1 2 --control --out DIR/learning.json
    python -m bench learning --size gpu --seeds 0 1 2 3 4 --control --processes 10 --out DIR/learning.json --plot P
    python -m bench learning --size gpu --lrs 1e-3 5e-4 --seeds 0 1 2 --control --processes 12 --out DIR/sweep.json

prints the per-run table and writes every number and curve (the bench result schema); ``--size gpu`` is the larger
setting for a CUDA machine, ``--lrs`` runs the size at several learning rates (how the gpu size's was chosen). See
LEARNING.md; tests/test_learning.py is the CI run.
"""

from __future__ import annotations

import hashlib
import json
import random
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from bench import common

SCENARIO = "learning"

ROOT = Path(__file__).resolve().parent.parent
TINY_PARAMS = ROOT / "profiles" / "tiny.yaml"


@dataclass(frozen=True)
class Size:
    """Everything that differs between the CI run on CPU and the larger run on a GPU."""

    operand_max: int  # operands are 0..operand_max
    carries: bool  # False: only pairs whose digits add up to less than 10 in every column
    n_test: int  # held-out problems, never used in warm-up or GRPO
    n_dev: int  # problems the warm-up checks its accuracy on (also never trained on)
    hidden_size: int
    layers: int
    vocab_size: int
    warmup_lr: float
    warmup_batch: int
    warmup_max_steps: int
    warmup_check_every: int
    warmup_target: float  # stop the warm-up once greedy dev accuracy reaches this
    lora: dict = field(default_factory=dict)  # overrides of params' lora section
    train: dict = field(default_factory=dict)  # overrides of params' train section


SIZES = {
    # CI on 2 CPU cores: the warm-up takes ~500 steps (~40 s), each GRPO run 150 steps (~50 s).
    "cpu": Size(
        operand_max=39, carries=True, n_test=256, n_dev=128, hidden_size=64, layers=2, vocab_size=512,
        warmup_lr=3e-3, warmup_batch=64, warmup_max_steps=1500, warmup_check_every=50, warmup_target=0.3,
        lora=dict(r=16, alpha=32),
        train=dict(learning_rate=2e-3, max_steps=150, per_device_train_batch_size=128, num_generations=4,
                   max_completion_length=24),
    ),
}
# One GPU: a 4x wider, 2x deeper model, ten thousand problems, twice the prompts per step and
# twice the steps; 10 runs at a time take ~7 min on one H100 (LEARNING.md). LoRA r=32/alpha=64
# at lr 2e-3 lost correctness; this scale at 1e-3 or 5e-4 gained +0.28 to +0.46 on every seed.
# The longest answer, 99 + 99, takes 24 tokens.
SIZES["gpu"] = replace(
    SIZES["cpu"], operand_max=99, n_test=512, n_dev=256, hidden_size=256, layers=4, warmup_lr=1e-3,
    warmup_batch=128, warmup_max_steps=8000,
    train=dict(learning_rate=1e-3, max_steps=300, per_device_train_batch_size=256, num_generations=4,
               max_completion_length=28),
)


# ---------------------------------------------------------------------------------------------- task


def problems(size: Size, seed: int) -> dict[str, list[dict]]:
    """All additions a + b with a, b in 0..operand_max, shuffled and split into ``test`` (held out
    from warm-up and GRPO), ``dev`` (the warm-up's stopping check) and ``train`` (both train on it)."""
    rows = [{"question": f"What is {a} + {b}?", "answer": str(a + b),
             "solution": f"<reasoning>\n{a} + {b} = {a + b}\n</reasoning>\n<answer>\n{a + b}\n</answer>"}
            for a in range(size.operand_max + 1) for b in range(size.operand_max + 1)
            if size.carries or _digit_sum(a) + _digit_sum(b) == _digit_sum(a + b)]
    random.Random(seed).shuffle(rows)
    test, dev = rows[:size.n_test], rows[size.n_test:size.n_test + size.n_dev]
    return {"test": test, "dev": dev, "train": rows[size.n_test + size.n_dev:]}


def _digit_sum(n: int) -> int:
    return sum(int(d) for d in str(n))


def system_prompt() -> str:
    from grpo_gsm8k.config import read_yaml

    return read_yaml(TINY_PARAMS)["data"]["system_prompt"]


def with_prompts(rows: list[dict]) -> list[dict]:
    from grpo_gsm8k.gsm8k import build_prompt

    sp = system_prompt()
    return [{**row, "prompt": build_prompt(row["question"], sp)} for row in rows]


# ------------------------------------------------------------------------------------------- warm-up


def device():
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def accuracy(model, tokenizer, rows: list[dict], batch_size: int, max_new_tokens: int) -> dict:
    """Greedy generation and the project's grader: the same path the evaluate stage takes."""
    from grpo_gsm8k.evaluation import generate_hf, score

    was_training = model.training
    model.eval()
    completions = generate_hf(model, tokenizer, [r["prompt"] for r in rows], batch_size, max_new_tokens)
    if was_training:
        model.train()
    _, metrics = score(rows, completions)
    return metrics


def _encode(tokenizer, row: dict) -> tuple[list[int], int]:
    prompt = tokenizer.apply_chat_template(row["prompt"], add_generation_prompt=True, tokenize=False)
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    completion_ids = tokenizer(row["solution"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return prompt_ids + completion_ids, len(prompt_ids)


def warm_up(size: Size, seed: int, out_dir: Path, data: dict, log=print) -> dict:
    """A model built from scratch, trained on worked examples until it is right some of the time.

    Writes model and tokenizer to ``out_dir`` (what params' model.name then points at). The loss
    covers the completion tokens only; dev accuracy is checked every few steps and the warm-up
    stops at ``size.warmup_target``, so GRPO starts from a model that is sometimes right.
    """
    import torch
    from transformers import AutoModelForCausalLM, set_seed

    from grpo_gsm8k.modeling import load_tokenizer
    from grpo_gsm8k.tiny import build_model, build_tokenizer

    info_file = out_dir / "warmup.json"
    if info_file.is_file():  # the same seed and size always produce the same model: reuse it
        return json.loads(info_file.read_text())
    set_seed(seed)
    texts = [r["question"] for r in data["train"]] + [r["solution"] for r in data["train"]] + [system_prompt()]
    build_model(build_tokenizer(texts, out_dir, vocab_size=size.vocab_size), out_dir, seed=seed,
                hidden_size=size.hidden_size, layers=size.layers)
    # The tokenizer exactly as the project loads it (load_policy, evaluate): AutoTokenizer on the
    # finished folder, which for a qwen2 config is Qwen2's own class. It splits numbers into
    # single digits like Qwen2.5 does, unlike the object build_tokenizer returns: warm-up, GRPO
    # and evaluation must all see the same token ids.
    tokenizer = load_tokenizer(str(out_dir))
    dev = device()
    model = AutoModelForCausalLM.from_pretrained(out_dir, dtype=torch.float32).to(dev)
    encoded = [_encode(tokenizer, r) for r in data["train"]]
    optimizer = torch.optim.AdamW(model.parameters(), lr=size.warmup_lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(seed)
    dev_rows, step, dev_acc = data["dev"], 0, 0.0
    start = time.perf_counter()
    model.train()
    while step < size.warmup_max_steps:
        batch = [encoded[i] for i in torch.randint(len(encoded), (size.warmup_batch,), generator=gen).tolist()]
        width = max(len(ids) for ids, _ in batch)
        input_ids = torch.full((len(batch), width), tokenizer.pad_token_id)
        labels = torch.full((len(batch), width), -100)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for k, (ids, n_prompt) in enumerate(batch):
            input_ids[k, :len(ids)] = torch.tensor(ids)
            labels[k, n_prompt:len(ids)] = torch.tensor(ids[n_prompt:])
            mask[k, :len(ids)] = 1
        loss = model(input_ids=input_ids.to(dev), attention_mask=mask.to(dev), labels=labels.to(dev)).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        if step % size.warmup_check_every == 0:
            max_new = size.train["max_completion_length"]
            dev_acc = accuracy(model, tokenizer, dev_rows, len(dev_rows), max_new)["accuracy"]
            log(f"warm-up step {step}: loss {loss.item():.3f}, dev accuracy {dev_acc:.3f} "
                f"({time.perf_counter() - start:.0f}s)")
            if dev_acc >= size.warmup_target:
                break
    model.save_pretrained(out_dir)
    info = {"steps": step, "dev_accuracy": dev_acc, "loss": round(loss.item(), 4),
            "seconds": round(time.perf_counter() - start, 1)}
    info_file.write_text(json.dumps(info))
    return info


# ---------------------------------------------------------------------------------------------- GRPO


def params_for(size: Size, seed: int, model_dir: Path):
    """profiles/tiny.yaml with this experiment's model, LoRA and budget: the project's own Params."""
    from grpo_gsm8k import config

    raw = config.read_yaml(TINY_PARAMS)
    raw["model"].update(name=str(model_dir), backend="transformers", load_in_4bit=False, dtype="float32",
                        gradient_checkpointing=False)
    raw["lora"].update(size.lora)
    raw["train"].update(seed=seed, optim="adamw_torch", **size.train)
    raw["train"]["save_steps"] = raw["train"]["max_steps"]
    raw["eval"].update(max_new_tokens=size.train["max_completion_length"])
    return config.parse(raw)


def shuffled_rewards(funcs: list, seed: int) -> list:
    """The negative control: each reward's scores permuted across the completions of the batch.

    Every wrapper owns a ``random.Random(seed)`` with the same seed; TRL calls them once per batch,
    in order, with the same batch size, so they draw the same permutation and a completion is
    given the whole reward of another completion. The global RNG is never touched.
    """
    def wrap(func):
        rng = random.Random(seed)

        def shuffled(completions, **kwargs):
            scores = func(completions, **kwargs)
            order = list(range(len(scores)))
            rng.shuffle(order)
            return [scores[i] for i in order]

        shuffled.__name__ = func.__name__  # same metric names in the logs
        return shuffled

    return [wrap(f) for f in funcs]


def warm_dir(spec: Size, seed: int, workdir: Path) -> Path:
    """Where the warm-up for this seed is cached: keyed by everything that shapes the warm-up."""
    warm_key = {k: v for k, v in asdict(spec).items() if k not in ("lora", "train")}
    warm_key["max_completion_length"] = spec.train["max_completion_length"]
    digest = hashlib.sha256(json.dumps(warm_key, sort_keys=True).encode()).hexdigest()[:8]
    return workdir / f"warm-{seed}-{digest}"


def _spec(size: str | Size) -> Size:
    return SIZES[size] if isinstance(size, str) else size


def _warmed(size: str | Size, seed: int, workdir: Path, log=print) -> tuple[dict, Path, dict]:
    """The seed's problems with prompts, and its warmed-up model's folder (made once, then reused)."""
    spec = _spec(size)
    data = {split: with_prompts(rows) for split, rows in problems(spec, seed).items()}
    model_dir = warm_dir(spec, seed, workdir)
    model_dir.mkdir(parents=True, exist_ok=True)
    return data, model_dir, warm_up(spec, seed, model_dir, data, log=log)


def run_experiment(size: str | Size = "cpu", seed: int = 0, control: bool = False, workdir: str | Path | None = None,
                   log=print) -> dict:
    """Warm up (cached per size and seed under ``workdir``), measure, train with GRPO, measure again.

    Returns ``before`` and ``after`` held-out accuracy, the logged mean ``rewards`` per step, and
    details of the warm-up and the run.
    """
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, set_seed

    from grpo_gsm8k import training
    from grpo_gsm8k.modeling import load_policy

    spec = _spec(size)
    name = size if isinstance(size, str) else "custom"
    workdir = Path(workdir) if workdir is not None else Path(tempfile.mkdtemp(prefix="learning-"))
    start = time.perf_counter()
    data, model_dir, warm = _warmed(spec, seed, workdir, log=log)
    p = params_for(spec, seed, model_dir)
    max_new = p.train.max_completion_length

    policy = load_policy(p)
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(device())
    before = accuracy(base, policy.tokenizer, data["test"], len(data["test"]), max_new)
    seen = data["train"][:len(data["test"])]  # trained-on problems, to tell learning from memorising
    before_seen = accuracy(base, policy.tokenizer, seen, len(seen), max_new)
    del base

    set_seed(seed)
    dataset = Dataset.from_list([{"prompt": r["prompt"], "answer": r["answer"]} for r in data["train"]])
    override = shuffled_rewards(training.reward_funcs(p), seed) if control else None
    # A directory of its own: runs that share a warm-up may train at the same time (run_grid).
    out_dir = Path(tempfile.mkdtemp(prefix=f"grpo-{name}-{seed}-{'control' if control else 'real'}-", dir=workdir))
    trainer = training.build_trainer(p, policy, dataset, str(out_dir), reward_funcs_override=override,
                                     save_strategy="no", disable_tqdm=True)
    train_start = time.perf_counter()
    trainer.train()
    train_seconds = time.perf_counter() - train_start
    after = accuracy(trainer.model, policy.tokenizer, data["test"], len(data["test"]), max_new)
    after_seen = accuracy(trainer.model, policy.tokenizer, seen, len(seen), max_new)
    rewards = [round(e["reward"], 4) for e in trainer.state.log_history if "reward" in e]
    correct = [round(e["rewards/correctness/mean"], 4) for e in trainer.state.log_history
               if "rewards/correctness/mean" in e]
    result = {
        "size": name, "seed": seed, "control": control, "learning_rate": p.train.learning_rate,
        "before": before["accuracy"], "after": after["accuracy"],
        "before_format": before["format_adherence"], "after_format": after["format_adherence"],
        "before_seen": before_seen["accuracy"], "after_seen": after_seen["accuracy"],
        "rewards": rewards, "correctness": correct,
        "warmup": warm, "grpo_seconds": round(train_seconds, 1),
        "seconds": round(time.perf_counter() - start, 1),
    }
    result["reward_trend"] = round(trend(rewards), 4)
    log(json.dumps({k: v for k, v in result.items() if k not in ("rewards", "correctness")}))
    return result


def run_grid(runs: list[tuple[str | Size, int, bool]], workdir: str | Path, processes: int = 1,
             on_result=None) -> list[dict]:
    """``run_experiment`` for every (size, seed, control), ``processes`` at a time, in the order given.

    A model this small leaves a GPU mostly idle, so several runs share one. Each distinct warm-up
    is made once, before any GRPO run starts, so that concurrent runs only read it. ``on_result``
    is called with each result as it finishes, so a long grid can save as it goes.
    """
    workdir = Path(workdir)
    on_result = on_result or (lambda result: None)
    if processes <= 1:
        results = []
        for size, seed, control in runs:
            results.append(run_experiment(size, seed, control, workdir))
            on_result(results[-1])
        return results
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed

    warm_ups = {warm_dir(_spec(size), seed, workdir): (size, seed) for size, seed, _ in runs}
    context = multiprocessing.get_context("spawn")  # CUDA cannot be used in a forked child
    with ProcessPoolExecutor(processes, mp_context=context) as pool:
        list(pool.map(_warmed, *zip(*warm_ups.values()), [workdir] * len(warm_ups)))
        futures = {pool.submit(run_experiment, size, seed, control, workdir): k
                   for k, (size, seed, control) in enumerate(runs)}
        results = [None] * len(runs)
        for future in as_completed(futures):
            results[futures[future]] = future.result()
            on_result(results[futures[future]])
    return results


def plot(results: list[dict], path: str | Path) -> None:
    """Reward and correctness-reward curves per run, GRPO solid and control dashed, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for r in results:
        label = f"seed {r['seed']} {'shuffled control' if r['control'] else 'GRPO'}"
        label += f" (held-out {r['before']:.2f} -> {r['after']:.2f})"
        style = dict(color=f"C{r['seed'] % 10}", linestyle="--" if r["control"] else "-", linewidth=1.2)
        for ax, key in zip(axes, ("rewards", "correctness")):
            smooth = common.moving_average(r[key], max(1, len(r[key]) // 30))  # per-step means are noisy
            ax.plot(range(1, len(smooth) + 1), smooth, label=label if ax is axes[0] else None, **style)
    axes[0].set(title="total reward (mean over completions, moving average)", xlabel="GRPO step", ylabel="reward")
    axes[1].set(title="correctness reward (fraction right)", xlabel="GRPO step", ylabel="mean")
    fig.legend(loc="lower center", ncol=2, fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.06 * ((len(results) + 1) // 2), 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def trend(values: list[float], part: float = 0.25) -> float:
    """Mean of the last quarter minus mean of the first quarter: how far a logged curve rose."""
    n = max(1, int(len(values) * part))
    return sum(values[-n:]) / n - sum(values[:n]) / n


def main(argv: list[str] | None = None) -> None:
    argv = common.argv_or_sys(argv)
    parser = common.parser(SCENARIO, __doc__)
    parser.add_argument("--size", default="cpu", choices=sorted(SIZES))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--control", action="store_true", help="also run the shuffled-reward control")
    parser.add_argument("--lrs", type=float, nargs="+", default=None,
                        help="the size at each of these learning rates (default: its own)")
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--processes", type=int, default=1,
                        help="runs at a time; on a GPU several small runs share the device")
    parser.add_argument("--out", default=None, help="write all results here (JSON), each run as it finishes")
    parser.add_argument("--plot", default=None, help="write the reward curves as a PNG here (one per lr with --lrs)")
    args = parser.parse_args(argv)
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="learning-"))
    base = SIZES[args.size]
    sizes = [replace(base, train={**base.train, "learning_rate": lr}) for lr in args.lrs] if args.lrs else [args.size]
    runs = [(size, seed, control) for size in sizes for seed in args.seeds
            for control in ([False, True] if args.control else [False])]
    done = []

    def save(result: dict | None = None) -> None:  # after every run: a grid cut short keeps what finished
        if result is not None:
            done.append(result)
        if args.out:
            entries = [common.run_entry(f"lr {r['learning_rate']:g} seed {r['seed']} "
                                        f"{'shuffled control' if r['control'] else 'GRPO'}",
                                        [{"step": "grpo", "seconds": r["grpo_seconds"]}], **r) for r in done]
            common.write_json(Path(args.out), common.result(
                SCENARIO, argv, vars(args), entries, "complete" if len(done) == len(runs) else "partial"))

    results = run_grid(runs, workdir, args.processes, on_result=save)
    print("\n| lr | seed | run | warm-up steps | held-out before | after | gain | trained-on before -> after "
          "| correctness reward, first -> last quarter | seconds |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        n = max(1, len(r["correctness"]) // 4)
        first, last = sum(r["correctness"][:n]) / n, sum(r["correctness"][-n:]) / n
        print(f"| {r['learning_rate']:g} | {r['seed']} | {'shuffled control' if r['control'] else 'GRPO'} | "
              f"{r['warmup']['steps']} | {r['before']:.3f} | {r['after']:.3f} | {r['after'] - r['before']:+.3f} | "
              f"{r['before_seen']:.3f} -> {r['after_seen']:.3f} | {first:.3f} -> {last:.3f} | {r['seconds']} |")
    if args.plot:
        for lr in args.lrs or [None]:
            chosen = [r for r in results if lr is None or r["learning_rate"] == lr]
            path = Path(args.plot)
            plot(chosen, path if lr is None else path.with_name(f"{path.stem}-lr{lr:g}{path.suffix}"))
