"""`medpipe verify BUNDLE`: the checks of the verification suite for one bundle, offline.

Metadata against the schema shipped in medpipe/schemas (MONAI's verify_metadata would download one), and
every network listed in metadata `medpipe.networks` through MONAI's verify_net_in_out."""

from __future__ import annotations

import json
from pathlib import Path

from medpipe.bundle.config import find_bundle
from medpipe.errors import MedpipeError, first_line

SCHEMA = Path(__file__).parents[1] / "schemas" / "meta_schema.json"




def net_io_overrides(config_files: list[str]) -> dict[str, str]:
    """verify_net_in_out overrides for a network overlay: a bundle with 2.5-D input (`context_slices`) feeds that
    many channels, whatever the metadata's default network reads."""
    from monai.bundle import ConfigParser

    config = ConfigParser.load_config_files(config_files)
    if "context_slices" not in config:
        return {}
    return {"_meta_#network_data_format#inputs#image#num_channels": int(config["context_slices"])}


def verify_bundle(bundle: str | Path) -> list[str]:
    """Run the checks; return what passed, raise MedpipeError on the first failure."""
    from monai.bundle import verify_metadata, verify_net_in_out

    bundle_dir = find_bundle(bundle)
    meta_file = bundle_dir / "configs" / "metadata.json"
    try:
        verify_metadata(meta_file=str(meta_file), filepath=str(SCHEMA))
    except ValueError as exc:
        raise MedpipeError(f"{meta_file}: {first_line(exc)}") from exc
    passed = [f"metadata {meta_file}"]
    networks = json.loads(meta_file.read_text()).get("medpipe", {}).get("networks", [None])
    for network in networks:
        configs = [str(bundle_dir / "configs" / "train.json")]
        overlay = bundle_dir / "configs" / f"net_{network}.json"
        if overlay.is_file():
            configs.append(str(overlay))
        try:
            verify_net_in_out(
                net_id="network_def", meta_file=str(meta_file), config_file=configs, device="cpu",
                **net_io_overrides(configs),
            )  # fmt: skip
        except Exception as exc:
            raise MedpipeError(f"network '{network}' of {bundle_dir.name}: {exc}") from exc
        passed.append(f"network {network}")
    return passed
