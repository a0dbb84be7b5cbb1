"""The project's measurements: one CLI of named scenarios (`python -m bench <scenario>`, bench/__main__.py lists
them), each writing one JSON of one schema (bench/common.py), kept under bench/results/<scenario>/ and turned into
BENCHMARKS.md and bench/results/INDEX.md by `python -m bench report`. Not part of the grpo_gsm8k package."""
