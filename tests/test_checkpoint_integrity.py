"""A damaged checkpoint (full disk, interrupted copy, bit rot) never ends a run in a traceback: resume
checks each checkpoint against its marker's file sizes and hashes and falls back to the newest good one,
or stops with one line, deleting nothing."""

import json
import shutil
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from grpo_gsm8k import smoke, training
from test_resilience import assert_same_run, stage

CKPTS = Path("checkpoints")


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """A tiny run trained uninterrupted to step 6; save_total_limit 2 kept checkpoints 4 and 6."""
    ws = smoke.make_workspace(tmp_path_factory.mktemp("integrity") / "clean",
                              {"train.max_steps": 6, "train.save_steps": 2})
    assert stage(ws, "dvc", "repro", "prepare").returncode == 0
    trained = stage(ws, sys.executable, "stages/train.py")
    assert trained.returncode == 0, trained.stderr
    assert sorted(p.name for p in (ws / CKPTS).glob("checkpoint-*")) == ["checkpoint-4", "checkpoint-6"]
    return ws


def killed_after_last_checkpoint(finished: Path, dest: Path) -> Path:
    """The finished run as if killed right after it wrote checkpoint-6: no adapter, not marked finished."""
    shutil.copytree(finished, dest, symlinks=True)
    (dest / CKPTS / training.FINISHED).unlink()
    shutil.rmtree(dest / "models/adapter")
    return dest


def truncate(path: Path) -> str:
    size = path.stat().st_size
    path.write_bytes(path.read_bytes()[: size // 2])
    return f"{path.relative_to(path.parents[2])} is {size // 2} bytes, its marker says {size}"


def remove(path: Path) -> str:
    path.unlink()
    return f"{path.relative_to(path.parents[2])} is missing"


def flip_a_byte_of_the_largest_file(folder: Path) -> str:
    path = max((p for p in folder.iterdir() if p.is_file()), key=lambda p: p.stat().st_size)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF  # the middle: tensor data, past every header a loader checks
    path.write_bytes(bytes(data))
    return f"{path.relative_to(folder.parents[1])} changed since it was saved (its SHA-256 differs from its marker's)"


DAMAGE = {
    "truncated adapter": lambda c: truncate(c / "adapter_model.safetensors"),
    "truncated optimizer": lambda c: truncate(c / "optimizer.pt"),
    "missing trainer state": lambda c: remove(c / "trainer_state.json"),
    "flipped byte": flip_a_byte_of_the_largest_file,
    "copied without its marker": lambda c: remove(c / training.MARKER).replace(
        "is missing", "is missing or cut short (killed while saving, or copied without it)"),
}


def tree(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.slow
@pytest.mark.parametrize("damage", DAMAGE)
def test_a_damaged_newest_checkpoint_falls_back_to_the_last_good_one(finished, tmp_path, damage):
    ws = killed_after_last_checkpoint(finished, tmp_path / "ws")
    why = DAMAGE[damage](ws / CKPTS / "checkpoint-6")
    damaged = tree(ws / CKPTS / "checkpoint-6")

    resumed = stage(ws, sys.executable, "stages/train.py")
    assert resumed.returncode == 0, resumed.stderr
    assert "Traceback" not in resumed.stderr
    warnings = [line for line in resumed.stdout.splitlines() if line.startswith("warning:")]
    assert warnings == [f"warning: {why}; resuming from step 4, the checkpoint(s) passed over moved to "
                        f"checkpoints/unverified/"]
    assert "resuming from checkpoints/checkpoint-4" in resumed.stdout
    assert json.loads((ws / "models/adapter/training_run.json").read_text())["resumed_from"] == "checkpoints/checkpoint-4"
    assert_same_run(ws, finished, 6)
    # Nothing a later fallback needs was deleted: the checkpoint resumed from, the one the resumed run wrote
    # (both verify), and the damaged one, kept as it was for a look.
    assert sorted(p.name for p in (ws / CKPTS).glob("checkpoint-*")) == ["checkpoint-4", "checkpoint-6"]
    for step in (4, 6):
        folder = ws / CKPTS / f"checkpoint-{step}"
        assert training.checkpoint_integrity.problem(folder, json.loads((folder / training.MARKER).read_text())) is None
    assert tree(ws / CKPTS / training.UNVERIFIED / "checkpoint-6") == damaged


@pytest.mark.slow
def test_no_good_checkpoint_left_stops_with_one_line_and_deletes_nothing(finished, tmp_path):
    ws = killed_after_last_checkpoint(finished, tmp_path / "ws")
    newest = truncate(ws / CKPTS / "checkpoint-6/adapter_model.safetensors")
    older = remove(ws / CKPTS / "checkpoint-4/trainer_state.json")
    before = tree(ws / CKPTS)

    refused = stage(ws, "dvc", "repro", "train")
    assert refused.returncode != 0
    assert "Traceback" not in refused.stderr + refused.stdout
    errors = [line for line in refused.stderr.splitlines() if line.startswith("error:")]
    assert errors == [f"error: no checkpoint in checkpoints/ can be resumed from: {newest}; {older}. Nothing was "
                      f"deleted. Copy the checkpoints in again to resume, or start over with `GRPO_FRESH=1 dvc repro "
                      f"train` (or `python stages/train.py --fresh`)."]
    assert tree(ws / CKPTS) == before
    assert not (ws / "models/adapter").exists()


def write_checkpoint(ckpts: Path, step: int, legacy: bool = False) -> Path:
    """The files the Trainer writes, in their real formats, and the marker (as today's, or an older version's)."""
    import torch
    from safetensors.torch import save_file

    folder = ckpts / f"checkpoint-{step}"
    folder.mkdir(parents=True)
    save_file({"lora_A": torch.full((64, 64), float(step))}, folder / "adapter_model.safetensors")
    torch.save({"state": {0: {"exp_avg": torch.zeros(4096)}}, "param_groups": []}, folder / "optimizer.pt")
    torch.save({"last_epoch": step}, folder / "scheduler.pt")
    (folder / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    if legacy:  # what markers held before they listed the files
        (folder / training.MARKER).write_text(json.dumps({"run_hash": "x", "step": step}))
    else:
        training.CheckpointMarker({"run_hash": "x"}).on_save(
            SimpleNamespace(output_dir=str(ckpts)), SimpleNamespace(global_step=step, is_world_process_zero=True), None)
    return folder


def test_markers_of_older_versions_are_checked_for_what_a_resume_reads(tmp_path, capsys):
    """No sizes or hashes to compare: the files the Trainer needs must be there and start to load."""
    ckpts = tmp_path / "checkpoints"
    for step in (2, 4, 6):
        write_checkpoint(ckpts, step, legacy=True)
    assert training.resume_checkpoint(ckpts, {"run_hash": "x"}) == ckpts / "checkpoint-6"
    assert capsys.readouterr().out == ""

    (ckpts / "checkpoint-6/trainer_state.json").unlink()
    optimizer = ckpts / "checkpoint-4/optimizer.pt"
    optimizer.write_bytes(optimizer.read_bytes()[:-100])  # the zip's directory, at its end, cut off
    assert training.resume_checkpoint(ckpts, {"run_hash": "x"}) == ckpts / "checkpoint-2"
    out = capsys.readouterr().out
    assert out.startswith(f"warning: {ckpts}/checkpoint-6/trainer_state.json is missing; {optimizer} does not load "
                          f"(BadZipFile: ")
    assert out.endswith(f"; resuming from step 2, the checkpoint(s) passed over moved to {ckpts}/unverified/\n")
    assert sorted(p.name for p in (ckpts / training.UNVERIFIED).iterdir()) == ["checkpoint-4", "checkpoint-6"]


def test_a_damaged_newest_checkpoint_cannot_make_rotation_delete_the_good_ones(tmp_path):
    """transformers' save_total_limit rotation always keeps the newest checkpoint, by step when mtimes are
    within a second of each other: left in place, a damaged checkpoint-6 would be kept and the checkpoint-5
    the resumed run writes (save_steps changed) deleted under save_total_limit 1."""
    from transformers.trainer_utils import rotate_checkpoints

    ckpts = tmp_path / "checkpoints"
    write_checkpoint(ckpts, 4)
    damaged = write_checkpoint(ckpts, 6)
    (damaged / "optimizer.pt").write_bytes(b"")
    assert training.resume_checkpoint(ckpts, {"run_hash": "x"}) == ckpts / "checkpoint-4"
    write_checkpoint(ckpts, 5)  # the resumed run's next save
    rotate_checkpoints(str(ckpts), save_total_limit=1, use_mtime=False)
    assert sorted(p.name for p in ckpts.glob("checkpoint-*")) == ["checkpoint-5"]
    assert (ckpts / training.UNVERIFIED / "checkpoint-6/optimizer.pt").read_bytes() == b""

    damaged = write_checkpoint(ckpts, 6)  # damaged at the same step again: both kept
    (damaged / "trainer_state.json").unlink()
    assert training.resume_checkpoint(ckpts, {"run_hash": "x"}) == ckpts / "checkpoint-5"
    assert sorted(p.name for p in (ckpts / training.UNVERIFIED).iterdir()) == ["checkpoint-6", "checkpoint-6.1"]


def test_the_marker_lists_every_file_with_its_size_and_hash(tmp_path):
    import hashlib

    folder = write_checkpoint(tmp_path / "checkpoints", 2)
    marker = json.loads((folder / training.MARKER).read_text())
    assert marker["run_hash"] == "x" and marker["step"] == 2
    assert marker["files"] == {
        p.name: {"size": p.stat().st_size, "sha256": hashlib.sha256(p.read_bytes()).hexdigest()}
        for p in sorted(folder.iterdir()) if p.name != training.MARKER}
    assert not list(folder.glob(".*"))  # the marker was written beside, then renamed: no leftover


def test_under_two_processes_both_fall_back_alike_and_rank_zero_alone_moves_the_damaged_one(tmp_path):
    import subprocess
    import textwrap

    ckpts = tmp_path / "checkpoints"
    write_checkpoint(ckpts, 4)
    adapter = write_checkpoint(ckpts, 6) / "adapter_model.safetensors"
    size = adapter.stat().st_size
    adapter.write_bytes(b"")
    rank_script = tmp_path / "rank.py"
    rank_script.write_text(textwrap.dedent(f"""\
        import sys, time
        from pathlib import Path
        import torch.distributed as dist
        from grpo_gsm8k import training
        rank = int(sys.argv[1])
        dist.init_process_group("gloo", init_method="file://{tmp_path / 'rendezvous'}", rank=rank, world_size=2)
        if rank == 1:
            time.sleep(1.5)  # the slower process must still find the damaged checkpoint where it was
        print(training.resume_checkpoint(Path("{ckpts}"), {{"run_hash": "x"}}))
        dist.destroy_process_group()
        """))
    ranks = [subprocess.Popen([sys.executable, str(rank_script), str(r)], cwd=Path(__file__).parent.parent,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in (0, 1)]
    (out0, err0), (out1, err1) = (p.communicate(timeout=120) for p in ranks)
    assert [p.returncode for p in ranks] == [0, 0], err0 + err1
    assert out0.splitlines() == [f"warning: {adapter} is 0 bytes, its marker says {size}; resuming from step 4, the checkpoint(s) passed over moved to {ckpts}/unverified/",
                                 str(ckpts / "checkpoint-4")]
    assert out1.splitlines() == [str(ckpts / "checkpoint-4")]
    assert sorted(p.name for p in ckpts.glob("checkpoint-*")) == ["checkpoint-4"]
    assert (ckpts / training.UNVERIFIED / "checkpoint-6/adapter_model.safetensors").read_bytes() == b""
