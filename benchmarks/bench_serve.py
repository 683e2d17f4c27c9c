"""DICOM node speed: the RIDER chest CT (95 slices, 512²) pushed from a real Orthanc → DICOM-SEG + SR stored back in
Orthanc (target ≤ 15 s wall on 2 cores), with the split: transfer / queue (quiet period) / model / writing / send.

The network is covid_ct_seg's default UNet; weights do not change the speed, so a checkpoint is optional (--ckpt)
and seeded random weights are used without one. Models load when the node starts, as in service.

    OMP_NUM_THREADS=2 MEDPIPE_DATA=../shared/data python benchmarks/bench_serve.py [--ckpt model.pt] [--quiet 1]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ckpt", default=None, help="covid_ct_seg model.pt (default: seeded random weights)")
    parser.add_argument("--quiet", type=float, default=1.0, help="seconds without new instances that close a series")
    args = parser.parse_args()

    import pydicom
    import torch

    from medpipe.serve.routing import load_settings
    from medpipe.serve.worker import Node
    from tests.orthanc import Orthanc, free_port

    series_dir = Path(os.environ.get("MEDPIPE_DATA", REPO.parent / "shared" / "data")) / "dicom"
    series_dir = series_dir / "rider_pilot_chest_ct_0117"
    if not series_dir.is_dir():
        sys.exit(f"RIDER series not found at {series_dir}: set MEDPIPE_DATA")
    with tempfile.TemporaryDirectory(prefix="bench-serve-") as tmp:
        tmp_path = Path(tmp)
        ckpt = args.ckpt
        if ckpt is None:
            from monai.bundle import ConfigParser

            config = ConfigParser()
            config.read_config(str(REPO / "bundles/covid_ct_seg/configs/train.json"))
            config["bundle_root"] = str(REPO / "bundles/covid_ct_seg")
            torch.manual_seed(0)
            ckpt = str(tmp_path / "ct.pt")
            torch.save(config.get_parsed_content("network_def").state_dict(), ckpt)
        port = free_port()
        pacs = Orthanc(tmp_path / "orthanc", medpipe_port=port)
        try:
            routing = {
                "node": {"ae_title": "MEDPIPE", "port": port, "work_dir": str(tmp_path / "node"),
                         "quiet_seconds": args.quiet},
                "destination": {"ae_title": "ORTHANC", "host": "127.0.0.1", "port": pacs.dicom_port},
                "routes": [{"name": "chest_ct", "task": "ct_segmentation", "bundle": "covid_ct_seg",
                            "checkpoints": [ckpt], "modality": "CT"}],
            }  # fmt: skip
            (tmp_path / "routing.json").write_text(json.dumps(routing))
            series_id = pacs.upload(pydicom.dcmread(f) for f in sorted(series_dir.glob("*.dcm")))
            node = Node(load_settings(tmp_path / "routing.json"))
            thread = threading.Thread(target=node.serve_forever, daemon=True)
            thread.start()
            while node.scp.server is None:
                time.sleep(0.05)
            started = time.perf_counter()
            pacs.push_to_medpipe(series_id, asynchronous=True)
            pacs.wait_for_modality(series_id, "SEG", timeout_s=300)
            pacs.wait_for_modality(series_id, "SR", timeout_s=60)
            wall = time.perf_counter() - started
            (job,) = node.queue.jobs("done")
            node.stopping.set()
            thread.join(30)
        finally:
            pacs.stop()
    t = job.timings
    print(
        f"RIDER {job.n_instances} slices, Orthanc → medpipe serve → DICOM-SEG + SR in Orthanc: {wall:.1f}s wall "
        f"(target ≤ 15 s; threads {torch.get_num_threads()})"
    )
    for name, key in [("transfer (C-STORE in)", "transfer_s"), (f"queue (incl. {args.quiet:g}s quiet)", "queue_s"),
                      ("model (load series, predict, masks + DICOM-SEG)", "model_s"), ("writing (SR)", "writing_s"),
                      ("send (C-STORE out)", "send_s")]:  # fmt: skip
        print(f"  {name:<52} {t.get(key, float('nan')):6.2f}s")


if __name__ == "__main__":
    main()
