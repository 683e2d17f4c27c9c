"""int8 ONNX: ONNX Runtime static quantization calibrated on a few dozen of the bundle's training images, prepared by
the bundle's own evaluation preprocessing (`validate#preprocessing`), so the activation ranges are the deployed ones.

The sidecar records how often the int8 model's predicted label (or pixel label) agrees with fp32 on those images:
a first check, in-sample; its accuracy change on held-out predictions needs trained cross-validation models."""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from medpipe.errors import MedpipeError
from medpipe.files import atomic_write

logger = logging.getLogger(__name__)

BATCH = 8


def calibration_batches(bundle: Any, count: int = 32) -> list[np.ndarray]:
    """`count` training images spread evenly over the bundle's train split, preprocessed, in batches of 8."""
    import torch

    parser = bundle.parser
    try:
        items = list(parser.get_parsed_content("datalists")["train"])
    except MedpipeError:
        raise
    except Exception as exc:
        raise MedpipeError(f"int8 calibration needs the bundle's training data ({type(exc).__name__}: {exc}); "
                           "set MEDPIPE_DATA or --dataset_dir") from None  # fmt: skip
    if not items:
        raise MedpipeError("int8 calibration found no training images; set MEDPIPE_DATA or --dataset_dir")
    step = max(1, len(items) // max(1, int(count)))
    chosen = items[::step][: int(count)]
    preprocess = parser.get_parsed_content("validate#preprocessing")
    images = [torch.as_tensor(preprocess(dict(item))["image"]).float().numpy() for item in chosen]
    stacked = np.stack(images).astype(np.float32)
    logger.info(f"int8 calibration on {len(stacked)} training images of shape {stacked.shape[1:]}")
    return [stacked[i : i + BATCH] for i in range(0, len(stacked), BATCH)]


def _labels(outputs: np.ndarray) -> np.ndarray:
    """Predicted class per image (or per pixel): argmax over channels, or logit > 0 for one output channel."""
    return (outputs[:, 0] > 0).astype(np.int64) if outputs.shape[1] == 1 else np.argmax(outputs, axis=1)


def quantize_int8(fp32_path: Path, out: Path, batches: list[np.ndarray], segmentation: bool) -> dict[str, Any]:
    """Statically quantize `fp32_path` (QDQ, uint8 activations, int8 per-channel weights) to `out`, atomically;
    return its agreement with fp32 on the calibration images."""
    import onnxruntime
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quant_pre_process,
        quantize_static,
    )

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.pending = iter(batches)

        def get_next(self) -> dict[str, np.ndarray] | None:
            batch = next(self.pending, None)
            return None if batch is None else {"image": batch}

    with tempfile.TemporaryDirectory(prefix="medpipe-int8-") as tmp:
        prepared = Path(tmp) / "prepared.onnx"
        quant_pre_process(str(fp32_path), str(prepared), skip_symbolic_shape=segmentation)

        def write(target: Path) -> None:
            quantize_static(str(prepared), str(target), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)  # fmt: skip

        logging.disable(logging.INFO)  # onnxruntime.quantization logs one INFO line per tensor on the root logger
        try:
            atomic_write(out, write)
        finally:
            logging.disable(logging.NOTSET)
    options = ["CPUExecutionProvider"]
    fp32 = onnxruntime.InferenceSession(str(fp32_path), providers=options)
    int8 = onnxruntime.InferenceSession(str(out), providers=options)
    ref = np.concatenate([fp32.run(None, {"image": b})[0] for b in batches])
    got = np.concatenate([int8.run(None, {"image": b})[0] for b in batches])
    agreement = float(np.mean(_labels(ref) == _labels(got)))
    logger.info(f"int8 vs fp32 on the calibration images: {100 * agreement:.1f} % same labels")
    return {
        "calibration_images": int(sum(len(b) for b in batches)),
        "scheme": "static QDQ, activations uint8 (MinMax), weights int8 per channel",
        "label_agreement_with_fp32_on_calibration_images": round(agreement, 4),
        "max_abs_output_diff_on_calibration_images": float(np.abs(ref - got).max()),
    }
