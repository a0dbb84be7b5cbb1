"""Checkpoint verification (issue 32): what verifying a checkpoint costs. The defaults' Qwen2.5-3B checkpoint sized
on paper from the model's config.json and params.yaml's LoRA, written in the real formats (safetensors, torch zip),
then timed: the marker's hashes at save and the check before a resume, both from the page cache (just written, as
at a save; a resume after a reboot reads from disk first, and the Trainer then loads from the cache). CPU only.

    python -m bench checkpoint-verify [--config /work/shared/qwen2.5-tokenizer/config.json] [--out FILE]
"""

from __future__ import annotations

import json
import os
import platform
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

from bench import common
from grpo_gsm8k import checkpoint_integrity, training
from grpo_gsm8k.config import read_yaml

SCENARIO = "checkpoint-verify"


def lora_params(config: dict, r: int, targets: list[str]) -> int:
    """LoRA A (r x in) + B (out x r) on each target projection of every layer."""
    h, inter = config["hidden_size"], config["intermediate_size"]
    kv = config["num_key_value_heads"] * h // config["num_attention_heads"]
    shapes = {"q_proj": (h, h), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (h, h),
              "gate_proj": (h, inter), "up_proj": (h, inter), "down_proj": (inter, h)}
    return config["num_hidden_layers"] * sum(r * (shapes[t][0] + shapes[t][1]) for t in targets)


def sizes(n: int) -> dict[str, int]:
    """Bytes per file. PEFT keeps the adapter in float32 under a bf16 base (autocast_adapter_dtype), and
    bitsandbytes' 8-bit AdamW holds two uint8 states per parameter plus a float32 scale per 256 of them."""
    return {"adapter_model.safetensors": 4 * n, "optimizer.pt": 2 * n + 2 * 4 * (n // 256)}


def write_checkpoint(folder: Path, files: dict[str, int], tokenizer: Path) -> None:
    import torch
    from safetensors.torch import save_file

    folder.mkdir(parents=True)
    save_file({"w": torch.randint(0, 255, (files["adapter_model.safetensors"],), dtype=torch.uint8)},
              folder / "adapter_model.safetensors")
    torch.save({"state": torch.randint(0, 255, (files["optimizer.pt"],), dtype=torch.uint8)}, folder / "optimizer.pt")
    (folder / "tokenizer.json").write_bytes(tokenizer.read_bytes() if tokenizer.is_file() else b"{}")
    torch.save({"last_epoch": 25}, folder / "scheduler.pt")
    torch.save({"python": list(range(625))}, folder / "rng_state.pth")
    (folder / "trainer_state.json").write_text(json.dumps({"global_step": 25, "log_history": [{}] * 25}))


def timed(action) -> dict:
    """Wall seconds, and CPU seconds (what a machine shared with other work cannot inflate)."""
    wall, cpu = time.perf_counter(), time.process_time()
    action()
    return {"wall_s": round(time.perf_counter() - wall, 3), "cpu_s": round(time.process_time() - cpu, 3)}


def main(argv: list[str] | None = None) -> None:
    argv = common.argv_or_sys(argv)
    parser = common.parser(SCENARIO, __doc__)
    parser.add_argument("--config", default="/work/shared/qwen2.5-tokenizer/config.json")
    parser.add_argument("--out", default=str(common.ROOT / "build/bench/checkpoint_verify.json"))
    args = parser.parse_args(argv)
    params = read_yaml(common.ROOT / "params.yaml")
    n = lora_params(json.loads(Path(args.config).read_text()), params["lora"]["r"], params["lora"]["target_modules"])
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "checkpoint-25"
        write_checkpoint(folder, sizes(n), Path(args.config).with_name("tokenizer.json"))
        total = sum(p.stat().st_size for p in folder.iterdir())
        mark = training.CheckpointMarker({"run_hash": "bench"})
        save_s = [timed(lambda: mark.on_save(SimpleNamespace(output_dir=tmp),
                                             SimpleNamespace(global_step=25, is_world_process_zero=True), None))
                  for _ in range(3)]
        marker = json.loads((folder / training.MARKER).read_text())
        resume_s = [timed(lambda: checkpoint_integrity.problem(folder, marker)) for _ in range(3)]
        assert checkpoint_integrity.problem(folder, marker) is None
        files = {p.name: p.stat().st_size for p in sorted(folder.iterdir()) if p.name != training.MARKER}
    runs = [common.run_entry(name, [{"step": i + 1, "seconds": t["wall_s"], "cpu_s": t["cpu_s"]}
                                    for i, t in enumerate(ts)])
            for name, ts in (("marker at save", save_s), ("verify at resume", resume_s))]
    result = common.result(
        SCENARIO, argv, vars(args), runs, "complete",
        lora_params=n, checkpoint_bytes=total, files=files, marker_at_save_s=save_s, verify_at_resume_s=resume_s,
        wall_s_per_gb=round(min(t["wall_s"] for t in resume_s) / (total / 1e9), 3),
        cpu_s_per_gb=round(min(t["cpu_s"] for t in resume_s) / (total / 1e9), 3),
        load_average=list(os.getloadavg()),
        machine=f"{platform.processor() or platform.machine()}, {platform.python_version()}")
    common.write_json(Path(args.out), result)
    print(json.dumps(result, indent=1))
