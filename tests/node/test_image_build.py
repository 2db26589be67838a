"""Building an image here leaves the host as it was: buildah runs with chroot isolation (its default isolation adds
a bridge and iptables chains and sets the host's ip_forward) and keeps its config, storage and caches under ours."""

from __future__ import annotations

import secrets
from pathlib import Path

import pytest
from cluster import images

from node import hoststate

pytestmark = [pytest.mark.node, pytest.mark.slow]


def test_a_build_with_a_run_step_leaves_the_host_unchanged(debian_base: str, tmp_path: Path) -> None:
    nonce = secrets.token_hex(8)  # a fresh key: the build really runs
    print(f"nonce {nonce}")
    dockerfile = (
        "ARG BASE_IMAGE\nFROM ${BASE_IMAGE}\nARG NONCE\nRUN echo \"$NONCE\" > /nonce && python3 -c 'print(1)'\n"
    )
    (tmp_path / "Dockerfile").write_text(dockerfile)
    before = hoststate.snapshot()
    image = images.build(
        f"throwaway-{nonce}", tmp_path / "Dockerfile", tmp_path, build_args={"BASE_IMAGE": debian_base, "NONCE": nonce}
    )
    after = hoststate.snapshot()
    try:
        assert image.built_s is not None and image.archive.stat().st_size > 0
        assert hoststate.diff(before, after) == {}
    finally:
        image.archive.unlink(missing_ok=True)
        images.remove(image.name)
