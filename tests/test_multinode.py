"""multi_gpu_train.json across nodes: `torchrun --nnodes 2 --nproc_per_node 1` with a c10d rendezvous, started as two
launcher processes on 127.0.0.1 (gloo), trains the same weights as one node with two processes, records one MLflow
run and writes one checkpoint; `--resume` hands rank 0's last.pt to the ranks that cannot see it.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from conftest import REPO
from medpipe.data.synthetic import make_synthetic_set

TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]
JOB_TIMEOUT_S = 240  # a hang (a rendezvous that never completes, a collective never paired) fails the test
BUNDLE = REPO / "bundles" / "brain_tumor_cls"


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _run_together(cmds: list[list[str]], timeout_s: float = JOB_TIMEOUT_S) -> list[subprocess.CompletedProcess]:
    """Start every command in its own process group, wait for all; past `timeout_s` kill every group and fail."""
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO, env=_env(),
                              start_new_session=True) for cmd in cmds]  # fmt: skip
    outputs: list[str] = []
    try:
        for proc in procs:
            outputs.append(proc.communicate(timeout=timeout_s)[0])
    except subprocess.TimeoutExpired:
        pytest.fail(f"a launcher did not finish in {timeout_s:.0f}s (a hang?)")
    finally:
        for proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.communicate()
    return [subprocess.CompletedProcess(c, p.returncode, out) for c, p, out in zip(cmds, procs, outputs, strict=True)]


def _train_args(data: Path, out: Path, **extra: object) -> list[str]:
    configs = [str(BUNDLE / "configs" / "train.json"), str(BUNDLE / "configs" / "multi_gpu_train.json")]
    overrides = {"dataset_dir": data, "ckpt_dir": out / "models", "output_dir": out / "out", "seed": 0, "epochs": 1,
                 "num_folds": 2, "fold": 0, "image_size": 32, **extra}  # fmt: skip
    args = [a for k, v in overrides.items() for a in (f"--{k}", json.dumps(v) if isinstance(v, bool) else str(v))]
    return ["-m", "monai.bundle", "run", "training", "--config_file", repr(configs), *args]


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_synthetic_set(tmp_path_factory.mktemp("multinode") / "data", per_class=6, size=32)


def test_two_nodes_train_what_one_node_trains(data: Path, tmp_path: Path) -> None:
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path}/runs/mlflow.db"
    tracked = _train_args(data, tmp_path / "two_nodes", mlflow=True, tracking_uri=uri, experiment_name="multinode")
    rdzv = ["--nnodes", "2", "--nproc_per_node", "1", "--rdzv_backend", "c10d", "--rdzv_endpoint",
            f"127.0.0.1:{_free_port()}", "--rdzv_id", "multinode-test"]  # fmt: skip
    nodes = _run_together([[*TORCHRUN, *rdzv, *tracked], [*TORCHRUN, *rdzv, *tracked]])
    for node in nodes:
        assert node.returncode == 0, node.stdout[-3000:]
    single = _run_together([[*TORCHRUN, "--standalone", "--nproc_per_node", "2",
                             *_train_args(data, tmp_path / "one_node")]])[0]  # fmt: skip
    assert single.returncode == 0, single.stdout[-3000:]

    two = torch.load(tmp_path / "two_nodes" / "models" / "model.pt", map_location="cpu", weights_only=True)
    one = torch.load(tmp_path / "one_node" / "models" / "model.pt", map_location="cpu", weights_only=True)
    assert two.keys() == one.keys()
    differ = [k for k in one if not torch.equal(one[k], two[k])]
    assert not differ, f"weights differ between 2 nodes x 1 process and 1 node x 2 processes: {differ}"

    # global rank 0 alone checkpoints, tracks and logs, though each node's process is its node's LOCAL_RANK 0
    assert sorted(p.name for p in (tmp_path / "two_nodes" / "models").iterdir()) == [
        "last.pt", "mlflow_run.json", "model.pt", "model.trained_on.json"]  # fmt: skip
    assert sorted("saved the final model" in node.stdout for node in nodes) == [False, True]
    assert sorted("Epoch[1] Complete" in node.stdout for node in nodes) == [False, True]
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("multinode").experiment_id])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"


RESUME_PROBE = """
import json, sys
from pathlib import Path

import torch
import torch.distributed as dist
from ignite.engine import Engine

from medpipe.training.checkpoints import ResumeTraining
from medpipe.training.distributed import destroy_process_group, init_process_group

init_process_group()
rank = dist.get_rank()
root = Path(sys.argv[1])
torch.manual_seed(100 + rank)  # each rank starts from other weights: only the checkpoint can make them agree
model = torch.nn.Linear(3, 2)
optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
engine = Engine(lambda engine, batch: None)
engine.state.max_epochs = 3
# rank 0's own folder holds last.pt; rank 1's is another, empty one, as on a node that does not share the storage
ResumeTraining(str(root / f"node{rank}" / "last.pt"), model, {"optimizer": optimizer})(engine)
out = {"epoch": engine.state.epoch, "weight": model.weight.tolist(), "bias": model.bias.tolist(),
       "momentum": [s["momentum_buffer"].tolist() for s in optimizer.state.values()]}
(root / f"rank{rank}.json").write_text(json.dumps(out))
destroy_process_group()
"""


def test_resume_hands_rank_0s_checkpoint_to_every_rank(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.ones(4, 3)).sum().backward()
    optimizer.step()  # a momentum buffer to carry over
    (tmp_path / "node0").mkdir()
    (tmp_path / "node1").mkdir()
    trainer = {"epoch_length": 2, "max_epochs": 3, "iteration": 4}  # two of three epochs done
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "trainer": trainer},
               tmp_path / "node0" / "last.pt")  # fmt: skip
    (tmp_path / "probe.py").write_text(textwrap.dedent(RESUME_PROBE))
    proc = _run_together([[*TORCHRUN, "--standalone", "--nproc_per_node", "2", str(tmp_path / "probe.py"),
                           str(tmp_path)]])[0]  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0] == ranks[1]
    assert ranks[0]["epoch"] == 2
    assert ranks[0]["weight"] == model.weight.tolist() and ranks[0]["bias"] == model.bias.tolist()
    assert ranks[0]["momentum"] == [s["momentum_buffer"].tolist() for s in optimizer.state.values()]
    assert not (tmp_path / "node1" / "last.pt").exists()


def test_an_unreadable_last_pt_is_one_line(tmp_path: Path) -> None:
    """Read on rank 0 and sent to every rank as a message, so each rank stops with the same line (here: one process)."""
    from ignite.engine import Engine

    from medpipe.errors import MedpipeError
    from medpipe.training.checkpoints import ResumeTraining

    (tmp_path / "last.pt").write_bytes(b"not a checkpoint, cut short")
    engine = Engine(lambda engine, batch: None)
    engine.state.max_epochs = 2
    with pytest.raises(MedpipeError, match="last.pt' cannot be read as a checkpoint") as info:
        ResumeTraining(str(tmp_path / "last.pt"), torch.nn.Linear(2, 1))(engine)
    assert "\n" not in str(info.value)
