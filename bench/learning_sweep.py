"""The learning experiment's `gpu` size at several learning rates, many runs sharing one GPU.

    python bench/learning_sweep.py --lrs 1e-3 5e-4 --seeds 0 1 2 --control --processes 12 --out DIR

Writes DIR/runs.jsonl, one line per finished run (so a run cut short keeps what finished), and
DIR/curves.png. The sweep is how the `gpu` size's learning rate was chosen; LEARNING.md has the
numbers.
"""

import argparse
import json
import tempfile
from dataclasses import replace
from pathlib import Path

from grpo_gsm8k import learning


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lrs", type=float, nargs="+", required=True)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--control", action="store_true")
    parser.add_argument("--processes", type=int, default=1)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    base = learning.SIZES["gpu"]
    runs = [(replace(base, train={**base.train, "learning_rate": lr}), seed, control)
            for lr in args.lrs for seed in args.seeds for control in ([False, True] if args.control else [False])]

    def save(result: dict) -> None:
        with open(out / "runs.jsonl", "a") as f:
            f.write(json.dumps(result) + "\n")

    results = learning.run_grid(runs, tempfile.mkdtemp(prefix="sweep-"), args.processes, on_result=save)
    for lr in args.lrs:
        learning.plot([r for r in results if r["learning_rate"] == lr], out / f"curves-lr{lr:g}.png")


if __name__ == "__main__":
    main()
