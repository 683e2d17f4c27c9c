"""Run a 2-D slice segmentation model on whole CT volumes: DICOM series or NIfTI in, 3-D masks and a report out.

Each axial slice goes through the intensity pipeline the COVID CT training slices went through (HU min-max per
slice, or an HU window → [0, 1] → 256² → 8-bit → CLAHE), is predicted at the model's size, and the class
probabilities are resized back to the native grid (medpipe.io.ct.reassemble), then post-processed (lung
components; small infection components → lung). Outputs per volume: `<name>_seg.nii.gz` (the label map),
`<name>_lung.nii.gz` and `<name>_infection.nii.gz` (binary), `<name>_seg.dcm` (DICOM-SEG, DICOM input only), and
one `report.json` for all inputs with lung and infection volumes in mL.

All or nothing: every output is written into a staging folder inside the output folder and moved into place,
report.json last, only when all were written (medpipe.files.staged_outputs); a failing writer leaves no partial set
and one line. A DICOM series whose type-1 UIDs a DICOM-SEG needs are empty (some de-identified research sets) gets
no SEG: the reason is logged and recorded in the report's `warnings`."""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812

from medpipe.errors import MedpipeError
from medpipe.evaluation.infection_presence import check_coefficients, slice_probabilities
from medpipe.files import atomic_write_text, distinct_names, staged_outputs
from medpipe.inference.input_guard import OK, ct_route_planes
from medpipe.io import ct, dicom_seg
from medpipe.io.dicom import Volume
from medpipe.transforms.ct_intensity import (
    AIR_HU,
    HU_CT,
    MINMAX_MODES,
    check_axial_ct,
    check_normalisation,
    ct_to_model_slices,
    hu_model_slices,
    is_hounsfield,
)
from medpipe.transforms.seg_postprocessing import (
    PADDING_HU,
    check_fraction,
    check_lung_fraction,
    gate_infection_slices,
    patient_region,
    relabel_small_components,
    slice_infection_fractions,
)
from medpipe.transforms.slice_context import check_context_slices, stack_context
from medpipe.values import path_list

logger = logging.getLogger(__name__)

REPORT = "report.json"


@torch.no_grad()
def predict_slices(
    slices: np.ndarray,
    network: torch.nn.Module,
    inferer: Any,
    image_size: int,
    batch_size: int = 32,
    context_slices: int = 1,
) -> np.ndarray:
    """Softmax class probabilities (N, C, image_size, image_size) for the [0, 1] slices of one volume, in order,
    batch by batch; with context_slices k > 1 each slice goes in with its k - 1 neighbours as channels."""
    network.eval()
    device = next(iter(network.parameters()), torch.empty(0)).device  # an ONNX Runtime network has no parameters
    probs = []
    for start in range(0, len(slices), batch_size):
        if context_slices > 1:  # neighbours come from the whole volume, not only this batch
            index = np.arange(start, min(start + batch_size, len(slices)))
            chunk = stack_context(slices, context_slices, index)
        else:
            chunk = slices[start : start + batch_size, None]
        batch = torch.from_numpy(np.ascontiguousarray(chunk)).to(device)
        if batch.shape[-1] != image_size or batch.shape[-2] != image_size:
            batch = F.interpolate(batch, size=(image_size, image_size), mode="area")  # as MONAI Resized(mode="area")
        logits = inferer(batch, network) if inferer is not None else network(batch)
        probs.append(torch.softmax(logits.float(), dim=1).cpu().numpy())
    return np.concatenate(probs)


def keep_lung_components(mask: np.ndarray, keep: int = 2, hu: np.ndarray | None = None, axis: int = 2) -> np.ndarray:
    """Zero lung labels (>= 1) outside the `keep` largest 3-D connected components that lie inside the patient:
    lungs lie inside the chest, so pieces in the air around the patient or in the table are errors.

    With the volume's `hu` (slices along `axis`), a component is inside when at least half of it lies in the patient's
    cross-section (seg_postprocessing.patient_region). Touching the image edge is no sign of being outside: a targeted
    reconstruction (RIDER: 33 cm field of view) cuts the chest, and its lung runs to the edge. Lung labels on the
    padding outside the field of view (no image there) are zeroed first. Without `hu`, the fallback for masks alone,
    components touching the in-plane edge (the two axes other than `axis`) count as outside.
    """
    from scipy import ndimage

    if hu is not None:
        mask = np.where(np.asarray(hu) < PADDING_HU, 0, mask).astype(mask.dtype)
    components, count = ndimage.label(mask >= 1)
    if count == 0:
        return mask
    sizes = np.bincount(components.ravel(), minlength=count + 1)
    if hu is not None:
        inside = np.bincount(components[patient_region(hu, axis)], minlength=count + 1)
        outside = 2 * inside < sizes
    else:
        planes = np.moveaxis(components, axis, -1)  # (in-plane, in-plane, slices)
        edge = np.unique(np.concatenate([
            planes[0].ravel(), planes[-1].ravel(), planes[:, 0].ravel(), planes[:, -1].ravel()
        ]))  # fmt: skip
        outside = np.zeros(count + 1, dtype=bool)
        outside[edge] = True
    sizes[0], sizes[outside] = 0, 0
    kept = [int(i) for i in np.argsort(sizes)[::-1][:keep] if sizes[i] > 0]
    keep_table = np.zeros(count + 1, dtype=bool)  # a lookup per component id: far faster than np.isin on 10^7 voxels
    keep_table[kept] = True
    out = mask.copy()
    out[~keep_table[components]] = 0
    return out


def lung_sides_ml(mask: np.ndarray, volume: Volume) -> tuple[float, float]:
    """Lung (label >= 1) mL on the patient's right and left of the body's midline: the mean RAS x of the voxels
    above -500 HU (soft tissue and bone), taken per in-plane position (axial volume: voxel axis 2 is the slice axis).
    A segmentation that finds one lung only shows as one side near zero."""
    affine = volume.affine
    body_per_column = (volume.array > -500).sum(axis=2)
    lung_per_column = (mask >= 1).sum(axis=2)
    i, j = np.indices(body_per_column.shape)
    x_ras = affine[0, 0] * i + affine[0, 1] * j + affine[0, 3]  # RAS: +x is the patient's left
    if body_per_column.sum() == 0:
        return 0.0, 0.0
    midline = float((x_ras * body_per_column).sum() / body_per_column.sum())
    voxel = ct.voxel_ml(affine)
    right = float(lung_per_column[x_ras < midline].sum()) * voxel
    return right, float(lung_per_column.sum()) * voxel - right


def _write(what: str, write: Callable[[], Path]) -> Path:
    """Run one writer; its failure becomes one line (OSErrors are left to staged_outputs, which says the same)."""
    try:
        return write()
    except OSError:
        raise
    except MedpipeError as exc:
        raise MedpipeError(f"writing {what} failed: {exc}; nothing was written") from exc
    except Exception as exc:  # a writer library's own error (highdicom, nibabel): still one line, nothing left
        raise MedpipeError(f"writing {what} failed ({type(exc).__name__}: {exc}); nothing was written") from exc


def _stem(path: Path) -> str:
    name = path.name.removesuffix(".gz").removesuffix(".nii") if path.is_file() else path.name
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name) or "volume"


def output_stems(paths: Sequence[str | Path]) -> list[str]:
    """The file stem of each input's outputs (`<stem>_seg.nii.gz` …): a/s1 and b/s1 must not write over each other's
    s1_seg.nii.gz, so names are planned over all the inputs of a run (medpipe.files.distinct_names)."""
    return distinct_names([Path(p) for p in paths], _stem)


def split_report(report: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """report.json as (everything but the volumes, {input: its volume entry}): the parts a run in pieces merges."""
    header = {k: v for k, v in report.items() if k != "volumes"}
    return header, {str(entry["input"]): entry for entry in report.get("volumes", [])}


def join_report(header: Mapping[str, Any], entries: Sequence[Mapping[str, Any]]) -> str:
    """report.json's text from split_report's parts, entries in input order: what one run over all inputs writes."""
    return json.dumps({**header, "volumes": list(entries)}, indent=2)


class VolumeSegmenter:
    """Segment lungs and infection in CT volumes with a trained 2-D network; write masks and a JSON report.

    Labels: 0 background, 1 lung without infection, 2 infection; the lung mask is label >= 1. With
    `keep_components` > 0, lung labels outside the largest chest components are dropped (keep_lung_components);
    with `min_infection_fraction` > 0, smaller infection components of each axial slice become lung (the CV-chosen
    post-processing, medpipe.transforms.seg_postprocessing); with `min_infection_lung_fraction` > 0, a slice whose
    infection is under that fraction of its lung loses it (the slice gate, results log §10), and a volume with no
    slice left says "no infection detected". `infection_probability` ([intercept, slope]) adds each slice's
    calibrated probability of infection (medpipe.evaluation.infection_presence) and the highest one to the report.

    A model trained on HU volumes reads `window` "hu_ct": nnU-Net's CT normalisation with the `normalisation` figures
    stored beside its checkpoint (medpipe.transforms.ct_intensity.hu_model_slices, as in its training), no CLAHE. The
    two go together: figures with another window, or "hu_ct" without figures, are refused in one line, since either
    would feed the model intensities it never saw.
    """

    def __init__(
        self,
        network: torch.nn.Module,
        image_size: int,
        inferer: Any = None,
        window: str | Sequence[float] = "lung",
        slice_size: int = 256,
        clip_limit: float = 7.0,
        batch_size: int = 32,
        label_names: Mapping[int, str] | None = None,
        write_dicom_seg: bool = True,
        keep_components: int = 2,
        info: dict[str, Any] | None = None,
        input_guard: Any = None,
        context_slices: int = 1,
        min_infection_fraction: float = 0.0,
        normalisation: Mapping[str, Any] | None = None,
        min_infection_lung_fraction: float = 0.0,
        infection_probability: Sequence[float] | str | None = None,
    ) -> None:
        self.network, self.image_size, self.inferer = network, image_size, inferer
        self.window = window if isinstance(window, str) else (float(window[0]), float(window[1]))
        if isinstance(self.window, str) and self.window not in (*MINMAX_MODES, *ct.WINDOWS, HU_CT):
            raise MedpipeError(f"window {self.window!r}: use one of {', '.join((*ct.WINDOWS, *MINMAX_MODES, HU_CT))} "
                               "or a [level, width] pair")  # fmt: skip
        if normalisation is not None and self.window != HU_CT:
            raise MedpipeError(f"window {self.window!r}: this model was trained on HU volumes and reads their stored "
                               f"normalisation; use --window {HU_CT}")  # fmt: skip
        if self.window == HU_CT and normalisation is None:
            raise MedpipeError(f"window {HU_CT}: the checkpoint has no HU normalisation figures beside it "
                               "(model.normalisation.json): it was trained on the PNG slices; use another window")
        self.normalisation = None if normalisation is None else check_normalisation(dict(normalisation),
                                                                                    "normalisation")  # fmt: skip
        if not is_hounsfield(self.normalisation):
            channel = self.normalisation.get("channel", "?") if self.normalisation else "?"
            raise MedpipeError(f"this model was trained on the '{channel}' channel of its data set, not on CT in HU: "
                               "it cannot segment CT series; evaluate it on its own data set (`medpipe run "
                               "covid_ct_seg evaluate --dataset_dir ...`)")  # fmt: skip
        if not isinstance(self.window, str):
            ct.window(np.zeros(1, np.float32), self.window)  # a bad width fails here, in one line, not mid-run
        self.slice_size, self.clip_limit, self.batch_size = slice_size, clip_limit, batch_size
        self.label_names = dict(label_names or {1: "lung (not infected)", 2: "COVID-19 infection"})
        self.write_dicom_seg, self.keep_components, self.info = write_dicom_seg, keep_components, info or {}
        self.input_guard = input_guard  # an InputGuard('ct'): flags volumes that do not look like chest CT
        self.context_slices = check_context_slices(context_slices)  # 2.5-D: neighbours as channels
        self.min_infection_fraction = check_fraction(min_infection_fraction)
        self.min_infection_lung_fraction = check_lung_fraction(min_infection_lung_fraction)
        self.infection_probability = check_coefficients(infection_probability)

    def segment(self, volume: Volume, name: str = "volume") -> np.ndarray:
        """uint8 label mask on the volume's own grid."""
        return self.segment_slices(volume, name)[0]

    def segment_slices(self, volume: Volume, name: str = "volume") -> tuple[np.ndarray, np.ndarray]:
        """The label mask and, per axial slice, its infection / lung fraction before the slice gate (what the
        gate and the infection probability read)."""
        check_axial_ct(volume, name)
        if self.normalisation is not None:  # a model trained on HU volumes: their input, at the model's size
            slices = hu_model_slices(volume, self.normalisation, self.image_size)
        else:
            slices = ct_to_model_slices(volume, self.window, self.slice_size, self.clip_limit)
        probs = predict_slices(
            slices, self.network, self.inferer, self.image_size, self.batch_size, self.context_slices
        )
        mask = ct.reassemble(list(probs), volume.array.shape, volume.affine)
        axis = ct.axial_axis(volume.affine)
        mask = keep_lung_components(mask, self.keep_components, volume.array, axis) if self.keep_components else mask
        mask = relabel_small_components(mask, self.min_infection_fraction, axis=axis)
        fractions = slice_infection_fractions(mask, axis)
        return gate_infection_slices(mask, self.min_infection_lung_fraction, axis), fractions

    def volume_report(
        self, mask: np.ndarray, volume: Volume, fractions: np.ndarray | None = None
    ) -> dict[str, Any]:
        """Lung (label >= 1) and infection (label 2) volumes in mL, the percent of lung involved, the slices with
        infection and the finding in words; with `infection_probability`, the calibrated probability of infection
        per slice (from `fractions`, segment_slices' second value) and the highest one."""
        ml = ct.label_volumes_ml(mask, volume.affine, labels=[1, 2])
        lung, infection = ml[1] + ml[2], ml[2]
        right, left = lung_sides_ml(mask, volume)
        with_infection = int((slice_infection_fractions(mask, ct.axial_axis(volume.affine)) > 0).sum())
        slices = int(mask.shape[ct.axial_axis(volume.affine)])
        entry: dict[str, Any] = {
            "lung_volume_ml": round(lung, 2),
            "lung_right_ml": round(right, 2),
            "lung_left_ml": round(left, 2),
            "infection_volume_ml": round(infection, 2),
            "infection_percent_of_lung": round(100.0 * infection / lung, 3) if lung > 0 else None,
            # no lung: nothing was read, so nothing is said about infection (not "no infection detected")
            "infection_detected": with_infection > 0 if lung > 0 else None,
            "infection_slices": with_infection,
            "finding": (f"infection on {with_infection} of {slices} slices" if with_infection
                        else "no infection detected" if lung > 0 else "no lung found: infection not assessed"),
        }  # fmt: skip
        if self.infection_probability is not None and fractions is not None:
            probabilities = slice_probabilities(fractions, self.infection_probability)
            entry["infection_probability_max"] = round(float(probabilities.max(initial=0.0)), 4)
            entry["slice_infection_probability"] = [round(float(p), 4) for p in probabilities]
        return entry

    def __call__(
        self, inputs: str | Path | Sequence[str | Path], output_dir: str | Path,
        output_names: Sequence[str] | None = None,
    ) -> dict[str, Any]:  # fmt: skip
        """Segment every input (a DICOM series folder or a NIfTI file); write masks and `<output_dir>/report.json`.

        `output_names`: the inputs' file stems, when they were planned over a larger set (output_stems) of which
        these inputs are a part (medpipe.bundle.archive); default planned over these inputs."""
        paths = [Path(p) for p in path_list(inputs)]  # `--input 123` (a folder named 123) arrives as a number
        if not paths:
            raise MedpipeError("no input volumes given: pass --input <DICOM series folder or .nii.gz>")
        stems = output_stems(paths) if output_names is None else [str(n) for n in path_list(output_names)]
        if len(stems) != len(paths):
            raise MedpipeError(f"output_names gives {len(stems)} name(s) for {len(paths)} input(s)")
        out_dir = Path(output_dir)
        # load and check everything first, so a bad input stops the run before anything is written
        volumes = [(path, ct.load_volume(path)) for path in paths]
        seg_blockers: dict[Path, str | None] = {}
        for path, volume in volumes:
            check_axial_ct(volume, str(path))
            if self.write_dicom_seg and volume.source_files:
                seg_blockers[path] = dicom_seg.volume_seg_blocker(volume)
        entries = []
        with staged_outputs(out_dir, "the segmentation outputs", last=(REPORT,)) as staging:
            for (path, volume), stem in zip(volumes, stems, strict=True):
                entries.append(self._segment_and_write(path, volume, staging, seg_blockers.get(path), stem))
            header, _ = split_report(self._report([]))
            atomic_write_text(staging / REPORT, join_report(header, entries))
        return self._report(entries)

    def _segment_and_write(
        self, path: Path, volume: Volume, out_dir: Path, seg_blocker: str | None, stem: str | None = None
    ) -> dict[str, Any]:
        """Segment one volume, write its masks (and DICOM-SEG) into `out_dir` named `<stem>_…`; return its report
        entry."""
        started, stem = time.perf_counter(), stem or _stem(path)
        mask, fractions = self.segment_slices(volume, str(path))
        files: dict[str, Path] = {}
        for key, values in (("seg", mask), ("lung", mask >= 1), ("infection", mask == 2)):
            target = out_dir / f"{stem}_{key}.nii.gz"
            files[key] = _write(target.name, partial(ct.write_mask_nifti, values, volume.affine, target))
        warnings = []
        if self.input_guard is not None:  # one verdict per series, from central slices in the lung window
            window = "lung" if self.window in (*MINMAX_MODES, HU_CT) else self.window
            planes = ct_route_planes(volume, window, self.slice_size)  # as the guard is fitted on real series
            _, guard = self.input_guard.check_volume(planes, str(path))
            if guard != OK:
                warnings.append(guard)
        if self.write_dicom_seg and volume.source_files:
            if seg_blocker:
                warnings.append(f"no DICOM-SEG: {seg_blocker}")
                logger.warning(f"{path}: {warnings[-1]}")
            else:
                target = out_dir / f"{stem}_seg.dcm"
                write = partial(
                    dicom_seg.write_dicom_seg, mask, volume, target, labels=self.label_names, algorithm="covid_ct_seg"
                )
                files["dicom_seg"] = _write(target.name, write)
        entry = {
            "input": str(path),
            "shape": list(volume.array.shape),
            "spacing_mm": [round(s, 4) for s in volume.spacing],
            **self.volume_report(mask, volume, fractions),
            "files": {k: Path(v).name for k, v in files.items()},
            "seconds": round(time.perf_counter() - started, 2),
        }
        if warnings:
            entry["warnings"] = warnings
        logger.info(f"{path}: lung {entry['lung_volume_ml']} mL, infection {entry['infection_volume_ml']} mL "
                    f"({entry['finding']})")
        return entry

    def _postprocessing_steps(self) -> list[str]:
        steps = []
        if self.keep_components:
            steps.append(f"lung labels kept in the {self.keep_components} largest 3-D components inside the patient")
        if self.min_infection_fraction:
            fraction = self.min_infection_fraction
            steps.append(f"infection components under {fraction:g} of an axial slice's area relabelled lung")
        if self.min_infection_lung_fraction:
            steps.append(f"infection of a slice where it covers under {self.min_infection_lung_fraction:g} of the "
                         "slice's lung relabelled lung")  # fmt: skip
        if self.infection_probability is not None:
            intercept, slope = self.infection_probability
            steps.append(f"probability of infection per slice 1 / (1 + exp(-({intercept:.4g} + {slope:.4g} * "
                         "log10(infection / lung + 1e-4))))")  # fmt: skip
        return steps

    def _intensity_steps(self) -> str:
        """The input pipeline in words, up to the model's grid."""
        if self.normalisation is not None:
            figures = self.normalisation
            return (f"HU clipped to [{figures['clip_low']:g}, {figures['clip_high']:g}], minus {figures['mean']:g}, "
                    f"divided by {figures['std']:g} (nnU-Net CT normalisation, fitted on the training foreground) -> "
                    f"axial slices resized to the model's {self.image_size}x{self.image_size}")  # fmt: skip
        return (
            (f"HU {self.window} (below {AIR_HU:g} as {AIR_HU:g})" if self.window in MINMAX_MODES
             else f"HU window {self.window}")  # fmt: skip
            + f" -> [0, 1] -> {self.slice_size}x{self.slice_size} axial slices -> 8-bit -> "
            f"CLAHE (clip {self.clip_limit}, 8x8 tiles) -> model at {self.image_size}x{self.image_size}"
        )

    def _report(self, entries: list[dict[str, Any]]) -> dict[str, Any]:
        """report.json: run info, labels, the preprocessing in words, and one entry per volume."""
        return {
            **self.info,
            "labels": {"0": "background", **{str(k): v for k, v in self.label_names.items()}},
            "preprocessing": (
                self._intensity_steps()
                + (f" with {self.context_slices} neighbouring slices as channels" if self.context_slices > 1 else "")
                + "; "
                "probabilities resized back to the native grid, argmax; "
                + "; ".join(self._postprocessing_steps() or ["no post-processing"])
            ),
            **({"normalisation": self.normalisation} if self.normalisation is not None else {}),
            "volumes": entries,
        }
