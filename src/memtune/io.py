"""Atomic outputs: everything is written to a temporary path beside the target, then renamed."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from memtune.errors import MemtuneError


def check_output_free(path: str | Path, overwrite: bool = False) -> None:
    """Fail early (before slow work) when `path` exists, is not empty and may not be replaced."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise MemtuneError(f"output {str(path)!r} is a file: expected a folder to create (choose another --out)")
    if path.exists() and not overwrite and any(path.iterdir()):
        raise MemtuneError(f"output {str(path)!r} already exists and is not empty: choose another --out or pass --overwrite")
    parent = next((p for p in path.absolute().parents if p.exists()), None)
    if parent is None or not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise MemtuneError(f"output {str(path)!r} cannot be created: {str(parent)!r} is not a writable folder")


@contextlib.contextmanager
def atomic_dir(path: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder that becomes `path` only if the block succeeds."""
    path = Path(path)
    check_output_free(path, overwrite)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-{os.getpid()}-", dir=path.parent))
    except OSError as e:
        raise MemtuneError(f"output {str(path)!r} cannot be created: {e.strerror or e}") from None
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    tmp.chmod(0o755)  # mkdtemp makes it private
    if path.exists():
        if not overwrite and any(path.iterdir()):  # another job wrote it while this one ran
            shutil.rmtree(tmp, ignore_errors=True)
            raise MemtuneError(f"output {str(path)!r} was created by another job while this one ran: "
                               "choose another --out or pass --overwrite")
        shutil.rmtree(path)
    os.replace(tmp, path)


def remove_stale_temporaries(folder: str | Path) -> list[Path]:
    """Remove the temporary folders `atomic_dir` left in `folder` when its process was killed.
    A temporary of a process still running (another job writing there), or of unknown owner,
    is kept."""
    removed = []
    for tmp in Path(folder).glob(".*.tmp-*"):
        pid = tmp.name.rsplit(".tmp-", 1)[1].split("-", 1)[0]
        if not pid.isdigit() or _alive(int(pid)):
            continue
        shutil.rmtree(tmp, ignore_errors=True)
        removed.append(tmp)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def check_output_file(path: str | Path) -> None:
    """Fail early (before slow work) when the file `path` could not be written."""
    path = Path(path)
    if path.is_dir():
        raise MemtuneError(f"output {str(path)!r} is a folder: expected a file name")
    parent = next((p for p in path.absolute().parents if p.exists()), None)
    if parent is None or not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise MemtuneError(f"output {str(path)!r} cannot be written: {str(parent)!r} is not a writable folder")


def atomic_write_text(path: str | Path, text: str) -> None:
    path = Path(path)
    check_output_file(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    except OSError as e:
        raise MemtuneError(f"output {str(path)!r} cannot be written: {e.strerror or e}") from None
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_json(path: str | Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, default=str) + "\n")


CONFIG, METRICS, RESULTS = "config.json", "metrics.jsonl", "results.json"


class RunFolder:
    """A run's folder while it is written: `config.json` (what was asked), `metrics.jsonl` (one
    JSON record per step, flushed, so a crash keeps what was logged), `results.json` (written
    last: a folder with it holds a finished run) and whatever the run saves beside them."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._metrics = open(self.path / METRICS, "a")  # noqa: SIM115 (closed by close()); there even with no step

    def log(self, record: dict) -> None:
        self._metrics.write(json.dumps(record) + "\n")
        self._metrics.flush()

    def write_config(self, config: dict) -> None:
        write_json(self.path / CONFIG, config)

    def write_results(self, results: dict) -> None:
        write_json(self.path / RESULTS, results)

    def close(self) -> None:
        self._metrics.close()


@contextlib.contextmanager
def run_folder(path: str | Path, overwrite: bool = False, folder=atomic_dir) -> Iterator[RunFolder]:
    """A `RunFolder` in a temporary path that becomes `path` only if the block succeeds
    (`folder`: `atomic_dir`, or `memtune.distributed.main_process_dir` under torchrun). Raises
    MemtuneError when `path` exists and not `overwrite`. First removes what killed runs left
    beside it (`remove_stale_temporaries`)."""
    remove_stale_temporaries(Path(path).absolute().parent)
    with folder(path, overwrite=overwrite) as tmp:
        run = RunFolder(tmp)
        try:
            yield run
        finally:
            run.close()

