"""Files between stages: atomic writes, JSONL with file:line errors, manifests and fingerprints.

Every artifact is written to a temporary name in the same directory and renamed into place, so a
killed process leaves either the old file or the new one, never half of one. A stage records what
it was made from in a manifest (a fingerprint of its inputs and settings); a re-run whose
fingerprint matches skips the work, and a mismatching one redoes it rather than reusing stale data.
A manifest also records the sha256 of the outputs it vouches for (``outputs_record``), so a matching
manifest over a truncated or altered output is caught (``reusable``) and the output rebuilt with a
warning, instead of a later stage dying on the read.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

log = logging.getLogger(__name__)


class UserError(Exception):
    """Something the user can fix (an input file, a model that is not there): the stage entry point
    prints its message as one line, without a traceback (dpo_dist/cli.py)."""


class DataError(UserError, ValueError):
    """Bad input data; the message names the file and line."""


class MissingFile(UserError, FileNotFoundError):
    """An input file that is not there; the message names it (and the config key, where one names it)."""


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
    data = path.read_bytes()
    try:
        return json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as e:
        line, line_start = data.count(b"\n", 0, e.start) + 1, data.rfind(b"\n", 0, e.start) + 1
        raise DataError(f"{path}:{line}: {_not_utf8(e, line_start)}") from None
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}: invalid JSON: {e.msg}") from None


def _not_utf8(e: UnicodeDecodeError, line_start: int = 0) -> str:
    return f"not UTF-8 text (byte 0x{e.object[e.start]:02x} at column {e.start - line_start + 1})"


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
    records = []
    for lineno, record in iter_jsonl(path):
        if validate is not None:
            try:
                validate(record)
            except ValueError as e:
                raise DataError(f"{path}:{lineno}: {e}") from None
        records.append(record)
    return records


def iter_jsonl(path: str | os.PathLike) -> Iterator[tuple[int, dict]]:
    """(line number, object) of each non-blank line; DataError naming ``file:line`` for a line that
    is not UTF-8 or not a JSON object, MissingFile when there is no such file."""
    path = Path(path)
    if not path.is_file():
        raise MissingFile(f"{path}: no such file")
    # Bytes, decoded line by line: a text-mode reader decodes in blocks, so its decode error cannot
    # say which line holds the bad byte.
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{path}:{lineno}: {_not_utf8(e)}") from None
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: invalid JSON: {e.msg} (column {e.colno})") from None
            if not isinstance(record, dict):
                raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(record).__name__}")
            yield lineno, record


def fingerprint(*parts: Any) -> str:
    """Stable short hash of JSON-serialisable settings and file contents (see ``file_digest``)."""
    h = hashlib.sha256()
    for p in parts:
        h.update(json.dumps(p, sort_keys=True, default=str).encode())
        h.update(b"\x00")
    return h.hexdigest()[:16]


def records_fingerprint(records: Iterable[Any]) -> str:
    """``fingerprint(list(records))``, hashed a record at a time: the JSON of a million pairs is
    never one string in memory."""
    h = hashlib.sha256(b"[")
    for i, r in enumerate(records):
        h.update((", " if i else "").encode() + json.dumps(r, sort_keys=True, default=str).encode())
    h.update(b"]\x00")
    return h.hexdigest()[:16]


def file_digest(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def manifest_matches(manifest_path: str | os.PathLike, expected_fingerprint: str, quiet: bool = False) -> bool:
    """True if a finished artifact exists with this fingerprint (a stage may skip its work). A
    manifest that cannot be read counts as absent, with a warning (unless ``quiet``): the stage
    redoes its work."""
    p = Path(manifest_path)
    if not p.is_file():
        return False
    try:
        manifest = read_json(p)
    except (DataError, OSError) as e:
        if not quiet:
            log.warning("%s cannot be read (%s): redoing the work it recorded", p, e)
        return False
    return isinstance(manifest, dict) and manifest.get("fingerprint") == expected_fingerprint


def outputs_record(*outputs: str | os.PathLike) -> dict:
    """The manifest entry vouching for a stage's finished outputs: each file's sha256 by name."""
    return {"outputs": {Path(p).name: file_digest(p) for p in outputs}}


def reusable(manifest_path: str | os.PathLike, expected_fingerprint: str, outputs: Iterable[str | os.PathLike],
             quiet: bool = False) -> bool:
    """True if the manifest has this fingerprint and every output is there with the sha256 the
    manifest recorded (``outputs_record``). An output that is missing, truncated or altered under a
    matching manifest is named in a warning (unless ``quiet``) and the stage rebuilds it."""
    if not manifest_matches(manifest_path, expected_fingerprint, quiet):
        return False
    recorded = read_json(manifest_path).get("outputs") or {}
    for p in map(Path, outputs):
        if not p.is_file():
            problem = "is missing"
        elif p.name not in recorded:
            problem = "has no digest in its manifest (written by an older version)"
        elif file_digest(p) != recorded[p.name]:
            problem = "does not match the digest its manifest recorded (truncated or altered)"
        else:
            continue
        if not quiet:
            log.warning("%s %s: rebuilding it", p, problem)
        return False
    return True


def intact(path: str | os.PathLike, check: Callable[[Path], Any]) -> bool:
    """Whether a finished file that is about to be reused instead of recomputed (a rank's shard) is
    whole: ``check(path)`` reads it and raises if it is not. An unreadable file is named in a
    warning and removed, and counts as absent, so the caller recomputes it."""
    path = Path(path)
    if not path.is_file():
        return False
    try:
        check(path)
    except Exception as e:  # whatever the reader raises on a damaged file (SafetensorError, DataError, ...)
        log.warning("%s cannot be read (%s): recomputing it", path, " ".join(str(e).split()))
        path.unlink(missing_ok=True)
        return False
    return True


def expect_ids(rows: list[dict], ids: list[str]) -> None:
    """``rows`` are the records of ``ids``, in order: a reused shard is the one its rank would write."""
    found = [r.get("id") for r in rows]
    if found != ids:
        raise ValueError(f"holds {len(found)} records, not the {len(ids)} expected ({ids[:1]}...)")


def file_digests(paths: Iterable[str | os.PathLike], index: str | os.PathLike) -> dict[str, str]:
    """sha256 of each file's content, by the path given, each file hashed once: ``index`` (a JSON
    file) keeps every digest with the file's resolved path and what ``stat`` says of it (size,
    mtime_ns, ctime_ns, inode), and a file whose stat is unchanged is not read again.

    ctime is in the key because it is the one stamp a user cannot set: ``cp -p``, ``rsync -t`` and
    ``tar`` restore the modification time of a file they overwrite (tar to the whole second), and a
    same-sized checkpoint copied over another in place keeps the inode too. An index that cannot be
    read is ignored and rebuilt. Concurrent ranks and jobs take a lock, so a file is hashed once."""
    index = Path(index)
    with file_lock(index.with_name(f".{index.name}.lock")):
        try:
            known = json.loads(index.read_text(encoding="utf-8"))
            if not isinstance(known, dict):
                raise ValueError("not a JSON object")
        except FileNotFoundError:
            known = {}
        except (OSError, ValueError) as e:
            log.warning("%s cannot be read (%s): hashing again", index, e)
            known = {}
        digests, changed = {}, False
        for p in paths:
            real = os.path.realpath(p)
            st = os.stat(real)
            stamp = [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]
            entry = known.get(real)
            if not (isinstance(entry, dict) and entry.get("stat") == stamp and isinstance(entry.get("sha256"), str)):
                entry = known[real] = {"stat": stamp, "sha256": file_digest(real)}
                changed = True
            digests[str(p)] = entry["sha256"]
        if changed:
            # Entries of files that are gone would otherwise pile up (every test's temporary model).
            write_json(index, {k: v for k, v in known.items() if os.path.exists(k)})
    return digests


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


def wait_for_manifest(manifest_path: Path, fp: str, timeout: float | None = None,
                      outputs: Iterable[str | os.PathLike] = ()) -> None:
    """Block until rank 0 has written this stage's manifest with fingerprint ``fp`` (timeout as in
    wait_for_files), and ``outputs`` with the digests it records (an output being rebuilt under a
    manifest that already matches): how the other ranks wait for a merge without a process group,
    whose collectives would time out while one engine still generates."""
    outputs = list(outputs)
    _wait_until(lambda: reusable(manifest_path, fp, outputs, quiet=True), timeout,
                lambda t: f"{manifest_path}: not written with fingerprint {fp} after {t:.0f}s")


def file_barrier(directory: Path, name: str, rank: int, world_size: int, attempt: str = "") -> None:
    """Every rank reaches this point before any goes on, through marker files in ``directory``: a
    barrier for stages that keep no process group (evaluation, with vLLM engines in between).
    ``attempt`` (dist.launch_id) keeps an earlier, failed launch's markers from letting this one
    through at once."""
    tag = f"-{attempt}" if attempt else ""
    marker = lambda r: Path(directory) / f"{name}{tag}-rank{r}-of-{world_size}"
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
