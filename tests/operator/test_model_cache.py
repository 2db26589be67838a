"""storage.modelCache as rendered (no cluster): the claim, the loader Job, the replicas held at 0 until the model is
in the cache, and the status read from the Job and its pods."""

from __future__ import annotations

import json
from typing import Any

from kubellm.operator import constants as c
from kubellm.operator.model_cache import (
    PERMANENT_EXIT_CODE,
    JobState,
    loader_job_name,
    model_status,
    parse_progress,
    termination_message,
)
from kubellm.operator.render import render
from kubellm.operator.resources import Owner, selector_labels
from kubellm.operator.settings import Settings
from kubellm.operator.spec import LLMDeploymentSpec
from kubellm.runtime import download

OWNER = Owner(name="llama", namespace="ml", uid="u-1")
SPEC: dict[str, Any] = {
    "model": {"source": "hf://meta-llama/Llama-3.1-8B-Instruct", "revision": "v1", "tokenSecretRef": {"name": "hf"}},
    "replicas": 3,
    "storage": {"modelCache": {"size": "40Gi", "storageClassName": "fast"}},
}


def _spec(**over: Any) -> LLMDeploymentSpec:
    return LLMDeploymentSpec.model_validate({**SPEC, **over})


def test_claim_and_loader_job_come_first_and_the_replicas_wait_for_the_model() -> None:
    waiting = render(OWNER, _spec(), Settings(), model_ready=False)
    kinds = [o["kind"] for o in waiting.to_apply()]
    assert kinds[:3] == ["ConfigMap", "PersistentVolumeClaim", "Job"]
    assert waiting.deployment is not None and waiting.deployment["spec"]["replicas"] == 0
    assert waiting.pdb is None
    ready = render(OWNER, _spec(), Settings(), model_ready=True)
    assert ready.deployment is not None and ready.deployment["spec"]["replicas"] == 3
    claim, job = ready.model_cache
    assert claim["spec"] == {
        "accessModes": ["ReadWriteMany"],
        "resources": {"requests": {"storage": "40Gi"}},
        "storageClassName": "fast",
    }
    pod = job["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    dest = container["args"][3]
    assert container["args"] == ["download", SPEC["model"]["source"], "--dest", dest, "--revision", "v1"]
    assert {"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": "hf", "key": "token"}}} in container["env"]
    assert pod["restartPolicy"] == "Never" and pod["volumes"][0]["persistentVolumeClaim"]["claimName"] == "llama-model"
    (rule,) = job["spec"]["podFailurePolicy"]["rules"]
    assert rule["action"] == "FailJob" and rule["onExitCodes"]["values"] == [download.PERMANENT_EXIT_CODE]
    assert PERMANENT_EXIT_CODE == download.PERMANENT_EXIT_CODE
    # The loader is not a runtime pod: the Service and the PDB never select it.
    labels = job["spec"]["template"]["metadata"]["labels"]
    assert not selector_labels("llama").items() <= labels.items()
    # The replicas load the loader's folder from the claim, read-only, offline.
    engine = json.loads(ready.config_map["data"][c.ENGINE_CONFIG_KEY])["engine"]
    assert engine["model"] == dest and "revision" not in engine
    runtime = ready.deployment["spec"]["template"]["spec"]
    (cache,) = [v for v in runtime["volumes"] if v["name"] == "model-cache"]
    assert cache["persistentVolumeClaim"] == {"claimName": "llama-model", "readOnly": True}
    assert {"name": "HF_HUB_OFFLINE", "value": "1"} in runtime["containers"][0]["env"]


def test_a_new_source_is_a_new_job_and_names_fit_in_a_label() -> None:
    first = loader_job_name(OWNER, _spec())
    other = loader_job_name(OWNER, _spec(model={"source": "hf://org/other"}))
    assert first != other
    long = Owner(name="x" * 63, namespace="ml", uid="u")
    assert len(loader_job_name(long, _spec())) <= 63


def test_progress_is_the_last_progress_line() -> None:
    log = '{"bytesDone": 1, "bytesTotal": 10, "filesDone": 0, "filesTotal": 2}\nnoise\n'
    log += '{"bytesDone": 6, "bytesTotal": 10, "filesDone": 1, "filesTotal": 2}\n'
    assert parse_progress(log) == {"bytesDone": 6, "bytesTotal": 10, "filesDone": 1, "filesTotal": 2}
    assert parse_progress("warming up\n") is None


def test_status_from_the_job_and_its_pods() -> None:
    spec = _spec()
    assert model_status(spec, None, None, None).phase == "Pending"
    running = model_status(spec, JobState("j", active=1), {"bytesDone": 6, "bytesTotal": 10}, None)
    assert (running.phase, running.bytes_done, running.bytes_total) == ("Downloading", 6, 10)
    assert "60%" in running.message
    failed_pods = [
        {"status": {"containerStatuses": [{"state": {"terminated": {"exitCode": 1, "message": "old",
                                                                    "finishedAt": "2026-01-01T00:00:00Z"}}}]}},
        {"status": {"containerStatuses": [{"state": {"terminated": {"exitCode": 2, "message": "GatedRepoError: x",
                                                                    "finishedAt": "2026-01-01T00:01:00Z"}}}]}},
    ]  # fmt: skip
    cause = termination_message(failed_pods)
    assert cause == "GatedRepoError: x"
    failed = model_status(spec, JobState("j", failed=True, message="BackoffLimitExceeded"), None, cause)
    assert failed.phase == "Failed" and "GatedRepoError" in failed.message
    assert model_status(spec, JobState("j", complete=True), None, None).phase == "Ready"
