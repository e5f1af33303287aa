"""Files between stages: atomic writes, JSONL with file:line errors, manifests and fingerprints.

Every artifact is written to a temporary name in the same directory and renamed into place, so a
killed process leaves either the old file or the new one, never half of one. A stage records what
it was made from in a manifest (a fingerprint of its inputs and settings); a re-run whose
fingerprint matches skips the work, and a mismatching one redoes it rather than reusing stale data.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator


class DataError(ValueError):
    """Bad input data; the message names the file and line."""


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _tmp_path(path: Path) -> Path:
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    # mkstemp makes the file owner-only; give the finished artifact the permissions open() would.
    os.chmod(name, 0o666 & ~_umask())
    return Path(name)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it over ``path`` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_path(path)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())


def write_json(path: str | os.PathLike, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, ensure_ascii=False, sort_keys=True) + "\n")


def read_json(path: str | os.PathLike) -> Any:
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}: invalid JSON: {e.msg}") from None


def write_jsonl(path: str | os.PathLike, records: Iterable[dict]) -> int:
    n = 0
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            for r in records:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
                n += 1
            f.flush()
            os.fsync(f.fileno())
    return n


def read_jsonl(path: str | os.PathLike, validate: Callable[[dict], None] | None = None) -> list[dict]:
    """Read a JSONL file. A line that is not a JSON object, or that ``validate`` rejects with
    ValueError, raises DataError naming ``file:line`` and the reason. Blank lines are skipped."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    records = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: invalid JSON: {e.msg} (column {e.colno})") from None
            if not isinstance(record, dict):
                raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(record).__name__}")
            if validate is not None:
                try:
                    validate(record)
                except ValueError as e:
                    raise DataError(f"{path}:{lineno}: {e}") from None
            records.append(record)
    return records


def fingerprint(*parts: Any) -> str:
    """Stable short hash of JSON-serialisable settings and file contents (see ``file_digest``)."""
    h = hashlib.sha256()
    for p in parts:
        h.update(json.dumps(p, sort_keys=True, default=str).encode())
        h.update(b"\x00")
    return h.hexdigest()[:16]


def file_digest(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def manifest_matches(manifest_path: str | os.PathLike, expected_fingerprint: str) -> bool:
    """True if a finished artifact exists with this fingerprint (a stage may skip its work)."""
    p = Path(manifest_path)
    if not p.is_file():
        return False
    try:
        return read_json(p).get("fingerprint") == expected_fingerprint
    except (DataError, OSError):
        return False


@contextlib.contextmanager
def file_lock(path: str | os.PathLike) -> Iterator[None]:
    """An exclusive advisory lock, so concurrent ranks or jobs do one-time work once."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Build a directory under a temporary name and rename it into place when the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp is owner-only; others on a cluster must read the model
    try:
        yield tmp
        if path.exists():
            # Replacing a finished directory: move the old one aside first so the swap is two renames.
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def shard_path(directory: Path, fp: str, rank: int, world_size: int, suffix: str = ".jsonl") -> Path:
    """Where one rank writes its part of a sharded stage (generate, judge, reference). Keyed by the
    stage's fingerprint and the world size: a re-run with the same inputs reuses finished shards, and
    shards of other settings or another world size are never mixed in."""
    return Path(directory) / "shards" / f"{fp}-rank{rank:03d}-of-{world_size:03d}{suffix}"


def gather_jsonl_shards(directory: Path, fp: str, world_size: int) -> list[dict]:
    """Rank 0: wait for every rank's JSONL shard, then their records in rank order."""
    paths = [shard_path(directory, fp, r, world_size) for r in range(world_size)]
    wait_for_files(paths)
    return [row for p in paths for row in read_jsonl(p)]


def wait_for_manifest(manifest_path: Path, fp: str, timeout: float | None = None) -> None:
    """Block until rank 0 has written this stage's manifest with fingerprint ``fp`` (timeout as in
    wait_for_files): how the other ranks wait for a merge without a process group, whose collectives
    would time out while one engine still generates."""
    _wait_until(lambda: manifest_matches(manifest_path, fp), timeout,
                lambda t: f"{manifest_path}: not written with fingerprint {fp} after {t:.0f}s")


def file_barrier(directory: Path, name: str, rank: int, world_size: int) -> None:
    """Every rank reaches this point before any goes on, through marker files in ``directory``: a
    barrier for stages that keep no process group (evaluation, with vLLM engines in between)."""
    marker = lambda r: Path(directory) / f"{name}-rank{r}-of-{world_size}"
    write_text(marker(rank), "")
    wait_for_files([marker(r) for r in range(world_size)])


def wait_for_files(paths: list[Path], timeout: float | None = None) -> None:
    """Block until every path exists: how rank 0 waits for other ranks' shards in stages that keep
    no process group. The timeout (DPO_DIST_SHARD_TIMEOUT seconds, default a day) names the missing."""
    _wait_until(lambda: all(Path(p).is_file() for p in paths), timeout,
                lambda t: f"shards missing after {t:.0f}s: {[str(p) for p in paths if not Path(p).is_file()]}")


def _wait_until(done, timeout: float | None, message) -> None:
    """Poll ``done()`` once a second; TimeoutError(``message(timeout)``) after ``timeout`` seconds
    (default DPO_DIST_SHARD_TIMEOUT, a day)."""
    timeout = float(os.environ.get("DPO_DIST_SHARD_TIMEOUT", 24 * 3600)) if timeout is None else timeout
    deadline = time.time() + timeout
    while not done():
        if time.time() > deadline:
            raise TimeoutError(message(timeout))
        time.sleep(1.0)
