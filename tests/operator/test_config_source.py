"""One config source: runtime/config.py's EngineConfig generates the serve flags, the operator renders its
ConfigMap with the same field names and validates it with the same dataclass, and the runtime started from that
ConfigMap alone serves with exactly the spec's settings."""

from __future__ import annotations

import argparse
import dataclasses
import json
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from kubellm import contract
from kubellm.operator import constants as c
from kubellm.operator.render import render
from kubellm.operator.resources import Owner
from kubellm.operator.settings import Settings
from kubellm.operator.spec import LLMDeploymentSpec
from kubellm.runtime import config
from kubellm.runtime.server import cli

OWNER = Owner(name="smol", namespace="ml", uid="u-1")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kubellm serve")
    cli.add_arguments(parser)
    return parser


def _engine_json(spec: dict[str, Any], settings: Settings | None = None) -> dict[str, Any]:
    parsed = LLMDeploymentSpec.model_validate({"model": {"source": "builtin:smollm2-135m-instruct"}, **spec})
    config_map = render(OWNER, parsed, settings or Settings()).config_map
    return dict(json.loads(config_map["data"][c.ENGINE_CONFIG_KEY]))


def test_every_engine_field_is_a_flag_with_its_help_default_and_choices() -> None:
    parser = _parser()
    actions = {a.dest: a for a in parser._actions}
    for f in dataclasses.fields(config.EngineConfig):
        if not f.metadata.get("cli", True):
            assert config.dest_name(f) not in actions, f.name
            continue
        action = actions[config.dest_name(f)]
        assert action.help and f.metadata["help"] in action.help, f.name
        assert action.dest == config.dest_name(f)
        assert config.flag_name(f) in action.option_strings
        if f.metadata.get("choices"):
            assert tuple(action.choices or ()) == f.metadata["choices"], f.name
    assert actions["dtype"].choices == config.DTYPES
    assert "--no-enable-prefix-caching" in actions["enable_prefix_caching"].option_strings
    assert "--kv-cache-memory" in actions["kv_cache_memory"].option_strings
    assert actions["kv_cache_memory"].default is None and actions["max_num_seqs"].default == 256
    # Nothing given: the dataclass's own defaults.
    args = parser.parse_args([])
    assert config.engine_config(cli.apply_config_file(args)) == config.EngineConfig()


def test_config_file_then_flags(tmp_path: Path) -> None:
    path = tmp_path / "engine.json"
    engine = {"max_num_seqs": 8, "block_size": 32, "served_model_name": "from-file"}
    path.write_text(json.dumps({"engine": engine, "server": {"port": 9123, "drain_timeout": 7.0}}))
    args = _parser().parse_args(["--config", str(path), "--max-num-seqs", "4", "--drain-timeout", "3"])
    values = cli.apply_config_file(args)
    resolved = config.engine_config(values)
    assert (resolved.max_num_seqs, resolved.block_size, resolved.served_model_name) == (4, 32, "from-file")
    assert (args.port, args.drain_timeout) == (9123, 3.0), "the file sets what the flags left; flags win"
    path.write_text(json.dumps({"engine": {"max_num_sequences": 8}}))
    with pytest.raises(ValueError, match="max_num_sequences"):
        config.engine_config(cli.apply_config_file(_parser().parse_args(["--config", str(path)])))
    path.write_text(json.dumps({"server": {"prot": 1}}))
    with pytest.raises(ValueError, match="prot"):
        cli.apply_config_file(_parser().parse_args(["--config", str(path)]))


def test_the_operator_renders_and_validates_with_the_same_dataclass() -> None:
    rendered = _engine_json({"engine": {"maxNumSeqs": 16, "enablePrefixCaching": False}, "replicas": 1})
    assert set(rendered) == {contract.CONFIG_ENGINE_SECTION, contract.CONFIG_SERVER_SECTION}
    engine = rendered["engine"]
    assert set(engine) <= set(contract.engine_fields())
    assert contract.check_engine_section(engine) is None
    assert (engine["max_num_seqs"], engine["enable_prefix_caching"]) == (16, False)
    assert rendered["server"]["port"] == contract.CONTAINER_PORT
    assert "dtype must be one of" in (contract.check_engine_section({**engine, "dtype": "int3"}) or "")
    # The container carries no engine flag any more: only the file (and the user's extra arguments).
    parsed = LLMDeploymentSpec.model_validate(
        {"model": {"source": "builtin:smollm2-135m-instruct"}, "engine": {"extraArgs": ["--seed", "3"]}}
    )
    container = render(OWNER, parsed, Settings()).deployment["spec"]["template"]["spec"]["containers"][0]
    assert container["args"] == ["serve", "--config", f"{c.CONFIG_MOUNT_PATH}/{c.ENGINE_CONFIG_KEY}", "--seed", "3"]


@pytest.mark.slow
def test_runtime_started_from_the_rendered_config_map_alone(tmp_path: Path) -> None:
    """The ConfigMap's engine.json, as the pod mounts it, is all `kubellm serve` gets (host and port aside,
    which the pod's network gives it and loopback cannot)."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "server"))
    from conftest import ServerProcess  # tests/server/conftest.py: a real `kubellm serve` on loopback

    spec = {
        "model": {"source": "builtin:smollm2-135m-instruct", "maxModelLen": 512, "servedModelName": "smol-cm"},
        "engine": {"maxNumSeqs": 4, "maxNumBatchedTokens": 256, "blockSize": 32},
    }
    path = tmp_path / c.ENGINE_CONFIG_KEY
    path.write_text(json.dumps(_engine_json(spec)))
    server = ServerProcess(["--config", str(path)])  # adds --host 127.0.0.1 --port 0
    try:
        server.wait_ready()
        with urllib.request.urlopen(server.url("/v1/models"), timeout=10) as r:
            (model,) = json.load(r)["data"]
        assert (model["id"], model["max_model_len"]) == ("smol-cm", 512)
        with urllib.request.urlopen(server.url("/metrics"), timeout=10) as r:
            metrics = r.read().decode()
        assert 'block_size="32"' in metrics, metrics[:2000]
    finally:
        server.stop()
