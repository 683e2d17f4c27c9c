"""Infection-free CT slices as training items: real DICOM series, or the label-negative slices of a slice-labelled
series, with the partial label "no infection anywhere in this slice".

Every development slice of covid_ct_seg holds infection, so a model trained on them alone has never seen a slice
without it and invents infection on normal scans. These items teach the absence: their label map is NO_INFECTION
everywhere (the lung is not labelled; only "not infection" is known), which
medpipe.training.partial_label_loss.NoInfectionLoss scores. The slices go through the intensity pipeline of
volumetric inference (medpipe.transforms.ct_intensity.ct_to_model_slices) and their neighbours are stacked from the
volume as there (stack_context), so the model learns "no infection" on exactly the inputs it meets in the clinic.

A source is a DICOM series folder (all its slices are infection-free, e.g. a pre-COVID scan) or a CSV with `file`
and `infection` columns (COVID-CT-MD's slice labels; files relative to the CSV's folder): the slices labelled 0.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.transforms import MapTransform

from medpipe.errors import MedpipeError

NO_INFECTION = 255  # label value: "some class other than infection" (background or lung, not known which)
PIXELS_KEY = "pixels"  # the item's ready (k, H, W) input; `image` keeps the DICOM file for the trained_on record


def _read_negative_files(csv_path: Path) -> dict[Path, set[str]]:
    """{series folder: names of its files labelled infection 0} from a slice-label CSV."""
    from medpipe.io.slice_labels import read_slice_label_rows

    negatives: dict[Path, set[str]] = {}
    for file, label in read_slice_label_rows(csv_path):
        names = negatives.setdefault(file.parent, set())
        if label == 0:
            names.add(file.name)
    return negatives


def _display_to_voxel(volume: Any) -> np.ndarray:
    """The voxel slice index k of each display slice (ct.display_slices orders them inferior → superior)."""
    from medpipe.io import ct

    shape = volume.array.shape
    index = np.broadcast_to(np.arange(shape[2], dtype=np.float32)[None, None, :], shape)
    return np.rint(ct.display_slices(np.ascontiguousarray(index), volume.affine, size=None)[:, 0, 0]).astype(int)


def series_items(
    folder: Path, keep: set[str] | None, window: str, slice_size: int, context_slices: int
) -> list[dict[str, Any]]:
    """Items for the slices of one series whose file name is in `keep` (None: every slice)."""
    from medpipe.io import ct
    from medpipe.transforms.ct_intensity import check_axial_ct, ct_to_model_slices
    from medpipe.transforms.slice_context import stack_context

    volume = ct.load_volume(folder)
    check_axial_ct(volume, str(folder))
    if not volume.source_files or None in volume.source_files:
        raise MedpipeError(f"{folder}: infection-free slices need a DICOM series with one file per slice")
    slices = ct_to_model_slices(volume, window, slice_size)
    files = [Path(volume.source_files[k]) for k in _display_to_voxel(volume)]
    absent = sorted(keep - {f.name for f in files}) if keep is not None else []
    if absent:
        raise MedpipeError(f"{folder}: labelled files {absent[:3]} are not in the series")
    chosen = np.array([i for i, f in enumerate(files) if keep is None or f.name in keep], dtype=int)
    if not len(chosen):
        return []
    stacks = stack_context(slices, context_slices, chosen)
    group = f"infection_free:{folder.name}"
    label = np.full((1, slice_size, slice_size), NO_INFECTION, dtype=np.uint8)
    return [
        {"image": str(files[i]), PIXELS_KEY: stacks[n], "label": label, "group": group, "source_index": int(i)}
        for n, i in enumerate(chosen)
    ]


def infection_free_items(
    sources: Sequence[str | Path], window: str = "minmax_slice", slice_size: int = 256, context_slices: int = 1,
    layout: str = "png",
) -> list[dict[str, Any]]:
    """Training items of every source (a DICOM series folder, or a slice-label CSV's label-negative slices).

    Only beside the PNG slices (`layout` png): their intensities are those of the PNGs; a model trained on a volume
    layout reads HU with another normalisation, and its volumes carry their infection-free slices themselves."""
    if sources and layout != "png":
        raise MedpipeError(f"--infection_free adds slices in the PNG slices' intensities; the {layout} volumes train "
                           "in HU (their slices without infection teach 'none' already): leave --infection_free out")
    items: list[dict[str, Any]] = []
    for source in sources:
        path = Path(source)
        found: list[dict[str, Any]] = []
        if path.is_dir():
            found = series_items(path, None, window, slice_size, context_slices)
        elif path.is_file() and path.suffix.lower() == ".csv":
            for folder, names in _read_negative_files(path).items():
                found += series_items(folder, names, window, slice_size, context_slices)
        else:
            raise MedpipeError(f"infection_free source '{source}': not a DICOM series folder or a slice-label .csv")
        if not found:  # a source that adds nothing would leave the run silently without what it asked for
            raise MedpipeError(f"infection_free source '{source}': no slice is labelled infection 0")
        items += found
    return items


class ResolveNoInfectiond(MapTransform):
    """For the training Dice only: a NO_INFECTION pixel takes the predicted class when that is not infection and
    background when it is, so the logged Dice counts invented infection as an error and nothing else unknown."""

    def __init__(self, pred_key: str = "pred", label_key: str = "label", infection: int = 2) -> None:
        super().__init__([label_key])
        self.pred_key, self.label_key, self.infection = pred_key, label_key, int(infection)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        out = dict(data)
        label = out[self.label_key]
        unknown = label == NO_INFECTION
        if bool(unknown.any()):
            predicted = torch.as_tensor(out[self.pred_key]).argmax(dim=0, keepdim=True).to(label.dtype)
            guess = torch.where(predicted == self.infection, torch.zeros_like(predicted), predicted)
            out[self.label_key] = torch.where(unknown, guess, label)
        return out
