"""Stage: one summary PNG of the run: the reward curves, GSM8K accuracy before and after, and lm-eval's
GSM8K exact match (with its standard error) when the evaluate stages ran it."""

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
    lm_eval = metrics.get("lm_eval", {})
    panels = 3 if "base" in lm_eval and "trained" in lm_eval else 2
    fig, (left, right, *extra) = plt.subplots(1, panels, figsize=(6 * panels, 4.5),
                                              gridspec_kw={"width_ratios": [3, 2, 2][:panels]})
    series = [("total (weighted sum)", curves_dir / "reward.tsv")]
    series += [(f"{p.parent.name} (unweighted)", p) for p in sorted((curves_dir / "rewards").glob("*/mean.tsv"))]
    for label, path in series:
        if path.is_file():
            steps, values = read_curve(path)
            left.plot(steps, values, label=label, linewidth=2.5 if label.startswith("total") else 1.2)
    left.set(title="GRPO training reward (mean per step)", xlabel="optimizer step", ylabel="reward")
    left.xaxis.set_major_locator(MaxNLocator(integer=True))
    left.grid(alpha=0.3)
    if left.lines:
        left.legend(fontsize=8)
    else:  # an empty panel would pass for a run that logged nothing
        left.text(0.5, 0.5, f"no reward curves in {curves_dir}", ha="center", transform=left.transAxes)
    kinds = ["accuracy", "accuracy_lenient", "format_adherence"]
    base, trained = metrics["base"], metrics["trained"]
    xs = range(len(kinds))
    for offset, (label, values) in zip((-0.2, 0.2), (("base", base), ("trained", trained))):
        bars = right.bar([x + offset for x in xs], [values[k] for k in kinds], width=0.4, label=label)
        right.bar_label(bars, fmt="%.3f", fontsize=8)
    right.set_xticks(list(xs), ["strict accuracy", "lenient accuracy", "format"])
    right.set(ylim=(0, 1.1), title=f"GSM8K test ({trained['problems']} problems, greedy)")
    right.legend()
    if extra:
        lm_eval_panel(extra[0], lm_eval)
    fig.tight_layout()
    return fig


def lm_eval_panel(ax, lm_eval: dict) -> None:
    """Each task and filter, base beside trained, labelled as lm-eval's so nobody takes it for the project's own."""
    bars = [(label, f) for label, block in lm_eval["trained"].items() for f in block["filters"]
            if f in lm_eval["base"].get(label, {}).get("filters", {})]
    xs = range(len(bars))
    for offset, side in zip((-0.2, 0.2), ("base", "trained")):
        scores = [lm_eval[side][label]["filters"][f] for label, f in bars]
        drawn = ax.bar([x + offset for x in xs], [s["exact_match"] for s in scores], width=0.4, label=side,
                       yerr=[s["stderr"] for s in scores], capsize=3)
        ax.bar_label(drawn, fmt="%.3f", fontsize=7)
    names = []
    for label, f in bars:
        block = lm_eval["trained"][label]
        chat = "chat template" if block["chat_template"] else "no chat template"
        names.append(f"{block['task']}\n{block['num_fewshot']}-shot, {chat}\n{f}")
    ax.set_xticks(list(xs), names, fontsize=7)
    problems = next(iter(lm_eval["trained"].values()))["problems"]
    ax.set(ylim=(0, 1.1), ylabel="exact match (± stderr)",
           title=f"lm-evaluation-harness {lm_eval['version']} ({problems} problems)")
    ax.legend()


def main() -> None:
    fig = summary_figure(CURVES, read_json(EVAL))
    with atomic_path(OUT) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
