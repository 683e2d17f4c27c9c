"""Viewer latency: the RIDER chest CT (95 slices, 512²) pushed from Orthanc to the node → its DICOM-SEG overlaid on
the CT in OHIF (headless Chromium), wall time (goal ≤ 20 s) with the split: node (transfer, quiet period, model,
writing) / store (C-STORE of SEG + SR into Orthanc until Orthanc lists them) / viewer (OHIF opened on the study →
SEG loaded → overlay pixels on screen). The stack is `medpipe viewer`'s (`ViewerStack`), started before the clock.

The network is covid_ct_seg's; weights do not change the speed, so seeded random weights are used without --ckpt.

    OMP_NUM_THREADS=2 MEDPIPE_DATA=../shared/data python benchmarks/viewer_latency.py [--ckpt model.pt] [--quiet 1] \
        [--precision bf16]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ckpt", default=None, help="covid_ct_seg model.pt (default: seeded random weights)")
    parser.add_argument("--quiet", type=float, default=1.0, help="seconds without new instances that close a series")
    parser.add_argument("--precision", default=None, choices=("fp32", "bf16"),
                        help="the CT route's `precision` option (default: the bundle's, fp32)")
    parser.add_argument("--screenshot", default=None, help="save the page with the overlay here (PNG)")
    args = parser.parse_args()

    from orthanc import OrthancRest, free_port
    from playwright.sync_api import sync_playwright
    from test_serve import make_checkpoint, rider_datasets
    from test_viewer import BLUE, BROWSER_ARGS, DISMISSED, ORANGE, colour_pixels, wait_for_screenshot

    from medpipe.serve.routing import load_settings
    from medpipe.viewer.stack import ViewerStack

    os.environ.setdefault("MEDPIPE_DATA", str(REPO.parent / "shared" / "data"))
    with tempfile.TemporaryDirectory(prefix="bench-viewer-") as tmp:
        root = Path(tmp)
        ckpt = args.ckpt or str(make_checkpoint("covid_ct_seg", root / "ct.pt"))
        routing = {
            "node": {"ae_title": "MEDPIPE", "port": free_port(), "work_dir": str(root / "node"),
                     "quiet_seconds": args.quiet},
            "destination": {"ae_title": "ORTHANC", "host": "127.0.0.1", "port": free_port()},
            "routes": [{"name": "chest_ct", "task": "ct_segmentation", "bundle": "covid_ct_seg", "modality": "CT",
                        "checkpoints": [str(Path(ckpt).resolve())],
                        "options": {"precision": args.precision} if args.precision else {}}],
        }  # fmt: skip
        (root / "routing.json").write_text(json.dumps(routing))
        stack = ViewerStack(load_settings(root / "routing.json"), orthanc_http_port=free_port(), port=0)
        try:
            orthanc = OrthancRest(stack.orthanc.url)
            source = rider_datasets()
            series_id = orthanc.upload(source)  # the study is in the PACS before the clock starts
            with sync_playwright() as pw:
                chromium = shutil.which("chromium") or shutil.which("chromium-browser")
                browser = pw.chromium.launch(executable_path=chromium, headless=True, args=BROWSER_ARGS)
                page = browser.new_page(viewport={"width": 1280, "height": 800})
                page.add_init_script(DISMISSED)

                started = time.perf_counter()
                orthanc.push_to_medpipe(series_id)
                orthanc.wait_for_modality(series_id, "SEG", timeout_s=600)
                orthanc.wait_for_modality(series_id, "SR", timeout_s=60)
                stored = time.perf_counter()
                page.goto(stack.study_url(source[0].StudyInstanceUID))
                page.get_by_text("medpipe segmentation").dblclick(timeout=120_000)
                page.get_by_role("button", name="Yes").click(timeout=120_000)
                png = wait_for_screenshot(
                    page.locator('[data-cy="viewport-pane"]').first,
                    lambda shot: min(colour_pixels(shot, ORANGE), colour_pixels(shot, BLUE)) > 100, timeout_s=120,
                )  # fmt: skip
                shown = time.perf_counter()
                visible = min(colour_pixels(png, ORANGE), colour_pixels(png, BLUE)) > 100
                if args.screenshot:
                    page.screenshot(path=args.screenshot)
                browser.close()
            (job,) = stack.node.queue.jobs()
        finally:
            stack.stop()
    t = job.timings
    node_s = sum(t.get(k, 0.0) for k in ("transfer_s", "queue_s", "model_load_s", "model_s", "writing_s"))
    total, viewer_s = shown - started, shown - stored
    store_s = stored - started - node_s
    print(f"RIDER {len(source)} slices: push -> overlay visible in OHIF {total:.1f} s (goal <= 20 s)"
          f"{'' if visible else ' -- OVERLAY NOT SEEN'}")  # fmt: skip
    print(f"  node   {node_s:5.1f} s  (transfer {t.get('transfer_s', 0):.1f}, quiet period {t.get('queue_s', 0):.1f}, "
          f"model {t.get('model_s', 0):.1f}, writing {t.get('writing_s', 0):.1f})")  # fmt: skip
    print(f"  store  {store_s:5.1f} s  (C-STORE of SEG + SR {t.get('send_s', 0):.1f}, until Orthanc lists them)")
    print(f"  viewer {viewer_s:5.1f} s  (OHIF opened on the study -> SEG loaded -> overlay on screen)")
    print(f"  precision {args.precision or 'fp32 (bundle default)'}, "
          f"weights {'--ckpt ' + args.ckpt if args.ckpt else 'seeded random'}")
    print(f"  machine: {os.cpu_count()} cores, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}, "
          f"load average {os.getloadavg()[0]:.1f}")  # fmt: skip


if __name__ == "__main__":
    main()
