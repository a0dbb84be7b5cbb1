"""The push stage against a local fake of the Hub's HTTP API (pytest-httpserver on 127.0.0.1).

stages/push.py runs in a subprocess with cwd in a tmp workspace (fake DVC outputs, params.yaml,
dvc.lock, a git repo) and HF_ENDPOINT pointing at the fake, exactly as `dvc repro push` runs it.
The fake implements what upload_folder and friends call in huggingface_hub 1.x: repos/create,
model info, validate-yaml, preupload (every file "regular": no LFS or xet) and commit (NDJSON).
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import matplotlib
import pytest
import yaml
from huggingface_hub import ModelCard
from werkzeug import Request, Response

from grpo_gsm8k import config, hub

matplotlib.use("Agg")

ROOT = Path(__file__).resolve().parent.parent
TOKEN = "hf_FAKEtokenDoNotLeak0123456789abcdef"
ADAPTER_REPO, MERGED_REPO = "someone/qwen-gsm8k-grpo-lora", "someone/qwen-gsm8k-grpo"
BASE = "Qwen/Qwen2.5-3B-Instruct"
TRAIN_MD5 = "0123456789abcdef0123456789abcdef.dir"
METRICS = {
    "trained": {"problems": 8, "accuracy": 0.625, "accuracy_lenient": 0.75, "format_adherence": 0.875,
                "capped_at": 8, "max_new_tokens": 24},
    "base": {"problems": 8, "accuracy": 0.375, "accuracy_lenient": 0.5, "format_adherence": 0.25,
             "capped_at": 8, "max_new_tokens": 24},
    "delta": {"accuracy": 0.25, "accuracy_lenient": 0.25, "format_adherence": 0.625},
}
ADAPTER_FILES = ["adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "training_run.json"]
MERGED_FILES = ["config.json", "generation_config.json", "model.safetensors", "tokenizer.json"]
EXPECTED = {  # what each repo must hold: the DVC output (PEFT's README replaced), the card, the figure
    ADAPTER_REPO: sorted(ADAPTER_FILES + ["README.md", "assets/summary.png"]),
    MERGED_REPO: sorted(MERGED_FILES + ["README.md", "assets/summary.png", "training_run.json"]),
}


# ---------------------------------------------------------------------------------- the fake Hub

class FakeHub:
    """Just enough of the Hub: repos with files and a head commit; every request is logged."""

    def __init__(self, server):
        self.server, self.repos, self.log = server, {}, []
        repo = r"(?P<repo>[^/]+/[^/]+)"
        routes = [
            ("POST", re.compile(r"^/api/repos/create$"), self.create),
            ("POST", re.compile(r"^/api/validate-yaml$"), self.validate_yaml),
            ("POST", re.compile(rf"^/api/models/{repo}/preupload/main$"), self.preupload),
            ("POST", re.compile(rf"^/api/models/{repo}/commit/main$"), self.commit),
            ("GET", re.compile(rf"^/api/models/{repo}(/revision/main)?$"), self.info),
        ]
        for method, uri, handler in routes:
            server.expect_request(uri, method=method).respond_with_handler(self._wrap(uri, handler))

    @property
    def url(self) -> str:
        return self.server.url_for("").rstrip("/")

    def _wrap(self, uri, handler):
        def respond(request: Request) -> Response:
            self.log.append((request.method, request.path, request.headers.get("Authorization")))
            if request.headers.get("Authorization") != f"Bearer {TOKEN}":
                return self._json({"error": "Invalid credentials"}, 401)
            match = uri.match(request.path)
            return handler(request, **{k: v for k, v in match.groupdict().items() if k == "repo"})
        return respond

    @staticmethod
    def _json(data, status=200, headers=None) -> Response:
        return Response(json.dumps(data), status=status, content_type="application/json", headers=headers)

    def commit_sha(self, repo_id: str, files: dict) -> str:
        return hashlib.sha1(json.dumps([repo_id, len(self.log), sorted(
            (k, hashlib.sha256(v).hexdigest()) for k, v in files.items())]).encode()).hexdigest()

    def add_commit(self, repo_id: str, files: dict, summary: str) -> str:
        repo = self.repos[repo_id]
        repo["files"].update(files)
        repo["sha"] = self.commit_sha(repo_id, repo["files"])
        repo["commits"].append({"summary": summary, "files": sorted(files), "sha": repo["sha"]})
        return repo["sha"]

    def create(self, request):
        body = request.get_json()
        repo_id = f"{body['organization']}/{body['name']}"
        if repo_id in self.repos:
            return self._json({"error": "You already created this model repo", "url": f"{self.url}/{repo_id}"}, 409)
        self.repos[repo_id] = {"files": {}, "sha": None, "commits": [], "private": body.get("visibility") == "private"}
        self.add_commit(repo_id, {".gitattributes": b"*.safetensors filter=lfs\n"}, "initial commit")
        return self._json({"url": f"{self.url}/{repo_id}"})

    def validate_yaml(self, request):
        return self._json({"errors": [], "warnings": []})

    def info(self, request, repo):
        if repo not in self.repos:
            return self._json({"error": "Repository not found"}, 404, {"X-Error-Code": "RepoNotFound"})
        r = self.repos[repo]
        return self._json({"id": repo, "modelId": repo, "sha": r["sha"], "private": r["private"],
                           "siblings": [{"rfilename": f} for f in sorted(r["files"])]})

    def preupload(self, request, repo):
        if repo not in self.repos:
            return self._json({"error": "Repository not found"}, 404, {"X-Error-Code": "RepoNotFound"})
        existing = self.repos[repo]["files"]

        def oid(path):  # git blob sha1 of the file on the Hub, so unchanged files are not recommitted
            data = existing.get(path)
            return None if data is None else hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
        files = request.get_json()["files"]
        return self._json({"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False,
                                      "oid": oid(f["path"])} for f in files]})

    def commit(self, request, repo):
        lines = [json.loads(line) for line in request.get_data().decode().splitlines() if line.strip()]
        header = next(x["value"] for x in lines if x["key"] == "header")
        assert all(x["key"] in ("header", "file") for x in lines), "only regular files are expected"
        files = {x["value"]["path"]: base64.b64decode(x["value"]["content"]) for x in lines if x["key"] == "file"}
        sha = self.add_commit(repo, files, header["summary"])
        self.repos[repo]["commits"][-1]["description"] = header.get("description", "")
        return self._json({"commitUrl": f"{self.url}/{repo}/commit/{sha}", "commitOid": sha})

    def commits_posted(self) -> int:
        return sum(1 for method, path, _ in self.log if method == "POST" and "/commit/" in path)


@pytest.fixture
def fake_hub(httpserver):
    return FakeHub(httpserver)


# ----------------------------------------------------------------------- the workspace and a run

def write(path: Path, data: bytes | str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data.encode() if isinstance(data, str) else data)


def git(ws: Path, *args: str) -> str:
    env = dict(os.environ, GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@localhost", GIT_COMMITTER_NAME="t",
               GIT_COMMITTER_EMAIL="t@localhost")
    return subprocess.run(["git", *args], cwd=ws, env=env, check=True, capture_output=True, text=True).stdout.strip()


@pytest.fixture
def workspace(tmp_path):
    """Fake outputs of every stage before push, tiny params with the repo ids, a committed git repo."""
    import matplotlib.pyplot as plt

    ws = tmp_path / "ws"
    params = yaml.safe_load((ROOT / "profiles/tiny.yaml").read_text())
    params["model"]["name"] = BASE
    params["hub"] |= {"repo_id": MERGED_REPO, "adapter_repo_id": ADAPTER_REPO, "private": True}
    write(ws / "params.yaml", yaml.safe_dump(params, sort_keys=False))
    p = config.parse(params)
    write(ws / "models/adapter/adapter_config.json", json.dumps({"r": 8, "lora_alpha": 16, "peft_type": "LORA"}))
    write(ws / "models/adapter/adapter_model.safetensors", os.urandom(512))
    write(ws / "models/adapter/tokenizer.json", '{"version": "1.0"}')
    write(ws / "models/adapter/README.md", "---\nlibrary_name: peft\n---\nPEFT's own card\n")
    write(ws / "models/adapter/training_run.json", json.dumps({
        "run_hash": "abc123", "base_model": BASE, "backend": "unsloth", "params": config.as_dict(p),
        "versions": {"trl": "0.99", "peft": "0.21.0"}}))
    write(ws / "models/merged/config.json", json.dumps({"architectures": ["Qwen2ForCausalLM"]}))
    write(ws / "models/merged/generation_config.json", "{}")
    write(ws / "models/merged/model.safetensors", os.urandom(2048))
    write(ws / "models/merged/tokenizer.json", '{"version": "1.0"}')
    write(ws / "reports/eval/metrics.json", json.dumps(METRICS))
    fig, ax = plt.subplots(figsize=(1, 1))
    ax.plot([0, 1], [0, 1])
    (ws / "reports").mkdir(exist_ok=True)
    fig.savefig(ws / "reports/summary.png", dpi=20)
    plt.close(fig)
    write(ws / "dvc.lock", yaml.safe_dump({"schema": "2.0", "stages": {"train": {"cmd": "python stages/train.py",
          "outs": [{"path": "models/adapter", "hash": "md5", "md5": TRAIN_MD5}]}}}))
    git(ws, "init", "-q")
    git(ws, "add", "params.yaml", "dvc.lock")
    git(ws, "commit", "-qm", "workspace")
    return ws


def run_push(ws: Path, endpoint: str, token: str | None = TOKEN, **env_extra) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("HF_", "HUGGINGFACE_")) and k != "TRANSFORMERS_OFFLINE"}
    env |= {"HF_ENDPOINT": endpoint, "HF_HOME": str(ws.parent / "hf_home"), "HF_HUB_DISABLE_TELEMETRY": "1",
            "HF_HUB_DISABLE_PROGRESS_BARS": "1", "PYTHONPATH": str(ROOT)}
    if token:
        env["HF_TOKEN"] = token
    env |= env_extra
    return subprocess.run([sys.executable, str(ROOT / "stages/push.py")], cwd=ws, env=env,
                          capture_output=True, text=True, timeout=120)


def receipt(ws: Path) -> dict:
    return json.loads((ws / "reports/push.json").read_text())


def snapshot(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() or p.is_symlink()}


def assert_no_token(ws: Path, proc: subprocess.CompletedProcess, fake: FakeHub | None = None) -> None:
    assert TOKEN not in proc.stdout and TOKEN not in proc.stderr
    for path in ws.rglob("*"):
        if path.is_file():
            assert TOKEN.encode() not in path.read_bytes(), path
    for repo in (fake.repos.values() if fake else []):
        for name, data in repo["files"].items():
            assert TOKEN.encode() not in data, name
        assert all(TOKEN not in json.dumps(c) for c in repo["commits"])


# --------------------------------------------------------------------------------------- tests

def test_publishes_both_repos_with_cards_and_a_receipt(workspace, fake_hub):
    ws = workspace
    before = {d: snapshot(ws / d) for d in ("models/adapter", "models/merged")}
    proc = run_push(ws, fake_hub.url)
    assert proc.returncode == 0, proc.stderr

    rev = git(ws, "rev-parse", "--short", "HEAD")
    r = receipt(ws)
    assert r["git_revision"] == rev and r["dvc_revision"] == TRAIN_MD5 and r["private"] is True
    assert r["uploaded"] is True
    for kind, repo_id in (("adapter", ADAPTER_REPO), ("merged", MERGED_REPO)):
        remote, entry = fake_hub.repos[repo_id], r["repos"][kind]
        assert remote["private"] is True
        uploaded = sorted(remote["commits"][-1]["files"])
        assert uploaded == EXPECTED[repo_id] == sorted(entry["files"])
        # the receipt names each uploaded file's local source, holding exactly the bytes the Hub got;
        # the card among them is the push stage's own output, not a file in the DVC output folder
        assert entry["files"]["README.md"] == f"reports/hub/{kind}/README.md"
        assert all(remote["files"][rel] == (ws / src).read_bytes() for rel, src in entry["files"].items())
        assert entry["uploaded"] is True and entry["repo_id"] == repo_id
        assert entry["commit_id"] == remote["sha"] and entry["url"] == f"{fake_hub.url}/{repo_id}"
        # the content hash is sha256 over the sorted manifest of exactly what the Hub received
        manifest = {f: hashlib.sha256(remote["files"][f]).hexdigest() for f in uploaded}
        assert entry["content_hash"] == hub.content_hash(manifest)
        summary = remote["commits"][-1]["summary"]
        assert rev in summary and TRAIN_MD5 in summary and "-dirty" not in summary
        assert remote["files"]["assets/summary.png"] == (ws / "reports/summary.png").read_bytes()
        assert remote["files"]["assets/summary.png"].startswith(b"\x89PNG")

    # the DVC outputs are untouched (no README written into them, PEFT's card left as it was)
    assert {d: snapshot(ws / d) for d in before} == before
    assert fake_hub.repos[MERGED_REPO]["files"]["model.safetensors"] == (ws / "models/merged/model.safetensors").read_bytes()
    assert_no_token(ws, proc, fake_hub)


@pytest.mark.parametrize("repo_id,relation,library", [(ADAPTER_REPO, "adapter", "peft"),
                                                       (MERGED_REPO, "finetune", "transformers")])
def test_model_cards_parse_and_carry_the_metadata(workspace, fake_hub, repo_id, relation, library):
    assert run_push(workspace, fake_hub.url).returncode == 0
    text = fake_hub.repos[repo_id]["files"]["README.md"].decode()
    card = ModelCard(text)
    d = card.data
    assert d.base_model == BASE and d.base_model_relation == relation and d.library_name == library
    assert d.datasets == ["openai/gsm8k"]
    assert set(d.tags) >= {"grpo", "trl", "unsloth", "qlora", "gsm8k", "reasoning"}
    results = {e.metric_name: e for e in d.eval_results}
    assert len(results) == 2
    for e in results.values():
        assert (e.task_type, e.dataset_type, e.dataset_split, e.metric_type) == (
            "text-generation", "openai/gsm8k", "test", "accuracy")
    trained = [e.metric_value for n, e in results.items() if "base model" not in n]
    base = [e.metric_value for n, e in results.items() if "base model" in n]
    assert trained == [METRICS["trained"]["accuracy"]] and base == [METRICS["base"]["accuracy"]]
    # body: the figure in the repo, the system prompt, the training params, usage snippets
    assert "](assets/summary.png)" in text
    assert "Respond in the following format:\n<reasoning>" in text
    params = yaml.safe_load((workspace / "params.yaml").read_text())
    assert f"| learning rate | {params['train']['learning_rate']:g} |" in text
    for name, key in [("optimizer steps", "max_steps"), ("generations per prompt (GRPO group)", "num_generations"),
                      ("per-device batch (completions)", "per_device_train_batch_size")]:
        assert f"| {name} | {params['train'][key]} |" in text
    assert f"| LoRA r | {params['lora']['r']} |" in text and f"| LoRA alpha | {params['lora']['alpha']} |" in text
    assert f"| ratio clip (epsilon, epsilon_high) | {params['train']['epsilon']}, {params['train']['epsilon_high']} |" in text
    assert "from vllm import LLM" in text and "from transformers import" in text
    assert ("from peft import" in text) == (relation == "adapter")
    assert f'"{repo_id}"' in text


def test_rerun_with_unchanged_model_uploads_nothing(workspace, fake_hub):
    assert run_push(workspace, fake_hub.url).returncode == 0
    first = receipt(workspace)
    n_log = len(fake_hub.log)

    proc = run_push(workspace, fake_hub.url)
    assert proc.returncode == 0, proc.stderr
    second = receipt(workspace)
    assert second["uploaded"] is False
    new = fake_hub.log[n_log:]
    assert [m for m, path, _ in new if m == "POST"] == []        # no create, preupload or commit
    assert len(new) == 2                                          # one head check per repo
    for kind in ("adapter", "merged"):
        assert second["repos"][kind]["uploaded"] is False and second["repos"][kind]["reason"] == "unchanged"
        assert second["repos"][kind]["commit_id"] == first["repos"][kind]["commit_id"]
        assert second["repos"][kind]["files"] == first["repos"][kind]["files"]
    assert "unchanged" in proc.stdout

    # a changed merged model is uploaded again; the unchanged adapter is not
    (workspace / "models/merged/model.safetensors").write_bytes(os.urandom(2048))
    commits = fake_hub.commits_posted()
    assert run_push(workspace, fake_hub.url).returncode == 0
    third = receipt(workspace)
    assert fake_hub.commits_posted() == commits + 1
    assert fake_hub.repos[MERGED_REPO]["commits"][-1]["files"] == ["model.safetensors"]
    assert third["repos"]["merged"]["uploaded"] is True
    assert third["repos"]["merged"]["commit_id"] != first["repos"]["merged"]["commit_id"]
    assert third["repos"]["adapter"]["reason"] == "unchanged"
    # the models are not tracked by git: changing them does not make the work tree dirty
    assert "-dirty" not in fake_hub.repos[MERGED_REPO]["commits"][-1]["summary"]


def test_remote_moved_on_is_not_skipped(workspace, fake_hub):
    """Same local content as the receipt, but someone changed the Hub repo: push restores it."""
    assert run_push(workspace, fake_hub.url).returncode == 0
    fake_hub.add_commit(ADAPTER_REPO, {"README.md": b"edited on the Hub\n"}, "web edit")
    commits = fake_hub.commits_posted()
    proc = run_push(workspace, fake_hub.url)
    assert proc.returncode == 0, proc.stderr
    r = receipt(workspace)
    assert fake_hub.commits_posted() == commits + 1
    assert fake_hub.repos[ADAPTER_REPO]["commits"][-1]["files"] == ["README.md"]  # only what differs
    assert r["repos"]["adapter"]["uploaded"] is True
    assert r["repos"]["adapter"]["commit_id"] == fake_hub.repos[ADAPTER_REPO]["sha"]
    assert r["repos"]["merged"]["reason"] == "unchanged"


def test_dirty_work_tree_is_named_in_the_commit(workspace, fake_hub):
    (workspace / "params.yaml").write_text((workspace / "params.yaml").read_text() + "\n# edited\n")
    assert run_push(workspace, fake_hub.url).returncode == 0
    assert f"git {git(workspace, 'rev-parse', '--short', 'HEAD')}-dirty" in (
        fake_hub.repos[MERGED_REPO]["commits"][-1]["summary"])


def test_public_repos_and_existing_visibility_left_alone(workspace, fake_hub):
    params = yaml.safe_load((workspace / "params.yaml").read_text())
    params["hub"]["private"] = False
    (workspace / "params.yaml").write_text(yaml.safe_dump(params))
    fake_hub.repos[ADAPTER_REPO] = {"files": {}, "sha": "0" * 40, "commits": [], "private": True}
    proc = run_push(workspace, fake_hub.url)
    assert proc.returncode == 0, proc.stderr
    assert fake_hub.repos[MERGED_REPO]["private"] is False          # created public
    assert fake_hub.repos[ADAPTER_REPO]["private"] is True          # existed private: not flipped
    assert f"warning: {ADAPTER_REPO} is private" in proc.stdout
    assert receipt(workspace)["private"] is False
    assert sorted(fake_hub.repos[ADAPTER_REPO]["files"]) == EXPECTED[ADAPTER_REPO]


def test_only_the_adapter_repo_set_publishes_only_the_adapter(workspace, fake_hub):
    params = yaml.safe_load((workspace / "params.yaml").read_text())
    params["hub"]["repo_id"] = None
    (workspace / "params.yaml").write_text(yaml.safe_dump(params))
    proc = run_push(workspace, fake_hub.url)
    assert proc.returncode == 0, proc.stderr
    assert set(fake_hub.repos) == {ADAPTER_REPO}
    r = receipt(workspace)
    assert r["repos"]["adapter"]["uploaded"] is True
    assert r["repos"]["merged"]["uploaded"] is False and "hub.repo_id is null" in r["repos"]["merged"]["reason"]
    assert sorted(r["repos"]["merged"]["files"]) == EXPECTED[MERGED_REPO]


def test_dry_run_without_repo_ids_says_what_it_would_upload(workspace, fake_hub):
    params = yaml.safe_load((workspace / "params.yaml").read_text())
    params["hub"] |= {"repo_id": None, "adapter_repo_id": None}
    (workspace / "params.yaml").write_text(yaml.safe_dump(params))
    before = snapshot(workspace / "models")
    proc = run_push(workspace, fake_hub.url, token=None)
    assert proc.returncode == 0, proc.stderr
    r = receipt(workspace)
    assert r["uploaded"] is False
    assert fake_hub.log == []                                   # no network at all
    for kind, repo_id in (("adapter", ADAPTER_REPO), ("merged", MERGED_REPO)):
        e = r["repos"][kind]
        assert e["uploaded"] is False and e["repo_id"] is None and e["commit_id"] is None
        assert sorted(e["files"]) == EXPECTED[repo_id]
        assert f"(model card: reports/hub/{kind}/README.md)" in proc.stdout
        # what it would upload is on disk: the files the receipt names hash to its content hash
        on_disk = {rel: hashlib.sha256((workspace / src).read_bytes()).hexdigest() for rel, src in e["files"].items()}
        assert hub.content_hash(on_disk) == e["content_hash"]
        card = ModelCard((workspace / e["files"]["README.md"]).read_text())
        assert [x.metric_value for x in card.data.eval_results] == [
            METRICS["trained"]["accuracy"], METRICS["base"]["accuracy"]]
        assert "PEFT's own card" not in card.text
    assert "hub.repo_id is null" in r["repos"]["merged"]["reason"]
    assert snapshot(workspace / "models") == before


def test_dry_run_works_offline_with_a_token(workspace, fake_hub):
    """The tiny profile (make smoke) runs push with HF_HUB_OFFLINE=1 and null repo ids."""
    params = yaml.safe_load((workspace / "params.yaml").read_text())
    params["hub"] |= {"repo_id": None, "adapter_repo_id": None}
    (workspace / "params.yaml").write_text(yaml.safe_dump(params))
    proc = run_push(workspace, fake_hub.url, HF_HUB_OFFLINE="1")
    assert proc.returncode == 0, proc.stderr
    assert fake_hub.log == [] and receipt(workspace)["repos"]["merged"]["uploaded"] is False
    assert_no_token(workspace, proc)


def test_repo_id_without_token_fails_before_any_work(workspace, fake_hub):
    proc = run_push(workspace, fake_hub.url, token=None)
    assert proc.returncode != 0
    assert "HF_TOKEN" in proc.stderr and "hub.repo_id" in proc.stderr
    assert not (workspace / "reports/push.json").exists()
    assert fake_hub.log == []


def test_offline_mode_is_a_clear_error_and_leaves_no_receipt(workspace, fake_hub):
    write(workspace / "reports/push.json", json.dumps({"repos": {"merged": {"uploaded": True}}}))
    proc = run_push(workspace, fake_hub.url, HF_HUB_OFFLINE="1")
    assert proc.returncode != 0
    assert "HF_HUB_OFFLINE" in proc.stderr and fake_hub.url in proc.stderr
    assert not (workspace / "reports/push.json").exists()
    assert fake_hub.log == []
    assert_no_token(workspace, proc)


def test_unreachable_hub_is_a_clear_error_and_leaves_no_receipt(workspace):
    with socket.socket() as s:  # a port that nothing listens on
        s.bind(("127.0.0.1", 0))
        endpoint = f"http://127.0.0.1:{s.getsockname()[1]}"
    proc = run_push(workspace, endpoint)
    assert proc.returncode != 0
    assert "cannot reach the Hugging Face Hub" in proc.stderr and endpoint in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (workspace / "reports/push.json").exists()
    assert_no_token(workspace, proc)


def test_hub_refusal_echoing_the_token_is_scrubbed(workspace, httpserver):
    """A server error that quotes the Authorization header must not carry the token to the user."""
    def refuse(request: Request) -> Response:
        return Response(json.dumps({"error": f"forbidden for {request.headers.get('Authorization')}"}),
                        status=403, content_type="application/json")
    httpserver.expect_request(re.compile(r"^/api/.*")).respond_with_handler(refuse)
    proc = run_push(workspace, httpserver.url_for("").rstrip("/"))
    assert proc.returncode != 0
    assert "HTTP 403" in proc.stderr and "<HF_TOKEN>" in proc.stderr
    assert not (workspace / "reports/push.json").exists()
    assert_no_token(workspace, proc)


def test_git_revision_outside_git_is_unknown(tmp_path):
    assert hub.git_revision(tmp_path) == "unknown"
    assert hub.dvc_revision(tmp_path / "dvc.lock") == "unknown"


def test_content_hash_depends_on_names_and_bytes():
    a = hub.content_hash({"a": "1", "b": "2"})
    assert a == hub.content_hash({"b": "2", "a": "1"})
    assert a != hub.content_hash({"a": "1", "b": "3"}) and a != hub.content_hash({"a": "1", "c": "2"})


def test_card_usage_snippets_run_and_answer_like_the_evaluation(tiny_model, tmp_path):
    """The transformers and PEFT snippets of both cards, run as written on local folders, print what
    the project's own greedy evaluation generates for the same question."""
    import contextlib
    import io

    import torch
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    from grpo_gsm8k.evaluation import generate_hf
    from grpo_gsm8k.gsm8k import build_prompt
    from grpo_gsm8k.model_card import QUESTION, build_card
    from grpo_gsm8k.modeling import load_tokenizer

    p = config.parse(yaml.safe_load((ROOT / "profiles/tiny.yaml").read_text()))
    tokenizer = load_tokenizer(str(tiny_model))
    torch.manual_seed(0)  # init_lora_weights=False: a random B, so the adapter changes the answers
    adapter = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model),
                             LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    adapter.save_pretrained(tmp_path / "adapter")
    tokenizer.save_pretrained(tmp_path / "adapter")  # the train stage saves the tokenizer with the adapter
    question = QUESTION  # the one the snippets ask, as printed
    answers = {}
    for kind, folder in (("merged", tiny_model), ("adapter", tmp_path / "adapter")):
        card = str(build_card(kind, repo_id=None, local_folder=str(folder), base_model=str(tiny_model),
                              system_prompt=p.data.system_prompt, metrics=METRICS,
                              training_run={"backend": "transformers", "params": config.as_dict(p)}))
        snippets = [code for code in re.findall(r"```python\n(.*?)```", card, re.S) if "vllm" not in code]
        assert len(snippets) == 1, card
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            exec(snippets[0], {})  # as printed: the snippet defines SYSTEM_PROMPT and question itself
        answers[kind] = printed.getvalue().rstrip("\n")

    prompt = [build_prompt(question, p.data.system_prompt)]
    base = AutoModelForCausalLM.from_pretrained(tiny_model)
    assert answers["merged"] == generate_hf(base, tokenizer, prompt, 1, 512)[0].text
    with_adapter = PeftModel.from_pretrained(base, tmp_path / "adapter")
    assert answers["adapter"] == generate_hf(with_adapter, tokenizer, prompt, 1, 512)[0].text
    assert answers["adapter"] != answers["merged"]  # the adapter snippet really applied the adapter
    assert "TRL, PEFT, QLoRA" in card and "Unsloth" not in card  # the stack that trained it, from the run record
