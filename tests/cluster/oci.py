"""A one-layer OCI image archive written directly (no builder): enough for the node's pause image.

archive.tar
  oci-layout                    {"imageLayoutVersion": "1.0.0"}
  index.json                    one manifest, named by io.containerd.image.name (what `ctr images import` tags)
  blobs/sha256/<layer>          an uncompressed tar: only imported locally, never pushed
  blobs/sha256/<config>         architecture, os, entrypoint, user, rootfs.diff_ids
  blobs/sha256/<manifest>
"""

from __future__ import annotations

import hashlib
import io
import json
import platform
import tarfile
from dataclasses import dataclass
from pathlib import Path

_ARCH = {"x86_64": "amd64", "aarch64": "arm64"}


@dataclass(frozen=True)
class File:
    path: str  # inside the image, relative to /
    data: bytes
    mode: int = 0o644


def _tar(files: list[File]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for f in files:
            info = tarfile.TarInfo(f.path)
            info.size, info.mode = len(f.data), f.mode
            tar.addfile(info, io.BytesIO(f.data))
    return buffer.getvalue()


def _descriptor(media_type: str, blob: bytes) -> dict[str, object]:
    return {"mediaType": media_type, "digest": f"sha256:{hashlib.sha256(blob).hexdigest()}", "size": len(blob)}


def write_archive(path: Path, name: str, files: list[File], *, entrypoint: list[str], user: str) -> None:
    layer = _tar(files)
    config = json.dumps(
        {
            "architecture": _ARCH.get(platform.machine(), platform.machine()),
            "os": "linux",
            "config": {"Entrypoint": entrypoint, "User": user},
            "rootfs": {"type": "layers", "diff_ids": [f"sha256:{hashlib.sha256(layer).hexdigest()}"]},
        },
        sort_keys=True,
    ).encode()
    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": _descriptor("application/vnd.oci.image.config.v1+json", config),
            "layers": [_descriptor("application/vnd.oci.image.layer.v1.tar", layer)],
        },
        sort_keys=True,
    ).encode()
    manifest_descriptor = _descriptor("application/vnd.oci.image.manifest.v1+json", manifest)
    manifest_descriptor["annotations"] = {"io.containerd.image.name": name, "org.opencontainers.image.ref.name": name}
    index = json.dumps({"schemaVersion": 2, "manifests": [manifest_descriptor]}, sort_keys=True).encode()
    blobs = [File(f"blobs/sha256/{hashlib.sha256(b).hexdigest()}", b) for b in (layer, config, manifest)]
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(_tar([File("oci-layout", b'{"imageLayoutVersion":"1.0.0"}'), File("index.json", index), *blobs]))
    tmp.replace(path)
