"""How often a finished two-rank gloo job dies of SIGABRT at exit, with torch's plain teardown and with medpipe's.

Each job: `torchrun --standalone --nproc_per_node=2`, a DistributedDataParallel Linear trained three steps, a
barrier, then either `torch.distributed.destroy_process_group()` ("plain") or
`medpipe.training.distributed.destroy_process_group()` ("medpipe"), then exit. A job fails when torchrun exits
non-zero; an abort of the kind fixed prints "terminate called without an active exception". The two kinds are
interleaved so both see the same machine load (run it beside another CPU job to see the race as CI does).

    OMP_NUM_THREADS=1 python benchmarks/ddp_teardown.py --jobs 30
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

WORKER = """
import sys
import torch
import torch.distributed as dist
from medpipe.training.distributed import destroy_process_group

dist.init_process_group("gloo")
model = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(4, 2))
for _ in range(3):
    model(torch.randn(3, 4)).sum().backward()
if sys.argv[1] == "plain":
    dist.barrier()
    dist.destroy_process_group()
else:
    destroy_process_group()
"""
ABORT = "terminate called without an active exception"


def run_job(script: Path, kind: str) -> tuple[int, bool]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script), kind]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120, check=False)
    return proc.returncode, ABORT in proc.stdout + proc.stderr


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--jobs", type=int, default=30, help="jobs of each kind")
    parser.add_argument("--json", type=Path, help="also write the counts here")
    args = parser.parse_args()
    counts = {kind: {"jobs": 0, "failed": 0, "aborted_at_exit": 0} for kind in ("plain", "medpipe")}
    with tempfile.TemporaryDirectory() as tmp:
        script = Path(tmp) / "worker.py"
        script.write_text(WORKER)
        for _ in range(args.jobs):
            for kind, count in counts.items():
                code, aborted = run_job(script, kind)
                count["jobs"] += 1
                count["failed"] += code != 0
                count["aborted_at_exit"] += aborted
    for kind, count in counts.items():
        failed, jobs, aborted = count["failed"], count["jobs"], count["aborted_at_exit"]
        print(f"{kind:8s} {failed:3d} of {jobs} jobs failed ({aborted} aborted at exit)")
    if args.json:
        args.json.write_text(json.dumps(counts, indent=2) + "\n")


if __name__ == "__main__":
    main()
