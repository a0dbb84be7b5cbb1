"""Multi-GPU check: a few GRPO steps of the random-weight Qwen2.5-3B stand-in under DDP through
`scripts/train_multi_gpu.sh` (accelerate launch + stages/train.py), then proof that the outputs were
written once, by rank 0, not once per rank.

  python bench/ddp_check.py setup  --model /tmp/standin --data .carry/gsm8k   # params.yaml + prepare
  N=2 scripts/train_multi_gpu.sh
  python bench/ddp_check.py verify --gpus 2 --out $OUT/ddp_check.json

`setup` rewrites params.yaml in place: run it only in a scratch copy of the repo (the GPU machine's).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from grpo_gsm8k.config import read_yaml, write_yaml  # noqa: E402  (params read as DVC reads them)

STEPS, SAVE_STEPS, PER_DEVICE, GENERATIONS = 4, 2, 8, 8


def setup(model: str, data: str) -> None:
    params = read_yaml("params.yaml")
    params["data"] |= {"source": "local", "local_dir": data, "train_limit": 256}
    params["model"] |= {"name": model, "backend": "transformers", "load_in_4bit": True}
    params["train"] |= {"max_steps": STEPS, "save_steps": SAVE_STEPS, "per_device_train_batch_size": PER_DEVICE,
                        "gradient_accumulation_steps": 1, "num_generations": GENERATIONS,
                        "max_completion_length": 64}
    params["generation"] |= {"use_vllm": False}
    write_yaml("params.yaml", params)
    subprocess.run([sys.executable, "stages/prepare.py"], check=True)


def verify(gpus: int) -> dict:
    run = json.loads(Path("models/adapter/training_run.json").read_text())
    curve = Path("reports/train/plots/metrics/reward.tsv").read_text().splitlines()[1:]
    steps = [int(row.split("\t")[0]) for row in curve]
    checkpoints = sorted(p.name for p in Path("checkpoints").glob("checkpoint-*"))
    result = {
        "gpus": gpus,
        "world_size": run["world_size"],
        "logged_steps": steps,
        "checkpoints": checkpoints,
        "finished": json.loads(Path("checkpoints/FINISHED.json").read_text()),
        "adapter_files": sorted(p.name for p in Path("models/adapter").iterdir()),
        "stray_outputs": sorted(str(p) for p in Path(".").glob("**/.*.tmp")),
        "completions_per_step": PER_DEVICE * gpus,
        "versions": run["versions"],
    }
    assert steps == list(range(1, STEPS + 1)), f"each step must be logged once (rank 0 only): {steps}"
    assert checkpoints == [f"checkpoint-{s}" for s in range(SAVE_STEPS, STEPS + 1, SAVE_STEPS)], checkpoints
    assert result["finished"]["step"] == STEPS and not result["stray_outputs"]
    assert result["world_size"] == gpus, f"trained on {result['world_size']} processes, expected {gpus}"
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("setup")
    s.add_argument("--model", required=True)
    s.add_argument("--data", required=True)
    v = sub.add_parser("verify")
    v.add_argument("--gpus", type=int, required=True)
    v.add_argument("--out", required=True)
    args = parser.parse_args()
    if args.cmd == "setup":
        setup(args.model, args.data)
    else:
        result = verify(args.gpus)
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
        print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
