"""The chart and the examples against the real control plane (tests/cluster): server-side apply of what helm renders,
pods admitted under the restricted Pod Security Standard, and the operator running as the chart's ServiceAccount
(a token from the TokenRequest API) reconciling every example.
"""

from __future__ import annotations

import functools
import json
import os
import signal
import subprocess
import sys
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from cluster import ControlPlane, wait_until
from cluster.controlplane import free_port
from deploy.helmchart import ROOT, VALUES_DIR, Helm, by_kind, one

from kubellm.operator.constants import ENGINE_CONFIG_KEY

pytestmark = pytest.mark.k8s

EXAMPLES = sorted((ROOT / "examples").glob("*.yaml"))
PEERING_LIFETIME_S = 5  # the failover test's keep-alive lifetime (the chart's default is 60)
THIRD_PARTY_CRDS = Path(__file__).parent / "testdata" / "third-party-crds.yaml"


def _docs(text: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(text) if d]


def _apply(cluster: ControlPlane, manifests: list[dict[str, Any]], *extra: str) -> str:
    """Server-side apply; returns what kubectl printed on stderr (the API server's warnings land there)."""
    body = json.dumps({"apiVersion": "v1", "kind": "List", "items": manifests})
    args = ["apply", "--server-side", "--force-conflicts", "--field-manager=kubellm-tests", "-f", "-", *extra]
    return cluster.kubectl(*args, input=body).stderr


def _establish(cluster: ControlPlane, crds: list[dict[str, Any]]) -> None:
    _apply(cluster, crds)
    names = [f"customresourcedefinition/{c['metadata']['name']}" for c in crds]
    cluster.kubectl("wait", "--for=condition=Established", "--timeout=30s", *names, timeout=40)


def _namespace(cluster: ControlPlane, name: str, *, restricted: bool = False) -> None:
    labels = {}
    if restricted:
        labels = {f"pod-security.kubernetes.io/{mode}": "restricted" for mode in ("enforce", "warn", "audit")}
    ns = {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name, "labels": labels}}
    _apply(cluster, [ns])
    cluster.kubectl("wait", "--for=create", "serviceaccount/default", "-n", name, "--timeout=30s", timeout=40)


@pytest.fixture
def release(k8s_cluster: ControlPlane) -> Iterator[dict[str, str]]:
    """A unique release name and a restricted namespace for it; its cluster-scoped objects are removed afterwards."""
    suffix = uuid.uuid4().hex[:6]
    names = {"release": f"r{suffix}", "namespace": f"kubellm-{suffix}", "watched": f"llm-{suffix}"}
    _namespace(k8s_cluster, names["namespace"], restricted=True)
    _namespace(k8s_cluster, names["watched"])
    _establish(k8s_cluster, _docs(THIRD_PARTY_CRDS.read_text()))
    yield names
    # The operator puts no finalizer on anything: the namespaces go without help, operator or no operator.
    selector = f"app.kubernetes.io/instance={names['release']}"
    for kind in ("clusterrolebinding", "clusterrole", "clusterkopfpeering"):
        k8s_cluster.kubectl("delete", kind, "-l", selector, "--ignore-not-found", "--wait=false", check=False)
    for ns in (names["namespace"], names["watched"]):
        k8s_cluster.kubectl("delete", "namespace", ns, "--wait=false", check=False)


def _canonical_crds() -> list[str]:
    return [p.read_text() for p in sorted((ROOT / "crds").glob("*.yaml"))]


def _install(
    cluster: ControlPlane, helm: Helm, names: dict[str, str], values: list[Path], set_values: list[str]
) -> list[dict[str, Any]]:
    """`helm template --include-crds` applied server-side, CRDs first (as helm install does); returns the manifests."""
    manifests = helm.render(
        values=values, set_values=set_values, release=names["release"], namespace=names["namespace"], include_crds=True
    )
    crds = by_kind(manifests, "CustomResourceDefinition")
    # The control plane is shared by the whole session: never replace a canonical CRD (LLMDeployment, LLMRoute) with
    # a copy that drifted from it (test_chart.py reports the drift).
    canonical = {c["metadata"]["name"]: c["spec"] for c in map(yaml.safe_load, _canonical_crds())}
    crds = [c for c in crds if canonical.get(c["metadata"]["name"], c["spec"]) == c["spec"]]
    _establish(cluster, crds)
    rest = [m for m in manifests if m["kind"] != "CustomResourceDefinition"]
    # The namespace warns on pod templates that break `restricted`: the chart must draw no warning at all.
    warnings = _apply(cluster, rest)
    assert "Warning" not in warnings, warnings
    return manifests


def _pods(cluster: ControlPlane, namespace: str, selector: str) -> list[dict[str, Any]]:
    out = cluster.kubectl("get", "pods", "-n", namespace, "-l", selector, "-o", "json").stdout
    return list(json.loads(out)["items"])


VALUES_SETS = [
    pytest.param([], [], id="default"),
    pytest.param([VALUES_DIR / "namespaced.yaml"], ["watchNamespaces={WATCHED}"], id="namespaced"),
    pytest.param([VALUES_DIR / "ha.yaml", VALUES_DIR / "monitoring.yaml"], ["grafanaDashboard.namespace=NS"], id="ha"),
    pytest.param([VALUES_DIR / "minimal.yaml"], ["serviceAccount.create=true"], id="minimal"),
]


@pytest.mark.parametrize(("values", "set_values"), VALUES_SETS)
def test_rendered_chart_applies_and_its_pods_are_admitted_as_restricted(
    k8s_cluster: ControlPlane, helm: Helm, release: dict[str, str], values: list[Path], set_values: list[str]
) -> None:
    set_values = [s.replace("WATCHED", release["watched"]).replace("NS", release["namespace"]) for s in set_values]
    manifests = _install(k8s_cluster, helm, release, values, set_values)
    deployment = one(manifests, "Deployment")
    ns = release["namespace"]
    # Every rendered object exists now (the API server accepted it as rendered).
    for obj in manifests:
        meta = obj["metadata"]
        args = ["get", f"{obj['kind'].lower()}.{obj['apiVersion'].split('/')[0]}", meta["name"], "-o", "name"]
        if "/" not in obj["apiVersion"]:
            args[1] = obj["kind"].lower()
        if meta.get("namespace"):
            args += ["-n", meta["namespace"]]
        k8s_cluster.kubectl(*args)
    # The ReplicaSet controller creates the pods in a namespace that enforces `restricted`: refused pods never appear.
    selector = ",".join(f"{k}={v}" for k, v in deployment["spec"]["selector"]["matchLabels"].items())
    replicas = deployment["spec"]["replicas"]
    wait_until(
        lambda: len(_pods(k8s_cluster, ns, selector)) == replicas,
        timeout=60,
        what=f"{replicas} operator pod(s) admitted in restricted namespace {ns}",
    )


def test_a_pod_violating_restricted_is_refused_there(k8s_cluster: ControlPlane, release: dict[str, str]) -> None:
    """The admission check above can fail: the same namespace refuses a root pod."""
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "root", "namespace": release["namespace"]},
        "spec": {"containers": [{"name": "c", "image": "busybox:1.36", "securityContext": {"runAsUser": 0}}]},
    }
    result = k8s_cluster.kubectl("create", "-f", "-", input=json.dumps(pod), check=False)
    assert result.returncode != 0
    assert "violates PodSecurity" in result.stderr


class _OperatorExited(BaseException):
    """Not an Exception: wait_until must not swallow it and keep polling a dead process."""


@dataclass
class _OperatorProcess:
    """`kubellm operator` as a local process, configured as the chart's Deployment configures the container."""

    process: subprocess.Popen[bytes]
    env: dict[str, str]
    log_path: Path
    health_port: int

    @classmethod
    def start(cls, manifests: list[dict[str, Any]], kubeconfig: Path, pod_id: str, tmp_path: Path) -> _OperatorProcess:
        (container,) = one(manifests, "Deployment")["spec"]["template"]["spec"]["containers"]
        health_port = free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith(("KUBERNETES_", "KUBELLM_"))}
        env.update({e["name"]: e["value"] for e in container["env"] if "value" in e})
        env.update(
            {
                "KUBECONFIG": str(kubeconfig),
                "POD_ID": pod_id,  # the Downward API gives the pod's name
                "KUBELLM_LIVENESS_ENDPOINT": f"http://127.0.0.1:{health_port}/healthz",
                "KUBELLM_TIMER_INTERVAL_SECONDS": "1",
            }
        )
        log_path = tmp_path / f"{pod_id}.log"
        kubellm = Path(sys.executable).parent / "kubellm"
        with log_path.open("w") as log:
            process = subprocess.Popen(
                [str(kubellm), *container["args"]], env=env, stdout=log, stderr=subprocess.STDOUT
            )
        return cls(process, env, log_path, health_port)

    def healthy(self) -> bool:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.health_port}/healthz", timeout=2) as response:
            return bool(response.status == 200)

    def until(self, predicate: Callable[[], Any], timeout: float, what: str) -> None:
        """wait_until, but failing at once if the operator exits, and showing its log on a timeout."""

        def check() -> Any:
            if self.process.poll() is not None:
                raise _OperatorExited(f"the operator exited ({self.process.returncode}):\n{self.log()[-4000:]}")
            return predicate()

        try:
            wait_until(check, timeout=timeout, what=what, interval=0.5)
        except TimeoutError as exc:
            raise TimeoutError(f"{exc}\n--- the operator's log ---\n{self.log()[-6000:]}") from None

    def log(self) -> str:
        return self.log_path.read_text()

    def stop(self) -> None:
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def _token_kubeconfig(cluster: ControlPlane, namespace: str, service_account: str, path: Path) -> Path:
    """A kubeconfig that authenticates as the ServiceAccount with a token from the TokenRequest API."""
    token = cluster.kubectl("create", "token", service_account, "-n", namespace, "--duration=1h").stdout.strip()
    admin = yaml.safe_load(cluster.kubeconfig.read_text())
    user = f"system:serviceaccount:{namespace}:{service_account}"
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": admin["clusters"],
        "users": [{"name": user, "user": {"token": token}}],
        "contexts": [{"name": "sa", "context": {"cluster": admin["clusters"][0]["name"], "user": user}}],
        "current-context": "sa",
    }
    path.write_text(yaml.safe_dump(config))
    return path


def _can_i(cluster: ControlPlane, user: str, verb: str, resource: str, namespace: str | None) -> bool:
    args = ["auth", "can-i", verb, resource, f"--as={user}"]
    args += ["-n", namespace] if namespace else []
    return cluster.kubectl(*args, check=False).stdout.strip() == "yes"


def _get(cluster: ControlPlane, kind: str, name: str, namespace: str) -> dict[str, Any] | None:
    result = cluster.kubectl("get", kind, name, "-n", namespace, "-o", "json", check=False)
    return json.loads(result.stdout) if result.returncode == 0 else None


@pytest.mark.slow
def test_operator_as_the_chart_service_account_reconciles_every_example(
    k8s_cluster: ControlPlane, helm: Helm, release: dict[str, str], tmp_path: Path
) -> None:
    ns, watched = release["namespace"], release["watched"]
    manifests = _install(
        k8s_cluster, helm, release, [VALUES_DIR / "namespaced.yaml"], [f"watchNamespaces={{{watched}}}"]
    )
    service_account = one(manifests, "ServiceAccount")["metadata"]["name"]
    user = f"system:serviceaccount:{ns}:{service_account}"
    # Least privilege, seen from the API server: nothing outside the watched namespace, no Secrets anywhere.
    assert _can_i(k8s_cluster, user, "patch", "deployments.apps", watched)
    assert not _can_i(k8s_cluster, user, "patch", "deployments.apps", "default")
    assert not _can_i(k8s_cluster, user, "get", "secrets", watched)
    assert not _can_i(k8s_cluster, user, "create", "pods", watched)

    # Every example is accepted by the API server as it is (dry run), then applied for the operator to reconcile.
    docs = [d for path in EXAMPLES for d in _docs(path.read_text())]
    _apply(k8s_cluster, docs, "-n", watched, "--dry-run=server")
    llmds = [d for d in docs if d["kind"] == "LLMDeployment"]

    # The operator, as the chart's Deployment configures it, but as a local process holding the SA's token.
    kubeconfig = _token_kubeconfig(k8s_cluster, ns, service_account, tmp_path / "sa.kubeconfig")
    operator = _OperatorProcess.start(manifests, kubeconfig, f"test-{release['release']}", tmp_path)
    env, log_path, until = operator.env, operator.log_path, operator.until
    try:
        until(operator.healthy, timeout=60, what="the operator's liveness endpoint")
        # Peering is on: the operator publishes its keep-alive in the chart's KopfPeering (list/watch/patch).
        peering = one(manifests, "KopfPeering")["metadata"]["name"]
        until(
            lambda: env["POD_ID"] in ((_get(k8s_cluster, "kopfpeering", peering, watched) or {}).get("status") or {}),
            timeout=30,
            what=f"the operator's keep-alive in kopfpeering/{peering}",
        )
        _apply(k8s_cluster, docs, "-n", watched)

        def workload(name: str) -> dict[str, Any] | None:
            """The Deployment, or for replicas spanning nodes the first group's StatefulSet."""
            return _get(k8s_cluster, "deployment", name, watched) or _get(
                k8s_cluster, "statefulset", f"{name}-g0", watched
            )

        def reconciled(name: str) -> bool:
            llmd = _get(k8s_cluster, "llmdeployment", name, watched) or {}
            generation = llmd.get("metadata", {}).get("generation")
            status = llmd.get("status") or {}
            conditions = {cond["type"]: cond for cond in status.get("conditions") or []}
            # Degraded for want of a storage provisioner or a free GPU is this cluster's doing; a failed apply or a
            # spec the operator refuses is not.
            degraded = conditions.get("Degraded", {})
            assert degraded.get("reason") not in ("ApplyFailed", "InvalidSpec"), (name, degraded.get("message"))
            return (
                workload(name) is not None
                and _get(k8s_cluster, "service", name, watched) is not None
                and status.get("observedGeneration") == generation
                and "Degraded" in conditions
            )

        for llmd in llmds:
            name = llmd["metadata"]["name"]
            until(functools.partial(reconciled, name), timeout=60, what=f"llmdeployment/{name} reconciled")
            pod_spec = workload(name)["spec"]["template"]["spec"]  # type: ignore[index]
            gpus = llmd["spec"].get("resources", {}).get("gpus", 1)
            limits = pod_spec["containers"][0]["resources"].get("limits", {})
            assert int(limits.get("nvidia.com/gpu", 0)) == gpus, (name, limits)
            if llmd["spec"].get("image", {}).get("name"):
                assert pod_spec["containers"][0]["image"] == llmd["spec"]["image"]["name"]
            else:
                assert pod_spec["containers"][0]["image"] == env["KUBELLM_RUNTIME_IMAGE"]

        # Two replicas bring a PodDisruptionBudget; back to one, the operator deletes it (get + delete).
        multi = next(d["metadata"]["name"] for d in llmds if d["spec"].get("replicas", 1) > 1)
        until(
            lambda: _get(k8s_cluster, "poddisruptionbudget", multi, watched) is not None,
            timeout=30,
            what=f"the PDB of {multi}",
        )
        k8s_cluster.kubectl(
            "patch", "llmdeployment", multi, "-n", watched, "--type=merge", "-p", '{"spec": {"replicas": 1}}'
        )
        until(
            lambda: _get(k8s_cluster, "poddisruptionbudget", multi, watched) is None,
            timeout=30,
            what=f"the PDB of {multi} deleted once it has one replica",
        )
        # Through the scale subresource, as KEDA and `kubectl scale` do it.
        keda = next(d["metadata"]["name"] for d in docs if d["kind"] == "ScaledObject")
        k8s_cluster.kubectl("scale", "llmdeployment", keda, "-n", watched, "--replicas=3")
        until(
            lambda: (_get(k8s_cluster, "deployment", keda, watched) or {}).get("spec", {}).get("replicas") == 3,
            timeout=30,
            what=f"deployment/{keda} scaled to 3 through the scale subresource",
        )
        names = [d["metadata"]["name"] for d in llmds]
        assert all(
            not (_get(k8s_cluster, "llmdeployment", n, watched) or {})["metadata"].get("finalizers") for n in names
        )
    finally:
        operator.stop()
    log_text = log_path.read_text()
    for sign in ("Forbidden", "forbidden", " 403", "Not enough permissions"):
        assert sign not in log_text, f"the operator hit a permission error ({sign!r}):\n{log_text[-5000:]}"
    # As after `helm uninstall` (the CRD is kept): no operator runs, and deleting the LLMDeployments completes.
    k8s_cluster.kubectl("delete", "llmdeployments", "--all", "-n", watched, "--wait=true", "--timeout=60s", timeout=90)
    assert not k8s_cluster.kubectl("get", "llmdeployments", "-n", watched, "-o", "name").stdout.strip()


@pytest.mark.slow
def test_two_replicas_reconcile_through_one_of_them(
    k8s_cluster: ControlPlane, helm: Helm, release: dict[str, str], tmp_path: Path
) -> None:
    """replicaCount: 2 with peering: a replica reconciles the create; when it dies without leaving (SIGKILL), the
    other takes over (a standby once the keep-alive lapses) and reconciles the change made meanwhile."""
    ns, watched = release["namespace"], release["watched"]
    manifests = _install(
        k8s_cluster,
        helm,
        release,
        [VALUES_DIR / "namespaced.yaml", VALUES_DIR / "ha.yaml"],
        [f"watchNamespaces={{{watched}}}", f"peering.lifetimeSeconds={PEERING_LIFETIME_S}"],
    )
    assert one(manifests, "Deployment")["spec"]["replicas"] == 2
    service_account = one(manifests, "ServiceAccount")["metadata"]["name"]
    kubeconfig = _token_kubeconfig(k8s_cluster, ns, service_account, tmp_path / "sa.kubeconfig")
    replicas = [_OperatorProcess.start(manifests, kubeconfig, f"replica-{i}", tmp_path) for i in range(2)]
    try:
        for replica in replicas:
            replica.until(replica.healthy, timeout=60, what="the operator's liveness endpoint")

        _apply(k8s_cluster, _docs((ROOT / "examples" / "smollm2-cpu.yaml").read_text()), "-n", watched)
        name = "smollm2"
        replicas[0].until(
            lambda: _get(k8s_cluster, "deployment", name, watched) is not None,
            timeout=20,
            what=f"deployment/{name} created by one of the two replicas",
        )

        # the handler finishes after the Deployment exists (its status write comes last): wait for kopf to say so
        def handled() -> list[Any]:
            return [r for r in replicas if "Creation is processed: 1 succeeded" in r.log()]

        replicas[0].until(lambda: len(handled()) >= 1, timeout=30, what="the create handled by one replica")
        # Which replica is the leader is kopf's peering; with this test's 5 s keep-alive lifetime a standby has been
        # seen to resume beside the leader for a while (both handle an event then). The leader is the one that
        # handled the create; the other must reconcile what changes once the leader is gone.
        leader = handled()[0]
        (standby,) = [r for r in replicas if r is not leader]
        leader.process.kill()  # no goodbye in the peering object: its keep-alive has to lapse
        leader.process.wait(10)
        k8s_cluster.kubectl(
            "patch", "llmdeployment", name, "-n", watched, "--type=merge", "-p", '{"spec":{"engine":{"maxNumSeqs":7}}}'
        )

        def reconciled() -> bool:
            cm = _get(k8s_cluster, "configmap", f"{name}-engine", watched) or {}
            engine = json.loads((cm.get("data") or {}).get(ENGINE_CONFIG_KEY, "{}")).get("engine", {})
            return bool(engine.get("max_num_seqs") == 7)

        standby.until(reconciled, timeout=PEERING_LIFETIME_S + 60, what="the standby to reconcile the change")
    finally:
        for replica in replicas:
            if replica.process.poll() is None:
                replica.stop()
