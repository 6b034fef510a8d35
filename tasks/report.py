"""The run report: one Markdown page, with plots, that says what a pipeline run did and how
good its model is, for readers who never opened the code.

It answers, in order: what data went in, what model was built, how long each stage took,
what the model scored before and after fine-tuning, whether its experts share the work,
what it writes, what it thinks comes next, and how it compares with the current champion.
Every section is always there; an empty table reads "none", so a missing piece is visible
rather than silently absent.

Plots are PNG files beside `report.md`, linked by relative paths, so the folder can be
logged as an MLflow artifact or opened anywhere. They are drawn on `matplotlib.figure.Figure`
objects directly (Agg rendering, no pyplot state), which is safe in Prefect worker threads.
The caller passes plain dicts and DataFrames; this module knows nothing of MLflow or Prefect.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

REPORT_FILE = "report.md"
CURVES_PNG = "loss_curves.png"
EXACT_MATCH_PNG = "exact_match.png"
MOE_PNG = "moe.png"
CURVE_METRICS = ("loss", "val_loss")
STAGE_ORDER = ("pretrain", "finetune")
NONE = "_none_"


# ---------------------------------------------------------------------------
# Markdown


# what Markdown would read as markup inside a table cell: a prompt `def __init__(self` would
# show "init" in bold, `<module>` would vanish as HTML; each is written backslash-escaped. An
# underscore inside a word (too_short) is no markup and stays as it is.
MARKUP = re.compile(r"[\\|*`\[\]<>&~]|(?<![^\W_])_|_(?![^\W_])")


def _cell(value: Any) -> str:
    if isinstance(value, bool | np.bool_):
        return "yes" if value else "no"
    if isinstance(value, int | np.integer):
        return f"{int(value):,}"
    if isinstance(value, float | np.floating):
        return "" if math.isnan(value) else f"{float(value):.4g}"
    if value is None or (isinstance(value, str) and not value):
        return ""
    text = MARKUP.sub(r"\\\g<0>", str(value))
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode() for c in text)


def markdown_table(table: pd.DataFrame) -> str:
    """A DataFrame as a Markdown table, or "none" when it has no rows."""
    if table is None or table.empty:
        return NONE
    header = "| " + " | ".join(_cell(str(c)) for c in table.columns) + " |"
    rule = "|" + "|".join("---" for _ in table.columns) + "|"
    rows = ["| " + " | ".join(_cell(v) for v in row) + " |" for row in table.itertuples(index=False)]
    return "\n".join([header, rule, *rows])


def _key_values(values: Mapping[str, Any], key: str = "item", value: str = "value") -> str:
    scalars = {k: v for k, v in values.items() if not isinstance(v, pd.DataFrame)}
    return markdown_table(pd.DataFrame({key: list(scalars), value: list(scalars.values())}, dtype=object))


def _section(heading: str, explanation: str, *parts: str) -> str:
    return "\n\n".join([f"## {heading}", explanation, *(part for part in parts if part)])


# ---------------------------------------------------------------------------
# Plots


def _save(figure: Figure, path: Path) -> None:
    figure.tight_layout()
    figure.savefig(path, dpi=100)


def _placeholder(path: Path, text: str) -> None:
    figure = Figure(figsize=(6, 2))
    figure.text(0.5, 0.5, text, ha="center", va="center")
    figure.savefig(path, dpi=100)


def _has(table: pd.DataFrame | None, *columns: str) -> bool:
    return table is not None and not table.empty and all(c in table.columns for c in columns)


def _stages(curves: pd.DataFrame) -> list[str]:
    present = list(dict.fromkeys(curves["stage"]))
    return [s for s in STAGE_ORDER if s in present] + [s for s in present if s not in STAGE_ORDER]


def plot_curves(curves: pd.DataFrame, path: Path) -> None:
    """Training and validation loss against step, one panel per stage."""
    shown = curves[curves["metric"].isin(CURVE_METRICS)] if _has(curves, "step", "stage", "metric", "value") else None
    if shown is None or shown.empty:
        _placeholder(path, "no training curves recorded")
        return
    stages = _stages(shown)
    figure = Figure(figsize=(5 * len(stages), 3.5))
    for index, stage in enumerate(stages, start=1):
        axes = figure.add_subplot(1, len(stages), index)
        for metric, points in shown[shown["stage"] == stage].groupby("metric", sort=False):
            points = points.sort_values("step")
            axes.plot(points["step"], points["value"], marker="o" if len(points) < 20 else None, label=metric)
        axes.set(title=stage, xlabel="step", ylabel="loss (nats/token)")
        axes.legend()
    _save(figure, path)


def plot_exact_match(exact_match: pd.DataFrame, path: Path) -> None:
    """Exact match per task family, base and fine-tuned model as grouped bars."""
    models = [m for m in ("base", "tuned") if _has(exact_match, "family", m)]
    if not models:
        _placeholder(path, "no exact-match scores")
        return
    positions = np.arange(len(exact_match))
    width = 0.8 / len(models)
    figure = Figure(figsize=(max(6, 0.7 * len(exact_match)), 3.5))
    axes = figure.add_subplot()
    for offset, model in enumerate(models):
        axes.bar(positions + offset * width, exact_match[model].astype(float), width, label=model)
    axes.set_xticks(positions + width * (len(models) - 1) / 2, exact_match["family"], rotation=30, ha="right")
    axes.set(ylim=(0, 1), ylabel="exact match")
    axes.legend(loc="lower left", bbox_to_anchor=(0, 1), ncol=len(models), frameon=False)  # above: bars reach 1
    _save(figure, path)


def _heatmaps(expert_load: pd.DataFrame, path: Path) -> None:
    groups = list(expert_load.groupby("model", sort=False)) if "model" in expert_load else [("", expert_load)]
    figure = Figure(figsize=(5 * len(groups), 3.5))
    top = expert_load["share"].max()  # one colour scale, so the models compare at a glance
    for index, (name, loads) in enumerate(groups, start=1):
        grid = loads.pivot_table(index="layer", columns="expert", values="share")
        axes = figure.add_subplot(1, len(groups), index)
        image = axes.imshow(grid.to_numpy(), aspect="auto", cmap="viridis", vmin=0, vmax=top)
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
        axes.yaxis.set_major_locator(MaxNLocator(integer=True))
        axes.set(title=f"{name} routed-token share".strip(), xlabel="expert", ylabel="MoE layer")
        figure.colorbar(image, ax=axes)
    _save(figure, path)


def _max_vio_bars(max_vio: pd.DataFrame, path: Path) -> None:
    series = [c for c in max_vio.columns if c != "layer" and pd.api.types.is_numeric_dtype(max_vio[c])]
    positions = np.arange(len(max_vio))
    width = 0.8 / max(len(series), 1)
    figure = Figure(figsize=(6, 3.5))
    axes = figure.add_subplot()
    for offset, column in enumerate(series):
        axes.bar(positions + offset * width, max_vio[column].astype(float), width, label=column)
    axes.set_xticks(positions + width * (len(series) - 1) / 2, max_vio["layer"])
    axes.set(xlabel="MoE layer", ylabel="MaxVio")
    axes.legend()
    _save(figure, path)


def plot_moe(max_vio: pd.DataFrame, expert_load: pd.DataFrame | None, path: Path) -> None:
    """Expert-load heatmap (MoE layer x expert) when loads are given, else MaxVio per layer."""
    if _has(expert_load, "layer", "expert", "share"):
        _heatmaps(expert_load, path)
    elif _has(max_vio, "layer") and len(max_vio.columns) > 1:
        _max_vio_bars(max_vio, path)
    else:
        _placeholder(path, "no MoE load measurements")


# ---------------------------------------------------------------------------
# Sections


def _paired_metrics(metrics: Mapping[str, Any], skip: set[str]) -> pd.DataFrame:
    """(metric, base, tuned) from flat names ending in _base/_tuned; others go in the tuned column."""
    rows: dict[str, dict[str, Any]] = {}
    for key, value in metrics.items():
        name, model = key, "tuned"
        for suffix in ("_base", "_tuned"):
            if key.endswith(suffix):
                name, model = key.removesuffix(suffix), suffix[1:]
        if name not in skip:
            rows.setdefault(name, {"metric": name})[model] = value
    return pd.DataFrame(list(rows.values()), columns=["metric", "base", "tuned"])


def _data_section(data_summary: Mapping[str, Any]) -> str:
    tables = {name: value for name, value in data_summary.items() if isinstance(value, pd.DataFrame)}
    tables.setdefault("drop_reasons", None)
    return _section(
        "What data went in",
        "Documents collected, kept after cleaning (filters, deduplication, decontamination) and turned into "
        "tokens; the reasons table says why documents were dropped. `quarantined` counts the documents that "
        "could not be read, `instruction_rows_quarantined` the rows of your instruction data that could not be "
        "used: each stage's quarantine.parquet lists them with the reason. `instruction_examples_train` and "
        "`_test` are the fine-tuning examples (the finetune stage's train_examples.parquet and "
        "test_examples.parquet), `instruction_examples_cut` those longer than `finetune.seq_len`, whose ends "
        "are not learned.",
        _key_values(data_summary),
        *(f"**{name.replace('_', ' ')}**\n\n{markdown_table(table)}" for name, table in tables.items()),
    )


def _timing_section(timings: Mapping[str, float]) -> str:
    table = pd.DataFrame({"stage": list(timings), "seconds": [float(s) for s in timings.values()]})
    total = f"Total: {sum(table['seconds']):,.1f} s." if not table.empty else ""
    return _section(
        "How long it took", "Wall-clock seconds per stage; a stage reused from an earlier run takes almost none.",
        markdown_table(table), total,
    )


def _scores_section(metrics: Mapping[str, Any], exact_match: pd.DataFrame) -> str:
    families = {f"exact_match_{f}" for f in exact_match["family"]} if _has(exact_match, "family") else set()
    return _section(
        "What it scored",
        "Validation loss is the average surprise per token on held-out text of the pretraining corpus (lower "
        "is better); bits per byte is the same measured per byte of text, so it compares across tokenizers. "
        "Fine-tuning on instruction chats alone can raise it, as the model moves from continuing that text to "
        "answering in the chat format. Exact match is the share of held-out instruction problems answered "
        "exactly right, before (base) and after (tuned) fine-tuning.",
        markdown_table(_paired_metrics(metrics, families)),
        "**Exact match per task family**",
        markdown_table(exact_match),
        f"![exact match per task family]({EXACT_MATCH_PNG})",
        "**Training curves** (training loss at each logged step, validation loss at each evaluation)",
        f"![loss curves]({CURVES_PNG})",
    )


def _comparison_section(comparison: pd.DataFrame | None, decision: str, champion: int | None) -> str:
    if comparison is not None:
        table = markdown_table(comparison)
    elif champion is None:
        table = f"{NONE}: there is no champion to compare with."
    else:  # registered by hand, say: no run recorded its scores
        table = f"{NONE}: the champion (version {champion}) has no recorded scores to compare with."
    return _section(
        "Comparison with the champion",
        "The registered champion is the best model so far; the new model (challenger) replaces it only when it "
        "is better on the primary metric.",
        f"Decision: {decision}" if decision else "",
        table,
    )


def _links_section(links: Mapping[str, str]) -> str:
    items = "\n".join(f"- {name}: {target}" for name, target in links.items()) or NONE
    return _section("Links", "Where to look further: runs, models and output folders.", items)


def write_report(
    out_dir: str | Path,
    *,
    title: str,
    data_summary: Mapping[str, Any],
    model_summary: Mapping[str, Any],
    timings: Mapping[str, float],
    metrics: Mapping[str, Any],
    exact_match: pd.DataFrame,
    curves: pd.DataFrame,
    max_vio: pd.DataFrame,
    generations: pd.DataFrame,
    next_token: pd.DataFrame,
    comparison: pd.DataFrame | None,
    links: Mapping[str, str],
    expert_load: pd.DataFrame | None = None,
    decision: str = "",
    champion: int | None = None,
) -> Path:
    """Write `report.md` and its plots into `out_dir`; returns the report's path.

    `data_summary` holds counts (and DataFrames such as drop reasons, shown as tables);
    `metrics` is the flat evaluate dict (names ending in _base/_tuned, and max_vio_final); `curves` has columns
    (step, stage, metric, value); `max_vio` has a `layer` column and one MaxVio column per
    run; `expert_load` (layer, expert, share[, model]) gives the heatmap when present;
    `comparison` is None when there is no champion (`champion` None) or it has no recorded
    scores; `decision` is the promotion verdict.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    plot_curves(curves, out / CURVES_PNG)
    plot_exact_match(exact_match, out / EXACT_MATCH_PNG)
    plot_moe(max_vio, expert_load, out / MOE_PNG)
    sections = [
        f"# {title}",
        "A summary of one tinyseek pipeline run: the data, the model, the time taken and how good the model is.",
        _data_section(data_summary),
        _section("What model", "A DeepSeek-V3-style mixture-of-experts transformer. Each token runs through only "
                 "some experts, so it activates fewer parameters than the model holds.", _key_values(model_summary)),
        _timing_section(timings),
        _scores_section(metrics, exact_match),
        _section("MoE health", "Each MoE layer routes every token to a few experts. Balanced experts share the work "
                 "evenly: MaxVio = (busiest expert's load - mean load) / mean load, 0 when perfectly even. The "
                 "plot shows each expert's share of its layer's tokens on validation text (or, when that was not "
                 "measured, MaxVio per layer); the table lists the MaxVio the training runs ended with.",
                 f"![expert load]({MOE_PNG})", markdown_table(max_vio)),
        _section("Sample generations", "Greedy output for fixed prompts: plain text continued as in pretraining, "
                 "and instructions answered in the chat format, by the base and the fine-tuned model.",
                 markdown_table(generations)),
        _section("Next-token view", "The most likely next tokens after each prompt and their probabilities, "
                 "for the base and the fine-tuned model.", markdown_table(next_token)),
        _comparison_section(comparison, decision, champion),
        _links_section(links),
    ]
    path = out / REPORT_FILE
    path.write_text("\n\n".join(sections) + "\n")
    return path
