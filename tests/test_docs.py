"""The model cards and docs: tables equal their results files, rows come from cv_summary.json, references resolve."""

from __future__ import annotations

import ast
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO
from medpipe.errors import MedpipeError
from medpipe.evaluation.results_tables import (
    add_run,
    command_from_summary,
    render_all,
    render_file,
    render_table,
    row_from_cv_summary,
)

CARDS = sorted(REPO.glob("bundles/*/docs/README.md"))
DOCS = [REPO / "README.md", *sorted(REPO.glob("docs/**/*.md")), *sorted(REPO.glob("bundles/*/docs/*.md"))]
ZOO_ORDER = [
    "## Model overview", "## Data", "## Training configuration", "## Performance", "## How to run", "## Limitations",
    "## References",
]  # fmt: skip

CLASSIFICATION_COLUMNS = [
    {"header": "model", "key": "label"},
    {"header": "accuracy (mean ± sd)", "key": "folds.accuracy", "format": "mean_sd"},
    {"header": "pooled accuracy [95 % CI]", "key": "pooled.accuracy", "format": "ci"},
    {"header": "pooled ROC-AUC [95 % CI]", "key": "pooled.roc_auc", "format": "ci"},
    {"header": "wall time", "key": "wall_time_s", "format": "seconds"},
    {"header": "command", "key": "command", "format": "command"},
]


def test_committed_cards_equal_rendering_of_committed_results() -> None:
    assert render_all(REPO, check=True) == []
    for results in sorted(REPO.glob("docs/results/*.json")):
        bundle = json.loads(results.read_text())["bundle"]
        assert f"bundles/{bundle}/docs/README.md" in json.loads(results.read_text())["render_into"]
        assert (results.parent / f"{bundle}.md").is_file(), f"{bundle} has no results log"


@pytest.mark.parametrize("card", CARDS, ids=lambda p: p.parent.parent.name)
def test_cards_are_short_and_in_zoo_order(card: Path) -> None:
    text = card.read_text()
    assert len(text.splitlines()) <= 155, f"{card} has {len(text.splitlines())} lines; move history to docs/results/"
    positions = [text.find(heading) for heading in ZOO_ORDER]
    assert -1 not in positions and positions == sorted(positions), f"{card}: sections {ZOO_ORDER} missing or unordered"
    assert "<!-- results:performance -->" in text and f"docs/results/{card.parent.parent.name}.md" in text


def test_a_card_edited_by_hand_is_caught_and_rerendered(tmp_path: Path) -> None:
    shutil.copytree(REPO / "docs" / "results", tmp_path / "docs" / "results")
    card = tmp_path / "bundles" / "brain_tumor_cls" / "docs" / "README.md"
    card.parent.mkdir(parents=True)
    original = (REPO / "bundles" / "brain_tumor_cls" / "docs" / "README.md").read_text()
    card.write_text(original.replace("0.772 [0.718, 0.827]", "0.872 [0.818, 0.927]", 1))
    with pytest.raises(MedpipeError, match="differs from"):
        render_file(tmp_path / "docs" / "results" / "brain_tumor_cls.json", tmp_path, check=True)
    assert render_file(tmp_path / "docs" / "results" / "brain_tumor_cls.json", tmp_path) == [card]
    assert card.read_text() == original


def test_row_from_synthetic_cv_summary_gives_the_expected_table_row() -> None:
    summary = {
        "bundle": "brain_tumor_cls", "network": "paper_cnn", "split_mode": "group", "folds": 5,
        "overrides": {"val_interval": 1000, "crop_foreground": True}, "parallel": 2, "wall_time_s": 221.6, "n": 202,
        "accuracy": {"mean": 0.7712, "sd": 0.0841, "per_fold": [0.7, 0.8, 0.9, 0.6, 0.85]},
        "pooled_out_of_fold": {"n": 202, "metrics": {
            "accuracy": {"value": 0.772277, "ci95": [0.717822, 0.826733]},
            "roc_auc": {"value": 0.819, "ci95": [0.7543, 0.8731]},
            "per_class": {"yes": {"sensitivity": {"value": 0.8, "ci95": [0.7, 0.9]}}},
        }},
    }  # fmt: skip
    row = row_from_cv_summary(summary, "results/brain_tumor_cls/x", "paper_cnn_crop", label="paper CNN, cropped")
    table = render_table({"columns": CLASSIFICATION_COLUMNS, "rows": [row]})
    assert table.splitlines()[2] == (
        "| paper CNN, cropped | 0.771 ± 0.084 | 0.772 [0.718, 0.827] | 0.819 [0.754, 0.873] | 222 s | "
        "`medpipe cv brain_tumor_cls --network paper_cnn --split_mode group --parallel 2 --val_interval 1000 "
        "--crop_foreground true --out results/brain_tumor_cls/x` |"
    )
    assert "per_class" not in row["pooled"] and row["n"] == 202


def test_row_from_segmentation_summary_and_missing_cells() -> None:
    summary = {
        "bundle": "covid_ct_seg", "network": "default", "split_mode": "group", "folds": 5, "overrides": {},
        "pooled_out_of_fold": {"folds": 5, "n_volumes": 11, "per_volume": {
            "dice_lung": {"value": 0.9631, "ci95": [0.9541, 0.9702]},
            "hd95_lung": {"value": 4.83, "ci95": [2.8, 7.24]}},
            "per_slice": {"dice_lung": {"value": 0.955, "ci95": None}}},
    }  # fmt: skip
    columns = [
        {"header": "model", "key": "label"},
        {"header": "lung Dice", "key": "pooled.per_volume.dice_lung", "format": "ci"},
        {"header": "per slice", "key": "pooled.per_slice.dice_lung", "format": "ci"},
        {"header": "HD95", "key": "pooled.per_volume.hd95_lung", "format": "ci", "digits": 1},
        {"header": "infection Dice", "key": "pooled.per_volume.dice_infection", "format": "ci"},
        {"header": "wall time", "key": "wall_time_s", "format": "seconds"},
    ]
    row = row_from_cv_summary(summary, "r/unet", "unet")
    assert render_table({"columns": columns, "rows": [row]}).splitlines()[2] == (
        "| unet | 0.963 [0.954, 0.970] | 0.955 | 4.8 [2.8, 7.2] | — | — |"
    )
    assert command_from_summary(summary, "r/unet") == "medpipe cv covid_ct_seg --split_mode group --out r/unet"


def test_commands_of_rescored_and_ensembled_runs() -> None:
    rescored = {"bundle": "b", "network": "n", "rescored_from": "r/a", "overrides": {"tta": True, "note": "a b"}}
    assert command_from_summary(rescored, "r/a_tta") == "medpipe cv_rescore r/a --out r/a_tta --tta true --note 'a b'"
    ensemble = {"bundle": "b", "ensemble_of": ["r/a", "r/b"], "overrides": {}}
    assert command_from_summary(ensemble, "r/ab") == "medpipe cv_ensemble r/a r/b --out r/ab"


def _fold(folder: Path, accuracy: float, rows: list[tuple[str, float, str]]) -> None:
    folder.mkdir(parents=True)
    lines = ["path,prob_no,prob_yes,predicted,label"]
    lines += [f"{p},{1 - y:.6f},{y:.6f},{'yes' if y >= 0.5 else 'no'},{label}" for p, y, label in rows]
    (folder / "predictions.csv").write_text("\n".join(lines) + "\n")
    (folder / "metrics.json").write_text(json.dumps({"n": len(rows), "metrics": {"accuracy": {"value": accuracy}}}))


def test_add_run_reads_what_medpipe_cv_writes_and_renders_it(tmp_path: Path) -> None:
    from medpipe.evaluation.cv import write_summary

    run = tmp_path / "results" / "run"
    _fold(run / "fold0", 0.75, [("a", 0.9, "yes"), ("b", 0.2, "no"), ("c", 0.6, "no"), ("d", 0.7, "yes")])
    _fold(run / "fold1", 0.5, [("e", 0.8, "yes"), ("f", 0.9, "no"), ("g", 0.1, "no"), ("h", 0.4, "yes")])
    write_summary(run, {"bundle": "brain_tumor_cls", "network": "resnet18", "split_mode": "random", "folds": 2,
                        "overrides": {"epochs": 3}, "parallel": 1, "wall_time_s": 12.4})  # fmt: skip
    results = tmp_path / "docs" / "results" / "brain_tumor_cls.json"
    card = tmp_path / "card.md"
    card.write_text("# card\n<!-- results:performance -->\nold\n<!-- /results -->\nafter\n")
    results.parent.mkdir(parents=True)
    table = {"columns": CLASSIFICATION_COLUMNS, "rows": [{"recipe": "old", "label": "kept", "command": "x"}]}
    results.write_text(json.dumps({"bundle": "b", "render_into": ["card.md"], "tables": {"performance": table}}))

    row = add_run(results, run, "resnet18_random", label="ResNet18", date="2026-11-29")
    assert render_file(results, tmp_path) == [card]
    lines = card.read_text().splitlines()
    assert lines[-1] == "after" and lines[4] == "| kept | — | — | — | — | `x` |"
    pooled = row["pooled"]["accuracy"]
    assert pooled["value"] == pytest.approx(5 / 8)  # a, b, d, e, g right; c, f, h wrong
    assert lines[5] == (
        f"| ResNet18 | 0.625 ± 0.177 | 0.625 [{pooled['ci95'][0]:.3f}, {pooled['ci95'][1]:.3f}] | "
        f"{row['pooled']['roc_auc']['value']:.3f} [{row['pooled']['roc_auc']['ci95'][0]:.3f}, "
        f"{row['pooled']['roc_auc']['ci95'][1]:.3f}] | 12 s | `medpipe cv brain_tumor_cls --network resnet18 "
        f"--folds 2 --split_mode random --epochs 3 --out {run}` |"
    )
    # the same recipe again replaces its row and keeps the label it was given
    add_run(results, run, "resnet18_random", date="2026-11-30")
    rows = json.loads(results.read_text())["tables"]["performance"]["rows"]
    assert [r["recipe"] for r in rows] == ["old", "resnet18_random"] and rows[1]["label"] == "ResNet18"
    assert rows[1]["date"] == "2026-11-30"


def test_bad_results_input_is_one_line(tmp_path: Path) -> None:
    bad = tmp_path / "r.json"
    bad.write_text("{not json")
    with pytest.raises(MedpipeError, match="not valid JSON"):
        render_file(bad, tmp_path)
    bad.write_text(json.dumps({"render_into": ["c.md"], "tables": {"t": {"columns": [], "rows": [{}]}}}))
    with pytest.raises(MedpipeError, match="unique 'recipe'"):
        render_file(bad, tmp_path)
    bad.write_text(json.dumps({"render_into": ["c.md"], "tables": {"t": {"columns": [], "rows": []}}}))
    (tmp_path / "c.md").write_text("<!-- results:other -->\n<!-- /results -->\n")
    with pytest.raises(MedpipeError, match="names no table"):
        render_file(bad, tmp_path)
    with pytest.raises(MedpipeError, match="no cv_summary.json"):
        add_run(bad, tmp_path, "x", table="t")


def test_cards_verb_checks_the_committed_cards_and_refuses_unknown_actions() -> None:
    ok = subprocess.run([sys.executable, "-m", "medpipe", "cards", "check"], cwd=REPO, capture_output=True, text=True)
    assert ok.returncode == 0 and "up to date" in ok.stdout, ok.stderr
    bad = subprocess.run([sys.executable, "-m", "medpipe", "cards", "frob"], cwd=REPO, capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.strip() == (
        "medpipe error: medpipe cards: unknown action 'frob'; use render, check or add"
    )
    no_recipe = [sys.executable, "-m", "medpipe", "cards", "add", "docs/results/brain_tumor_cls.json", "results/x"]
    usage = subprocess.run(no_recipe, cwd=REPO, capture_output=True, text=True)
    assert usage.returncode == 2 and usage.stderr.startswith("medpipe error: usage: medpipe cards add RESULTS_JSON")


# ------------------------------------------------------------------------------------------- references in the docs
def _defined_names(module_file: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.parse(module_file.read_text()).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names |= {t.id for t in targets if isinstance(t, ast.Name)}
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names |= {(a.asname or a.name).split(".")[0] for a in node.names}
    return names


def _resolves(dotted: str) -> bool:
    """Whether `medpipe.a.b.name…` names a module of the package, or a top-level name defined in one."""
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        base = REPO.joinpath(*parts[:cut])
        module = base.with_suffix(".py") if base.with_suffix(".py").is_file() else base / "__init__.py"
        if module.is_file():
            rest = parts[cut:]
            return not rest or rest[0] in _defined_names(module) or (base / f"{rest[0]}.py").is_file()
    return False


def test_module_paths_named_in_the_docs_exist() -> None:
    metadata = [json.loads(m.read_text()) for m in REPO.glob("bundles/*/configs/metadata.json")]
    metadata_keys = {key for m in metadata for key in m.get("medpipe", {})}  # `medpipe.networks` etc. in the docs
    stale = []
    for doc in DOCS:
        for ref in set(re.findall(r"\bmedpipe(?:\.[A-Za-z_][A-Za-z0-9_]*)+", doc.read_text())):
            if ref.split(".")[1] not in metadata_keys and not _resolves(ref):
                stale.append(f"{doc.relative_to(REPO)}: {ref}")
        for path in re.findall(r"`(medpipe/[\w/]+\.py)`", doc.read_text()):
            if not (REPO / path).is_file():
                stale.append(f"{doc.relative_to(REPO)}: {path}")
    assert not stale, "docs name modules that do not exist (moved?):\n" + "\n".join(sorted(stale))


def test_relative_links_in_the_docs_resolve() -> None:
    broken = []
    for doc in DOCS:
        for target in re.findall(r"\]\(([^)\s]+)\)", doc.read_text()):
            if re.match(r"[a-z]+:", target) or target.startswith("#"):
                continue
            if not (doc.parent / target.split("#")[0]).exists():
                broken.append(f"{doc.relative_to(REPO)}: {target}")
    assert not broken, "broken links:\n" + "\n".join(broken)
