"""Sample quality against training budget: runs of ``benchmarks/generator_comparison.sh`` made with different
``GEN_CPU_MINUTES``, one point per (generator, budget).

Each argument is ``GENERATOR=MINUTES:OUT`` or ``GENERATOR=MINUTES:OUT:SERIES``: the run ``OUT/GENERATOR`` trained for
``MINUTES`` process CPU-minutes (its ``eval/metrics.json`` is read through :func:`generator_table.rows`); points
with the same generator and ``SERIES`` (e.g. ``50 steps``, for another evaluate setting) form one curve; the same
budget given more than once (evaluates with other ``--seed``) is drawn as the mean, with a faint dot per seed. Prints a
Markdown table and, with ``--figure``, draws ``c2st_accuracy`` against the budget per generator, with the target (0.75),
chance (0.5) and the power check (real slices against blurred copies of themselves) as reference lines; with
``--strict``, a second panel beside it draws the statistics test (``c2st_stats_accuracy``, the strict one of issue 30)
the same way, and the table gains its columns and the memorisation audit's ``copy_rate``.

Usage::

    python benchmarks/budget_curve.py --figure docs/generators_budget_brain.png \\
        diffusion=4:/tmp/gen_brain4 diffusion=8:/tmp/gen_brain diffusion=16:/tmp/gen_brain16 \\
        gated=8:/tmp/gen_brain gated=16:/tmp/gen_brain16
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from generator_table import _fmt, rows  # noqa: E402
from generator_table import label as generator_label  # noqa: E402

TARGET = 0.75


def points(specs: list[str]) -> list[dict]:
    """One row of :func:`generator_table.rows` per ``GENERATOR=MINUTES:OUT[:SERIES]``, with ``budget_cpu_min`` and
    ``label`` added."""
    found = []
    for spec in specs:
        try:
            name, rest = spec.split("=", 1)
            minutes, out, *series = rest.split(":", 2)
            budget = float(minutes)
        except ValueError:
            raise SystemExit(f"{spec!r}: expected GENERATOR=MINUTES:OUT, e.g. diffusion=8:/tmp/gen_brain") from None
        row = rows(Path(out), [name])[0]
        if row["c2st_accuracy"] is None:
            raise SystemExit(f"{Path(out) / name / 'eval' / 'metrics.json'}: no c2st_accuracy; run the evaluate first")
        name_of_series = generator_label(row) + (f", {series[0]}" if series else "")
        found.append({**row, "budget_cpu_min": budget, "label": name_of_series})
    return sorted(found, key=lambda r: (r["label"], r["budget_cpu_min"]))


def by_budget(table: list[dict]) -> dict[tuple[str, float], list[dict]]:
    """The rows of ``table`` grouped by (label, budget), in table order: several rows in one group are the same run
    evaluated with several seeds."""
    groups: dict[tuple[str, float], list[dict]] = {}
    for r in table:
        groups.setdefault((r["label"], r["budget_cpu_min"]), []).append(r)
    return groups


def markdown(table: list[dict], strict: bool = False) -> str:
    extra = " c2st_stats_accuracy | power (stats) | copy_rate |" if strict else ""
    lines = [
        "| generator | budget (CPU-min) | epochs | c2st_accuracy | power (blur σ1) |"
        + extra
        + " MS-SSIM samples / real | NLL bits per code |",
        "| --- | --- | --- | --- | --- | --- | --- |" + (" --- | --- | --- |" if strict else ""),
    ]
    for r in table:
        cells = (
            f" {_fmt(r['c2st_stats_accuracy'])} | {_fmt(r['c2st_stats_power_blurred_real'])} | {_fmt(r['copy_rate'])} |"
            if strict
            else ""
        )
        lines.append(
            f"| {r['label']} | {r['budget_cpu_min']:g} | {r['epochs']} "
            f"| {_fmt(r['c2st_accuracy'])} | {_fmt(r['c2st_power_blurred_real'])} |{cells}"
            f" {_fmt(r['ms_ssim_diversity_samples'])} / {_fmt(r['ms_ssim_diversity_real'])} "
            f"| {_fmt(r['nll_bits_per_code'], 2)} |"
        )
    for (label, budget), same in by_budget(table).items():
        if len(same) > 1:  # the same run evaluated with several seeds
            mean = sum(r["c2st_accuracy"] for r in same) / len(same)
            lines.append(
                f"| {label}, mean of {len(same)} | {budget:g} | {same[0]['epochs']} | {_fmt(mean)} | - |"
                + (" - | - | - |" if strict else "")
                + " - | - |"
            )
    return "\n".join(lines)


def _panel(ax, table: list[dict], key: str, power_key: str, ylabel: str, title: str) -> None:
    """``key`` against the budget, one curve per label, with the target, chance and the mean of ``power_key``."""
    groups = by_budget(table)  # the table is sorted by label and budget
    for label in dict.fromkeys(r["label"] for r in table):
        budgets = [b for (name, b) in groups if name == label]
        scores = [[r[key] for r in groups[label, b] if r[key] is not None] for b in budgets]
        budgets, scores = [b for b, s in zip(budgets, scores, strict=True) if s], [s for s in scores if s]
        if not scores:
            continue
        means = [sum(s) / len(s) for s in scores]
        (line,) = ax.plot(budgets, means, "o-", label=label + (" (mean of seeds)" if max(map(len, scores)) > 1 else ""))
        several = [(b, s) for b, s in zip(budgets, scores, strict=True) if len(s) > 1]
        if several:  # one faint dot per evaluate seed where a budget was scored more than once
            ax.plot(
                [b for b, s in several for _ in s],
                [v for _, s in several for v in s],
                ".",
                color=line.get_color(),
                alpha=0.5,
            )
    power = [r[power_key] for r in table if r[power_key] is not None]
    if power:
        ax.axhline(sum(power) / len(power), color="grey", ls=":", label="power check (real vs blurred real)")
    ax.axhline(TARGET, color="red", ls="--", label=f"target {TARGET}")
    ax.axhline(0.5, color="black", lw=0.5, label="chance")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("training budget (process CPU-minutes)")
    ax.set_ylabel(ylabel)
    ax.set_ylim(0.45, 1.02)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)


def figure(table: list[dict], path: Path, title: str, strict: bool = False) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2 if strict else 1, figsize=(11 if strict else 6, 4), squeeze=False)
    _panel(axes[0, 0], table, "c2st_accuracy", "c2st_power_blurred_real", "c2st_accuracy (lower is better)", title)
    if strict:
        _panel(
            axes[0, 1],
            table,
            "c2st_stats_accuracy",
            "c2st_stats_power_blurred_real",
            "c2st_stats_accuracy (lower is better)",
            "the strict test: logistic regression on image statistics",
        )
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", help="GENERATOR=MINUTES:OUT[:SERIES]")
    parser.add_argument("--figure", type=Path, help="write the curve to this PNG")
    parser.add_argument("--title", default="c2st_accuracy against training budget")
    parser.add_argument("--strict", action="store_true", help="add the statistics test and the copy rate")
    args = parser.parse_args()
    table = points(args.runs)
    print(markdown(table, args.strict))
    if args.figure:
        figure(table, args.figure, args.title, args.strict)
        print(f"figure: {args.figure}")


if __name__ == "__main__":
    main()
