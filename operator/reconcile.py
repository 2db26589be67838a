"""Bring the cluster to what one LLMDeployment's spec asks for: parse, render, server-side apply, prune.

Returns a typed outcome instead of raising for what is the user's to fix (an invalid spec, an apply the API server
refuses): the status shows it, and the handler decides whether kopf should retry. Transient API errors (5xx, 409,
429, connection errors) do raise, so kopf retries them with backoff.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import pydantic
from kubernetes.client.exceptions import ApiException

from kubellm import contract
from kubellm.operator.apply import Kube
from kubellm.operator.model_cache import JobState, find_job
from kubellm.operator.render import render
from kubellm.operator.resources import Owner, engine_section, model_cache_claim
from kubellm.operator.settings import Settings
from kubellm.operator.spec import LLMDeploymentSpec, parse_spec
from kubellm.operator.status import DeploymentState


@dataclass(frozen=True)
class ReconcileOutcome:
    """What one reconcile did for generation `generation` of the spec."""

    generation: int
    spec: LLMDeploymentSpec | None  # None: the spec is invalid (`error` says why)
    applied: bool  # every desired object was applied (and stale ones pruned)
    error: str | None = None  # the API server's refusal, or the spec's first validation error
    deployment: DeploymentState | None = None  # the Deployment as the apply returned it

    @property
    def invalid_spec(self) -> bool:
        return self.spec is None


@dataclass(frozen=True)
class Existing:
    """What the watches show of the owner's objects, so a reconcile prunes what the spec no longer renders."""

    pdb: bool = False
    deployment: bool = False
    groups: frozenset[str] = frozenset()  # replica groups' StatefulSets (each with a namesake headless Service)
    jobs: tuple[JobState, ...] = ()  # loader Jobs of storage.modelCache

    @classmethod
    def from_indices(
        cls,
        key: Any,
        pdbs: Mapping[Any, Any],
        deployments: Mapping[Any, Any],
        statefulsets: Mapping[Any, Any],
        jobs: Mapping[Any, Any],
    ) -> Existing:
        """From the kopf indices (key: (namespace, LLMDeployment name))."""
        return cls(
            pdb=key in pdbs,
            deployment=key in deployments,
            groups=frozenset(s.name for s in statefulsets.get(key, ())),
            jobs=tuple(jobs.get(key, ())),
        )


def parse_or_error(spec: Mapping[str, Any]) -> tuple[LLMDeploymentSpec | None, str | None]:
    try:
        return parse_spec(dict(spec)), None
    except pydantic.ValidationError as exc:
        first = exc.errors()[0]
        where = "spec." + ".".join(str(p) for p in first["loc"])
        return None, f"{where}: {first['msg']}"


def is_permanent(exc: ApiException) -> bool:
    """A refusal that retrying the same request cannot fix (invalid object, forbidden), as opposed to a 409/429."""
    return exc.status is not None and 400 <= exc.status < 500 and exc.status not in (409, 429)


def api_message(exc: ApiException) -> str:
    """The API server's own message (a Status object's `message`), else the HTTP status line."""
    try:
        body = json.loads(exc.body or "")
    except (TypeError, ValueError):
        body = None
    if isinstance(body, dict) and body.get("message"):
        return str(body["message"])
    return f"HTTP {exc.status}: {exc.reason}"


def reconcile(
    kube: Kube, owner: Owner, raw_spec: Mapping[str, Any], generation: int, settings: Settings, existing: Existing
) -> ReconcileOutcome:
    """Apply everything the spec renders to, in dependency order; then prune what it no longer renders (the PDB
    at one replica, the Deployment or the groups when the replicas switch between pods and groups, the groups
    above spec.replicas)."""
    spec, error = parse_or_error(raw_spec)
    if spec is None:
        return ReconcileOutcome(generation=generation, spec=None, applied=False, error=error)
    engine_error = contract.check_engine_section(engine_section(owner, spec))
    if engine_error is not None:
        # The runtime's own EngineConfig refuses it: the same check the pod would make, before any pod starts.
        return ReconcileOutcome(generation=generation, spec=None, applied=False, error=f"spec.engine: {engine_error}")
    job = find_job(existing.jobs, owner, spec) if spec.storage.model_cache is not None else None
    desired = render(owner, spec, settings, model_ready=job is not None and job.complete)
    deployment = None
    what = ""
    try:
        for obj in desired.to_apply():
            what = f"applying {obj['kind']} {obj['metadata']['name']}"
            applied = kube.apply(obj)
            if obj["kind"] == "Deployment":
                deployment = DeploymentState.from_object(applied)
        if desired.pdb is None and existing.pdb:
            what = f"pruning PodDisruptionBudget {owner.name}"
            kube.delete_owned("policy/v1", "PodDisruptionBudget", owner.namespace, owner.name, owner.uid)
        if desired.deployment is None and existing.deployment:
            what = f"pruning Deployment {owner.name}"
            kube.delete_owned("apps/v1", "Deployment", owner.namespace, owner.name, owner.uid)
        wanted_jobs = {obj["metadata"]["name"] for obj in desired.model_cache if obj["kind"] == "Job"}
        for stale in sorted(j.name for j in existing.jobs if j.name not in wanted_jobs):
            what = f"pruning loader Job {stale}"
            kube.delete_owned("batch/v1", "Job", owner.namespace, stale, owner.uid)
        if existing.jobs and not desired.model_cache:
            what = f"pruning the model cache claim {model_cache_claim(owner.name)}"
            kube.delete_owned("v1", "PersistentVolumeClaim", owner.namespace, model_cache_claim(owner.name), owner.uid)
        for group in sorted(existing.groups - desired.group_names()):
            what = f"pruning replica group {group}"
            kube.delete_owned("apps/v1", "StatefulSet", owner.namespace, group, owner.uid)
            kube.delete_owned("v1", "Service", owner.namespace, group, owner.uid)
    except ApiException as exc:
        if not is_permanent(exc):
            raise
        message = f"{what} failed: {api_message(exc)}"
        return ReconcileOutcome(generation=generation, spec=spec, applied=False, error=message, deployment=deployment)
    return ReconcileOutcome(generation=generation, spec=spec, applied=True, deployment=deployment)


def reapply_one(
    kube: Kube, owner: Owner, raw_spec: Mapping[str, Any], settings: Settings, kind: str, name: str
) -> dict[str, Any] | None:
    """Re-apply the one desired object `kind`/`name` (drift correction); returns it as stored. None if the spec
    wants no such object (a PDB pruned at one replica) or cannot be parsed; API errors raise."""
    spec, _error = parse_or_error(raw_spec)
    if spec is None:
        return None
    for obj in render(owner, spec, settings).to_apply():
        if obj["kind"] == kind and obj["metadata"]["name"] == name:
            return kube.apply(obj)
    return None
