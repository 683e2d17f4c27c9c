"""multi_gpu_train.json under `torchrun --standalone --nproc_per_node=2` (gloo on CPU) for every bundle: one
checkpoint, one MLflow run, disjoint shards; a crashing rank ends the job; and `--resume true` after a SIGKILL.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import BUNDLES, REPO, finish_or_kill, real_dataset
from medpipe.bundle.config import run_bundle

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
JOB_TIMEOUT_S = 300  # a hang fails the test instead of blocking CI


def _spec(bundle: Path) -> dict:
    return json.loads((bundle / "configs" / "metadata.json").read_text())["medpipe"]


def _args(overrides: dict) -> list[str]:
    return [a for k, v in overrides.items() for a in (f"--{k}", json.dumps(v) if isinstance(v, bool) else str(v))]


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def run_job(cmd: list[str], timeout_s: float = JOB_TIMEOUT_S) -> subprocess.CompletedProcess:
    """Run a job in its own process group; past `timeout_s`, kill the whole group (torchrun's workers too) and fail."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO, env=_env(),
                            start_new_session=True)  # fmt: skip
    code, out, err = finish_or_kill(proc, timeout_s, "job")
    return subprocess.CompletedProcess(cmd, code, out, err)


def _ddp_cmd(bundle: Path, extra_configs: list[Path], overrides: dict) -> list[str]:
    configs = [str(bundle / "configs" / "train.json"), str(bundle / "configs" / "multi_gpu_train.json")]
    configs += [str(p) for p in extra_configs]
    return [*TORCHRUN, "-m", "monai.bundle", "run", "training", "--config_file", repr(configs), *_args(overrides)]


def _smoke(bundle: Path, tmp_path: Path) -> dict:
    spec = _spec(bundle)
    data = real_dataset(spec["dataset"])
    return {"dataset_dir": str(data), "ckpt_dir": str(tmp_path / "models"), "output_dir": str(tmp_path / "out"),
            "seed": 0, **spec["smoke_overrides"]}  # fmt: skip


@pytest.mark.parametrize("bundle", BUNDLES, ids=lambda b: b.name)
def test_torchrun_two_ranks(bundle: Path, tmp_path: Path) -> None:
    from mlflow import MlflowClient

    overlay = tmp_path / "record_shards.json"  # test-only: each rank writes the cases it trained on
    overlay.write_text(json.dumps({"+train#handlers": [
        {"_target_": "medpipe.training.distributed.ShardRecorder", "out_dir": str(tmp_path / "shards")}]}))  # fmt: skip
    uri = f"sqlite:///{tmp_path}/runs/mlflow.db"
    overrides = {**_smoke(bundle, tmp_path), "mlflow": True, "tracking_uri": uri, "experiment_name": "ddp"}
    proc = run_job(_ddp_cmd(bundle, [overlay], overrides))
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    # each epoch's metrics line (MONAI's StatsHandler) comes from rank 0 alone
    logged = re.findall(r"Epoch\[(\d+)\] Metrics -- (\w+)", proc.stdout + proc.stderr)
    assert logged and len(logged) == len(set(logged)), logged

    files = sorted(p.name for p in (tmp_path / "models").iterdir())
    assert files == ["last.pt", "mlflow_run.json", "model.pt", "model.trained_on.json"]
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("ddp").experiment_id])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"

    shards = [(tmp_path / "shards" / f"rank{r}.txt").read_text().split("\n") for r in (0, 1)]
    cases = [{line.split("\t", 1)[1] for line in shard if line} for shard in shards]
    assert cases[0] and cases[1]
    # DistributedSampler pads an odd count by repeating one case; anything more means both ranks read everything
    assert len(cases[0] & cases[1]) <= 1, cases[0] & cases[1]


def test_a_crashing_rank_ends_the_job(tmp_path: Path) -> None:
    bundle = BUNDLES[0]
    # rank 1 raises after its first iteration, while rank 0 goes on into the next collective
    crash = ("$@train#trainer.add_event_handler(monai.engines.workflow.Events.ITERATION_COMPLETED(once=1), "
             "lambda engine: (_ for _ in ()).throw(medpipe.errors.MedpipeError('injected failure on rank 1'))) "
             "if torch.distributed.get_rank() == 1 else None")  # fmt: skip
    overlay = tmp_path / "crash.json"
    overlay.write_text(json.dumps({"+initialize": [crash]}))
    started = time.monotonic()
    proc = run_job(_ddp_cmd(bundle, [overlay], _smoke(bundle, tmp_path)))
    assert proc.returncode != 0
    assert "medpipe error: injected failure on rank 1" in proc.stderr + proc.stdout
    assert time.monotonic() - started < JOB_TIMEOUT_S
    assert not (tmp_path / "models" / "model.pt").exists()


def _epochs_done(last: Path) -> int:
    trainer = torch.load(last, map_location="cpu", weights_only=True)["trainer"]
    return trainer["iteration"] // trainer["epoch_length"]


def test_resume_after_sigkill(tmp_path: Path) -> None:
    """Kill a training after its second epoch; `--resume true` finishes it with the same number of epochs."""
    bundle = BUNDLES[0]
    epochs = 6
    overrides = {**_smoke(bundle, tmp_path), "epochs": epochs}
    cmd = [sys.executable, "-m", "monai.bundle", "run", "training", "--config_file",
           str(bundle / "configs" / "train.json"), *_args(overrides)]  # fmt: skip
    last = tmp_path / "models" / "last.pt"
    log = (tmp_path / "first.log").open("w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO, env=_env(), start_new_session=True)
    try:
        deadline = time.monotonic() + JOB_TIMEOUT_S
        while time.monotonic() < deadline and proc.poll() is None:
            if last.is_file() and _epochs_done(last) >= 2:
                break
            time.sleep(0.05)
        assert proc.poll() is None, (tmp_path / "first.log").read_text()[-2000:]  # it must still be training
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
        log.close()
    killed_at = _epochs_done(last)  # readable: written to a temporary file, then renamed
    assert 2 <= killed_at < epochs
    # training.lock: the killed process's claim on the folder, taken over by the resumed run
    strays = [p.name for p in last.parent.iterdir() if p.name not in ("last.pt", "model.pt", "training.lock")]
    assert all(p.startswith(".") and p.endswith(".tmp") for p in strays), strays
    assert not (tmp_path / "models" / "model.pt").exists()

    proc2 = run_job([*cmd, "--resume", "true"])
    out = proc2.stdout + proc2.stderr
    assert proc2.returncode == 0, out[-3000:]
    assert f"after epoch {killed_at} of {epochs}" in out
    ran = [e for e in range(1, epochs + 1) if f"SupervisedTrainer - INFO - Epoch[{e}] Complete" in out]
    assert ran == list(range(killed_at + 1, epochs + 1))
    assert _epochs_done(last) == epochs
    final = torch.load(tmp_path / "models" / "model.pt", map_location="cpu", weights_only=True)
    resumed = torch.load(last, map_location="cpu", weights_only=True)["model"]
    assert all(torch.equal(final[k], resumed[k]) for k in final)


@pytest.mark.parametrize("bundle", BUNDLES, ids=lambda b: b.name)
def test_resume_wiring(bundle: Path, tmp_path: Path) -> None:
    """Every bundle: a finished 1-epoch run continued with --resume true and 2 epochs trains exactly one more."""
    common = _smoke(bundle, tmp_path)
    run_bundle(bundle, "train", **{**common, "epochs": 1})
    first = torch.load(tmp_path / "models" / "last.pt", map_location="cpu", weights_only=True)
    assert {"model", "optimizer", "trainer"} <= set(first)
    run_bundle(bundle, "train", **{**common, "epochs": 2, "resume": True})
    second = torch.load(tmp_path / "models" / "last.pt", map_location="cpu", weights_only=True)
    assert second["trainer"]["iteration"] == 2 * first["trainer"]["iteration"]
    assert second["optimizer"]["state"], "optimizer state was not saved"


@pytest.mark.parametrize("bundle", BUNDLES, ids=lambda b: b.name)
def test_torchrun_on_the_whole_folder(bundle: Path, tmp_path: Path) -> None:
    """`--fold -1` (how a final model is trained) under DDP: no validation part, so no validation sampler."""
    proc = run_job(_ddp_cmd(bundle, [], {**_smoke(bundle, tmp_path), "fold": -1}))
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    assert (tmp_path / "models" / "model.pt").is_file()
