"""PURE: an LLMDeployment spec -> every object that runs it, in the order they are applied.

A replica is a Deployment pod, or with `parallelism.nodes > 1` a group of pods (groups.py): then there is no
Deployment, and each group is a headless Service and a StatefulSet. With storage.modelCache a claim and its
loader Job come first (model_cache.py), and the replicas stay at 0 until the Job has filled the claim.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from kubellm.operator.groups import render_groups
from kubellm.operator.model_cache import render_claim, render_loader_job
from kubellm.operator.resources import (
    JSON,
    Owner,
    render_config_map,
    render_deployment,
    render_pdb,
    render_service,
)
from kubellm.operator.settings import Settings
from kubellm.operator.spec import LLMDeploymentSpec


@dataclass(frozen=True)
class DesiredObjects:
    config_map: JSON
    deployment: JSON | None  # None: the replicas are groups
    service: JSON
    # None: there must be no PodDisruptionBudget (a single replica cannot keep one available while draining).
    pdb: JSON | None
    groups: list[JSON] = field(default_factory=list)  # per group: its headless Service, then its StatefulSet
    model_cache: list[JSON] = field(default_factory=list)  # storage.modelCache: its claim, then its loader Job

    def to_apply(self) -> list[JSON]:
        """In dependency order: the ConfigMap and the model cache exist before the pods that mount them."""
        workloads = [self.deployment] if self.deployment is not None else self.groups
        pdb = [self.pdb] if self.pdb is not None else []
        return [self.config_map, *self.model_cache, *workloads, self.service, *pdb]

    def group_names(self) -> set[str]:
        return {obj["metadata"]["name"] for obj in self.groups}


def render(owner: Owner, spec: LLMDeploymentSpec, settings: Settings, model_ready: bool = True) -> DesiredObjects:
    """model_ready: the loader Job of storage.modelCache has completed (without a model cache, ignored)."""
    config_map = render_config_map(owner, spec, settings)
    cache = []
    if spec.storage.model_cache is not None:
        cache = [render_claim(owner, spec), render_loader_job(owner, spec, settings)]
        if not model_ready:
            spec = spec.model_copy(update={"replicas": 0})  # the pods wait for the model, holding no GPU
    grouped = spec.nodes() > 1
    return DesiredObjects(
        config_map=config_map,
        deployment=None if grouped else render_deployment(owner, spec, settings, config_map),
        service=render_service(owner, spec),
        pdb=render_pdb(owner, spec),
        groups=render_groups(owner, spec, settings, config_map) if grouped else [],
        model_cache=cache,
    )
