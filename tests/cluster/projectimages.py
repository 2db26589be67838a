"""The project's own images, built from Dockerfile.runtime itself on the local Debian base (images.py), for the
node tests' fixtures and hack/quickstart.sh's local-node hooks (`python -m cluster image ...`).

    operator      --target operator, PYTHON_IMAGE=<local base>
    runtime-cpu   --target runtime, VARIANT=cpu, PYTHON_IMAGE=<local base>; PyTorch's CPU index is out of reach
                  here, so PIP_EXTRA_INDEX_URL="" and TORCH_LOCAL_VERSION="" take PyPI's (CUDA) torch, from a
                  wheel folder the host downloaded once (images.torch_wheels) mounted at /wheels for the torch
                  stage only (PIP_FIND_LINKS + PIP_NO_INDEX are that stage's build arguments; a user's `docker
                  build` sets neither and downloads as before)
"""

from __future__ import annotations

from . import images
from .provision import REPO_ROOT, Log, _log_stderr

DOCKERFILE = REPO_ROOT / "Dockerfile.runtime"
WHEELS_MOUNT = "/wheels"


def operator(base: str, log: Log = _log_stderr) -> images.Image:
    return images.build(
        "operator", DOCKERFILE, REPO_ROOT, target="operator", build_args={"PYTHON_IMAGE": base}, log=log
    )


def runtime_cpu(base: str, log: Log = _log_stderr) -> images.Image:
    args = {"PYTHON_IMAGE": base, "VARIANT": "cpu", "PIP_EXTRA_INDEX_URL": "", "TORCH_LOCAL_VERSION": ""}
    wheels = images.torch_wheels(images.dockerfile_arg(DOCKERFILE, "TORCH_VERSION"), log=log)
    volumes = {}
    if wheels is not None:
        args |= {"PIP_FIND_LINKS": WHEELS_MOUNT, "PIP_NO_INDEX": "1"}
        volumes = {wheels: WHEELS_MOUNT}
    return images.build(
        "runtime-cpu", DOCKERFILE, REPO_ROOT, target="runtime", build_args=args, volumes=volumes, log=log
    )


BUILDERS = {"operator": operator, "runtime-cpu": runtime_cpu}
