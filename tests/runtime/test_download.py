"""`kubellm download` against a local HTTP server laid out as the Hugging Face Hub is (the API route `model_info`
calls and the `resolve` file routes `hf_hub_download` calls, with HTTP Range): the real huggingface_hub client in a
real process, killed in the middle of a file and run again."""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import random
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from huggingface_hub import constants as hub_constants

from kubellm.runtime import download
from kubellm.runtime.download import COMPLETE_MARKER, partial_bytes

REPO = "org/tiny"
COMMIT = "0123456789abcdef0123456789abcdef01234567"


@dataclass
class FakeHub:
    files: dict[str, bytes]
    # The first GET of this file sends half its bytes, then stalls until `release` is set.
    stall: str | None = None
    release: threading.Event = field(default_factory=threading.Event)
    requests: list[tuple[str, str, str]] = field(default_factory=list)  # (method, path, Range header)
    url: str = ""

    def etag(self, name: str) -> str:
        return hashlib.sha256(self.files[name]).hexdigest()


def _handler(hub: FakeHub) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: object) -> None:
            pass

        def _file(self) -> str | None:
            prefix = f"/{REPO}/resolve/"
            if not self.path.startswith(prefix):
                return None
            revision, _, name = self.path.removeprefix(prefix).partition("/")
            return name if revision in ("main", COMMIT) and name in hub.files else None

        def _send(self, status: int, body: bytes, headers: dict[str, str]) -> None:
            self.send_response(status)
            for key, value in headers.items():
                self.send_header(key, value)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def do_HEAD(self) -> None:
            self.do_GET()

        def do_GET(self) -> None:
            hub.requests.append((self.command, self.path.split("?")[0], self.headers.get("Range", "")))
            if self.path.split("?")[0] == f"/api/models/{REPO}/revision/main":
                siblings = [{"rfilename": n, "size": len(b)} for n, b in sorted(hub.files.items())]
                body = json.dumps({"id": REPO, "modelId": REPO, "sha": COMMIT, "siblings": siblings}).encode()
                return self._send(200, body, {"Content-Type": "application/json"})
            name = self._file()
            if name is None:
                body = json.dumps({"error": "Repository not found"}).encode()
                return self._send(404, body, {"X-Error-Code": "RepositoryNotFound"})
            data = hub.files[name]
            meta = {"X-Repo-Commit": COMMIT, "ETag": f'"{hub.etag(name)}"', "Accept-Ranges": "bytes"}
            start = int(self.headers["Range"].removeprefix("bytes=").split("-")[0]) if "Range" in self.headers else 0
            if self.command == "GET" and name == hub.stall and start == 0 and not hub.release.is_set():
                self.send_response(200)
                for key, value in meta.items():
                    self.send_header(key, value)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data[: len(data) // 2])
                self.wfile.flush()
                hub.release.wait(60)  # the client is killed meanwhile
                return None
            if start:
                meta["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
                return self._send(206, data[start:], meta)
            return self._send(200, data, meta)

    return Handler


@pytest.fixture
def hub() -> Iterator[FakeHub]:
    seed = random.randrange(2**32)
    print(f"fake hub seed {seed}")
    rng = random.Random(seed)
    files = {
        "config.json": json.dumps({"model_type": "llama", "hidden_size": 8}).encode(),
        "tokenizer.json": b'{"version": "1.0"}',
        # over two of huggingface_hub's download chunks: a whole chunk of its first half reaches the disk
        "model.safetensors": rng.randbytes(2 * hub_constants.DOWNLOAD_CHUNK_SIZE + 4096),
        "README.md": b"# not a file the runtime reads",
    }
    state = FakeHub(files=files, stall="model.safetensors")
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(state))
    state.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield state
    finally:
        state.release.set()
        server.shutdown()
        server.server_close()


def _download(hub: FakeHub, dest: Path, *extra: str, source: str = f"hf://{REPO}") -> subprocess.Popen[str]:
    env = {
        **os.environ,
        "PYTHONSAFEPATH": "1",
        "HF_ENDPOINT": hub.url,
        "HF_HOME": str(dest.parent / "hf-home"),
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "HF_HUB_DISABLE_XET": "1",
    }
    env.pop("HF_HUB_OFFLINE", None)
    command = [sys.executable, "-m", "kubellm.runtime.cli", "download", source, "--dest", str(dest), *extra]
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for(predicate: object, proc: subprocess.Popen[str], what: str, timeout: float = 60.0) -> None:
    import time

    deadline = time.monotonic() + timeout
    while not predicate():  # type: ignore[operator]
        if proc.poll() is not None:
            raise AssertionError(f"{what}: the download exited {proc.returncode}: {proc.communicate()}")
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        time.sleep(0.05)


def test_an_interrupted_download_resumes_and_a_finished_one_is_not_repeated(hub: FakeHub, tmp_path: Path) -> None:
    dest = tmp_path / "cache"
    first = _download(hub, dest, "--progress-interval", "0.2")
    _wait_for(lambda: partial_bytes(dest) > 0, first, "part of model.safetensors on disk")
    first.kill()  # as a Job pod is killed: no cleanup
    first.wait(timeout=30)
    kept = partial_bytes(dest)
    assert 0 < kept < len(hub.files["model.safetensors"])
    assert not (dest / COMPLETE_MARKER).exists()

    second = _download(hub, dest, "--progress-interval", "0.2")
    out, err = second.communicate(timeout=120)
    assert second.returncode == 0, err
    ranges = [r for m, p, r in hub.requests if m == "GET" and p.endswith("/model.safetensors") and r]
    assert ranges and int(ranges[-1].removeprefix("bytes=").rstrip("-")) > 0, f"no resume: {hub.requests}"
    for name in ("config.json", "tokenizer.json", "model.safetensors"):
        assert (dest / name).read_bytes() == hub.files[name], name
    assert not (dest / "README.md").exists(), "only the files the runtime reads"
    total = sum(len(hub.files[n]) for n in ("config.json", "tokenizer.json", "model.safetensors"))
    lines = [json.loads(line) for line in out.splitlines()]
    assert lines[-1] == {"bytesDone": total, "bytesTotal": total, "filesDone": 3, "filesTotal": 3}
    assert all(a["bytesDone"] <= b["bytesDone"] for a, b in itertools.pairwise(lines)), lines
    marker = json.loads((dest / COMPLETE_MARKER).read_text())
    assert (marker["repo"], marker["commit"]) == (REPO, COMMIT)

    seen = len(hub.requests)
    third = _download(hub, dest)
    out, err = third.communicate(timeout=60)
    assert third.returncode == 0, err
    assert len(hub.requests) == seen, "a finished cache is not fetched again"
    assert json.loads(out.splitlines()[-1])["filesDone"] == 3


def test_a_failed_download_names_its_cause(hub: FakeHub, tmp_path: Path) -> None:
    proc = _download(hub, tmp_path / "cache", source="hf://org/missing")
    _out, err = proc.communicate(timeout=60)
    assert proc.returncode == download.PERMANENT_EXIT_CODE, "a missing repository is not worth retrying"
    assert "download failed" in err and "org/missing" in err, err
