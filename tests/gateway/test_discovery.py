"""The registry the watches feed, without a network: LLMDeployments and runtime pods as the API server sends them."""

from __future__ import annotations

from typing import Any

from kubellm.gateway.balance import Strategy
from kubellm.gateway.discovery import Registry, parse_model, parse_pod


def _llmd(name: str, ns: str = "a", served: str | None = None, **spec: Any) -> dict[str, Any]:
    model: dict[str, Any] = {"source": "builtin:x"}
    if served:
        model["servedModelName"] = served
    return {"metadata": {"name": name, "namespace": ns}, "spec": {"model": model, **spec}}


def _pod(name: str, owner: str, ip: str | None, ready: bool, ns: str = "a", deleting: bool = False) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name, "namespace": ns, "labels": {"app.kubernetes.io/instance": owner}}
    if deleting:
        meta["deletionTimestamp"] = "2026-01-01T00:00:00Z"
    return {
        "metadata": meta,
        "spec": {"containers": [{"name": "runtime", "ports": [{"name": "http", "containerPort": 8000}]}]},
        "status": {"podIP": ip, "conditions": [{"type": "Ready", "status": "True" if ready else "False"}]},
    }


def test_models_by_served_name_with_strategy_replicas_and_wake() -> None:
    model = parse_model(_llmd("m", served="big/model:v1", replicas=0, routing={"strategy": "LeastLoad"}))
    assert model is not None
    assert (model.served_name, model.replicas, model.strategy, model.waking) == (
        "big/model:v1",
        0,
        Strategy.LEAST_LOAD,
        False,
    )
    plain = parse_model(_llmd("plain"))
    assert plain is not None and plain.served_name == "plain" and plain.strategy is Strategy.PREFIX_HASH
    woken = _llmd("w")
    woken["metadata"]["annotations"] = {"kubellm.io/wake": "now"}
    assert (parsed := parse_model(woken)) is not None and parsed.waking


def test_pods_count_only_when_ready_with_an_ip_and_not_terminating() -> None:
    assert parse_pod(_pod("p", "m", "10.0.0.1", True))[1] is not None
    assert parse_pod(_pod("p", "m", "10.0.0.1", True))[1].url == "http://10.0.0.1:8000"  # type: ignore[union-attr]
    assert parse_pod(_pod("p", "m", "fd00::1", True))[1].url == "http://[fd00::1]:8000"  # type: ignore[union-attr]
    assert parse_pod(_pod("p", "m", None, True))[1] is None
    assert parse_pod(_pod("p", "m", "10.0.0.1", False))[1] is None
    assert parse_pod(_pod("p", "m", "10.0.0.1", True, deleting=True))[1] is None


def test_of_a_multi_node_group_only_pod_0_is_an_endpoint() -> None:
    def member(index: str) -> dict[str, Any]:
        pod = _pod(f"m-g0-{index}", "m", "10.0.0.2", True)
        pod["metadata"]["labels"] |= {"kubellm.io/group": "0", "apps.kubernetes.io/pod-index": index}
        return pod

    assert parse_pod(member("0"))[1] is not None
    assert parse_pod(member("1"))[1] is None, "a worker of the group serves no API"


def test_registry_follows_events_and_relists() -> None:
    registry = Registry()
    registry.replace_models([_llmd("m", served="chat"), _llmd("m", ns="b", served="chat"), _llmd("n")])
    # Two LLMDeployments serving one name: the first by (namespace, name) wins.
    assert registry.lookup("chat") is not None and registry.lookup("chat").namespace == "a"  # type: ignore[union-attr]
    model = registry.lookup("chat")
    assert model is not None
    changed = registry.changed()
    registry.replace_pods([_pod("m-1", "m", "10.0.0.1", True), _pod("m-2", "m", "10.0.0.2", False)], "a")
    assert changed.is_set()
    assert [e.id for e in registry.endpoints(model)] == ["m-1"]
    registry.pod_event("MODIFIED", _pod("m-2", "m", "10.0.0.2", True))
    assert [e.id for e in registry.endpoints(model)] == ["m-1", "m-2"]
    # A status rewrite that changes nothing the gateway uses wakes nobody.
    quiet = registry.changed()
    registry.pod_event("MODIFIED", _pod("m-2", "m", "10.0.0.2", True))
    assert not quiet.is_set()
    registry.pod_event("DELETED", _pod("m-1", "m", "10.0.0.1", True))
    assert [e.id for e in registry.endpoints(model)] == ["m-2"]
    # A relist of one namespace keeps the others.
    registry.replace_models([], "a")
    assert registry.lookup("chat") is not None and registry.lookup("chat").namespace == "b"  # type: ignore[union-attr]
    assert registry.lookup("n") is None
