"""Rendering: the aggregated table as Markdown and LaTeX, with the best value of each column in bold.

Columns: the per-task test score and the average as mean ± sample standard deviation (ddof=1) over seeds,
in percent, with the number of seeds ``n``; the values a study's tuning chose (``lr*``, ...) when the runs
record them; the 95% confidence interval of the average (`mtpeft.results.stats`) when the runs saved
per-example scores; trainable parameters (and % of the base model), wall time (resumed runs left out) and
peak memory (means over seeds). The best value of each column is bold: highest score, lowest cost
(trainable parameters among methods that train any). Columns with one value for every row (e.g. the
model in a one-model study) move to the caption. Failed, incomplete (``status: running``) and unreadable
runs are listed below the table. LaTeX comes from pandas' ``Styler.to_latex`` (booktabs rules, every
LaTeX special character escaped).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import pandas as pd

from mtpeft.results.aggregate import TUNED_PREFIX, best_rows
from mtpeft.results.load import MISSING

CI_COLUMNS = ("avg_ci_low", "avg_ci_high")
CI_CAPTION = (
    "95% CI of avg: the envelope of a Student t interval over the seeds' averages and a bootstrap over seeds "
    "and test items (one seed: the bootstrap over its test items, which leaves seed noise out; stats.md has "
    "both). "
)


def score(mean: float, std: float) -> str:
    """``mean ± std`` in percent (the mean alone without a std)."""
    if mean is None or math.isnan(mean):
        return MISSING
    return f"{100 * mean:.1f}" if math.isnan(std) else f"{100 * mean:.1f} ± {100 * std:.1f}"


def count(value: float) -> str:
    """A parameter count with a k/M/B suffix."""
    if value is None or math.isnan(value):
        return MISSING
    for div, unit in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if value >= div:
            return f"{value / div:.3g}{unit}"
    return f"{value:.0f}"


def number(value: float, digits: int = 0) -> str:
    return MISSING if value is None or math.isnan(value) else f"{value:.{digits}f}"


def interval(low: float, high: float) -> str:
    """``[low, high]`` in percent."""
    if low is None or high is None or math.isnan(low) or math.isnan(high):
        return MISSING
    return f"[{100 * low:.1f}, {100 * high:.1f}]"


def tuned_columns(table: pd.DataFrame) -> list[str]:
    """The ``tuned.<key>`` columns of the table (values chosen by a study's tuning stage)."""
    return [c for c in table.columns if c.startswith(TUNED_PREFIX)]


def tuned_header(column: str) -> str:
    """``tuned.optimizer.lr`` -> ``lr*`` (the last part of the key, starred: chosen on validation)."""
    return column.split(".")[-1] + "*"


def has_ci(table: pd.DataFrame) -> bool:
    return all(c in table for c in CI_COLUMNS) and table[CI_COLUMNS[0]].notna().any()


def row_label(row: pd.Series) -> str:
    return f"{row['method']} ({row['variant']})" if row["variant"] else row["method"]


def display_table(
    table: pd.DataFrame, columns: Sequence[str]
) -> tuple[list[str], list[list[str]], list[str]]:
    """(header, cells, caption notes): formatted cells with ``**`` around the best of each column."""
    best = best_rows(table, columns)
    constant = [key for key in ("model", "mixture") if table[key].nunique() == 1]
    notes = [f"{key}: {table[key].iloc[0]}" for key in constant]
    tuned = tuned_columns(table)
    ci = has_ci(table)
    header = [
        "method",
        *[k for k in ("model", "mixture") if k not in constant],
        *[tuned_header(c) for c in tuned],
        "n",
        *columns,
        *(["avg 95% CI"] if ci else []),
        "trainable (% base)",
        "wall time (s)",
        "peak memory (MB)",
    ]
    cells = []
    for i, row in table.iterrows():
        scores = [(task, score(row[f"{task}_mean"], row[f"{task}_std"])) for task in columns]
        if ci:
            scores.append(("ci", interval(row[CI_COLUMNS[0]], row[CI_COLUMNS[1]])))
        costs = [
            (
                "trainable_params",
                f"{count(row['trainable_params'])} ({number(row['trainable_percent'], 2)}%)",
            ),
            ("wall_time_s", number(row["wall_time_s"])),
            ("peak_memory_mb", number(row["peak_memory_mb"])),
        ]
        marked = [f"**{text}**" if i in best.get(key, ()) else text for key, text in [*scores, *costs]]
        labels = [row[k] for k in ("model", "mixture") if k not in constant]
        chosen = [
            MISSING if pd.isna(row[c]) else f"{row[c]:g}" if isinstance(row[c], float) else str(row[c])
            for c in tuned
        ]
        cells.append([row_label(row), *labels, *chosen, str(row["n"]), *marked])
    return header, cells, notes


SPLIT_NAMES = {"test": "Test", "val": "Validation"}
"""How a table's caption names the split its scores come from (``--split``)."""


def _escape(text: str) -> str:
    return text.replace("|", "\\|")


def to_markdown(
    table: pd.DataFrame,
    failed: pd.DataFrame,
    columns: Sequence[str],
    title: str,
    incomplete: pd.DataFrame | None = None,
    problems: Sequence[tuple[str, str]] = (),
    split: str = "test",
) -> str:
    lines = [f"# {title}", ""]
    if len(table):
        header, cells, notes = display_table(table, columns)
        caption = (
            f"{SPLIT_NAMES[split]} score (%) as mean ± std over seeds (n seeds); best per column in bold. "
        )
        if tuned_columns(table):
            caption += "Starred columns: values chosen on the validation split by the study's tuning. "
        if has_ci(table):
            caption += CI_CAPTION
        lines += [
            caption + "; ".join(notes),
            "",
            "| " + " | ".join(header) + " |",
            "|" + "|".join("---" for _ in header) + "|",
        ]
        lines += ["| " + " | ".join(_escape(c) for c in row) + " |" for row in cells]
    else:
        lines.append("No successful runs.")
    if len(failed):
        lines += ["", f"## Failed runs ({len(failed)}, not averaged in)", ""]
        lines += [
            "| method | variant | model | mixture | seed | error | directory |",
            "|---|---|---|---|---|---|---|",
        ]
        for _, row in failed.iterrows():
            error = _escape(str(row["error"] or "").splitlines()[0][:200]) if row["error"] else ""
            lines.append(
                f"| {row['method']} | {row['variant']} | {row['model']} | {row['mixture']} | {row['seed']} "
                f"| {error} | {row['path']} |"
            )
    if incomplete is not None and len(incomplete):
        lines += [
            "",
            f"## Incomplete runs ({len(incomplete)}: started, never finished; re-run the sweep)",
            "",
        ]
        lines += ["| method | model | mixture | seed | directory |", "|---|---|---|---|---|"]
        for _, row in incomplete.iterrows():
            lines.append(
                f"| {row['method']} | {row['model']} | {row['mixture']} | {row['seed']} | {row['path']} |"
            )
    if problems:
        lines += ["", f"## Files skipped ({len(problems)}: not run records)", ""]
        lines += ["| file | problem |", "|---|---|"]
        lines += [f"| {path} | {_escape(problem)} |" for path, problem in problems]
    return "\n".join(lines) + "\n"


UNICODE_TEX = {"±": r"$\pm$", "—": "--"}
"""Characters of the display table that LaTeX text mode may lack, after Styler's escaping."""
BOLD = "textbf:--rwrap;"
r"""Styler's LaTeX "CSS" for ``\textbf{cell}``."""


def _unicode_tex(text: str) -> str:
    return "".join(UNICODE_TEX.get(char, char) for char in text)


def tex_escape(text: str) -> str:
    r"""``text`` escaped for LaTeX text mode as Styler escapes cells (``& % $ # _ { } ~ ^ \``), ± as
    ``$\pm$`` and — as ``--``. pandas has no public escape function, so a one-cell Styler does it."""
    one = pd.DataFrame([[text]]).style.hide(axis="index").hide(axis="columns")
    rendered = one.format(_unicode_tex, escape="latex").to_latex()
    return rendered.splitlines()[1].removesuffix(r" \\")


def _is_bold(text: str) -> bool:
    return len(text) > 4 and text.startswith("**") and text.endswith("**")


def to_latex(table: pd.DataFrame, columns: Sequence[str], title: str, split: str = "test") -> str:
    """A booktabs table (pandas `Styler.to_latex`): the Markdown table's cells, escaped, best in bold."""
    if not len(table):
        return f"% {title}: no successful runs\n"
    header, cells, notes = display_table(table, columns)
    frame = pd.DataFrame([[c[2:-2] if _is_bold(c) else c for c in row] for row in cells], columns=header)
    bold = pd.DataFrame([[BOLD if _is_bold(c) else "" for c in row] for row in cells], columns=header)
    styler = (
        frame.style.hide(axis="index")
        .format(_unicode_tex, escape="latex")
        .format_index(_unicode_tex, escape="latex", axis="columns")
        .apply(lambda _: bold, axis=None)
    )
    body = styler.to_latex(
        caption=tex_escape(
            f"{SPLIT_NAMES[split]} score (%), mean ± std over seeds"
            + (f". {CI_CAPTION}" if has_ci(table) else ". ")
            + "; ".join(notes)
        ),
        position="t",
        position_float="centering",
        hrules=True,
        column_format="l" + "r" * (len(header) - 1),
    )
    return f"% {title} (generated by python -m mtpeft.results; needs \\usepackage{{booktabs}})\n{body}"
