"""Wrong-input guard: does this picture look like the kind of image the bundle was trained on?

Method: a three-class logistic regression ("brain_mri", "chest_xray", "ct") on cheap image features: the image as
every bundle loads it (grey, min-max [0, 1]), histogram-equalised and box-downsampled to 32x32 whatever its aspect
ratio, plus a 16-bin intensity histogram. Why not a distance in the network's feature space: this needs no hook
into each network, no per-bundle threshold and no training-set features shipped with the weights; it costs a
resize and a 1040x3 dot product per image; one ~20 KB coefficient file serves every bundle and is refitted in
seconds from the shared data sets (`medpipe guard fit`, medpipe.inference.guard_fit). Its limit: it knows three
modalities, so a photograph or a knee X-ray is judged by which of the three it resembles most. A case is flagged
when P(expected modality) < MIN_PROBABILITY.

The coefficient file (`input_guard.npz`: numpy arrays, loaded without pickle) is fitted from the shared data sets
(`$MEDPIPE_DATA`) into the cache folder on first use, or by `medpipe guard fit`; it is never committed. A test checks
that refitting gives the same coefficients."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from medpipe.errors import MedpipeError

GUARD_FILE_NAME = "input_guard.npz"
# the fitting recipe (medpipe.inference.guard_fit), stamped in the file: a cached fit of an older recipe is refitted
# (2: the CT class also holds slices of the real CT series, rendered as the CT route renders them)
GUARD_RECIPE = "2"
MODALITIES = {"brain_mri": "a brain MRI", "chest_xray": "a chest X-ray", "ct": "a CT slice"}
WORK_SIZE = 128
THUMB = 32
HIST_BINS = 16
MIN_PROBABILITY = 0.5  # P(expected modality) below this flags the case
OK = "ok"
# a CT volume is judged as one case: the mean probabilities of this many slices spread over its central 20-80 %
# (where the development slices were cut), so one odd slice (a lung apex, the liver dome) does not decide alone
GUARD_SLICES = 5

log = logging.getLogger(__name__)


def _resize(grey: np.ndarray, width: int, height: int) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.fromarray(grey.astype(np.float32), mode="F").resize((width, height), Image.BOX))


def image_features(grey: np.ndarray) -> np.ndarray:
    """(THUMB*THUMB + HIST_BINS,) features of a grey [0, 1] image.

    The image is box-downsampled to at most WORK_SIZE px (aspect kept), histogram-equalised (rank / count) and
    box-downsampled to THUMB x THUMB (aspect dropped): equalising makes the picture's layout, not its windowing or
    contrast enhancement, decide (a HU-windowed DICOM CT and a CLAHE-enhanced CT PNG look alike). The 16-bin
    histogram of the unequalised image adds the intensity distribution."""
    grey = np.asarray(grey, dtype=np.float32)
    if grey.ndim != 2:
        raise ValueError(f"expected a 2-D grey image, got shape {grey.shape}")
    shrink = WORK_SIZE / max(grey.shape)
    if shrink < 1:
        grey = _resize(grey, max(2, int(grey.shape[1] * shrink)), max(2, int(grey.shape[0] * shrink)))
    ranks = np.argsort(np.argsort(grey, axis=None), axis=None).reshape(grey.shape) / max(1, grey.size - 1)
    thumb = _resize(ranks, THUMB, THUMB).astype(np.float64)
    hist = np.histogram(np.clip(grey, 0, 1), bins=HIST_BINS, range=(0.0, 1.0))[0] / grey.size
    return np.concatenate([thumb.reshape(-1), hist]).astype(np.float64)


def file_features(path: str | Path) -> np.ndarray:
    from medpipe.io.images import load_grey_2d

    return image_features(load_grey_2d(path))


def ct_route_planes(volume: Any, window: str | tuple[float, float] = "lung", size: int = 256) -> np.ndarray:
    """(N, size, size) axial slices of a CT volume in [0, 1] as the CT route shows them to the guard (and as the guard
    is fitted on real series): an HU window, display orientation (medpipe.io.ct)."""
    from medpipe.io import ct

    return ct.display_slices(ct.window(volume.array, window), volume.affine, size=size)


def central_slices(count: int, n: int = GUARD_SLICES) -> np.ndarray:
    """Indices of `n` slices evenly spread over the central 20-80 % of `count` slices (all of them when fewer)."""
    if count <= n:
        return np.arange(count)
    return np.unique(np.rint(np.linspace(0.2 * (count - 1), 0.8 * (count - 1), n)).astype(int))


def series_probabilities(model: ModalityModel, features: np.ndarray) -> np.ndarray:
    """(classes,) probabilities of a series from the (N, F) features of all its slices, in order: the mean over its
    central_slices."""
    return model.probabilities(features[central_slices(len(features))]).mean(axis=0)


class ModalityModel:
    """The fitted logistic regression, as plain arrays: standardise, dot product, softmax."""

    def __init__(self, classes: Sequence[str], mean: np.ndarray, scale: np.ndarray, coef: np.ndarray,
                 intercept: np.ndarray) -> None:  # fmt: skip
        self.classes = [str(c) for c in classes]
        self.mean, self.scale = np.asarray(mean, float), np.asarray(scale, float)
        self.coef, self.intercept = np.asarray(coef, float), np.asarray(intercept, float)
        if self.coef.shape != (len(self.classes), len(self.mean)) or self.intercept.shape != (len(self.classes),):
            raise ValueError(f"guard arrays do not fit {len(self.classes)} classes and {len(self.mean)} features")

    def probabilities(self, features: np.ndarray) -> np.ndarray:
        """(N, classes) modality probabilities for (N, F) features (or (F,) for one image)."""
        x = (np.atleast_2d(features) - self.mean) / self.scale
        z = x @ self.coef.T + self.intercept
        z -= z.max(axis=1, keepdims=True)
        e = np.exp(z)
        return e / e.sum(axis=1, keepdims=True)

    def save(self, path: str | Path, **meta: str) -> None:
        """Atomic .npz of the arrays (float32 is plenty) and string metadata, loadable without pickle."""
        from medpipe.files import atomic_write

        arrays = {name: getattr(self, name).astype(np.float32) for name in ("mean", "scale", "coef", "intercept")}
        arrays |= {"classes": np.array(self.classes), "meta": np.array(sorted(f"{k}={v}" for k, v in meta.items()))}

        def write(tmp: Path) -> None:
            with tmp.open("wb") as fh:  # a file object: np.savez would append .npz to a temporary name
                np.savez_compressed(fh, **arrays)

        atomic_write(Path(path), write)

    @classmethod
    def load(cls, path: str | Path | None = None) -> ModalityModel:
        """The given file, else the cached default, fitted from $MEDPIPE_DATA first if it is not there yet."""
        path = Path(path) if path else default_guard_file(fit_if_missing=True)
        try:
            with np.load(path, allow_pickle=False) as data:
                return cls(data["classes"].tolist(), data["mean"], data["scale"], data["coef"], data["intercept"])
        except (OSError, KeyError, ValueError) as exc:
            raise MedpipeError(
                f"cannot load the input guard '{path}' ({exc}): refit it with `medpipe guard fit`"
            ) from exc


def default_guard_file(fit_if_missing: bool = False) -> Path:
    """`<cache>/input_guard.npz`; with `fit_if_missing`, fitted there (~30 s, once per GUARD_RECIPE) from the shared
    data sets."""
    from medpipe.files import cache_dir

    path = cache_dir() / GUARD_FILE_NAME
    if not fit_if_missing or _current_recipe(path):
        return path
    import fcntl
    import os

    from medpipe.inference.guard_fit import fit_guard

    root = os.environ.get("MEDPIPE_DATA")
    if not root or not (Path(root) / "covid_cxr").is_dir():
        raise MedpipeError(
            "the wrong-input guard is not fitted yet and MEDPIPE_DATA holds no shared data sets to fit it from: "
            "set MEDPIPE_DATA and run `medpipe guard fit`, or pass --input_guard false"
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    # processes starting together (a node's routes, parallel jobs) fit once: the others wait and read that fit
    with open(path.parent / f"{GUARD_FILE_NAME}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not _current_recipe(path):
            log.info(f"fitting the wrong-input guard from {root} into {path} (once)")
            fit_guard(root, path, measure_held_out=False)
    return path


def _current_recipe(path: Path) -> bool:
    """Whether `path` holds a fit of this GUARD_RECIPE (False when missing, unreadable or older)."""
    try:
        with np.load(path, allow_pickle=False) as data:
            return f"recipe={GUARD_RECIPE}" in data["meta"].tolist()
    except (OSError, KeyError, ValueError):
        return False


def verdict(probabilities: Mapping[str, float], expected: str) -> str:
    """OK, or one line saying what the image looks like instead of `expected`."""
    if probabilities[expected] >= MIN_PROBABILITY:
        return OK
    likely = max(probabilities, key=probabilities.__getitem__)
    return (f"input looks like {MODALITIES[likely]} (p={probabilities[likely]:.2f}), not {MODALITIES[expected]}: "
            "result not trustworthy")  # fmt: skip


class InputGuard:
    """Checks every case of an evaluator run against the bundle's `expected` modality.

    As an ignite handler (attach) it logs one warning line per flagged case as the batches come, and a summary at
    the end; with `output_dir` it also writes `input_guard.csv` (path, modality, verdict). As a ClassificationReport
    column source (`header`, `cells`) it adds `input_modality` and `input_guard` to predictions.csv. A file is read
    once per run whichever asks first."""

    header = ["input_modality", "input_guard"]

    def __init__(self, expected: str, model_file: str | Path | None = None, output_dir: str | Path | None = None,
                 path_key: str = "path", log_flags: bool = True) -> None:  # fmt: skip
        if expected not in MODALITIES:
            raise MedpipeError(f"input guard: expected modality '{expected}' is not one of {sorted(MODALITIES)}")
        self.expected, self.path_key, self.log_flags = expected, path_key, log_flags
        self.output_dir = Path(output_dir) if output_dir else None
        self.model = ModalityModel.load(model_file)
        self.results: dict[str, tuple[str, str]] = {}  # path -> (most likely modality, verdict)

    def check(self, path: str | Path) -> tuple[str, str]:
        """(most likely modality, verdict) of one image file; logs the verdict once when it flags."""
        key = str(path)
        if key not in self.results:
            probs = dict(zip(self.model.classes, self.model.probabilities(file_features(key))[0], strict=True))
            result = (max(probs, key=probs.__getitem__), verdict(probs, self.expected))
            self.results[key] = result
            if result[1] != OK and self.log_flags:
                log.warning("%s: %s", key, result[1])
        return self.results[key]

    def check_image(self, grey: np.ndarray, name: str) -> tuple[str, str]:
        """(most likely modality, verdict) of an image already in memory (grey, [0, 1]), e.g. a CT volume's middle
        slice in the lung window; logged like `check`."""
        probs = dict(zip(self.model.classes, self.model.probabilities(image_features(grey)[None])[0], strict=True))
        result = (max(probs, key=probs.__getitem__), verdict(probs, self.expected))
        self.results[name] = result
        if result[1] != OK and self.log_flags:
            log.warning("%s: %s", name, result[1])
        return result

    def check_volume(self, planes: np.ndarray, name: str) -> tuple[str, str]:
        """(most likely modality, verdict) of a volume from its (N, H, W) [0, 1] slices (ct_route_planes): one
        decision per series, on the mean probabilities of its central slices; logged like `check`."""
        picked = np.asarray(planes)[central_slices(len(planes))]
        probs = self.model.probabilities(np.stack([image_features(p) for p in picked])).mean(axis=0)
        by_class = dict(zip(self.model.classes, probs, strict=True))
        result = (max(by_class, key=by_class.__getitem__), verdict(by_class, self.expected))
        self.results[name] = result
        if result[1] != OK and self.log_flags:
            log.warning("%s: %s", name, result[1])
        return result

    def cells(self, path: str, probs: Any = None) -> list[str]:
        return list(self.check(path))

    def attach(self, engine: Any) -> None:
        from ignite.engine import Events

        engine.add_event_handler(Events.EPOCH_STARTED, lambda _: self.results.clear())
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._iteration)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._epoch)

    def _iteration(self, engine: Any) -> None:
        batch = engine.state.batch
        for item in batch if isinstance(batch, list) else [batch]:
            paths = item.get(self.path_key) if isinstance(item, Mapping) else None
            for path in paths if isinstance(paths, list | tuple) else [paths]:
                if path is not None:
                    self.check(path)

    def _epoch(self, engine: Any) -> None:
        flagged = sum(v != OK for _, v in self.results.values())
        if self.results:
            log.info(f"input guard: {flagged} of {len(self.results)} inputs do not look like "
                     f"{MODALITIES[self.expected]}")  # fmt: skip
        if self.output_dir is not None and self.results:
            import csv
            import io

            from medpipe.files import atomic_write_text

            buf = io.StringIO()
            writer = csv.writer(buf)
            writer.writerow(["path", *self.header])
            writer.writerows([p, m, v] for p, (m, v) in self.results.items())
            atomic_write_text(self.output_dir / "input_guard.csv", buf.getvalue())
