"""PURE: models delivered once (storage.modelCache): a PersistentVolumeClaim per LLMDeployment, filled by a loader
Job running `kubellm download` (runtime/download.py), then mounted read-only by every replica.

    spec (hf:// source, storage.modelCache) ──▶ PVC NAME-model + Job NAME-load-KEY (KEY: name, source, revision)
    Job running   ──▶ replicas held at 0; status.model Downloading, progress from the loader's last log line
    Job complete  ──▶ the Deployment (or the groups) at spec.replicas; status.model Ready
    Job failed    ──▶ status.model Failed and Degraded=DownloadFailed, with the loader's termination message

A failed attempt is retried by the Job (a new pod resumes the partial files); a cause that retrying cannot fix (no
such repository, no access) exits with PERMANENT_EXIT_CODE, which the Job's pod failure policy turns into a failed
Job at once.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from kubellm.operator import constants as c
from kubellm.operator.resources import (
    JSON,
    Owner,
    model_cache_claim,
    model_cache_dir,
    model_cache_key,
    object_metadata,
    pod_security_context,
)
from kubellm.operator.settings import Settings
from kubellm.operator.spec import LLMDeploymentSpec, ModelStatus

LOADER_CONTAINER = "loader"
PERMANENT_EXIT_CODE = 2  # runtime/download.py's: retrying cannot help (a test holds the two equal)
BACKOFF_LIMIT = 6


def loader_job_name(owner: Owner, spec: LLMDeploymentSpec) -> str:
    # at most 41 + 6 + 10 characters: a Job's name goes into its pods' job-name label (63 at most)
    return f"{owner.name[:41]}-load-{model_cache_key(owner, spec)}"


def loader_labels(name: str) -> dict[str, str]:
    """Not the runtime's selector labels: the LLMDeployment's Service, PDB and pods index never pick a loader."""
    return {
        c.LABEL_INSTANCE: name,
        c.LABEL_COMPONENT: c.COMPONENT_MODEL_LOADER,
        c.LABEL_MANAGED_BY: c.MANAGED_BY,
        c.LABEL_PART_OF: c.APP_NAME,
    }


def render_claim(owner: Owner, spec: LLMDeploymentSpec) -> JSON:
    cache = spec.storage.model_cache
    assert cache is not None
    claim: JSON = {"accessModes": list(cache.access_modes), "resources": {"requests": {"storage": str(cache.size)}}}
    if cache.storage_class_name is not None:
        claim["storageClassName"] = cache.storage_class_name
    return {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": object_metadata(owner, model_cache_claim(owner.name)),
        "spec": claim,
    }


def render_loader_job(owner: Owner, spec: LLMDeploymentSpec, settings: Settings) -> JSON:
    args = ["download", spec.model.source, "--dest", model_cache_dir(owner, spec)]
    if spec.model.revision is not None:
        args += ["--revision", spec.model.revision]
    env: list[JSON] = [{"name": "HOME", "value": "/tmp"}, {"name": "HF_HOME", "value": "/tmp/huggingface"}]
    token = spec.model.token_secret_ref
    if token is not None:
        env.append({"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": token.name, "key": token.key}}})
    container: JSON = {
        "name": LOADER_CONTAINER,
        "image": spec.image.name or settings.runtime_image,
        "imagePullPolicy": spec.image.pull_policy,
        "command": ["kubellm"],
        "args": args,
        "env": env,
        "resources": {"requests": {"cpu": "500m", "memory": "1Gi"}, "limits": {"memory": "4Gi"}},
        "volumeMounts": [
            {"name": "model-cache", "mountPath": c.MODEL_CACHE_PATH},
            {"name": "tmp", "mountPath": "/tmp"},
        ],
        "terminationMessagePolicy": "FallbackToLogsOnError",
        "securityContext": {
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "runAsNonRoot": True,
            "capabilities": {"drop": ["ALL"]},
        },
    }
    pod_spec: JSON = {
        "restartPolicy": "Never",  # each attempt a new pod (its termination message kept); it resumes the files
        "containers": [container],
        "volumes": [
            {"name": "model-cache", "persistentVolumeClaim": {"claimName": model_cache_claim(owner.name)}},
            {"name": "tmp", "emptyDir": {}},
        ],
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "securityContext": pod_security_context(spec, settings),
    }
    if spec.image.pull_secrets:
        pod_spec["imagePullSecrets"] = [{"name": s} for s in spec.image.pull_secrets]
    meta = object_metadata(owner, loader_job_name(owner, spec))
    meta["labels"] = loader_labels(owner.name)
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": meta,
        "spec": {
            "backoffLimit": BACKOFF_LIMIT,
            "podFailurePolicy": {
                "rules": [
                    {
                        "action": "FailJob",
                        "onExitCodes": {
                            "containerName": LOADER_CONTAINER,
                            "operator": "In",
                            "values": [PERMANENT_EXIT_CODE],
                        },
                    }
                ]
            },
            "template": {"metadata": {"labels": loader_labels(owner.name)}, "spec": pod_spec},
        },
    }


@dataclass(frozen=True)
class JobState:
    """The observed part of a loader Job (kept in a kopf index)."""

    name: str
    uid: str = ""
    active: int = 0
    complete: bool = False
    failed: bool = False
    message: str = ""  # the Failed condition's

    @classmethod
    def from_object(cls, job: Mapping[str, Any]) -> JobState:
        status = job.get("status") or {}
        conditions = {cond.get("type"): cond for cond in status.get("conditions") or []}
        failed = conditions.get("Failed", {})
        return cls(
            name=str((job.get("metadata") or {}).get("name", "")),
            uid=str((job.get("metadata") or {}).get("uid", "")),
            active=int(status.get("active") or 0),
            complete=conditions.get("Complete", {}).get("status") == "True",
            failed=failed.get("status") == "True",
            message=str(failed.get("message") or ""),
        )


def find_job(jobs: Sequence[JobState], owner: Owner, spec: LLMDeploymentSpec) -> JobState | None:
    name = loader_job_name(owner, spec)
    return next((j for j in jobs if j.name == name), None)


def parse_progress(log_tail: str) -> dict[str, int] | None:
    """The last progress line `kubellm download` printed: {bytesDone, bytesTotal, filesDone, filesTotal}."""
    for line in reversed(log_tail.strip().splitlines()):
        try:
            data = json.loads(line)
        except ValueError:
            continue
        keys = ("bytesDone", "bytesTotal", "filesDone", "filesTotal")
        if isinstance(data, dict) and all(isinstance(data.get(k), int) for k in keys):
            return {k: int(data[k]) for k in keys}
    return None


def termination_message(pods: Sequence[Mapping[str, Any]]) -> str | None:
    """The newest failed loader container's termination message (the download's cause, runtime/download.py)."""
    found: list[tuple[str, str]] = []
    for pod in pods:
        for cs in (pod.get("status") or {}).get("containerStatuses") or []:
            terminated = (cs.get("state") or {}).get("terminated") or {}
            if terminated.get("exitCode") not in (None, 0) and terminated.get("message"):
                found.append((str(terminated.get("finishedAt") or ""), str(terminated["message"]).strip()))
    return max(found)[1] if found else None


def model_status(
    spec: LLMDeploymentSpec, job: JobState | None, progress: Mapping[str, int] | None, cause: str | None
) -> ModelStatus:
    source = spec.model.source
    counts = {
        "bytes_done": (progress or {}).get("bytesDone"),
        "bytes_total": (progress or {}).get("bytesTotal"),
        "files_done": (progress or {}).get("filesDone"),
        "files_total": (progress or {}).get("filesTotal"),
    }
    if job is None:
        return ModelStatus(phase="Pending", message="creating the loader Job", source=source)
    if job.complete:
        return ModelStatus(phase="Ready", message=f"{source} is in the model cache", source=source, **counts)
    if job.failed:
        message = f"downloading {source} failed: {cause or job.message or 'the loader Job failed'}"
        return ModelStatus(phase="Failed", message=message[:4096], source=source, **counts)
    done, total = counts["bytes_done"], counts["bytes_total"]
    share = f" ({100 * done // total}% of {total} bytes)" if done is not None and total else ""
    return ModelStatus(phase="Downloading", message=f"downloading {source}{share}", source=source, **counts)
