"""Grad-CAM figure for docs/: a CV fold's model on a few of that fold's held-out images, one panel each.

    python bundles/covid_cxr_cls/scripts/gradcam_figure.py RUN_DIR [--fold 0] [--image_size 64] [--layer NAME]

RUN_DIR is a `medpipe cv covid_cxr_cls --network efficientnet_lite0` output; images are picked from
RUN_DIR/fold<k>/predictions.csv (held out from that fold's model): two ieee8023 covid19, one ieee8023 pneumonia,
one actualmed covid19, one NIH pneumonia, one NIH normal. Writes docs/gradcam_examples.png.
"""

from __future__ import annotations

import argparse
import csv
import tempfile
from pathlib import Path

BUNDLE = Path(__file__).resolve().parents[1]
WANT = [("covid19", "ieee8023"), ("covid19", "ieee8023"), ("pneumonia", "ieee8023"), ("covid19", "actualmed"),
        ("pneumonia", "nih_chestxray8"), ("normal", "nih_chestxray8")]  # fmt: skip


def main() -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    from medpipe.bundle import run_bundle
    from medpipe.data import dataset_dir

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--fold", type=int, default=0)
    parser.add_argument("--image_size", type=int, default=64)
    parser.add_argument("--layer", default="features.blocks.10")  # stride 16: 4x4 maps at 64², finer than 'top'
    args = parser.parse_args()
    fold_dir = args.run_dir / f"fold{args.fold}"
    with (fold_dir / "predictions.csv").open() as fh:
        held_out = list(csv.DictReader(fh))
    picked: list[dict[str, str]] = []
    for finding, source in WANT:
        picked.append(next(r for r in held_out if (r["finding"], r["source"]) == (finding, source) and r not in picked))
    data = Path(dataset_dir("covid_cxr"))
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        run_bundle(BUNDLE, "inference", "efficientnet_lite0", input=[str(data / r["path"]) for r in picked],
                   ckpt_dir=str(fold_dir), output_dir=str(out), image_size=args.image_size,
                   gradcam_layer=args.layer)  # fmt: skip
        fig, axes = plt.subplots(1, len(picked), figsize=(2.0 * len(picked), 2.4))
        for ax, row in zip(axes, picked, strict=True):
            stem = Path(row["path"]).stem
            png = next((out / "gradcam").glob(f"{stem}_gradcam_*.png"))
            predicted = png.stem.rsplit("_gradcam_", 1)[1]
            ax.imshow(Image.open(png), interpolation="nearest")
            ax.set_title(f"{row['source']}\ntrue {row['finding']}\npred {predicted}", fontsize=7)
            ax.axis("off")
        fig.tight_layout()
        fig.savefig(BUNDLE / "docs" / "gradcam_examples.png", dpi=110)
    print(f"wrote {BUNDLE / 'docs' / 'gradcam_examples.png'}")


if __name__ == "__main__":
    main()
