"""``kubellm download hf://org/name --dest DIR``: a model repository into a plain folder, once, resumably.

This is what an LLMDeployment's loader Job runs to fill its model cache (a PVC every replica then mounts
read-only, so no pod downloads anything). The runtime loads the folder as it loads any local Hugging Face model.

- **Once:** a finished download leaves ``COMPLETE_MARKER`` (the repository, the commit it resolved to, the files);
  a second run against the same repository and revision returns at once.
- **Resumable:** files come through ``huggingface_hub.hf_hub_download`` into ``local_dir`` mode, which keeps a
  partial file as ``.cache/huggingface/download/<file>.incomplete`` and continues it with an HTTP Range request
  (after a dropped connection, and in the next process when one was killed); finished files are not fetched again.
- **Progress:** one JSON line on stdout every ``--progress-interval`` seconds and at the end,
  ``{"bytesDone", "bytesTotal", "filesDone", "filesTotal"}`` (the operator reads the last line of the Job's pod
  log into ``status.model``). A failure ends with its cause on stderr and in the pod's termination message.
"""

from __future__ import annotations

import argparse
import contextlib
import fnmatch
import json
import sys
import threading
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO, Any

# The files the runtime reads of a Hugging Face repository (models/loader.py fetches the same on its own).
HF_ALLOW_PATTERNS = ("*.json", "*.safetensors", "*.jinja", "tokenizer.model", "*.txt")
COMPLETE_MARKER = ".kubellm-complete.json"
# The exit status of a failure retrying cannot fix (no such repository or revision, no access, no model files):
# the loader Job's pod failure policy fails the Job at once on it instead of retrying (operator/model_cache.py).
PERMANENT_EXIT_CODE = 2
TERMINATION_LOG = Path("/dev/termination-log")


@dataclass
class Progress:
    bytes_done: int = 0
    bytes_total: int = 0
    files_done: int = 0
    files_total: int = 0

    def line(self) -> str:
        """The JSON line the operator reads (camelCase, as status.model has it)."""
        fields = asdict(self)
        return json.dumps({to_camel(k): v for k, v in fields.items()}, sort_keys=True)


def to_camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(part.title() for part in rest)


@dataclass(frozen=True)
class Plan:
    repo_id: str
    commit: str  # the revision resolved to a commit: every file comes from that one commit
    files: tuple[tuple[str, int], ...]  # (path in the repository, size in bytes)


def repo_id_of(source: str) -> str:
    repo_id = source.removeprefix("hf://")
    if not source.startswith("hf://") or repo_id.count("/") != 1 or not all(repo_id.split("/")):
        raise ValueError(f"downloads are of hf://org/name sources, got {source!r}")
    return repo_id


def wanted(path: str) -> bool:
    """The files the runtime reads (loader.HF_ALLOW_PATTERNS), at the top of the repository."""
    return "/" not in path and any(fnmatch.fnmatch(path, pattern) for pattern in HF_ALLOW_PATTERNS)


def make_plan(repo_id: str, revision: str | None) -> Plan:
    from huggingface_hub import HfApi

    info = HfApi().model_info(repo_id, revision=revision or "main", files_metadata=True)
    files = tuple(sorted((s.rfilename, int(s.size or 0)) for s in info.siblings or () if wanted(s.rfilename)))
    if not files:
        raise ValueError(f"hf://{repo_id} at {revision or 'main'} has no model files ({', '.join(HF_ALLOW_PATTERNS)})")
    return Plan(repo_id=repo_id, commit=str(info.sha), files=files)


def completed(dest: Path, repo_id: str, revision: str | None) -> dict[str, Any] | None:
    """The marker of a finished download of this repository and revision, if there is one."""
    try:
        marker = json.loads((dest / COMPLETE_MARKER).read_text())
    except (OSError, ValueError):
        return None
    same = marker.get("repo") == repo_id and (
        revision is None or revision in (marker.get("revision"), marker["commit"])
    )
    return marker if same else None


def partial_bytes(dest: Path) -> int:
    """Bytes in the partial files huggingface_hub keeps while a file downloads (local_dir mode)."""
    folder = dest / ".cache" / "huggingface" / "download"
    return sum(p.stat().st_size for p in folder.rglob("*.incomplete")) if folder.is_dir() else 0


class Reporter:
    """Prints the progress every `interval` seconds from a thread, and once more at the end."""

    def __init__(self, progress: Progress, dest: Path, interval: float, out: IO[str]) -> None:
        self.progress, self.dest, self.interval, self.out = progress, dest, interval, out
        self.done_bytes = 0  # of finished files
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="download progress", daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.emit()

    def emit(self) -> None:
        done = self.done_bytes + partial_bytes(self.dest)
        self.progress.bytes_done = min(done, self.progress.bytes_total)
        print(self.progress.line(), file=self.out, flush=True)

    def __enter__(self) -> Reporter:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def download(
    source: str,
    dest: Path,
    revision: str | None = None,
    *,
    interval: float = 5.0,
    out: IO[str] = sys.stdout,
    fetch: Callable[..., str] | None = None,
) -> dict[str, Any]:
    """Download `source` into `dest` (made if missing); returns the marker. `fetch` is hf_hub_download's
    signature (the tests pass the real one; it is a parameter only so nothing imports huggingface_hub early)."""
    repo_id = repo_id_of(source)
    dest.mkdir(parents=True, exist_ok=True)
    marker = completed(dest, repo_id, revision)
    if marker is not None:
        total = sum(size for _, size in marker["files"])
        print(Progress(total, total, len(marker["files"]), len(marker["files"])).line(), file=out, flush=True)
        return marker
    if fetch is None:
        from huggingface_hub import hf_hub_download

        fetch = hf_hub_download
    plan = make_plan(repo_id, revision)
    progress = Progress(bytes_total=sum(size for _, size in plan.files), files_total=len(plan.files))
    with Reporter(progress, dest, interval, out) as reporter:
        reporter.emit()
        for filename, size in plan.files:
            fetch(repo_id, filename, revision=plan.commit, local_dir=str(dest))
            reporter.done_bytes += size
            progress.files_done += 1
        reporter.emit()
    marker = {"repo": repo_id, "revision": revision or "main", "commit": plan.commit, "files": list(plan.files)}
    (dest / COMPLETE_MARKER).write_text(json.dumps(marker, indent=2) + "\n")
    return marker


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("source", help="hf://org/name: the model repository")
    parser.add_argument("--dest", required=True, type=Path, help="the folder to fill (the model cache volume)")
    parser.add_argument("--revision", default=None, help="branch, tag or commit (default: main)")
    parser.add_argument("--progress-interval", type=float, default=5.0, help="seconds between progress lines on stdout")


def _report_failure(message: str) -> None:
    print(f"download failed: {message}", file=sys.stderr, flush=True)
    # what the kubelet shows as the container's termination message (and the operator as the cause)
    with contextlib.suppress(OSError):
        TERMINATION_LOG.write_text(message[:4096])


def permanent(exc: Exception) -> bool:
    """A failure the same download would meet again: a bad source, no such repository/revision/file, no access."""
    from huggingface_hub import errors

    if isinstance(exc, ValueError | errors.RepositoryNotFoundError | errors.RevisionNotFoundError):
        return True
    if isinstance(exc, errors.EntryNotFoundError | errors.GatedRepoError):
        return True
    status = getattr(getattr(exc, "response", None), "status_code", None)
    return status in (401, 403, 404)


def run(args: argparse.Namespace) -> int:
    try:
        download(args.source, args.dest, args.revision, interval=args.progress_interval)
    except Exception as exc:  # the cause, named, is the whole point of the failure path
        _report_failure(f"{type(exc).__name__}: {exc}")
        return PERMANENT_EXIT_CODE if permanent(exc) else 1
    return 0
