"""Grad-CAM figure for docs/: a CV fold's model on a few of that fold's held-out images, one panel each.

    python bundles/covid_cxr_cls/scripts/gradcam_figure.py RUN_DIR [--network densenet121] [--fold 0]
        [--image_size 224] [--layer NAME] [--out docs/gradcam_examples.png]

RUN_DIR is a `medpipe cv covid_cxr_cls --network NAME` output; images are picked from
RUN_DIR/fold<k>/predictions.csv (held out from that fold's model): two ieee8023 covid19, one ieee8023 pneumonia,
one actualmed covid19, one NIH pneumonia, one NIH normal. The Grad-CAM layer defaults to the overlay's
`gradcam_layer`.
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

    from medpipe.bundle.config import run_bundle
    from medpipe.data.datalists import dataset_dir

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--network", default="densenet121")
    parser.add_argument("--fold", type=int, default=0)
    parser.add_argument("--image_size", type=int, default=224)
    parser.add_argument("--layer", default=None, help="default: the overlay's gradcam_layer")
    parser.add_argument("--out", type=Path, default=BUNDLE / "docs" / "gradcam_examples.png")
    args = parser.parse_args()
    fold_dir = args.run_dir / f"fold{args.fold}"
    with (fold_dir / "predictions.csv").open() as fh:
        held_out = list(csv.DictReader(fh))
    picked: list[dict[str, str]] = []
    for finding, source in WANT:
        match = (r for r in held_out if (r["finding"], r["source"]) == (finding, source) and r not in picked)
        row = next(match, None)
        if row is None:
            print(f"no held-out {source} {finding} image in fold {args.fold}; panel skipped")
        else:
            picked.append(row)
    if not picked:
        raise SystemExit(f"no held-out image of the wanted kinds in {fold_dir / 'predictions.csv'}")
    data = Path(dataset_dir("covid_cxr"))
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        layer = {"gradcam_layer": args.layer} if args.layer else {}
        run_bundle(BUNDLE, "inference", args.network, input=[str(data / r["path"]) for r in picked],
                   ckpt_dir=str(fold_dir), output_dir=str(out), image_size=args.image_size, **layer)  # fmt: skip
        fig, axes = plt.subplots(1, len(picked), figsize=(2.0 * len(picked), 2.9))
        for ax, row in zip(axes, picked, strict=True):
            stem = Path(row["path"]).stem
            png = next((out / "gradcam").glob(f"{stem}_gradcam_*.png"))
            predicted = png.stem.rsplit("_gradcam_", 1)[1]
            ax.imshow(Image.open(png), interpolation="nearest")
            ax.set_title(f"{row['source']}\ntrue {row['finding']}\npred {predicted}", fontsize=7)
            ax.axis("off")
        fig.tight_layout()
        args.out.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
