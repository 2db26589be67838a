"""Talk to the API server: server-side apply with one field manager, pruning a stale PDB, the scale subresource.

Server-side apply makes reconciliation idempotent by construction: the operator states the fields it owns, the
API server merges them and skips the write (the resourceVersion stays put) when nothing changed. Conflicts with
other managers are forced: the operator is the owner of what it renders. Edits to those fields by hand are undone
by the drift handlers (handlers.py, drift.py), which watch the owned objects and re-apply.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from kubernetes import client, config
from kubernetes.client.exceptions import ApiException

from kubellm.operator import constants as c

JSON = dict[str, Any]

_COLLECTIONS: dict[tuple[str, str], str] = {
    ("v1", "ConfigMap"): "/api/v1/namespaces/{namespace}/configmaps",
    ("v1", "Service"): "/api/v1/namespaces/{namespace}/services",
    ("v1", "Pod"): "/api/v1/namespaces/{namespace}/pods",
    ("v1", "Event"): "/api/v1/namespaces/{namespace}/events",
    ("apps/v1", "Deployment"): "/apis/apps/v1/namespaces/{namespace}/deployments",
    ("apps/v1", "StatefulSet"): "/apis/apps/v1/namespaces/{namespace}/statefulsets",
    ("batch/v1", "Job"): "/apis/batch/v1/namespaces/{namespace}/jobs",
    ("v1", "PersistentVolumeClaim"): "/api/v1/namespaces/{namespace}/persistentvolumeclaims",
    ("policy/v1", "PodDisruptionBudget"): "/apis/policy/v1/namespaces/{namespace}/poddisruptionbudgets",
    (c.API_VERSION, c.KIND): f"/apis/{c.API_VERSION}/namespaces/{{namespace}}/{c.PLURAL}",
    # kopf's peering objects (read by the fleet loop to know whether this replica leads); the cluster one has no
    # namespace in its path.
    (c.PEERING_API_VERSION, c.PEERING_KIND): "/apis/kopf.dev/v1/namespaces/{namespace}/kopfpeerings",
    (c.PEERING_API_VERSION, c.CLUSTER_PEERING_KIND): "/apis/kopf.dev/v1/clusterkopfpeerings",
}


def newer(a: JSON, b: JSON | None) -> JSON:
    """The later of two copies of one object by resourceVersion. Clients may not order versions in general (they
    are opaque); etcd's are increasing integers, and a wrong guess here costs one 409 and a read, never a lost
    write: the write stays conditional on the version it was computed from."""
    if b is None:
        return a
    try:
        va, vb = (int((x.get("metadata") or {}).get("resourceVersion") or 0) for x in (a, b))
    except ValueError:
        return a
    return b if vb > va else a


def in_cluster_server(environ: Mapping[str, str]) -> str | None:
    """The API server's URL inside a pod, from the `kubernetes` Service's address the kubelet gives every pod (what
    client-go and the kubernetes client's in-cluster config use); None outside a pod."""
    host = environ.get("KUBERNETES_SERVICE_HOST")
    if not host:
        return None
    port = environ.get("KUBERNETES_SERVICE_PORT") or "443"
    return f"https://[{host}]:{port}" if ":" in host else f"https://{host}:{port}"


def make_api_client(pool_size: int = 16) -> client.ApiClient:
    """In a pod: the service account; elsewhere: $KUBECONFIG (or ~/.kube/config). `pool_size` connections, one
    per handler thread (the client's default, 5 per CPU, would make threads queue for a connection)."""
    configuration = client.Configuration()
    configuration.connection_pool_maxsize = pool_size
    if os.environ.get("KUBERNETES_SERVICE_HOST"):
        config.load_incluster_config(client_configuration=configuration)
    else:
        config.load_kube_config(client_configuration=configuration)
    return client.ApiClient(configuration)


def object_path(api_version: str, kind: str, namespace: str, name: str | None = None) -> str:
    try:
        base = _COLLECTIONS[(api_version, kind)].format(namespace=namespace)
    except KeyError:
        raise ValueError(f"the operator does not manage {api_version} {kind}") from None
    return f"{base}/{name}" if name else base


@dataclass
class Kube:
    """The handful of API calls the operator makes, over one kubernetes ApiClient (thread-safe)."""

    api: client.ApiClient
    field_manager: str = c.FIELD_MANAGER
    request_timeout: float = 30.0
    # The newest copy of each LLMDeployment this client wrote the status of or read (the API server's answer), by
    # (namespace, name): update_status starts from it when it is newer than the watch's copy it is handed, so a
    # burst of status writes does not pay a conflict and a read for each (the watch lags behind our own writes).
    _latest: dict[tuple[str, str], JSON] = field(default_factory=dict, repr=False)

    def _call(
        self,
        method: str,
        path: str,
        *,
        body: Any = None,
        query: list[tuple[str, str]] | None = None,
        content_type: str | None = None,
        text: bool = False,
    ) -> JSON:
        """One request; the JSON body as a dict, or with `text` the body as {"text": ...} (a pod's log)."""
        headers = {"Accept": "text/plain" if text else "application/json"}
        if content_type:
            headers["Content-Type"] = content_type
        request = self.api.param_serialize(
            method,
            path,
            query_params=query or [],
            header_params=headers,
            body=body,
            auth_settings=["BearerToken"],
        )
        response = self.api.call_api(*request, _request_timeout=self.request_timeout)
        raw = response.read()
        if not 200 <= response.status <= 299:
            raise ApiException.from_response(http_resp=response, body=raw.decode("utf-8", "replace"), data=None)
        if text:
            return {"text": raw.decode("utf-8", "replace")}
        data = json.loads(raw) if raw else {}
        return data if isinstance(data, dict) else {}

    def apply(self, obj: JSON) -> JSON:
        """Server-side apply `obj` (an apply configuration); returns the object as stored."""
        meta = obj["metadata"]
        path = object_path(obj["apiVersion"], obj["kind"], meta["namespace"], meta["name"])
        return self._call(
            "PATCH",
            path,
            body=json.dumps(obj),
            query=[("fieldManager", self.field_manager), ("force", "true")],
            content_type="application/apply-patch+yaml",
        )

    def get(self, api_version: str, kind: str, namespace: str, name: str) -> JSON | None:
        try:
            return self._call("GET", object_path(api_version, kind, namespace, name))
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise

    def list(self, api_version: str, kind: str, namespace: str, label_selector: str) -> list[JSON]:
        data = self._call("GET", object_path(api_version, kind, namespace), query=[("labelSelector", label_selector)])
        return list(data.get("items") or [])

    def delete_owned(self, api_version: str, kind: str, namespace: str, name: str, owner_uid: str) -> bool:
        """Delete the object if it exists and this owner controls it (never someone else's). True if deleted."""
        current = self.get(api_version, kind, namespace, name)
        if current is None:
            return False
        owners = current.get("metadata", {}).get("ownerReferences") or []
        if not any(ref.get("uid") == owner_uid and ref.get("controller") for ref in owners):
            return False
        return self.delete(api_version, kind, namespace, name, current["metadata"]["uid"])

    def delete(self, api_version: str, kind: str, namespace: str, name: str, uid: str) -> bool:
        """Delete exactly the object with this uid (a precondition: never a namesake created since). True if
        deleted; False if it is gone or is another object now."""
        # Background: dependents go too (a Job's pods; the API's default for Jobs is to orphan them).
        body = {"preconditions": {"uid": uid}, "propagationPolicy": "Background"}
        path = object_path(api_version, kind, namespace, name)
        return self._unless_gone(lambda: self._call("DELETE", path, body=body, content_type="application/json"))

    def pod_log_tail(self, namespace: str, name: str, lines: int = 5) -> str:
        """The last lines a pod's container wrote (a loader's progress)."""
        data = self._call(
            "GET",
            object_path(c.POD_API_VERSION, c.POD_KIND, namespace, name) + "/log",
            query=[("tailLines", str(lines))],
            text=True,
        )
        return str(data.get("text", ""))

    def annotate(
        self, api_version: str, kind: str, namespace: str, name: str, uid: str, annotations: dict[str, str]
    ) -> bool:
        """Add annotations to exactly the object with this uid (the patch's uid is a precondition). True if
        written; False if it is gone or is another object now."""
        body = {"metadata": {"uid": uid, "annotations": annotations}}
        path = object_path(api_version, kind, namespace, name)
        return self._unless_gone(
            lambda: self._call("PATCH", path, body=body, content_type="application/merge-patch+json")
        )

    @staticmethod
    def _unless_gone(write: Callable[[], JSON]) -> bool:
        """One write conditional on the object's uid: False if the object is gone (404) or another one (409)."""
        try:
            write()
        except ApiException as exc:
            if exc.status in (404, 409):
                return False
            raise
        return True

    def get_peering(self, namespace: str | None, name: str) -> JSON | None:
        """kopf's peering object: the ClusterKopfPeering (namespace None) or a namespace's KopfPeering."""
        try:
            if namespace is None:
                return self._call("GET", object_path(c.PEERING_API_VERSION, c.CLUSTER_PEERING_KIND, "", name))
            return self._call("GET", object_path(c.PEERING_API_VERSION, c.PEERING_KIND, namespace, name))
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise

    def get_llmd(self, namespace: str, name: str) -> JSON | None:
        """The LLMDeployment as stored now (None if it is gone)."""
        try:
            return self._call("GET", object_path(c.API_VERSION, c.KIND, namespace, name))
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise

    def patch_status(self, namespace: str, name: str, status: JSON, resource_version: str | None = None) -> JSON:
        """JSON merge patch of an LLMDeployment's status subresource; with `resource_version`, only if the object
        is still that version (409 Conflict otherwise)."""
        body: JSON = {"status": status}
        if resource_version:
            body["metadata"] = {"resourceVersion": resource_version}
        return self._call(
            "PATCH",
            object_path(c.API_VERSION, c.KIND, namespace, name) + "/status",
            body=body,
            content_type="application/merge-patch+json",
        )

    def forget_except(self, keys: set[tuple[str, str]]) -> None:
        """Drop the copies of LLMDeployments that are gone (not in `keys`)."""
        for key in set(self._latest) - keys:
            self._latest.pop(key, None)

    def update_status(
        self, namespace: str, name: str, seen: JSON, compute: Callable[[JSON], JSON], attempts: int = 8
    ) -> bool:
        """Optimistic concurrency for status: `compute(status)` gives the merge patch for the LLMDeployment as
        `seen` (a watch's copy, with its resourceVersion); it is written only onto that version. On a conflict the
        object is read again and the patch recomputed from what is there now, so no writer overwrites a status it
        has not seen (kopf's own annotation patches bump the version too, hence the generous bound, with a short
        growing pause). An empty patch writes nothing. True if a write happened."""
        current: JSON | None = newer(seen, self._latest.get((namespace, name)))
        for attempt in range(attempts):
            if current is None:
                return False  # deleted meanwhile
            patch = compute(dict(current.get("status") or {}))
            if not patch:
                return False
            version = (current.get("metadata") or {}).get("resourceVersion")
            try:
                self._latest[(namespace, name)] = self.patch_status(namespace, name, patch, resource_version=version)
                return True
            except ApiException as exc:
                if exc.status != 409 or attempt == attempts - 1:
                    raise
            time.sleep(0.05 * attempt)  # a burst of writers (a rollout, a scale) passes in a few round trips
            current = self.get_llmd(namespace, name)
            if current is not None:
                self._latest[(namespace, name)] = current
        return False

    def post_event(self, involved: JSON, type_: str, reason: str, message: str, now: str) -> JSON:
        """A core/v1 Event about `involved` (an object's apiVersion, kind and metadata name/namespace/uid)."""
        meta = involved["metadata"]
        event = {
            "apiVersion": c.EVENT_API_VERSION,
            "kind": c.EVENT_KIND,
            "metadata": {"generateName": f"{meta['name']}.", "namespace": meta["namespace"]},
            "involvedObject": {
                "apiVersion": involved["apiVersion"],
                "kind": involved["kind"],
                "name": meta["name"],
                "namespace": meta["namespace"],
                "uid": meta.get("uid", ""),
            },
            "type": type_,
            "reason": reason,
            "message": message[:1024],
            "source": {"component": self.field_manager},
            "reportingComponent": self.field_manager,
            "firstTimestamp": now,
            "lastTimestamp": now,
            "count": 1,
        }
        return self._call(
            "POST",
            object_path(c.EVENT_API_VERSION, c.EVENT_KIND, meta["namespace"]),
            body=event,
            content_type="application/json",
        )

    def get_scale(self, namespace: str, name: str) -> JSON:
        """The LLMDeployment's scale subresource (spec.replicas and the resourceVersion)."""
        return self._call("GET", object_path(c.API_VERSION, c.KIND, namespace, name) + "/scale")

    def scale_if(
        self, namespace: str, name: str, expected: int, replicas: int, resource_version: str, attempts: int = 3
    ) -> bool:
        """Scale from `expected` to `replicas`, conditional on the object being as observed (resourceVersion).
        A 409 from a write that did not touch spec.replicas (a status update) is retried on the new version; if
        spec.replicas is no longer `expected`, someone else scaled: their write stands (False)."""
        version = resource_version
        for _ in range(attempts):
            try:
                self.scale(namespace, name, replicas, resource_version=version)
                return True
            except ApiException as exc:
                if exc.status != 409:
                    raise
            current = self.get_scale(namespace, name)
            if int((current.get("spec") or {}).get("replicas", 0)) != expected:
                return False
            version = (current.get("metadata") or {}).get("resourceVersion") or ""
        return False

    def clear_annotation(self, namespace: str, name: str, key: str) -> JSON:
        """Remove one annotation from an LLMDeployment (JSON merge patch: null deletes)."""
        return self._call(
            "PATCH",
            object_path(c.API_VERSION, c.KIND, namespace, name),
            body={"metadata": {"annotations": {key: None}}},
            content_type="application/merge-patch+json",
        )

    def scale(self, namespace: str, name: str, replicas: int, resource_version: str | None = None) -> JSON:
        """Write spec.replicas through the scale subresource (what `kubectl scale` and HPA do)."""
        body: JSON = {"spec": {"replicas": replicas}}
        if resource_version:
            # Optimistic concurrency: fail (409) if someone scaled since the decision's observation.
            body["metadata"] = {"resourceVersion": resource_version}
        return self._call(
            "PATCH",
            object_path(c.API_VERSION, c.KIND, namespace, name) + "/scale",
            body=body,
            content_type="application/merge-patch+json",
        )
