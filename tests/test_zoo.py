"""Model zoo round trip for every bundle: package -> index -> serve over http on 127.0.0.1 -> install -> the installed
bundle's inference matches the source bundle's; and every bad input is refused in one line.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
import zipfile
from pathlib import Path

import pytest
import torch

from conftest import BUNDLES, real_dataset
from medpipe.bundle.config import run_bundle
from medpipe.cli import main
from medpipe.export.exporters import bundle_network
from medpipe.export.runtime import runtime_network
from medpipe.zoo import package, sha256_file


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def zoo_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("zoo")


@pytest.fixture(scope="module")
def http_index(zoo_dir: Path):
    """`python -m http.server` serving the zoo folder on a free 127.0.0.1 port; stopped by its PID afterwards."""
    port = free_port()
    cmd = [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1", "--directory", str(zoo_dir)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(url, timeout=1).close()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("http.server did not start") from None
                time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=15)


def _spec(bundle: Path) -> dict:
    return json.loads((bundle / "configs" / "metadata.json").read_text())["medpipe"]


def _weights(bundle: Path, tmp_path: Path, overrides: dict) -> Path:
    """Seeded untrained weights: the round trip must reproduce any weights exactly, trained or not."""
    torch.manual_seed(0)
    net = bundle_network(bundle, None, overrides).net
    path = tmp_path / "src_models" / "model.pt"
    path.parent.mkdir(parents=True)
    torch.save(net.state_dict(), path)
    return path


def _net_overrides(bundle: Path) -> dict:
    """The smoke overrides that shape the network (image size), which packaging must know."""
    return {k: v for k, v in _spec(bundle)["smoke_overrides"].items() if k == "image_size"}


VOLATILE_KEYS = {"seconds", "checkpoint"}  # wall time and where the weights were read from differ by design


def _stable(value: object) -> object:
    if isinstance(value, dict):
        return {k: _stable(v) for k, v in value.items() if k not in VOLATILE_KEYS}
    if isinstance(value, list):
        return [_stable(v) for v in value]
    return value


def _outputs(folder: Path, names: list[str]) -> dict[str, object]:
    """Each output file's content; JSON reports compared without their timing and checkpoint-path fields."""
    texts = {name: (folder / name).read_text() for name in names}
    return {name: _stable(json.loads(text)) if name.endswith(".json") else text for name, text in texts.items()}


@pytest.mark.parametrize("bundle", BUNDLES, ids=lambda b: b.name)
def test_package_serve_install_infer(bundle: Path, tmp_path: Path, zoo_dir: Path, http_index: str) -> None:
    spec = _spec(bundle)
    data = real_dataset(spec["dataset"])
    net_overrides = _net_overrides(bundle)
    weights = _weights(bundle, tmp_path, net_overrides)
    zip_path = package(str(bundle), out_dir=str(zoo_dir), ckpt=str(weights), **net_overrides)
    assert main(["zoo", "index", str(zoo_dir)]) == 0
    entry = json.loads((zoo_dir / "model_info.json").read_text())[zip_path.stem]
    with zipfile.ZipFile(zip_path) as zf:
        names = set(zf.namelist())
    assert {f"{bundle.name}/{p}" for p in ("configs/metadata.json", "configs/inference.json", "models/model.pt",
                                           "models/model.ts", "models/model.ts.json", "models/model.onnx",
                                           "models/model.onnx.json", "large_files.yml", "LICENSE")
            } <= names  # fmt: skip
    assert len(entry["checksum"]) == 64 and entry["monai_version"] and entry["pytorch_version"]

    dest = tmp_path / "installed"
    assert main(["zoo", "install", bundle.name, "--index", http_index, "--dest", str(dest)]) == 0
    installed = dest / bundle.name
    assert torch.jit.load(str(installed / "models" / "model.ts")) is not None
    example = bundle_network(bundle, None, net_overrides)
    example.net.load_state_dict(torch.load(weights, weights_only=True))
    with torch.no_grad():  # the installed exports are verified and give the packaged weights' answers
        for runtime in ("onnxruntime", "torchscript"):
            got = runtime_network(example.net, runtime, installed / "models" / "model.pt")(example.example)
            assert torch.allclose(got, example.net(example.example), atol=1e-4), runtime

    common = {"dataset_dir": str(data), "seed": 0, **spec["smoke_overrides"]}
    run_bundle(bundle, "inference", output_dir=str(tmp_path / "src_out"), ckpt_dir=str(weights.parent), **common)
    run_bundle(installed, "inference", output_dir=str(tmp_path / "zoo_out"), **common)
    names = spec["inference_outputs"]
    assert _outputs(tmp_path / "src_out", names) == _outputs(tmp_path / "zoo_out", names)

    # the package is self-contained: what bundles share (links in the checkout) arrived as files, and the installed
    # bundle runs alone through MONAI's own entry point, from another folder
    for shared in ("multi_gpu_train.json", "logging.conf", "parameters.json"):
        assert (installed / "configs" / shared).is_file() and not (installed / "configs" / shared).is_symlink()
    configs = [str(installed / "configs" / "train.json"), str(installed / "configs" / "inference.json")]
    args = [a for k, v in common.items() for a in (f"--{k}", json.dumps(v) if isinstance(v, bool) else str(v))]
    alone = subprocess.run(
        [sys.executable, "-m", "monai.bundle", "run", "--config_file", repr(configs),
         "--output_dir", str(tmp_path / "alone_out"), *args],
        capture_output=True, text=True, cwd=tmp_path, timeout=600,  # same threads as this process: same floats
        env={**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())},
    )  # fmt: skip
    assert alone.returncode == 0, alone.stderr[-2000:]
    assert _outputs(tmp_path / "src_out", names) == _outputs(tmp_path / "alone_out", names)


@pytest.fixture(scope="module")
def package_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One valid package of the first bundle (untrained weights) with its index, for the bad-input tests."""
    bundle = BUNDLES[0]
    tmp = tmp_path_factory.mktemp("bad_input")
    weights = _weights(bundle, tmp, _net_overrides(bundle))
    package(str(bundle), out_dir=str(tmp / "zoo"), ckpt=str(weights), **_net_overrides(bundle))
    return tmp / "zoo"


def _install_error(capsys: pytest.CaptureFixture, spec: str, index: str, dest: Path, *extra: str) -> str:
    code = main(["zoo", "install", spec, "--index", index, "--dest", str(dest), *extra])
    err = capsys.readouterr().err.strip()
    assert code != 0 and err.startswith("medpipe error: ") and "\n" not in err, err
    assert not (dest / spec.split("==")[0]).exists(), "a refused install left files behind"
    return err


def _tampered_copy(package_dir: Path, tmp_path: Path, edit, rehash: bool) -> Path:
    """A copy of the zoo folder whose zip `edit(src_zip, dst_zip)` rewrote; with `rehash` the index gets the new
    sha256 (an attacker who controls the index too), so the checks after the download are the ones exercised."""
    zoo = tmp_path / "zoo"
    zoo.mkdir()
    src = next(package_dir.glob("*.zip"))
    edit(src, zoo / src.name)
    entries = json.loads((package_dir / "model_info.json").read_text())
    if rehash:
        entries[src.stem]["checksum"] = sha256_file(zoo / src.name)
    (zoo / "model_info.json").write_text(json.dumps(entries))
    return zoo


def _rewrite(extra: zipfile.ZipInfo | None = None, payload: bytes = b"", drop: str = "", swap: bytes = b""):
    def edit(src: Path, dst: Path) -> None:
        with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
            for info in zin.infolist():
                data = zin.read(info.filename)
                if info.filename.endswith(drop) and drop:
                    data = swap
                zout.writestr(info, data)
            if extra is not None:
                zout.writestr(extra, payload)

    return edit


def test_bad_install_inputs_are_one_line(package_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    name, dest = BUNDLES[0].name, tmp_path / "dest"
    index = str(package_dir)
    assert "no bundle 'nope'" in _install_error(capsys, "nope", index, dest)
    assert "no version 9.9.9" in _install_error(capsys, f"{name}==9.9.9", index, dest)
    assert "NAME or NAME==VERSION" in _install_error(capsys, f"{name}>=1", index, dest)
    closed = f"http://127.0.0.1:{free_port()}"
    assert "unreachable" in _install_error(capsys, name, closed, dest)
    assert "not found" in _install_error(capsys, name, str(tmp_path / "no_index"), dest)


def _swap_export_and_listing(src: Path, dst: Path) -> None:
    """Replace models/model.onnx and update large_files.yml to match: only the export's sidecar can tell."""
    import yaml

    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        swapped = zin.read(next(n for n in zin.namelist() if n.endswith("models/model.onnx"))) + b"\0"
        for info in zin.infolist():
            data = zin.read(info.filename)
            if info.filename.endswith("models/model.onnx"):
                data = swapped
            elif info.filename.endswith("large_files.yml"):
                record = yaml.safe_load(data)
                for item in record["large_files"]:
                    if item["path"] == "models/model.onnx":
                        item["hash_val"] = hashlib.sha256(swapped).hexdigest()
                data = yaml.safe_dump(record).encode()
            zout.writestr(info, data)


def test_tampered_archives_are_refused(package_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    name = BUNDLES[0].name

    def flip_byte(src: Path, dst: Path) -> None:
        data = bytearray(src.read_bytes())
        data[len(data) // 2] ^= 0xFF
        dst.write_bytes(bytes(data))

    def truncate(src: Path, dst: Path) -> None:
        dst.write_bytes(src.read_bytes()[:200])

    link = zipfile.ZipInfo(f"{name}/models/evil_link")
    link.external_attr = (0o120777) << 16  # a symlink entry
    cases = {
        "wrong hash": (flip_byte, False, "does not match the sha256 in the zoo index"),
        "corrupt zip": (truncate, True, "not a valid zip"),
        "path traversal": (_rewrite(zipfile.ZipInfo(f"{name}/../../evil.txt"), b"x"), True, "unsafe path"),
        "absolute path": (_rewrite(zipfile.ZipInfo("/tmp/evil.txt"), b"x"), True, "unsafe path"),
        "symlink": (_rewrite(link, b"/etc/passwd"), True, "link or special file"),
        "swapped weights": (_rewrite(drop="models/model.pt", swap=b"not weights"), True, "does not match its sha256"),
        "swapped export": (_rewrite(drop="models/model.onnx", swap=b"not onnx"), True, "does not match its sha256"),
        "listed export swapped": (_swap_export_and_listing, True, "does not match the sha256 in 'model.onnx.json'"),
        "unlisted export": (_rewrite(zipfile.ZipInfo(f"{name}/models/extra.onnx"), b"x"), True, "not listed"),
    }
    for label, (edit, rehash, message) in cases.items():
        case_dir = tmp_path / label.replace(" ", "_")
        case_dir.mkdir()
        zoo = _tampered_copy(package_dir, case_dir, edit, rehash)
        capsys.readouterr()
        err = _install_error(capsys, name, str(zoo), case_dir / "dest")
        assert message in err, f"{label}: {err}"
    assert not Path("/tmp/evil.txt").exists()


def test_newer_monai_is_refused(package_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    name = BUNDLES[0].name

    def newer_monai(src: Path, dst: Path) -> None:
        with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
            for info in zin.infolist():
                data = zin.read(info.filename)
                if info.filename.endswith("configs/metadata.json"):
                    meta = json.loads(data)
                    meta["monai_version"] = "9.0.0"
                    data = json.dumps(meta).encode()
                zout.writestr(info, data)

    zoo = _tampered_copy(package_dir, tmp_path, newer_monai, rehash=True)
    assert "needs monai 9.0.0" in _install_error(capsys, name, str(zoo), tmp_path / "dest")
    assert main(["zoo", "install", name, "--index", str(zoo), "--dest", str(tmp_path / "d2"), "--ignore_versions"]) == 0
