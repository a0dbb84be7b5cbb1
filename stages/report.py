"""Stage: one summary PNG of the run: the reward curves and GSM8K accuracy before and after."""

from __future__ import annotations

import csv
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from grpo_gsm8k.outputs import atomic_path, read_json  # noqa: E402

CURVES = Path("reports/train/plots/metrics")
EVAL = "reports/eval/metrics.json"
OUT = "reports/summary.png"


def read_curve(path: Path) -> tuple[list[int], list[float]]:
    with path.open() as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    value = [k for k in rows[0] if k not in ("step", "timestamp")][0] if rows else None
    return [int(r["step"]) for r in rows], [float(r[value]) for r in rows]


def summary_figure(curves_dir: Path, metrics: dict):
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5), gridspec_kw={"width_ratios": [3, 2]})
    series = [("total (weighted sum)", curves_dir / "reward.tsv")]
    series += [(f"{p.parent.name} (unweighted)", p) for p in sorted((curves_dir / "rewards").glob("*/mean.tsv"))]
    for label, path in series:
        if path.is_file():
            steps, values = read_curve(path)
            left.plot(steps, values, label=label, linewidth=2.5 if label.startswith("total") else 1.2)
    left.set(title="GRPO training reward (mean per step)", xlabel="optimizer step", ylabel="reward")
    left.xaxis.set_major_locator(MaxNLocator(integer=True))
    left.grid(alpha=0.3)
    left.legend(fontsize=8)
    kinds = ["accuracy", "accuracy_lenient", "format_adherence"]
    base, trained = metrics["base"], metrics["trained"]
    xs = range(len(kinds))
    for offset, (label, values) in zip((-0.2, 0.2), (("base", base), ("trained", trained))):
        bars = right.bar([x + offset for x in xs], [values[k] for k in kinds], width=0.4, label=label)
        right.bar_label(bars, fmt="%.3f", fontsize=8)
    right.set_xticks(list(xs), ["strict accuracy", "lenient accuracy", "format"])
    right.set(ylim=(0, 1.1), title=f"GSM8K test ({trained['problems']} problems, greedy)")
    right.legend()
    fig.tight_layout()
    return fig


def main() -> None:
    fig = summary_figure(CURVES, read_json(EVAL))
    with atomic_path(OUT) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
