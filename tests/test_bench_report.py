"""BENCHMARKS.md and bench/results/INDEX.md are what `python -m bench report` writes from the committed results, and
the index's checks catch what goes stale: a figure the docs no longer quote, a result folder nobody described, a
path that moved."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from bench import common, report

ROOT = Path(__file__).resolve().parent.parent


def test_the_committed_benchmarks_and_index_are_what_the_report_writes():
    bench_md, index_md, problems = report.render()
    assert problems == [], "\n".join(problems)
    assert bench_md == (ROOT / "BENCHMARKS.md").read_text(), "run `python -m bench report` and commit BENCHMARKS.md"
    assert index_md == (ROOT / "bench/results/INDEX.md").read_text(), "run `python -m bench report` and commit INDEX.md"


def test_every_row_of_the_benchmarks_names_a_result_that_exists():
    bench_md, _, _ = report.render()
    rows = [line for line in bench_md.splitlines() if line.startswith("| `") and ".json" in line.split("|")[1]]
    assert len(rows) > 40
    for row in rows:
        path = row.split("|")[1].strip().strip("`")
        assert (ROOT / "bench/results" / path).is_file(), row


def test_the_check_flag_exits_nonzero_when_a_file_is_stale(monkeypatch):
    assert subprocess.run([sys.executable, "-m", "bench", "report", "--check"], cwd=ROOT).returncode == 0
    bench_md, index_md, _ = report.render()
    monkeypatch.setattr(report, "render", lambda: (bench_md.replace("25.8 s", "24.8 s"), index_md, []))
    with pytest.raises(SystemExit) as stop:
        report.main(["--check"])
    assert stop.value.code == 1
    assert (ROOT / "BENCHMARKS.md").read_text() == bench_md  # --check writes nothing


def _results_copy(tmp_path: Path, figures: bool = True) -> Path:
    """A results tree of a few of the committed folders and their runs.yaml entries (and the README's figures that
    they back)."""
    keep = ("train_speed/levers_h200", "eval_speed/vllm_h100")
    manifest = json.loads(json.dumps(report.Results().manifest, default=str))
    root = tmp_path / "results"
    for run in keep:
        shutil.copytree(ROOT / "bench/results" / run, root / run)
    manifest = {"runs": {run: manifest["runs"][run] for run in keep}, "figures": {"README.md": [
        f for f in manifest["figures"]["README.md"] if f["results"][0].startswith(keep)] if figures else []}}
    (root / "runs.yaml").write_text(json.dumps(manifest))  # JSON is YAML
    return root


def test_the_index_flags_a_figure_the_readme_no_longer_quotes_and_an_undescribed_folder(tmp_path):
    root = _results_copy(tmp_path)
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "README.md").write_text((ROOT / "README.md").read_text())
    template = tmp_path / "t.md"
    template.write_text("# B\n\n{{train-speed}}\n")
    assert report.render(root, template, docs)[2] == []

    quote = json.loads((root / "runs.yaml").read_text())["figures"]["README.md"][0]["quote"]  # the speed headline
    (docs / "README.md").write_text((ROOT / "README.md").read_text().replace(quote[:12], "a few seconds"))
    (root / "eval_speed/new_run").mkdir()
    (root / "eval_speed/new_run/eval.json").write_text(json.dumps({"kind": "eval"}))  # neither schema nor described
    _, index_md, problems = report.render(root, template, docs)
    assert any(f"README.md no longer contains '{quote[:12]}" in p for p in problems), problems
    assert "eval_speed/new_run/: not described in bench/results/runs.yaml (and no result in the schema)" in problems
    assert "**NOT FOUND**" in index_md and "## Problems" in index_md


def test_a_result_in_the_schema_that_lacks_a_field_is_a_problem(tmp_path):
    root = _results_copy(tmp_path, figures=False)
    (root / "lm_eval/cpu").mkdir(parents=True)
    incomplete = {"schema": common.SCHEMA, "scenario": "lm-eval", "status": "complete", "runs": [{"name": "stages"}]}
    (root / "lm_eval/cpu/summary.json").write_text(json.dumps(incomplete))
    problems = report.Results(root).problems
    assert "lm_eval/cpu/summary.json: lacks command" in problems
    assert "lm_eval/cpu/summary.json: lacks runs[stages].steps" in problems


def test_a_pending_table_names_the_command_that_will_fill_it(tmp_path):
    root = _results_copy(tmp_path, figures=False)
    template = tmp_path / "t.md"
    template.write_text("# B\n\n## lm-eval\n\n{{lm-eval}}\n\n## Scaling\n\n{{multi-gpu-scaling}}\n")
    bench_md, index_md, problems = report.render(root, template, tmp_path)
    assert problems == [] and "`python -m bench lm-eval --adapter DIR --out $OUT/lm_eval` writes it" in bench_md
    assert "`bash bench/multi_gpu.sh scale --gpus 1` writes it" in bench_md
    assert "| `lm_eval/<name>/` | not yet |" in index_md
