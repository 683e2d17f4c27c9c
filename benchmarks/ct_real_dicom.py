"""covid_ct_seg on real clinical DICOM: slice-level agreement with radiologists' labels, false infection on
infection-free slices and scans, and the wall time of the whole volumetric inference (NIfTI + DICOM-SEG + report).

Series (under MEDPIPE_DATA): `covid_ct_md/P002` (a COVID-19 patient, 133 JPEG-Lossless slices, per-slice infection
labels: slice ROC-AUC of predicted infection mL, mL on the label-negative slices) and `dicom/rider_pilot_chest_ct_0117`
(a pre-COVID scan, 95 slices: every mL of infection there is false); `dicom/lung_pet_ct_dx_a0002_b40f` (infection-free,
a lung tumour, 30 slices of 8 mm: infection mL and the share of slices with any). None is in covid_ct_seg's data
set; a model trained with `infection_free` slices of one of them is not held out on it: the line and the JSON say so
(`held_out`, from the checkpoints' trained_on.json), and only the other series measures that model.

Each `--model NAME=NETWORK:CKPT[,CKPT…]` is built from the bundle's own configs (train.json, net_NETWORK.json,
inference.json), so it runs exactly as `medpipe run covid_ct_seg inference` does; several checkpoints are averaged
(the bundle's `ensemble_ckpts`). CKPT `random` keeps the seeded initial weights: only its time means anything.

    OMP_NUM_THREADS=2 MEDPIPE_DATA=/work/shared/data python benchmarks/ct_real_dicom.py \
        --model v2=unet5_25d:results/covid_ct_seg/unet5_25d_e40/fold0/model.pt --repeat 2
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
BUNDLE = REPO / "bundles" / "covid_ct_seg"


def build_segmenter(network: str, ckpts: list[str], options: dict[str, Any], scratch: Path) -> Any:
    """The bundle's `infer#segmenter` as `medpipe serve` builds it (medpipe.serve.models.CTSegmentationModel): the
    first checkpoint loaded, the rest as its ensemble. `random`: seeded initial weights saved into `scratch`."""
    from medpipe.serve.models import CTSegmentationModel
    from medpipe.serve.routing import Route

    if ckpts == ["random"]:
        from medpipe.export.exporters import bundle_network

        torch.manual_seed(0)
        ckpts = [str(scratch / f"{network}_random.pt")]
        torch.save(bundle_network(BUNDLE, None if network == "default" else network).net.state_dict(), ckpts[0])
    route = Route(name="ct", bundle=BUNDLE, task="ct_segmentation", modality=("CT",),
                  checkpoints=tuple(Path(c).resolve() for c in ckpts),
                  network=None if network == "default" else network, options=options)  # fmt: skip
    return CTSegmentationModel(route).segmenter


def scratch_dir() -> str:
    return tempfile.mkdtemp(prefix="ct-real-dicom-")


def trained_files(ckpts: list[str]) -> set[str]:
    """The images any of the checkpoints was trained on (their trained_on.json), resolved."""
    from medpipe.training.checkpoints import read_trained_on

    return set().union(*(read_trained_on(c) for c in ckpts if c != "random"))


def measure(name: str, segmenter: Any, data: Path, repeat: int, seen: set[str]) -> dict[str, Any]:
    from medpipe.evaluation.real_dicom import read_slice_labels, slice_label_figures
    from medpipe.io import ct

    row: dict[str, Any] = {"model": name}
    ctmd = data / "covid_ct_md"
    volume = ct.load_volume(ctmd / "P002")
    mask = segmenter.segment(volume, "P002")
    labels = read_slice_labels(ctmd / "slice_labels.csv")
    row["covid_ct_md_P002"] = slice_label_figures(mask, volume.affine, volume.source_files, labels)
    row["held_out"] = {  # by folder: no need to load a series again to list its files
        key: all(Path(f).parent != folder.resolve() for f in seen)
        for key, folder in (("P002", ctmd / "P002"), ("rider", data / "dicom" / "rider_pilot_chest_ct_0117"),
                            ("b40f", data / "dicom" / "lung_pet_ct_dx_a0002_b40f"))
    }
    times = {}
    for key, series in (("rider", data / "dicom" / "rider_pilot_chest_ct_0117"), ("P002", ctmd / "P002")):
        seconds = []
        for _ in range(repeat):
            with tempfile.TemporaryDirectory() as tmp:
                started = time.perf_counter()
                report = segmenter(series, Path(tmp) / "out")  # load, segment, NIfTI + DICOM-SEG + report.json
                seconds.append(time.perf_counter() - started)
                written = sorted(p.name for p in (Path(tmp) / "out").iterdir())
        entry = report["volumes"][0]
        times[key] = {"seconds_median": round(statistics.median(seconds), 2), "files": written,
                      "lung_ml": entry["lung_volume_ml"], "infection_ml": entry["infection_volume_ml"],
                      "warnings": entry.get("warnings", []), "finding": entry["finding"],
                      "infection_slices": entry["infection_slices"]}  # fmt: skip
    row["rider_infection_ml"] = times["rider"]["infection_ml"]
    b40f = segmenter(data / "dicom" / "lung_pet_ct_dx_a0002_b40f", Path(scratch_dir()) / "b40f")["volumes"][0]
    row["b40f"] = {"infection_ml": b40f["infection_volume_ml"], "finding": b40f["finding"],
                   "infection_slices": b40f["infection_slices"], "slices": b40f["shape"][2]}  # fmt: skip
    for key in ("rider", "P002"):
        row[f"{key.lower()}_finding"] = times[key]["finding"]
    row["volumetric_inference"] = times
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", action="append", required=True, help="NAME=NETWORK:CKPT[,CKPT…] (repeatable)")
    parser.add_argument("--option", action="append", default=[], help="KEY=JSON bundle key for every model")
    parser.add_argument("--repeat", type=int, default=1, help="timed runs of the whole inference per series")
    parser.add_argument("--json", default=None, help="also write the rows to this file")
    args = parser.parse_args()
    options = {k: json.loads(v) for k, v in (o.split("=", 1) for o in args.option)}
    data = Path(os.environ.get("MEDPIPE_DATA", REPO.parent / "shared" / "data"))
    threads = torch.get_num_threads()
    rows = []
    scratch = Path(tempfile.mkdtemp(prefix="ct-real-dicom-"))
    for spec in args.model:
        name, _, rest = spec.partition("=")
        network, _, ckpts = rest.partition(":")
        segmenter = build_segmenter(network, ckpts.split(","), options, scratch)
        row = measure(name, segmenter, data, args.repeat, trained_files(ckpts.split(",")))
        rows.append({**row, "network": network, "checkpoints": ckpts.split(","), "threads": threads})
        p002, vol = row["covid_ct_md_P002"], row["volumetric_inference"]
        seen = {k: "" if v else " (SEEN IN TRAINING, not held out)" for k, v in row["held_out"].items()}
        print(f"{name:>14}: P002 slice AUC {p002['slice_auc']:.3f}, infection on label-negative slices "
              f"{p002['infection_ml_label_negative']:.1f} mL (positive {p002['infection_ml_label_positive']:.1f} mL)"
              f"{seen['P002']}; RIDER infection {row['rider_infection_ml']:.1f} mL{seen['rider']} "
              f"({vol['rider']['infection_slices']} of 95 slices); B40f {row['b40f']['infection_ml']:.1f} mL "
              f"({row['b40f']['infection_slices']} of {row['b40f']['slices']} slices); "
              f"whole inference RIDER "
              f"{vol['rider']['seconds_median']:.2f} s, P002 {vol['P002']['seconds_median']:.2f} s "
              f"({threads} threads)", flush=True)  # fmt: skip
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
