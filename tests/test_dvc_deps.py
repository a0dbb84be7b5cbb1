"""dvc.yaml declares what each stage reads, computed from the code so it cannot drift: the package
modules a stage script imports (transitively), the train keys that change what is trained, and the
local data files. The real DVC behaviour (reruns, `dvc status`) is checked in test_pipeline.py."""

import ast
from pathlib import Path

import pytest
import yaml

from grpo_gsm8k import training

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = "grpo_gsm8k"
DVC_YAML = yaml.safe_load((ROOT / "dvc.yaml").read_text())
STAGES = DVC_YAML["stages"]


def module_file(name: str) -> Path | None:
    path = ROOT / (name.replace(".", "/") + ".py")
    return path if name.startswith(f"{PACKAGE}.") and path.is_file() else None


def imported_modules(path: Path) -> set[str]:
    """Package modules that ``path`` imports anywhere (top level or inside functions)."""
    here = path.relative_to(ROOT).with_suffix("").parts
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module
            if node.level:  # relative: from the importing module's package
                base = ".".join([*here[:len(here) - node.level], *filter(None, [node.module])])
            names |= {base, *(f"{base}.{alias.name}" for alias in node.names)}  # `from pkg import module`
    return {name for name in names if module_file(name)}


def transitive_imports(script: Path) -> set[str]:
    seen, todo = set(), [script]
    while todo:
        for name in imported_modules(todo.pop()) - seen:
            seen.add(name)
            todo.append(module_file(name))
    return {str(module_file(name).relative_to(ROOT)) for name in seen}


def test_the_import_walk_follows_relative_and_function_level_imports():
    """training.py imports cpu_logprob and modeling inside a function, config and rewards relatively."""
    assert {"grpo_gsm8k/config.py", "grpo_gsm8k/rewards.py", "grpo_gsm8k/grading.py", "grpo_gsm8k/modeling.py",
            "grpo_gsm8k/cpu_logprob.py"} <= transitive_imports(ROOT / "grpo_gsm8k/training.py")


# The on-disk card's wording (stages/train.py says why): a new wording must not
# retrain or re-merge; push, which publishes the cards, depends on it.
NOT_DEPS = {"train": {"grpo_gsm8k/model_card.py"}, "merge": {"grpo_gsm8k/model_card.py"}}


@pytest.mark.parametrize("name", sorted(STAGES))
def test_each_stage_depends_on_its_script_and_every_package_module_it_imports(name):
    script = STAGES[name]["cmd"].split()[1]
    code_deps = {dep for dep in STAGES[name]["deps"] if dep.startswith(("stages/", f"{PACKAGE}/"))}
    imported = transitive_imports(ROOT / script)
    assert NOT_DEPS.get(name, set()) <= imported  # an exception that no longer applies goes
    assert code_deps == {script} | imported - NOT_DEPS.get(name, set())


def test_train_stage_params_are_every_train_key_that_changes_what_is_trained():
    params = STAGES["train"]["params"]
    assert "train" not in params  # the whole section would rerun training for a save_steps change
    declared = {key.split(".", 1)[1] for key in params if key.startswith("train.")}
    for params_file in ("params.yaml", "profiles/tiny.yaml"):
        train_keys = set(yaml.safe_load((ROOT / params_file).read_text())["train"])
        assert declared == train_keys - training._RESUMABLE, params_file


def test_prepare_depends_on_the_local_data_files_which_exist_in_every_profile():
    assert {"${data.local_dir}/train.jsonl", "${data.local_dir}/test.jsonl"} <= set(STAGES["prepare"]["deps"])
    for params_file in ("params.yaml", "profiles/tiny.yaml"):  # a missing dep would stop `dvc repro` in any mode
        local_dir = ROOT / yaml.safe_load((ROOT / params_file).read_text())["data"]["local_dir"]
        assert (local_dir / "train.jsonl").is_file() and (local_dir / "test.jsonl").is_file(), params_file
