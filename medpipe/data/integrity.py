"""A segmentation data set brought by the user, checked before anything trains on it (`medpipe dataset check`).

In the spirit of nnU-Net's `--verify_dataset_integrity`: every case's images and label are read (NIfTI with nibabel,
NRRD / MetaImage with ITK, through `medpipe.io.ct`) and checked against each other and against `dataset.json`. Each
problem is one line naming the case and the file; the summary says what the set holds (cases, labels and their voxel
counts, spacings, orientations, intensity range). Three layouts (docs/datasets.md):

- `nnunet`: nnU-Net v2 raw, `imagesTr/<case>_<XXXX><ending>`, `labelsTr/<case><ending>`, `dataset.json` with
  `channel_names`, `labels` (name -> value), `numTraining`, `file_ending`;
- `msd`: a Medical Segmentation Decathlon / MONAI datalist, `dataset.json` with `training: [{image, label}]` (paths
  relative to the folder) and `labels` (value -> name);
- `dicom_seg`: no dataset.json; one folder per case holding a DICOM series and one DICOM-SEG of it (PACS, 3D Slicer,
  OHIF exports), label value = segment number, label name = SegmentLabel (medpipe.io.dicom_seg_read).
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from medpipe.errors import MedpipeError

LAYOUTS = ("nnunet", "msd", "dicom_seg")
DICOM_SEG = "dicom_seg"
NIFTI_ENDINGS = (".nii.gz", ".nii")
# geometry tolerances: nnU-Net compares spacing, origin and direction with np.allclose; an absolute 1e-4 mm on top of
# its relative 1e-5 lets float32 NIfTI headers of the same grid agree
RTOL = 1e-5
ATOL = 1e-4


@dataclass
class Case:
    """One training case: its image files (one per channel, in channel order) and its label file."""

    name: str
    images: list[Path]
    label: Path | None
    shape: tuple[int, ...] | None = None  # the images' grid and RAS affine, once read
    affine: np.ndarray | None = None
    patient: str = ""  # when the data set names the case's patient (DICOM PatientID, an MSD entry's `patient`)


@dataclass
class Report:
    """What `check_dataset` found: the problems (each one line) and the summary of what the data set holds."""

    root: Path
    layout: str
    cases: list[Case] = field(default_factory=list)
    test_images: int = 0
    channels: dict[str, str] = field(default_factory=dict)  # channel index ("0") -> name
    labels: dict[int, str] = field(default_factory=dict)  # declared label value -> name
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # the label map onto a bundle's classes
    class_values: dict[int, int] = field(default_factory=dict)  # label value -> the bundle's class index
    voxels: Counter = field(default_factory=Counter)  # label value -> voxels over all cases
    label_cases: Counter = field(default_factory=Counter)  # label value -> cases holding it
    spacings: Counter = field(default_factory=Counter)  # rounded image spacing -> cases
    orientations: Counter = field(default_factory=Counter)  # axis codes ("LPS") -> cases
    intensity: list[float] = field(default_factory=list)  # [min, max] of the finite image voxels

    @property
    def ok(self) -> bool:
        return not self.problems


# ------------------------------------------------------------------------------------------------------- the check


def check_dataset(
    root: str | Path, layout: str | None = None, bundle_classes: dict[str, Any] | None = None,
    label_map: dict[str, list[str]] | None = None, absent: Sequence[str] = (),
) -> Report:
    """Check the data set in folder `root`; `bundle_classes` (from `bundle_classes()`) also maps its labels, with
    the bundle's structures named in `absent` declared missing from the whole data set (see map_labels).

    Raises MedpipeError only when the folder cannot be checked at all (no folder, no or unreadable dataset.json,
    unknown layout); every problem of the data itself is a line of `Report.problems`.
    """
    root = Path(root).resolve()  # MSD paths are resolved against it ("./imagesTr/x.nii.gz")
    if not root.is_dir():
        raise MedpipeError(f"{root}: no such folder (give the data set's folder, the one holding dataset.json)")
    if layout is None and not (root / "dataset.json").is_file() and has_dicom_seg_cases(root):
        layout = DICOM_SEG
    if layout is not None and layout not in LAYOUTS:
        raise MedpipeError(f"--layout {layout}: unknown layout; use one of {', '.join(LAYOUTS)}")
    description = {} if layout == DICOM_SEG else _read_json(root / "dataset.json")
    layout = detect_layout(root, description) if layout is None else layout
    report = Report(root, layout)
    if layout == "nnunet":
        _read_nnunet(root, description, report)
    elif layout == "msd":
        _read_msd(root, description, report)
    else:
        _read_dicom_seg(root, report)
    for case in report.cases:
        _check_case(case, report)
    if bundle_classes is not None:
        map_labels(report, bundle_classes, label_map or {}, absent)
    return report


def detect_layout(root: Path, description: dict[str, Any]) -> str:
    """`nnunet` when dataset.json has nnU-Net v2's keys, `msd` when it lists `training` cases."""
    if "channel_names" in description or "file_ending" in description:
        return "nnunet"
    if "training" in description:
        return "msd"
    raise MedpipeError(
        f"{root / 'dataset.json'}: neither nnU-Net v2 (channel_names, file_ending) nor MSD (training); "
        "see docs/datasets.md"
    )


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise MedpipeError(f"{path.parent}: no dataset.json, nor case folders holding a DICOM-SEG (see "
                           "docs/datasets.md for the layouts medpipe reads)")
    try:
        description = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise MedpipeError(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(description, dict):
        raise MedpipeError(f"{path}: expected a JSON object, got {type(description).__name__}")
    return description


def _volume_files(folder: Path) -> list[Path]:
    """The visible files of `folder` (macOS `._` resource forks and dot files left out), sorted."""
    return sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")) if folder.is_dir() else []


def _rel(report: Report, path: Path) -> str:
    try:
        return str(path.relative_to(report.root))
    except ValueError:
        return str(path)


# ------------------------------------------------------------------------------------------------------- nnU-Net v2


def _read_nnunet(root: Path, description: dict[str, Any], report: Report) -> None:
    missing = [k for k in ("channel_names", "labels", "numTraining", "file_ending") if k not in description]
    if missing:
        raise MedpipeError(f"{root / 'dataset.json'}: nnU-Net v2 needs {', '.join(missing)} (see docs/datasets.md)")
    channels, ending = description["channel_names"], description["file_ending"]
    if not isinstance(channels, dict) or not channels or not isinstance(ending, str):
        raise MedpipeError(f"{root / 'dataset.json'}: channel_names must map '0' to a name; file_ending a string")
    report.channels = {str(k): str(v) for k, v in channels.items()}
    report.labels = _nnunet_labels(root, description["labels"], report)
    if not ending.startswith(".") or not ending.endswith((*NIFTI_ENDINGS, *_itk_endings())):
        report.problems.append(f"dataset.json: file_ending '{ending}' is not a 3-D volume format medpipe reads "
                               f"({', '.join((*NIFTI_ENDINGS, *_itk_endings()))})")
    try:
        indexes = sorted(int(k) for k in report.channels)
    except ValueError:
        raise MedpipeError(f"{root / 'dataset.json'}: channel_names keys must be numbers ('0', '1', …)") from None
    for folder in ("imagesTr", "labelsTr"):
        if not (root / folder).is_dir():
            raise MedpipeError(f"{root}: no {folder}/ folder (nnU-Net v2 raw layout, see docs/datasets.md)")

    # a file with another ending is refused once; its case still counts as present, and is not read
    wrong_ending: set[str] = set()
    labels: dict[str, Path | None] = {}
    for path in _volume_files(root / "labelsTr"):
        if not path.name.endswith(ending):
            report.problems.append(f"{_rel(report, path)}: wrong file ending (dataset.json file_ending is '{ending}')")
            wrong_ending.add(_case_name(path))
            labels[_case_name(path)] = None
        else:
            labels[path.name[: -len(ending)]] = path
    images: dict[str, dict[int, Path | None]] = {}
    pattern = re.compile(rf"^(?P<case>.+)_(?P<channel>\d{{4}}){re.escape(ending)}$")
    for path in _volume_files(root / "imagesTr"):
        match = pattern.match(path.name) or re.match(r"^(?P<case>.+)_(?P<channel>\d{4})$", _case_name(path))
        if not path.name.endswith(ending):
            report.problems.append(f"{_rel(report, path)}: wrong file ending (dataset.json file_ending is '{ending}')")
            if match is not None:
                wrong_ending.add(match["case"])
                images.setdefault(match["case"], {})[int(match["channel"])] = None
        elif match is None:
            report.problems.append(f"{_rel(report, path)}: not named <case>_<XXXX>{ending} (XXXX: channel, 0000 …)")
        elif int(match["channel"]) not in indexes:
            report.problems.append(f"{_rel(report, path)}: channel {int(match['channel'])} is not in dataset.json "
                                   f"channel_names ({', '.join(map(str, indexes))})")
        else:
            images.setdefault(match["case"], {})[int(match["channel"])] = path
    for name in sorted(set(images) - set(labels)):
        report.problems.append(f"case {name}: imagesTr/{name}_*{ending} has no label labelsTr/{name}{ending}")
    for name in sorted(labels):
        found = images.get(name, {})
        absent = [i for i in indexes if i not in found]
        for i in absent:
            report.problems.append(f"case {name}: imagesTr/{name}_{i:04d}{ending} missing (channel {i} "
                                   f"'{report.channels[str(i)]}')")
        label = labels[name]
        if not absent and name not in wrong_ending and label is not None:
            report.cases.append(Case(name, [p for i in indexes if (p := found[i]) is not None], label))
    if description["numTraining"] != len(labels):
        report.problems.append(f"dataset.json: numTraining is {description['numTraining']} but labelsTr holds "
                               f"{len(labels)} case(s): a counted case has no files, or numTraining is stale")
    for path in _volume_files(root / "imagesTs"):
        if pattern.match(path.name) is None:
            report.problems.append(f"{_rel(report, path)}: not named <case>_<XXXX>{ending}")
        report.test_images += 1


def _nnunet_labels(root: Path, labels: Any, report: Report) -> dict[int, str]:
    """nnU-Net's `labels` (name -> value, or name -> [values] for a region) as value -> name."""
    if not isinstance(labels, dict):
        raise MedpipeError(f"{root / 'dataset.json'}: labels must map each name to a value, e.g. {{'background': 0}}")
    out: dict[int, str] = {}
    for name, value in labels.items():
        values = value if isinstance(value, list) else [value]
        if not values or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in values):
            raise MedpipeError(f"{root / 'dataset.json'}: label '{name}': {value!r} is not a whole number ≥ 0")
        if not isinstance(value, list):
            out[value] = str(name)
        else:  # a region (nnU-Net region-based training) is a set of the plain labels' values
            out.update({v: out.get(v, f"{name}[{v}]") for v in values})
    if out.get(0) is None:
        report.problems.append("dataset.json: labels declare no background 0 (nnU-Net needs 'background': 0)")
    if sorted(out) != list(range(len(out))):
        report.problems.append(f"dataset.json: label values {sorted(out)} are not consecutive 0, 1, 2, … "
                               "(nnU-Net requires it)")
    return dict(sorted(out.items()))


# ------------------------------------------------------------------------------------------------- MSD / datalist


def _read_msd(root: Path, description: dict[str, Any], report: Report) -> None:
    training = description.get("training")
    if not isinstance(training, list):
        raise MedpipeError(f"{root / 'dataset.json'}: 'training' must be a list of {{image, label}}")
    raw_labels = description.get("labels")
    if not isinstance(raw_labels, dict):
        raise MedpipeError(f"{root / 'dataset.json'}: 'labels' must map each value to a name ({{'0': 'background'}})")
    try:
        report.labels = dict(sorted((int(k), str(v)) for k, v in raw_labels.items()))
    except ValueError:
        raise MedpipeError(f"{root / 'dataset.json'}: MSD labels map values to names ('1': 'lung'); for name -> value "
                           "use the nnU-Net layout") from None
    # MSD's own lists name their channels under `modality`; without it the CT bundles take the one channel as CT (HU)
    report.channels = {str(k): str(v) for k, v in (description.get("modality") or {"0": "CT"}).items()}
    listed: set[Path] = set()
    for index, entry in enumerate(training):
        if not isinstance(entry, dict) or "image" not in entry or "label" not in entry:
            report.problems.append(f"dataset.json: training[{index}] is not {{'image': …, 'label': …}}")
            continue
        images = entry["image"] if isinstance(entry["image"], list) else [entry["image"]]
        paths = [(root / str(p)).resolve() for p in images]
        label = (root / str(entry["label"])).resolve()
        name = _case_name(paths[0])
        listed.update([*paths, label])
        gone = [p for p in [*paths, label] if not p.is_file()]
        if gone:  # one line for the case, naming each missing file
            report.problems.append(f"case {name}: {', '.join(_rel(report, p) for p in gone)} listed in dataset.json "
                                   f"training[{index}] but missing")
        if not gone:  # MONAI datalists may name the patient; folds keep a patient's cases together
            patient = entry.get("patient", entry.get("patient_id", ""))
            report.cases.append(Case(name, paths, label, patient=str(patient).strip() if patient else ""))
    if "numTraining" in description and description["numTraining"] != len(training):
        report.problems.append(f"dataset.json: numTraining is {description['numTraining']} but training lists "
                               f"{len(training)} case(s)")
    for item in description.get("test") or []:
        path = (root / str(item["image"] if isinstance(item, dict) else item)).resolve()
        listed.add(path)
        report.test_images += 1
        if not path.is_file():
            report.problems.append(f"test: {_rel(report, path)} listed in dataset.json but missing")
    folders = {p.parent for p in listed} | {root / "imagesTr", root / "labelsTr", root / "imagesTs"}
    for folder in sorted(f for f in folders if f != root):
        for path in _volume_files(folder):
            if path not in listed:
                report.problems.append(f"{_rel(report, path)}: not listed in dataset.json (training or test)")


# ------------------------------------------------------------------------------------ DICOM series + DICOM-SEG


def _case_folders(root: Path) -> list[Path]:
    return sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


def _seg_files(folder: Path) -> list[Path]:
    """The DICOM-SEG files anywhere under a case folder."""
    from medpipe.io.dicom_seg_read import is_seg_file

    return [p for p in sorted(folder.rglob("*")) if p.is_file() and not p.name.startswith(".") and is_seg_file(p)]


def has_dicom_seg_cases(root: Path) -> bool:
    """Whether some sub-folder of `root` holds a DICOM-SEG (the `dicom_seg` layout, detected without dataset.json)."""
    return any(_seg_files(folder) for folder in _case_folders(root))


def _read_dicom_seg(root: Path, report: Report) -> None:
    """One case per sub-folder: its DICOM series (read later by medpipe.io.dicom.load_series, which leaves the SEG
    out) and its one SEG. Label values are segment numbers and must name the same label in every case, as
    dataset.json's `labels` would."""
    from medpipe.io.dicom_seg_read import read_seg_header

    report.channels = {"0": "CT"}  # one series per case: the CT bundles read one channel
    report.labels = {0: "background"}
    first: dict[int, str] = {}  # segment number -> the case that named it first
    for folder in _case_folders(root):
        segs = _seg_files(folder)
        if len(segs) != 1:
            found = f"{len(segs)} ({', '.join(_rel(report, p) for p in segs)})" if segs else "no"
            report.problems.append(f"case {folder.name}: {found} DICOM-SEG file(s) in {folder.name}/; a case holds "
                                   "one SEG beside its series")  # fmt: skip
            continue
        try:
            header = read_seg_header(segs[0])
        except MedpipeError as exc:
            report.problems.append(f"case {folder.name}: {_rel(report, segs[0])}: {str(exc).split(': ', 1)[-1]}")
            continue
        clash = [n for n, name in header.segments.items() if n in first and _norm(report.labels[n]) != _norm(name)]
        if clash:
            n = clash[0]
            report.problems.append(f"case {folder.name}: {_rel(report, segs[0])}: segment {n} is "
                                   f"'{header.segments[n]}', in case {first[n]} '{report.labels[n]}'; a segment "
                                   "number must name one label in every case")  # fmt: skip
            continue
        for number, name in header.segments.items():
            report.labels.setdefault(number, name)
            first.setdefault(number, folder.name)
        report.cases.append(Case(folder.name, [folder], segs[0], patient=header.patient_id))
    if not report.cases and not report.problems:
        report.problems.append(f"{root}: no case folder holding a DICOM series and its DICOM-SEG")
    report.labels = dict(sorted(report.labels.items()))


def _case_name(path: Path) -> str:
    for ending in (*NIFTI_ENDINGS, *_itk_endings()):
        if path.name.endswith(ending):
            return path.name[: -len(ending)]
    return path.stem


# ------------------------------------------------------------------------------------------------- reading, checks


def _itk_endings() -> tuple[str, ...]:
    from medpipe.io.ct import ITK_VOLUME_ENDINGS

    return ITK_VOLUME_ENDINGS


def read_volume(path: Path, folder: bool = False) -> Any:
    """A volume file (or, `folder`, a DICOM series folder) as `medpipe.io.dicom.Volume` (array indexed i, j, k and a
    RAS affine) whatever its format."""
    from medpipe.io.ct import load_volume

    if path.is_dir() and not folder:
        raise MedpipeError(f"{path}: a folder, not a volume file")
    return load_volume(path)


def _read(path: Path, case: Case, report: Report) -> Any:
    try:
        return read_volume(path, folder=report.layout == DICOM_SEG)
    except MedpipeError as exc:
        report.problems.append(f"case {case.name}: {_rel(report, path)}: unreadable ({str(exc).split(': ', 1)[-1]})")
        return None


def _geometry_problems(reference: Any, other: Any, what: str) -> list[str]:
    """Shape, spacing, origin and direction of `other` against `reference`, as nnU-Net compares them."""
    if reference.array.shape != other.array.shape:
        return [f"shape {other.array.shape} differs from the {what}'s {reference.array.shape}"]
    found = []
    spacing_a, spacing_b = np.asarray(reference.spacing), np.asarray(other.spacing)
    if not np.allclose(spacing_a, spacing_b, rtol=RTOL, atol=ATOL):
        found.append(f"spacing {_spacing_text(spacing_b)} mm differs from the {what}'s {_spacing_text(spacing_a)}")
    if not np.allclose(reference.affine[:3, 3], other.affine[:3, 3], rtol=RTOL, atol=ATOL):
        found.append(f"origin {np.round(other.affine[:3, 3], 3).tolist()} mm (RAS) differs from the {what}'s "
                     f"{np.round(reference.affine[:3, 3], 3).tolist()}")
    direction_a, direction_b = reference.affine[:3, :3] / spacing_a, other.affine[:3, :3] / spacing_b
    if not np.allclose(direction_a, direction_b, rtol=RTOL, atol=ATOL):
        found.append(f"direction {_axcodes(other.affine)} {np.round(direction_b, 3).tolist()} differs from the "
                     f"{what}'s {_axcodes(reference.affine)} {np.round(direction_a, 3).tolist()}")
    return found


def _check_case(case: Case, report: Report) -> None:
    images = [_read(p, case, report) for p in case.images]
    seg = report.layout == DICOM_SEG  # its label is placed on the image's series grid, so read once the image is
    label = _read(case.label, case, report) if case.label is not None and not seg else None
    if any(v is None for v in images):
        return
    first = images[0]
    if seg and case.label is not None:
        from medpipe.io.ct import load_label

        try:
            label = load_label(case.label, first)
        except MedpipeError as exc:
            report.problems.append(f"case {case.name}: {_rel(report, case.label)}: {str(exc).split(': ', 1)[-1]}")
    for path, volume in zip(case.images, images, strict=True):
        finite = np.isfinite(volume.array)
        if not finite.all():
            nan = int(np.isnan(volume.array).sum())
            report.problems.append(f"case {case.name}: {_rel(report, path)}: {nan} NaN and "
                                   f"{int((~finite).sum()) - nan} infinite voxels")
        if finite.any():
            lo, hi = float(volume.array[finite].min()), float(volume.array[finite].max())
            report.intensity = [min(report.intensity[0], lo), max(report.intensity[1], hi)] if report.intensity \
                else [lo, hi]
        if volume is not first:
            for problem in _geometry_problems(first, volume, f"channel 0 image {case.images[0].name}"):
                report.problems.append(f"case {case.name}: {_rel(report, path)}: {problem}")
    case.shape, case.affine = tuple(first.array.shape), np.asarray(first.affine, dtype=float)
    report.spacings[_spacing_text(first.spacing)] += 1
    report.orientations[_axcodes(first.affine)] += 1
    if label is None:
        return
    where = f"case {case.name}: {_rel(report, case.label)}"
    geometry = _geometry_problems(first, label, f"image {case.images[0].name}")
    report.problems.extend(f"{where}: {problem}" for problem in geometry)
    array = label.array
    if not np.issubdtype(array.dtype, np.integer):
        whole = np.isfinite(array) & (array == np.round(array))
        if not whole.all():
            report.problems.append(f"{where}: label not integer-valued ({int((~whole).sum())} voxels like "
                                   f"{array[~whole].flat[0]!r})")
            return
        array = array.astype(np.int64)
    values, counts = np.unique(array, return_counts=True)
    undeclared = [int(v) for v in values if int(v) not in report.labels]
    if undeclared:
        report.problems.append(f"{where}: label values {undeclared} not declared in dataset.json labels "
                               f"(declared {sorted(report.labels)})")
    for value, count in zip(values.tolist(), counts.tolist(), strict=True):
        report.voxels[int(value)] += int(count)
        report.label_cases[int(value)] += 1


def _spacing_text(spacing: Any) -> str:
    return " × ".join(f"{float(s):.3f}" for s in spacing)


def _axcodes(affine: np.ndarray) -> str:
    import nibabel as nib

    return "".join(c or "?" for c in nib.aff2axcodes(affine))


# ------------------------------------------------------------------------------------------ a bundle's classes


def bundle_classes(bundle_dir: str | Path) -> dict[str, Any]:
    """A segmentation bundle's classes from its train.json: `class_names` (index -> name) and `structures`
    (name -> class indexes, e.g. covid_ct_seg's lung = [1, 2], infection = [2])."""
    bundle_dir = Path(bundle_dir)
    config = _read_json(bundle_dir / "configs" / "train.json")
    return classes_of(bundle_dir.name, config.get("class_names"), config.get("structures"))


def classes_of(bundle: str, class_names: Any, structures: Any) -> dict[str, Any]:
    """{name, class_names, structures} as `bundle_classes` gives it, from the values themselves (a running config's
    `@class_names`, `@structures`)."""
    names, structures = class_names, structures or {}
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names) or not isinstance(structures, dict):
        raise MedpipeError(f"bundle {bundle}: train.json declares no class_names list; it is not a "
                           "segmentation bundle `dataset check --bundle` can map labels onto")
    if not structures:  # a plain segmentation bundle: one structure per foreground class
        structures = {n: [i] for i, n in enumerate(names) if i > 0}
    structures = {str(k): [int(i) for i in v] for k, v in structures.items()}
    return {"name": bundle, "class_names": list(names), "structures": structures}


def _norm(name: str) -> str:
    return re.sub(r"[\s_\-]+", "_", name.strip().lower())


def parse_label_map(value: Any) -> dict[str, list[str]]:
    """`--label_map '{"lung": ["left lung", "right lung"]}'`: bundle class or structure -> the data set's label names.

    fire hands over a dict when the text is a Python/JSON literal, the raw string otherwise; None or "": no map."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return {}
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as exc:
            raise MedpipeError(f"--label_map: not JSON ({exc}); e.g. '{{\"lung\": [\"left lung\"]}}'") from None
    if not isinstance(value, dict) or not all(
        isinstance(v, (str, list)) and all(isinstance(n, str) for n in ([v] if isinstance(v, str) else v))
        for v in value.values()
    ):
        raise MedpipeError("--label_map: give a JSON object of bundle class -> [label names of the data set]")
    return {str(k): [v] if isinstance(v, str) else list(v) for k, v in value.items()}


def parse_names(value: Any) -> list[str]:
    """`--absent_structures infection` or `lung,infection` (or a list, as python-fire may hand it over)."""
    if value is None:
        return []
    items = value if isinstance(value, (list, tuple)) else str(value).split(",")
    return [str(v).strip() for v in items if str(v).strip()]


def map_labels(
    report: Report, classes: dict[str, Any], label_map: dict[str, list[str]], absent: Sequence[str] = ()
) -> None:
    """Map the data set's label names onto the bundle's classes and structures, by name or by `label_map`, and
    record each label value's class index (`report.class_values`).

    Each of the bundle's structures must receive a label, unless `absent` names it: the user says the data set holds
    none of it (a lung-only set of scans without COVID-19: infection absent, so its lung is lung not infected). Each
    foreground label must land on some class (or on `background` when the map says so); anything else is a problem
    naming the labels that are missing."""
    bundle = classes["name"]
    targets = {_norm(n): n for n in [*classes["class_names"], *classes["structures"]]}
    declared = {_norm(name): value for value, name in report.labels.items()}
    unknown = [name for name in absent if _norm(name) not in {_norm(s) for s in classes["structures"]}]
    if unknown:
        raise MedpipeError(f"--absent_structures: '{unknown[0]}' is not a structure of {bundle} "
                           f"({', '.join(classes['structures'])})")
    mapped: dict[int, str] = {}
    for target, names in label_map.items():
        if _norm(target) not in targets:
            raise MedpipeError(f"--label_map: '{target}' is not a class of {bundle} "
                               f"({', '.join(sorted(set(targets.values())))})")
        for name in names:
            if _norm(name) not in declared:
                raise MedpipeError(f"--label_map: '{name}' is not a label of the data set "
                                   f"({', '.join(report.labels.values())})")
            mapped[declared[_norm(name)]] = targets[_norm(target)]
    for value, name in report.labels.items():
        if value not in mapped and (value == 0 or _norm(name) in targets):
            mapped[value] = "background" if value == 0 else targets[_norm(name)]
    for value, name in report.labels.items():
        if value not in mapped:
            report.problems.append(f"label '{name}' ({value}) maps onto no class of {bundle} "
                                   f"({', '.join(classes['structures'])}); name it in --label_map")
    index = {_norm(n): i for i, n in enumerate(classes["class_names"])}
    owned = {}  # structure -> the class indexes only it covers (lung: [1, 2] less infection's [2] = {1})
    for structure, members in classes["structures"].items():
        own = set(members) - {i for s, m in classes["structures"].items() if s != structure for i in m}
        owned[_norm(structure)] = own
        sources = [f"{report.labels[v]} ({v})" for v, t in mapped.items()
                   if _norm(t) == _norm(structure) or index.get(_norm(t)) in own]
        is_absent = _norm(structure) in {_norm(a) for a in absent}
        if is_absent and sources:
            report.problems.append(f"--absent_structures names '{structure}', but label(s) {', '.join(sources)} "
                                   "map onto it: drop it from --absent_structures")
        elif is_absent:
            report.notes.append(f"{bundle} {structure} <- none: declared absent (--absent_structures)")
            continue
        report.notes.append(f"{bundle} {structure} <- {', '.join(sources) if sources else 'missing'}")
        if not sources:
            report.problems.append(f"{bundle} class '{structure}' has no label in this data set (missing: "
                                   f"{structure}); map one with --label_map '{{\"{structure}\": [\"…\"]}}', or "
                                   f"declare it absent with --absent_structures {structure}")
    for value, target in mapped.items():
        if _norm(target) in index:
            report.class_values[value] = index[_norm(target)]
        elif len(owned[_norm(target)]) == 1:  # a structure stands for the one class only it covers
            report.class_values[value] = next(iter(owned[_norm(target)]))
        else:
            report.problems.append(f"label '{report.labels[value]}' ({value}) maps onto {bundle} structure "
                                   f"'{target}', which does not say which of its classes {sorted(owned[_norm(target)])}"
                                   " a voxel is: map it onto a class")


# ----------------------------------------------------------------------------------------------------- the summary


def fold_groups(report: Report) -> str:
    """How folds keep cases together: by patient where the data set names them, else each case alone."""
    named = [c for c in report.cases if c.patient]
    if not named:
        return "by case (the data set names no patients)"
    patients = {c.patient for c in named}
    alone = len(report.cases) - len(named)
    return (f"by patient: {len(patients)} patient(s) over {len(named)} case(s)"
            + (f", {alone} case(s) without a patient each alone" if alone else ""))


def format_report(report: Report) -> str:
    """The problems (one line each) and the summary table."""
    lines = [f"error: {p}" for p in report.problems]
    layout = {"nnunet": "nnU-Net v2 raw", "msd": "MSD / MONAI datalist",
              DICOM_SEG: "DICOM series + DICOM-SEG"}[report.layout]  # fmt: skip
    lines += [
        f"data set      {report.root} ({layout})",
        f"cases         {len(report.cases)} training (read), {report.test_images} test image(s)",
        f"channels      {', '.join(f'{k}: {v}' for k, v in report.channels.items())}",
        f"folds group   {fold_groups(report)}",
        "labels        value  name                  cases  voxels",
    ]
    for value in sorted(set(report.labels) | set(report.voxels)):
        name = report.labels.get(value, "(not declared)")
        lines.append(f"              {value:>5}  {name:<20}  {report.label_cases[value]:>5}  {report.voxels[value]:,}")
    for title, counts in (("spacing (mm)", report.spacings), ("orientation", report.orientations)):
        lines.append(f"{title:<14}" + "; ".join(f"{k} ({n} case{'s' * (n != 1)})" for k, n in counts.items()))
    if report.intensity:
        lines.append(f"intensity     {report.intensity[0]:g} … {report.intensity[1]:g}")
    lines += [f"label map     {note}" for note in report.notes]
    lines.append(f"result        {'ok' if report.ok else f'{len(report.problems)} problem(s)'}")
    return "\n".join(lines)
