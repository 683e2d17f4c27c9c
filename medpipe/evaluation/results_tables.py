"""Model-card performance tables rendered from results files, so a card cannot drift from its numbers.

A results file (`docs/results/<bundle>.json`) holds, per table, its columns and one row per recipe: the exact command
that produced it, its metrics (mean ± sd over folds, pooled values with 95 % CIs, as `medpipe cv` writes them in
`cv_summary.json`), wall time, device and date. `render_file` rewrites every `<!-- results:<table> -->` …
`<!-- /results -->` block of the files the results file names; `row_from_cv_summary` turns a CV run folder into a
row, so a new run reaches the card by one command instead of by hand.
"""

from __future__ import annotations

import csv
import datetime
import json
import re
import shlex
from pathlib import Path
from typing import Any

from medpipe.errors import MedpipeError
from medpipe.files import atomic_write_text

BLOCK = re.compile(r"(<!-- results:(?P<table>[\w-]+) -->\n)(?P<body>.*?)(<!-- /results -->)", re.DOTALL)
FORMATS = ("text", "command", "mean_sd", "ci", "value", "seconds")
MISSING = "—"  # a cell the run did not record


def read_results(path: str | Path) -> dict[str, Any]:
    """A results file, checked: every table has columns of known formats and rows with a unique `recipe`."""
    path = Path(path)
    if not path.is_file():
        raise MedpipeError(f"results file '{path}' not found")
    try:
        results = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise MedpipeError(f"{path} is not valid JSON ({exc.msg}, line {exc.lineno})") from None
    if not isinstance(results.get("tables"), dict) or not results.get("render_into"):
        raise MedpipeError(f"{path} needs 'tables' (name -> {{columns, rows}}) and 'render_into' (files to update)")
    for name, table in results["tables"].items():
        for column in table.get("columns", []):
            if column.get("format", "text") not in FORMATS or "key" not in column or "header" not in column:
                raise MedpipeError(f"{path}: table '{name}' column {column} needs header, key, format in {FORMATS}")
        recipes = [row.get("recipe") for row in table.get("rows", [])]
        if None in recipes or len(set(recipes)) != len(recipes):
            raise MedpipeError(f"{path}: every row of table '{name}' needs a unique 'recipe'")
    return results


def _lookup(row: dict[str, Any], key: str) -> Any:
    value: Any = row
    for part in key.split("."):
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    return value


def format_cell(row: dict[str, Any], column: dict[str, Any]) -> str:
    """One table cell: `mean_sd` → '0.771 ± 0.084', `ci` → '0.772 [0.718, 0.827]', `seconds` → '222 s'."""
    value, kind, digits = _lookup(row, column["key"]), column.get("format", "text"), column.get("digits", 3)
    if kind == "command":
        if not value:
            return MISSING
        after = f" ({row['after']})" if row.get("after") else ""
        return f"`{value}`{after}"
    if value is None or value == {}:
        return MISSING
    if kind == "mean_sd":
        text = f"{value['mean']:.{digits}f} ± {value['sd']:.{digits}f}"
    elif kind == "ci":
        ci = value.get("ci95")
        text = f"{value['value']:.{digits}f}" + (f" [{ci[0]:.{digits}f}, {ci[1]:.{digits}f}]" if ci else "")
    elif kind == "value":
        text = f"{value:.{digits}f}"
    elif kind == "seconds":
        return f"{value:.0f} s"
    else:
        return str(value).replace("|", "\\|")
    return f"**{text}**" if row.get("bold") else text  # the figures of a recommended row are bold


def render_table(table: dict[str, Any]) -> str:
    """The markdown table of one results table: a header, then one line per row in file order."""
    columns = table["columns"]
    lines = ["| " + " | ".join(c["header"] for c in columns) + " |", "|" + "---|" * len(columns)]
    for row in table.get("rows", []):
        cells = [format_cell(row, c) for c in columns]
        if row.get("bold"):  # the label of a recommended row is bold like its figures
            cells = [f"**{cell}**" if c["key"] == "label" else cell for c, cell in zip(columns, cells, strict=True)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def render_text(text: str, results: dict[str, Any], where: str = "card") -> str:
    """`text` with every results block replaced by the rendering of the table it names."""

    def replace(match: re.Match[str]) -> str:
        name = match.group("table")
        if name not in results["tables"]:
            raise MedpipeError(f"{where}: block '<!-- results:{name} -->' names no table of the results file")
        return match.group(1) + render_table(results["tables"][name]) + match.group(4)

    return BLOCK.sub(replace, text)


def render_file(results_path: str | Path, root: str | Path = ".", check: bool = False) -> list[Path]:
    """Render a results file's tables into the files it names (paths relative to `root`); return those changed.

    With `check`, write nothing and raise if any file differs from its rendering (a card edited by hand, or a
    results file changed without re-rendering).
    """
    results, root = read_results(results_path), Path(root)
    changed = []
    for name in results["render_into"]:
        target = root / name
        if not target.is_file():
            raise MedpipeError(f"{results_path}: render_into names '{name}', which does not exist under '{root}'")
        text = target.read_text()
        if not BLOCK.search(text):
            raise MedpipeError(f"{target} has no '<!-- results:TABLE -->' … '<!-- /results -->' block")
        rendered = render_text(text, results, str(target))
        if rendered != text:
            changed.append(target)
            if check:
                raise MedpipeError(f"{target} differs from {results_path}: run `medpipe cards render`")
            atomic_write_text(target, rendered)
    return changed


def _flag(key: str, value: Any) -> str:
    if isinstance(value, bool):
        value = "true" if value else "false"
    elif not isinstance(value, (str, int, float)):
        value = json.dumps(value)
    return f"--{key} {shlex.quote(str(value))}"


def command_from_summary(summary: dict[str, Any], run_dir: str) -> str:
    """The `medpipe` command that wrote this cv_summary.json, rebuilt from what the run recorded."""
    overrides = " ".join(_flag(k, v) for k, v in summary.get("overrides", {}).items())
    if summary.get("ensemble_of"):
        return f"medpipe cv_ensemble {' '.join(summary['ensemble_of'])} --out {run_dir}"
    if summary.get("rescored_from"):
        return f"medpipe cv_rescore {summary['rescored_from']} --out {run_dir} {overrides}".rstrip()
    parts = ["medpipe cv", summary["bundle"]]
    if summary.get("network", "default") != "default":
        parts.append(f"--network {summary['network']}")
    if summary.get("folds", 5) != 5:
        parts.append(f"--folds {summary['folds']}")
    parts.append(f"--split_mode {summary.get('split_mode', 'group')}")
    if summary.get("parallel", 1) != 1:
        parts.append(f"--parallel {summary['parallel']}")
    return " ".join(parts + ([overrides] if overrides else []) + [f"--out {run_dir}"])


def row_from_cv_summary(
    summary: dict[str, Any],
    run_dir: str,
    recipe: str,
    label: str | None = None,
    command: str | None = None,
    date: str | None = None,
    device: str | None = None,
) -> dict[str, Any]:
    """A results row from a `medpipe cv` / `cv_rescore` / `cv_ensemble` summary (`cv.write_summary`'s format).

    `folds` holds each metric's mean ± sd over folds, `pooled` the out-of-fold pooled values with CIs: for
    classification the top-level entries of `pooled_out_of_fold.metrics`, for segmentation its `per_volume` and
    `per_slice` tables.
    """
    if "pooled_out_of_fold" not in summary:
        raise MedpipeError(f"'{run_dir}/cv_summary.json' has no pooled_out_of_fold: rebuild it with medpipe cv_report")
    pooled_run = summary["pooled_out_of_fold"]
    if "metrics" in pooled_run:
        pooled = {k: v for k, v in pooled_run["metrics"].items() if isinstance(v, dict) and "value" in v}
    else:
        pooled = {level: pooled_run[level] for level in ("per_volume", "per_slice") if level in pooled_run}
    folds = {k: {"mean": v["mean"], "sd": v["sd"]} for k, v in summary.items() if isinstance(v, dict) and "mean" in v}
    row: dict[str, Any] = {
        "recipe": recipe, "label": label or recipe, "split": summary.get("split_mode"),
        "command": command or command_from_summary(summary, run_dir), "run_dir": run_dir,
        "n": pooled_run.get("n", summary.get("n")), "folds": folds, "pooled": pooled,
        "wall_time_s": summary.get("wall_time_s"), "device": device, "date": date,
    }  # fmt: skip
    return {k: v for k, v in row.items() if v is not None}


def source_controlled_entry(run_dir: Path) -> dict[str, Any]:
    """`{"source_controlled": {value, ci95}}` pooled over a run's folds when its predictions carry sources, else {}.

    cv_summary.json pools the plain classification report only; the chest X-ray card also shows the
    source-controlled AUC, which needs every fold's `source` and `finding` columns.
    """
    files = sorted(run_dir.glob("fold*/predictions.csv"))
    if not files:
        return {}
    with files[0].open(newline="") as fh:
        header = next(csv.reader(fh), [])
    if not {"source", "finding"} <= set(header):
        return {}
    from medpipe.evaluation.source_reports import pooled_source_report

    return {"source_controlled": pooled_source_report(files)["source_controlled"]["roc_auc"]}


def add_run(
    results_path: str | Path,
    run_dir: str | Path,
    recipe: str,
    table: str = "performance",
    label: str | None = None,
    command: str | None = None,
    date: str | None = None,
    device: str | None = None,
) -> dict[str, Any]:
    """Put the row of CV run `run_dir` into `table` of a results file (replacing the row of the same recipe).

    A replaced row keeps its label, notes and prerequisites (`after`) unless new ones are given; its figures,
    command, wall time and date all come from the new run. The date defaults to the day cv_summary.json was written.
    """
    results = read_results(results_path)
    if table not in results["tables"]:
        raise MedpipeError(f"{results_path} has no table '{table}'; tables: {sorted(results['tables'])}")
    summary_file = Path(run_dir) / "cv_summary.json"
    if not summary_file.is_file():
        raise MedpipeError(f"no cv_summary.json in '{run_dir}': give the --out folder of a finished `medpipe cv` run")
    summary = json.loads(summary_file.read_text())
    when = date or datetime.datetime.fromtimestamp(summary_file.stat().st_mtime, datetime.timezone.utc).date()
    row = row_from_cv_summary(summary, str(run_dir), recipe, label, command, str(when), device)
    row.update(source_controlled_entry(Path(run_dir)))
    rows = results["tables"][table].setdefault("rows", [])
    old = next((i for i, r in enumerate(rows) if r["recipe"] == recipe), None)
    if old is None:
        rows.append(row)
    else:
        kept = {k: rows[old][k] for k in ("label", "note", "after", "bold") if k in rows[old]}
        rows[old] = {**row, **kept, **({"label": label} if label else {})}
    atomic_write_text(results_path, json.dumps(results, indent=2, ensure_ascii=False) + "\n")
    return row


def render_all(root: str | Path = ".", check: bool = False) -> list[Path]:
    """Render every `docs/results/*.json` under `root` into its cards; return the files changed (none with `check`)."""
    files = sorted((Path(root) / "docs" / "results").glob("*.json"))
    if not files:
        raise MedpipeError(f"no docs/results/*.json under '{root}': run from the repository root or give --root")
    return [path for results in files for path in render_file(results, root, check)]
