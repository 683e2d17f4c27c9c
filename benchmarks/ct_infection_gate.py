"""covid_ct_seg v3 (issue #31, results log §10): choose the slice gate leave-one-infection-free-source-out, score
each source held out, fit and check the calibrated per-slice probability of infection, and apply the plan's rule.

Sources without infection: RIDER (dicom/rider_pilot_chest_ct_0117, every slice), Lung-PET-CT-Dx B40f
(dicom/lung_pet_ct_dx_a0002_b40f, every slice), P002's label-negative slices (covid_ct_md). Positives: P002's
label-positive slices and the out-of-fold development slices of `--oof` (a fold folder evaluated with
`--save_predictions true`; every development slice holds infection). The model (gate off) segments each series
once; every threshold is then applied to those masks with the bundle's own gate (gate_infection_slices).

    OMP_NUM_THREADS=2 MEDPIPE_DATA=/work/shared/data python benchmarks/ct_infection_gate.py \
        --model unet5_25d:results/covid_ct_seg/v3_base/fold0/model.pt --oof results/covid_ct_seg/v3_base/fold0 \
        --json results/covid_ct_seg/v3_gate.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
NEGATIVE_SOURCES = ("rider", "b40f", "p002_negative")
DICE_MARGIN, AUC_FLOOR = 0.01, 0.85  # the plan's rule


def segment_sources(network: str, ckpt: str, data: Path) -> dict[str, Any]:
    """Each series segmented once with the gate off: mask, per-slice fractions, axis, affine, files."""
    from ct_real_dicom import build_segmenter

    from medpipe.io import ct

    segmenter = build_segmenter(network, [ckpt], {"min_infection_lung_fraction": 0.0, "infection_probability": None},
                                Path(tempfile.mkdtemp(prefix="ct-gate-")))  # fmt: skip
    out = {}
    for key, folder in (("rider", data / "dicom" / "rider_pilot_chest_ct_0117"),
                        ("b40f", data / "dicom" / "lung_pet_ct_dx_a0002_b40f"),
                        ("p002", data / "covid_ct_md" / "P002")):  # fmt: skip
        volume = ct.load_volume(folder)
        mask, fractions = segmenter.segment_slices(volume, key)
        out[key] = {"mask": mask, "fractions": fractions, "axis": ct.axial_axis(volume.affine),
                    "affine": volume.affine, "files": volume.source_files}  # fmt: skip
    return out


def oof_slices(fold_dir: Path) -> tuple[list[tuple[str, str, np.ndarray, np.ndarray]], dict[str, list[int]]]:
    """(path, volume, predicted, true) of each out-of-fold slice, and the structures scored."""
    from medpipe.data.datalists import read_seg_datalist
    from medpipe.evaluation.seg_report import read_predictions
    from medpipe.transforms.seg import load_label_2d

    metrics = json.loads((fold_dir / "metrics.json").read_text())
    items = {i["path"]: i for i in read_seg_datalist(metrics["dataset_dir"], "training")}
    slices = [(p, items[p]["group"], pred, load_label_2d(items[p]["label"]))
              for p, pred in read_predictions(fold_dir).items()]  # fmt: skip
    return slices, {k: list(v) for k, v in metrics["structures"].items()}


def oof_dice(slices: list, structures: dict[str, list[int]], threshold: float) -> dict[str, Any]:
    from medpipe.evaluation.metrics import segmentation_report
    from medpipe.evaluation.seg_report import slice_statistics
    from medpipe.transforms.seg_postprocessing import gate_infection_slices

    records = [{"path": p, "group": g,
                **slice_statistics(np.asarray(gate_infection_slices(pred, threshold)).astype(np.int64), true,
                                   structures)}
               for p, g, pred, true in slices]  # fmt: skip
    report, _, volumes = segmentation_report(records, list(structures), n_boot=1000, seed=0)
    per_volume = report["metrics"]["per_volume"]
    return {"infection": per_volume["dice_infection"]["value"], "lung": per_volume["dice_lung"]["value"],
            "volumes": {r["volume_group"]: round(r["dice_infection"], 4) for r in volumes}}  # fmt: skip


def held_out_scores(source: str, series: dict[str, Any], threshold: float, labels: dict[str, int]) -> dict[str, Any]:
    from medpipe.evaluation.real_dicom import per_slice_ml, slice_label_figures
    from medpipe.transforms.seg_postprocessing import gate_infection_slices

    key = "p002" if source == "p002_negative" else source
    s = series[key]
    gated = np.asarray(gate_infection_slices(s["mask"], threshold, s["axis"]))
    ml = per_slice_ml(np.moveaxis(gated, s["axis"], 2), s["affine"])
    if key != "p002":
        return {"threshold": threshold, "infection_ml": round(float(ml.sum()), 2), "slices": int(ml.size),
                "slices_with_infection": int((ml > 0).sum()),
                "percent_slices_with_infection": round(100.0 * float((ml > 0).mean()), 1)}  # fmt: skip
    figures = slice_label_figures(np.moveaxis(gated, s["axis"], 2), s["affine"], s["files"], labels)
    negative = np.array([labels[Path(f).name] == 0 for f in s["files"]])
    return {"threshold": threshold, **figures,
            "negative_slices": int(negative.sum()),
            "negative_slices_with_infection": int((ml[negative] > 0).sum()),
            "percent_negative_slices_with_infection": round(100.0 * float((ml[negative] > 0).mean()), 1)}  # fmt: skip


def main() -> None:
    from medpipe.evaluation.infection_presence import (
        choose_gate,
        fit_presence,
        presence_reliability,
        slice_probabilities,
    )
    from medpipe.evaluation.metrics import roc_auc
    from medpipe.evaluation.real_dicom import read_slice_labels

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="NETWORK:CKPT")
    parser.add_argument("--oof", required=True, help="fold folder with predictions.npz and metrics.json")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    data = Path(os.environ.get("MEDPIPE_DATA", REPO.parent / "shared" / "data"))
    network, _, ckpt = args.model.partition(":")
    series = segment_sources(network, ckpt, data)
    labels = read_slice_labels(data / "covid_ct_md" / "slice_labels.csv")
    p002_truth = np.array([labels[Path(f).name] for f in series["p002"]["files"]], dtype=int)
    fractions = {"rider": series["rider"]["fractions"], "b40f": series["b40f"]["fractions"],
                 "p002_negative": series["p002"]["fractions"][p002_truth == 0],
                 "p002_positive": series["p002"]["fractions"][p002_truth == 1]}  # fmt: skip
    slices, structures = oof_slices(Path(args.oof))
    from medpipe.transforms.seg_postprocessing import slice_infection_fractions

    fractions["oof_development"] = np.array([slice_infection_fractions(pred)[0] for _, _, pred, _ in slices])

    result: dict[str, Any] = {"model": args.model, "oof": args.oof, "held_out": {}, "fraction_percentiles": {
        key: {q: round(float(np.percentile(f, q)), 4) for q in (50, 75, 90, 95, 99)} for key, f in fractions.items()}}
    for source in NEGATIVE_SOURCES:
        others = [s for s in NEGATIVE_SOURCES if s != source]
        threshold = choose_gate(np.concatenate([fractions[s] for s in others]))
        positives = ["oof_development"] + (["p002_positive"] if source != "p002_negative" else [])
        x = np.concatenate([fractions[s] for s in others + positives])
        y = np.concatenate([np.full(len(fractions[s]), int(s in positives)) for s in others + positives])
        coefficients = fit_presence(x, y)
        row = held_out_scores(source, series, threshold, labels)
        if source == "p002_negative":  # P002 held out whole: its positive slices are not in the fit either
            p = slice_probabilities(series["p002"]["fractions"], coefficients)
            row["slice_auc_probability"] = round(roc_auc(p002_truth.astype(bool), p), 4)
            row["reliability"] = presence_reliability(p, p002_truth)
        else:
            p = slice_probabilities(fractions[source], coefficients)
            row["reliability"] = presence_reliability(p, np.zeros(len(p)))
        row["probability_max"] = round(float(p.max()), 4)
        # what the same threshold costs the slices with infection: the share that would keep it
        row["oof_development_slices_keeping_infection"] = round(float((fractions["oof_development"] >= threshold)
                                                                      .mean()), 4)  # fmt: skip
        row["coefficients"] = [round(c, 4) for c in coefficients]
        result["held_out"][source] = row
        print(f"{source:>14} held out: gate {threshold:.4g} (chosen on {', '.join(others)}) -> "
              + (f"P002 slice AUC {row['slice_auc']:.3f} (probability {row['slice_auc_probability']:.3f}), "
                 f"negatives {row['infection_ml_label_negative']:.1f} mL on "
                 f"{row['percent_negative_slices_with_infection']}% of slices, positives "
                 f"{row['infection_ml_label_positive']:.1f} mL" if source == "p002_negative" else
                 f"{row['infection_ml']:.1f} mL on {row['percent_slices_with_infection']}% of "
                 f"{row['slices']} slices")
              + f"; highest slice probability {row['probability_max']:.3f}; development slices (OOF) keeping "
              f"infection at this gate {100 * row['oof_development_slices_keeping_infection']:.1f}%",
              flush=True)  # fmt: skip

    negatives = np.concatenate([fractions[s] for s in NEGATIVE_SOURCES])
    default = choose_gate(negatives)
    positives = np.concatenate([fractions["oof_development"], fractions["p002_positive"]])
    coefficients = fit_presence(np.concatenate([negatives, positives]),
                                np.concatenate([np.zeros(len(negatives)), np.ones(len(positives))]))  # fmt: skip
    off, on = oof_dice(slices, structures, 0.0), oof_dice(slices, structures, default)
    p002_auc = result["held_out"]["p002_negative"]["slice_auc"]
    adopt = (off["infection"] - on["infection"] <= DICE_MARGIN) and p002_auc >= AUC_FLOOR
    result["default"] = {"min_infection_lung_fraction": default,
                         "infection_probability": [round(c, 4) for c in coefficients],
                         "oof_dice_gate_off": off, "oof_dice_gate_on": on,
                         "oof_slices_keeping_infection": round(float((fractions["oof_development"] >= default).mean()),
                                                               4),
                         "rule": f"adopt if OOF infection Dice falls by <= {DICE_MARGIN} and P002 slice AUC (held "
                                 f"out) >= {AUC_FLOOR}", "adopt": bool(adopt)}  # fmt: skip
    print(f"all sources: gate {default:.4g}, probability [{coefficients[0]:.4f}, {coefficients[1]:.4f}]; fold-0 OOF "
          f"per-volume infection Dice {off['infection']:.4f} -> {on['infection']:.4f} (lung {off['lung']:.4f} -> "
          f"{on['lung']:.4f}); OOF slices keeping infection "
          f"{100 * result['default']['oof_slices_keeping_infection']:.1f}%; rule: "
          f"{'ADOPT' if adopt else 'keep off'}", flush=True)  # fmt: skip
    for key, q in result["fraction_percentiles"].items():
        print(f"{key:>16}: infection / lung per slice, percentiles 50/75/90/95/99: "
              + " / ".join(f"{v:.3f}" for v in q.values()))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
