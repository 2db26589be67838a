"""Images built here with no registry and no daemon, cached by content, for the real node (realnode.py):

    debian_base()     mmdebstrap bookworm minbase + python3 (the Dockerfiles' base-image build argument selects it)
    build(...)        `buildah bud --isolation chroot --pull=never` of a Dockerfile, exported as a docker-archive
                      (uncompressed: it is only imported locally) that RealNode.load_image imports into containerd

Each archive's name carries the hash of everything it was built from (Dockerfile, target, build arguments, the
context's files after .dockerignore, the base image's key): an unchanged tree does not rebuild. buildah's config,
storage and CNI folders all live under the cache (~/.cache/kubellm/images/buildah), never /etc/cni or
/var/lib/containers; chroot isolation, because buildah's default isolation adds a bridge, iptables chains and sets
the host's ip_forward.
"""

from __future__ import annotations

import fnmatch
import hashlib
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from .provision import Log, _locked, _log_stderr

DEBIAN_SUITE = "bookworm"
# What python:3.12-slim, the base it stands in for, carries and the Dockerfiles use: `python3 -m venv`, `useradd`,
# and the headers the CPU kernels' build includes (Python.h: the CPU image's build failed without them).
DEBIAN_PACKAGES = ("python3", "python3-venv", "python3-dev", "ca-certificates", "passwd")
# This sandbox re-signs TLS: pip inside a build trusts the host's bundle (only in this local base, never pushed).
HOST_CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")
LOCAL_REGISTRY = "kubellm.local"
# bookworm's python3: the wheels the host downloads for a build (torch_wheels) must be for the image's interpreter.
DEBIAN_PYTHON = (3, 11)
# What BuildKit sets as TARGETARCH (buildah 1.28 does not substitute it in FROM lines: it is passed explicitly).
TARGETARCH = {"x86_64": "amd64", "aarch64": "arm64"}.get(platform.machine(), platform.machine())


class ImageBuildError(RuntimeError):
    pass


@dataclass(frozen=True)
class Image:
    name: str  # e.g. kubellm.local/operator:<key>
    archive: Path  # docker-archive
    built_s: float | None  # None when it came from the cache


def images_dir() -> Path:
    root = os.environ.get("KUBELLM_CACHE_DIR") or str(Path.home() / ".cache" / "kubellm")
    return Path(root) / "images"


def _buildah_env() -> dict[str, str]:
    root = images_dir() / "buildah"
    (root / "cni").mkdir(parents=True, exist_ok=True)
    (root / "storage.conf").write_text(
        f'[storage]\ndriver = "overlay"\ngraphroot = "{root / "storage"}"\nrunroot = "{root / "run"}"\n'
    )
    (root / "containers.conf").write_text(
        f'[engine]\ncgroup_manager = "cgroupfs"\nevents_logger = "none"\n'
        f'[network]\nnetwork_config_dir = "{root / "cni"}"\n'
    )
    (root / "registries.conf").write_text("unqualified-search-registries = []\n")
    return {
        **os.environ,
        "CONTAINERS_CONF": str(root / "containers.conf"),
        "CONTAINERS_STORAGE_CONF": str(root / "storage.conf"),
        "CONTAINERS_REGISTRIES_CONF": str(root / "registries.conf"),
        "BUILDAH_ISOLATION": "chroot",
    }


# buildah (containers/image) keeps its blob-info cache in /var/lib/containers/cache whatever its config says: run it in
# a mount namespace of its own with a tmpfs over /var/lib (its storage lives under the cache, not there).
_PRIVATE_VAR_LIB = [
    *("unshare", "--mount", "--propagation=private", "--"),
    *("sh", "-c", 'mount -t tmpfs kubellm-buildah /var/lib && exec "$@"', "sh"),
]


def _run(cmd: list[str], *, cwd: Path | None = None, log: Log = _log_stderr) -> str:
    if cmd[0] == "buildah":
        cmd = [*_PRIVATE_VAR_LIB, *cmd]
    result = subprocess.run(cmd, cwd=cwd, env=_buildah_env(), capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise ImageBuildError(
            f"`{' '.join(cmd)}` failed ({result.returncode}):\n{(result.stdout + result.stderr)[-6000:]}"
        )
    return result.stdout


def _dockerignore(context: Path) -> tuple[list[str], list[str]]:
    ignore = context / ".dockerignore"
    if not ignore.exists():
        return [], []
    rules = [line.strip() for line in ignore.read_text().splitlines() if line.strip() and not line.startswith("#")]
    return [r for r in rules if not r.startswith("!")], [r[1:].rstrip("/") for r in rules if r.startswith("!")]


def _context_files(context: Path) -> Iterable[Path]:
    """The files a build sees under .dockerignore: our allow-list form (`*`, then `!path` entries) and exclusions
    matched against every path component (`**/__pycache__`, `**/*.py[cod]`)."""
    excludes, allows = _dockerignore(context)
    deny_all = "*" in excludes
    patterns = [e.removeprefix("**/") for e in excludes if e != "*"]
    for path in sorted(p for p in context.rglob("*") if p.is_file()):
        rel = path.relative_to(context)
        if deny_all and not any(rel.as_posix() == a or rel.as_posix().startswith(f"{a}/") for a in allows):
            continue
        if any(fnmatch.fnmatch(part, pattern) for part in rel.parts for pattern in patterns):
            continue
        yield path


# Docker's image format: with OCI's, buildah ignores SHELL (the Dockerfile's `-o pipefail` would silently go).
# --force-rm: a failed build leaves no working container holding its layers.
BUILD_FLAGS = ("--isolation=chroot", "--pull=never", "--layers", "--format=docker", "--force-rm")


def content_key(
    dockerfile: Path,
    context: Path,
    target: str | None,
    build_args: dict[str, str],
    volumes: dict[Path, str] | None = None,
) -> str:
    mounts = sorted((str(host), inside) for host, inside in (volumes or {}).items())
    digest = hashlib.sha256(dockerfile.read_bytes() + repr(BUILD_FLAGS).encode())
    digest.update(repr((target, sorted(build_args.items()), mounts)).encode())
    for path in _context_files(context):
        digest.update(path.relative_to(context).as_posix().encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


def _exists(name: str) -> bool:
    try:
        _run(["buildah", "inspect", "--type=image", name])
    except ImageBuildError:
        return False
    return True


def debian_base(log: Log = _log_stderr) -> str:
    """The local Debian base image's name, built once per package list (mmdebstrap ~20 s, then buildah)."""
    key = hashlib.sha256(repr((DEBIAN_SUITE, DEBIAN_PACKAGES)).encode() + HOST_CA_BUNDLE.read_bytes()).hexdigest()
    name = f"{LOCAL_REGISTRY}/debian-python:{DEBIAN_SUITE}-{key[:12]}"
    with _locked(images_dir() / ".lock", log):
        if _exists(name):
            return name
        log(f"mmdebstrap {DEBIAN_SUITE} ({', '.join(DEBIAN_PACKAGES)}) -> {name}")
        with tempfile.TemporaryDirectory(prefix="kubellm-base-", dir=images_dir()) as tmp:
            context = Path(tmp)
            subprocess.run(
                ["mmdebstrap", "--quiet", "--mode=root", "--variant=minbase", f"--include={','.join(DEBIAN_PACKAGES)}",
                 DEBIAN_SUITE, str(context / "rootfs.tar")],
                check=True, capture_output=True,
            )  # fmt: skip
            shutil.copy(HOST_CA_BUNDLE, context / "ca-certificates.crt")
            (context / "Dockerfile").write_text(
                "FROM scratch\nADD rootfs.tar /\nCOPY ca-certificates.crt /etc/ssl/certs/ca-certificates.crt\n"
                "ENV PIP_CERT=/etc/ssl/certs/ca-certificates.crt SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt\n"
                'CMD ["python3"]\n'
            )
            _run(["buildah", "bud", "--quiet", *BUILD_FLAGS, "-t", name, str(context)], log=log)
        _forget_older(name.split("/", 1)[1].split(":", 1)[0], name, None)
    return name


def build(
    repository: str,
    dockerfile: Path,
    context: Path,
    *,
    target: str | None = None,
    build_args: dict[str, str] | None = None,
    volumes: dict[Path, str] | None = None,
    log: Log = _log_stderr,
) -> Image:
    """Builds (or finds cached) `kubellm.local/<repository>:<content key>` as a docker-archive. volumes: host
    folders mounted read-only into every RUN step (named by path in the key: their content is the caller's to key)."""
    args = {"TARGETARCH": TARGETARCH, **(build_args or {})}
    mounts = dict(volumes or {})
    key = content_key(dockerfile, context, target, args, mounts)
    name = f"{LOCAL_REGISTRY}/{repository}:{key}"
    archive = images_dir() / f"{repository}-{key}.tar"
    with _locked(images_dir() / ".lock", log):
        if archive.exists():
            return Image(name, archive, None)
        start = time.monotonic()
        log(f"buildah bud {dockerfile.name}{f' --target {target}' if target else ''} -> {name}")
        cmd = ["buildah", "bud", "--quiet", *BUILD_FLAGS, "-f", str(dockerfile)]
        cmd += [f"--target={target}"] if target else []
        for arg, value in sorted(args.items()):
            cmd += ["--build-arg", f"{arg}={value}"]
        for host, inside in sorted(mounts.items()):
            cmd += ["--volume", f"{host}:{inside}:ro"]
        _run([*cmd, "-t", name, str(context)], log=log)
        tmp = archive.with_suffix(".tmp")
        tmp.unlink(missing_ok=True)
        _run(["buildah", "push", "--quiet", name, f"docker-archive:{tmp}:{name}"], log=log)
        tmp.replace(archive)
        _forget_older(repository, name, archive)
        return Image(name, archive, round(time.monotonic() - start, 1))


def _forget_older(repository: str, name: str, archive: Path | None) -> None:
    """One archive and one tag per image: the cache does not grow with every edit (shared layers stay)."""
    for stale in images_dir().glob(f"{repository}-*.tar"):
        if stale != archive:
            stale.unlink()
    for tagged in _run(["buildah", "images", "--noheading", "--format={{.Name}}:{{.Tag}}"]).split():
        if tagged.startswith(f"{LOCAL_REGISTRY}/{repository}:") and tagged != name:
            _run(["buildah", "rmi", tagged])
    _run(["buildah", "rmi", "--prune"])  # the layers no image uses any more


def remove(name: str) -> None:
    """Removes an image from buildah's storage (a test's throwaway build)."""
    _run(["buildah", "rmi", "--force", name])


def dockerfile_arg(dockerfile: Path, name: str) -> str:
    """The default of `ARG name=value` in a Dockerfile (the one place a version such as torch's is written)."""
    match = re.search(rf"^ARG {name}=(\S+)$", dockerfile.read_text(), re.MULTILINE)
    if match is None:
        raise ImageBuildError(f"{dockerfile} has no `ARG {name}=...`")
    return match.group(1)


def torch_wheels(version: str, log: Log = _log_stderr) -> Path | None:
    """A folder with torch==version and its dependencies' wheels, downloaded once by the host's pip (from its cache
    when `make setup` already fetched them): a build mounts it instead of fetching ~3 GB again whenever its torch
    layer is rebuilt. None where the host's Python is not the image's (the wheels would not fit): the build then
    downloads them itself."""
    if sys.version_info[:2] != DEBIAN_PYTHON:
        return None
    folder = images_dir() / "wheels" / f"torch-{version}"
    with _locked(images_dir() / ".lock", log):
        if folder.is_dir():
            return folder
        log(f"pip download torch=={version} -> {folder}")
        partial = folder.with_name(folder.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--only-binary=:all:", "-d", str(partial)]
        result = subprocess.run([*cmd, f"torch=={version}"], capture_output=True, text=True, check=False)
        if result.returncode != 0:
            raise ImageBuildError(f"pip download torch=={version} failed:\n{result.stderr[-4000:]}")
        partial.replace(folder)
    return folder
