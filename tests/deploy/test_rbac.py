"""The chart's RBAC is exactly what the operator's code paths use: no wildcard, nothing unused, nothing missing.

The permissions the operator needs are derived from the code itself, not from a list kept by hand:
- kopf's registry, filled by `handlers.register`: every watched or indexed resource needs list+watch; resources with
  change handlers or timers are patched (progress annotations, finalizer) and so is their status subresource;
- every use of `Kube` (apply.py) in operator/: apply -> patch and create on each kind `render.render` produces,
  scale -> patch on the scale subresource, delete_owned/get/list -> the verbs they send, on the kinds named at the call;
- `kopf.event` and kopf's own warning Events -> events create;
- kopf itself (kopf/_core/reactor/observation.py, engines/peering.py): CRDs list+watch for resource scanning;
  namespaces list+watch only in namespaced mode; the peering object of the mode, list+watch+patch.
tests/deploy/test_k8s_deploy.py then runs the operator as the chart's ServiceAccount against a real API server.
"""

from __future__ import annotations

import ast
import inspect
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from deploy.helmchart import ROOT, VALUES_DIR, Helm, by_kind

Permission = tuple[str, str, str]  # (apiGroup, resource, verb)

# Specs that make render.render produce every kind it can (a PDB needs two replicas; StatefulSets and headless
# Services replicas spanning several nodes; a claim and a Job a model cache).
FULL_SPEC: dict[str, Any] = {
    "model": {"source": "builtin:smollm2-135m-instruct", "chatTemplate": "{{ messages }}"},
    "replicas": 2,
    "auth": {"apiKeySecretRef": {"name": "key"}},
}
CACHED_SPEC: dict[str, Any] = {
    "model": {"source": "hf://org/model"},
    "storage": {"modelCache": {"size": "10Gi"}},
}
GROUPED_SPEC: dict[str, Any] = {
    **FULL_SPEC,
    "resources": {"gpus": 2},
    "parallelism": {"tensor": 2, "pipeline": 2, "nodes": 2},
}
CLUSTER_SCOPED = {
    ("apiextensions.k8s.io", "customresourcedefinitions"),
    ("", "namespaces"),
    ("kopf.dev", "clusterkopfpeerings"),
}


def _path_to_resource(path: str) -> tuple[str, str]:
    """/api/v1/namespaces/x/pods -> ("", "pods"); /apis/apps/v1/namespaces/x/deployments -> ("apps", "deployments")."""
    parts = path.strip("/").split("/")
    if parts[0] == "api":
        return "", parts[4]
    if len(parts) == 4:  # cluster-scoped: /apis/kopf.dev/v1/clusterkopfpeerings
        return parts[1], parts[3]
    return parts[1], parts[5]


_HTTP_VERBS = {"POST": "create", "PUT": "update", "PATCH": "patch", "DELETE": "delete"}


@dataclass(frozen=True)
class _Request:
    """One API request a Kube method sends: HTTP method, where (api_version, kind) comes from, subresource."""

    http_method: str
    target: tuple[str, str] | str  # constants (api_version, kind), "params" (the method's own), or "object"
    named: bool  # a path to one object (get) or to the collection (list)
    subresource: str
    creates: bool  # a server-side apply, which creates the object when it is missing


def _kube_requests() -> dict[str, list[_Request]]:
    """What each public method of apply.Kube sends, read from its source: its `self._call(...)` requests, and
    the requests of the Kube methods it calls in turn."""
    from kubellm.operator import apply

    constants = {"c": apply.c}
    tree = ast.parse((ROOT / "operator" / "apply.py").read_text())
    (kube,) = [n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "Kube"]
    methods = {f.name: f for f in kube.body if isinstance(f, ast.FunctionDef)}
    own: dict[str, list[_Request]] = {}
    calls: dict[str, set[str]] = {}
    for name, func in methods.items():
        own[name], calls[name] = [], set()
        # Local names bound once, e.g. `path = object_path(...)` before `self._call("PATCH", path, ...)`.
        local = {
            t.id: n.value
            for n in ast.walk(func)
            if isinstance(n, ast.Assign)
            for t in n.targets
            if isinstance(t, ast.Name)
        }
        for node in ast.walk(func):
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
                continue
            if not (isinstance(node.func.value, ast.Name) and node.func.value.id == "self"):
                continue
            if node.func.attr != "_call":
                calls[name].add(node.func.attr)
                continue
            http_method = ast.literal_eval(node.args[0])
            path, subresource = node.args[1], ""
            if isinstance(path, ast.Name):
                path = local[path.id]
            if isinstance(path, ast.BinOp):  # object_path(...) + "/status"
                subresource = ast.literal_eval(path.right)
                path = path.left
            assert isinstance(path, ast.Call) and getattr(path.func, "id", "") == "object_path", ast.unparse(path)
            first = path.args[0]
            target: tuple[str, str] | str
            if isinstance(first, ast.Attribute):
                target = (eval(ast.unparse(first), constants), eval(ast.unparse(path.args[1]), constants))
            elif isinstance(first, ast.Subscript):
                target = "object"
            else:
                target = "params"
            content_type = next((k.value for k in node.keywords if k.arg == "content_type"), None)
            creates = isinstance(content_type, ast.Constant) and content_type.value == "application/apply-patch+yaml"
            own[name].append(_Request(http_method, target, len(path.args) >= 4, subresource, creates))

    def closure(name: str, seen: frozenset[str] = frozenset()) -> list[_Request]:
        found = list(own[name])
        for callee in calls[name] - seen:
            if callee in methods:
                found += closure(callee, seen | {name})
        return found

    return {name: closure(name) for name in methods if not name.startswith("_")}


def _kube_uses() -> list[tuple[str, tuple[str, ...]]]:
    """(method, literal positional args) for every `kube.<method>` / `memo.kube.<method>` reference in operator/:
    called, or handed to a thread with its arguments (`asyncio.to_thread(self.kube.delete, "v1", "Pod", ...)`)."""
    from kubellm.operator.apply import Kube

    methods = {name for name, _ in inspect.getmembers(Kube, inspect.isfunction) if not name.startswith("_")}
    uses = []
    for path in sorted((ROOT / "operator").glob("*.py")):
        if path.name == "apply.py":
            continue
        tree = ast.parse(path.read_text())
        calls = {id(node.func): node for node in ast.walk(tree) if isinstance(node, ast.Call)}
        handed = {id(node.args[0]): node for node in ast.walk(tree) if isinstance(node, ast.Call) and node.args}
        for node in ast.walk(tree):
            if not (isinstance(node, ast.Attribute) and node.attr in methods):
                continue
            receiver = node.value
            name = receiver.attr if isinstance(receiver, ast.Attribute) else getattr(receiver, "id", "")
            if name != "kube":
                continue
            call = calls.get(id(node))
            literal = call.args if call else handed[id(node)].args[1:] if id(node) in handed else []
            args = tuple(str(a.value) for a in literal if isinstance(a, ast.Constant))
            uses.append((node.attr, args))
    return uses


def used_permissions(*, cluster_wide: bool, peering: bool) -> tuple[set[Permission], set[Permission]]:
    """(cluster-scoped, namespaced) permissions some code path of the operator uses in this mode."""
    import kopf

    from kubellm.operator import apply, handlers, render, resources
    from kubellm.operator.settings import Settings
    from kubellm.operator.spec import parse_spec

    namespaced: set[Permission] = set()
    registry = kopf.OperatorRegistry()
    handlers.register(registry, Settings())
    for kind in ("_indexing", "_watching", "_spawning", "_changing"):
        for handler in getattr(registry, kind).get_all_handlers():
            group, plural = handler.selector.group or "", handler.selector.any_name
            namespaced |= {(group, plural, "list"), (group, plural, "watch")}
            if kind in ("_spawning", "_changing"):
                # kopf patches the object (annotations, finalizer) and, via the subresource, its status.
                namespaced |= {(group, plural, "patch"), (group, f"{plural}/status", "patch")}

    owner = resources.Owner(name="x", namespace="ns", uid="u")
    rendered = [
        obj
        for spec in (FULL_SPEC, GROUPED_SPEC, CACHED_SPEC)
        for obj in render.render(owner, parse_spec(spec), Settings()).to_apply()
    ]
    uses = _kube_uses()
    assert uses, "found no use of Kube in operator/"
    requests = _kube_requests()
    for method, args in uses:
        for request in requests[method]:
            if request.target == "object":  # apply(obj): every kind render.render produces
                kinds = [(obj["apiVersion"], obj["kind"]) for obj in rendered]
            elif request.target == "params":  # the caller names the kind: its first two literal arguments
                kinds = [(args[0], args[1])]
            else:
                kinds = [request.target]  # type: ignore[list-item]
            for api_version, kind in kinds:
                group, plural = _path_to_resource(apply.object_path(api_version, kind, "ns"))
                resource = plural + request.subresource
                if request.http_method == "GET":
                    namespaced.add((group, resource, "get" if request.named else "list"))
                else:
                    namespaced.add((group, resource, _HTTP_VERBS[request.http_method]))
                if request.creates:
                    # A server-side apply that creates the object is authorized as `create` too (the API server
                    # says "cannot create resource" without it; test_k8s_deploy.py sees it).
                    namespaced.add((group, resource, "create"))
    # OwnerReferencesPermissionEnforcement (on in OpenShift and in the test control plane): writing an object's
    # ownerReferences needs `delete` on it, and blockOwnerDeletion `update` on the owner's finalizers subresource.
    for obj in rendered:
        for ref in obj["metadata"].get("ownerReferences") or []:
            group, plural = _path_to_resource(apply.object_path(obj["apiVersion"], obj["kind"], "ns"))
            namespaced.add((group, plural, "delete"))
            if ref.get("blockOwnerDeletion"):
                owner_group, owner_plural = _path_to_resource(apply.object_path(ref["apiVersion"], ref["kind"], "ns"))
                namespaced.add((owner_group, f"{owner_plural}/finalizers", "update"))

    # The fleet loop reads the peering object of the mode (loop.py), which only exists with peering on.
    namespaced = {p for p in namespaced if p[0] != "kopf.dev"}
    # Events: kopf.event in the handlers, and kopf posts its own warnings (settings.posting) as Events.
    namespaced.add(("", "events", "create"))

    cluster: set[Permission] = {
        ("apiextensions.k8s.io", "customresourcedefinitions", "list"),
        ("apiextensions.k8s.io", "customresourcedefinitions", "watch"),
    }
    if not cluster_wide:
        cluster |= {("", "namespaces", "list"), ("", "namespaces", "watch")}
    if peering:
        target = cluster if cluster_wide else namespaced
        plural = "clusterkopfpeerings" if cluster_wide else "kopfpeerings"
        target |= {("kopf.dev", plural, verb) for verb in ("get", "list", "watch", "patch")}
    return cluster, namespaced


def _crd_kind() -> tuple[str, str]:
    from kubellm.operator import constants as c

    return c.API_VERSION, c.KIND


def _flatten(rules: list[dict[str, Any]]) -> set[Permission]:
    return {
        (group, resource, verb)
        for rule in rules
        for group in rule["apiGroups"]
        for resource in rule["resources"]
        for verb in rule["verbs"]
    }


MODES = [
    pytest.param([], [], True, True, id="cluster-wide"),
    pytest.param([VALUES_DIR / "namespaced.yaml"], [], False, True, id="namespaced"),
    pytest.param([VALUES_DIR / "minimal.yaml"], [], True, False, id="cluster-wide-no-peering"),
    pytest.param([VALUES_DIR / "namespaced.yaml"], ["peering.enabled=false"], False, False, id="namespaced-no-peering"),
]


@pytest.mark.parametrize(("values", "set_values", "cluster_wide", "peering"), MODES)
def test_chart_grants_exactly_what_the_operator_uses(
    helm: Helm, values: list[Path], set_values: list[str], cluster_wide: bool, peering: bool
) -> None:
    manifests = helm.render(values=values, set_values=set_values)
    cluster_roles = by_kind(manifests, "ClusterRole")
    roles = by_kind(manifests, "Role")
    assert len(cluster_roles) == 1
    for rule in [r for role in cluster_roles + roles for r in role["rules"]]:
        for key in ("apiGroups", "resources", "verbs"):
            assert "*" not in rule[key], f"wildcard in {rule}"
        assert not rule.get("nonResourceURLs"), rule
        assert set(rule) <= {"apiGroups", "resources", "verbs"}, rule

    want_cluster, want_namespaced = used_permissions(cluster_wide=cluster_wide, peering=peering)
    granted_cluster = _flatten(cluster_roles[0]["rules"])
    if cluster_wide:
        assert not roles
        expected = want_cluster | want_namespaced
        assert granted_cluster - expected == set(), "granted but no code path uses it"
        assert expected - granted_cluster == set(), "used by the operator but not granted"
    else:
        assert granted_cluster == want_cluster
        assert {(g, r.split("/")[0]) for g, r, _ in granted_cluster} <= CLUSTER_SCOPED
        assert roles, "namespaced mode renders no Role"
        for role in roles:
            granted = _flatten(role["rules"])
            assert granted - want_namespaced == set(), f"{role['metadata']['namespace']}: granted but unused"
            assert want_namespaced - granted == set(), f"{role['metadata']['namespace']}: used but not granted"


def test_the_derivation_sees_the_operators_api_calls() -> None:
    """Guards the derivation above against finding nothing: the calls handlers.py is known to make are found."""
    cluster, namespaced = used_permissions(cluster_wide=True, peering=True)
    assert ("apps", "deployments", "patch") in namespaced  # server-side apply of the Deployment
    assert ("kubellm.io", "llmdeployments/scale", "patch") in namespaced  # the autoscaler
    assert ("", "pods", "watch") in namespaced  # the pods index
    assert ("policy", "poddisruptionbudgets", "delete") in namespaced  # pruning a stale PDB
    assert ("apps", "deployments", "delete") in namespaced  # setting its ownerReferences
    assert ("kubellm.io", "llmdeployments/finalizers", "update") in namespaced  # blockOwnerDeletion
    assert ("kopf.dev", "clusterkopfpeerings", "patch") in cluster
