"""PURE: an LLMDeployment spec -> every object that runs it, in the order they are applied.

A replica is a Deployment pod, or with `parallelism.nodes > 1` a group of pods (groups.py): then there is no
Deployment, and each group is a headless Service and a StatefulSet.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from kubellm.operator.groups import render_groups
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

    def to_apply(self) -> list[JSON]:
        """In dependency order: the ConfigMap exists before the pods that mount it."""
        workloads = [self.deployment] if self.deployment is not None else self.groups
        return [self.config_map, *workloads, self.service] + ([self.pdb] if self.pdb is not None else [])

    def group_names(self) -> set[str]:
        return {obj["metadata"]["name"] for obj in self.groups}


def render(owner: Owner, spec: LLMDeploymentSpec, settings: Settings) -> DesiredObjects:
    config_map = render_config_map(owner, spec, settings)
    grouped = spec.nodes() > 1
    return DesiredObjects(
        config_map=config_map,
        deployment=None if grouped else render_deployment(owner, spec, settings, config_map),
        service=render_service(owner, spec),
        pdb=render_pdb(owner, spec),
        groups=render_groups(owner, spec, settings, config_map) if grouped else [],
    )
