"""Stage compact copies of the data sets for the GPU machine, whose upload is capped at 64 MiB.

    python tools/gpu_cv/stage_data.py --data $MEDPIPE_DATA --out .devdata

- brain_mri_yes_no: copied byte for byte (7 MB).
- covid_ct_seg: images area-resized and labels nearest-resized to 128² (the bundle's own train transforms at its
  default `image_size` 128), stored as 8-bit PNG. On the GPU machine the folds are scored against these 128²
  labels; the fold checkpoints come back, so 256² figures need one evaluate job per fold on the original data
  here (`tools/gpu_cv/README.md`, step 3).
- covid_cxr: images area-resized to 224² (the bundle's transform at `image_size` 224), stored as 8-bit PNG, with
  labels.csv pointing at them. Fold models are scored on this copy on the GPU machine.

The copy is not bit-identical to what the bundle computes from the originals: the resized values are rounded to
8 bits, and the loader's per-image min-max runs once more on reload (a contrast change of a few per cent at most).
"""

from __future__ import annotations

import argparse
import csv
import json
import shutil
from pathlib import Path

import numpy as np
import torch
from monai.transforms import Resize
from PIL import Image

from medpipe.io.images import load_grey_2d
from medpipe.transforms.seg import load_label_2d


def _save_grey(array: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.clip(np.rint(array * 255.0), 0, 255).astype(np.uint8)).save(path, optimize=True)


def _resize(array: np.ndarray, size: int, mode: str) -> np.ndarray:
    tensor = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))[None]
    return np.asarray(Resize((size, size), mode=mode)(tensor))[0]


def stage_ct(src: Path, dst: Path, size: int = 128) -> None:
    datalist = json.loads((src / "datalist.json").read_text())
    for entry in datalist["training"]:
        _save_grey(_resize(load_grey_2d(src / entry["image"]), size, "area"), dst / entry["image"])
        label = _resize(load_label_2d(src / entry["label"]).astype(np.float32), size, "nearest")
        (dst / entry["label"]).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(label.astype(np.uint8)).save(dst / entry["label"], optimize=True)
        for key in ("lung", "infection"):  # separate masks are not used by the bundle
            entry.pop(key, None)
    (dst / "datalist.json").write_text(json.dumps(datalist, indent=1))


def stage_cxr(src: Path, dst: Path, size: int = 224) -> None:
    with (src / "labels.csv").open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    for row in rows:
        target = Path(row["image"]).with_suffix(".png")
        _save_grey(_resize(load_grey_2d(src / row["image"]), size, "area"), dst / target)
        row["image"] = str(target)
    with (dst / "labels.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="the MEDPIPE_DATA folder")
    parser.add_argument("--out", default=".devdata")
    args = parser.parse_args()
    data, out = Path(args.data), Path(args.out)
    if out.exists():
        shutil.rmtree(out)
    shutil.copytree(data / "brain_mri_yes_no", out / "brain_mri_yes_no")
    stage_ct(data / "covid_ct_seg", out / "covid_ct_seg")
    stage_cxr(data / "covid_cxr", out / "covid_cxr")
    for name in ("covid_ct_seg", "covid_cxr"):
        shutil.copy(data / name / "README.md", out / name / "README.md")
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    print(f"staged {out}: {size / 2**20:.1f} MiB")


if __name__ == "__main__":
    main()
