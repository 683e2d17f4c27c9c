"""covid_ct_seg volumetric inference in fp32 vs bf16 autocast on real series (RIDER, P002, Lung-PET-CT-Dx): wall time
per series and how far the bf16 masks are from the fp32 ones (Dice per class, lung and infection mL). bf16 pays only
on CPUs with native bf16 (AVX512-BF16 or AMX); elsewhere it is emulated and slower, so measure before choosing it.

    OMP_NUM_THREADS=2 MEDPIPE_DATA=../shared/data python benchmarks/bench_ct_precision.py --ckpt model.pt [--repeat 2]

Each precision runs every series `--repeat` times after a warm-up, alternating, so that load changes hit both alike;
the median is printed. A trained checkpoint is needed: agreement on random weights says nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SERIES = {"RIDER": ("dicom", "rider_pilot_chest_ct_0117"), "P002": ("covid_ct_md", "P002"),
          "Lung-PET-CT-Dx": ("dicom", "lung_pet_ct_dx_a0002_b40f")}  # fmt: skip
CLASSES = {"lung": 1, "infection": 2}


def dice(a, b) -> float:  # noqa: ANN001 - numpy masks
    both = int(a.sum()) + int(b.sum())
    return 1.0 if both == 0 else 2.0 * int((a & b).sum()) / both


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ckpt", required=True, help="a trained covid_ct_seg model.pt (its default network)")
    parser.add_argument("--repeat", type=int, default=2)
    args = parser.parse_args()

    import nibabel as nib
    import numpy as np
    import torch
    from monai.bundle import ConfigParser

    from medpipe.bundle.config import config_files

    data = Path(os.environ.get("MEDPIPE_DATA", REPO.parent / "shared" / "data"))
    bundle = REPO / "bundles" / "covid_ct_seg"
    segmenters = {}
    for precision in ("fp32", "bf16"):
        cfg = ConfigParser()
        cfg.read_config(config_files(bundle, "inference", None))
        cfg.update({"bundle_root": str(bundle), "ckpt_path": str(Path(args.ckpt).resolve()), "precision": precision})
        network = cfg.get_parsed_content("network")
        network.load_state_dict(torch.load(args.ckpt, map_location="cpu", weights_only=True))
        network.eval()
        segmenters[precision] = cfg.get_parsed_content("infer#segmenter")

    times: dict[str, dict[str, list[float]]] = {p: {} for p in segmenters}
    masks: dict[str, dict[str, np.ndarray]] = {p: {} for p in segmenters}
    volumes: dict[str, dict[str, dict]] = {p: {} for p in segmenters}
    with tempfile.TemporaryDirectory(prefix="bench-precision-") as tmp:
        for name, (dataset, folder) in SERIES.items():
            series = data / dataset / folder
            for precision, segment in segmenters.items():  # warm-up
                segment(series, Path(tmp) / "warm" / precision / name)
            for rep in range(args.repeat):
                for precision, segment in segmenters.items():
                    out = Path(tmp) / f"{precision}_{rep}" / name
                    started = time.perf_counter()
                    report = segment(series, out)
                    times[precision].setdefault(name, []).append(time.perf_counter() - started)
                    entry = report["volumes"][0]
                    masks[precision][name] = np.asarray(nib.load(out / entry["files"]["seg"]).dataobj)
                    volumes[precision][name] = {"lung_ml": entry["lung_volume_ml"],
                                                "infection_ml": entry["infection_volume_ml"]}  # fmt: skip

    print(f"covid_ct_seg inference, {os.cpu_count()} cores, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}, "
          f"torch {torch.__version__}, native bf16: {torch.ops.mkldnn._is_mkldnn_bf16_supported()}")  # fmt: skip
    print("| series | fp32 s | bf16 s | bf16/fp32 | Dice lung | Dice infection | lung mL fp32 / bf16 "
          "| infection mL fp32 / bf16 |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    summary = {}
    for name in SERIES:
        fp32, bf16 = (statistics.median(times[p][name]) for p in ("fp32", "bf16"))
        a, b = masks["fp32"][name], masks["bf16"][name]
        agreement = {c: dice(a == v, b == v) for c, v in CLASSES.items()}
        va, vb = volumes["fp32"][name], volumes["bf16"][name]
        print(f"| {name} | {fp32:.2f} | {bf16:.2f} | {bf16 / fp32:.2f} | {agreement['lung']:.4f} | "
              f"{agreement['infection']:.4f} | {va['lung_ml']:.0f} / {vb['lung_ml']:.0f} | "
              f"{va['infection_ml']:.1f} / {vb['infection_ml']:.1f} |")  # fmt: skip
        summary[name] = {"fp32_s": fp32, "bf16_s": bf16, "dice": agreement, "fp32": va, "bf16": vb}
    print(json.dumps(summary))
    print(f"load average {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
