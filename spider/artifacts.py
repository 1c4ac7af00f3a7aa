"""Where job artifacts live: a local folder (the default), or an S3-compatible bucket through
fsspec/s3fs (`SPIDER_DATA_URL=s3://bucket/prefix`), so that workers on several machines share one
store with nothing mounted.

A path in the store is a `pathlib.Path` for the local folder, so that the default is exactly a
folder on disk, and a `StorePath` in a bucket: both offer the part of `Path`'s interface that job
code uses (`/`, `name`, `exists`, `read_text`, `read_bytes`, `open` for reading, `iterdir`, `glob`,
`unlink`, `stat`). Writes go through `write_atomic` or `staged`, which publish a file whole: by
rename on disk, by one PUT (or a multipart upload, which appears only once completed) in a
bucket. `fetch` and `publish` move files between the store and a worker's own disk, for what must
be a real local file (source files `datasets` reads, a trainer's saved states).
"""

from __future__ import annotations

import os
import posixpath
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Union

from spider.errors import SpiderError

if TYPE_CHECKING:
    from spider.settings import Settings

__all__ = ["ArtifactPath", "StorePath", "artifact_root", "fetch", "publish", "remove", "staged", "write_atomic"]

# How much of a file in a bucket one read asks for: what a streamed download holds in memory.
READ_BLOCK = 4 * 1024 * 1024


@dataclass(frozen=True)
class StoreStat:
    """What `StorePath.stat` tells, as `os.stat_result` names it: the size in bytes and the time
    of the last write (0 for a folder, which is only a key prefix)."""

    st_size: int
    st_mtime: float = 0.0


class StorePath:
    """A file or folder in an fsspec filesystem (an S3 bucket): `path` is its key without the
    protocol (`bucket/prefix/jobs/<id>/result.jsonl`). Folders are key prefixes: one exists while
    a file is under it, and needs no creating."""

    def __init__(self, fs: Any, path: str):
        self.fs = fs
        self.path = path.strip("/")

    def __truediv__(self, other: str | os.PathLike[str]) -> "StorePath":
        return StorePath(self.fs, f"{self.path}/{os.fspath(other)}")

    def __str__(self) -> str:
        return self.fs.unstrip_protocol(self.path)

    def __repr__(self) -> str:
        return f"StorePath({str(self)!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, StorePath) and str(other) == str(self)

    def __hash__(self) -> int:
        return hash(str(self))

    def __lt__(self, other: "StorePath") -> bool:  # sorted() orders paths by key, as Path's do
        return str(self) < str(other)

    @property
    def name(self) -> str:
        return posixpath.basename(self.path)

    @property
    def stem(self) -> str:
        return posixpath.splitext(self.name)[0]

    @property
    def suffix(self) -> str:
        return posixpath.splitext(self.name)[1]

    @property
    def parent(self) -> "StorePath":
        return StorePath(self.fs, posixpath.dirname(self.path))

    def with_name(self, name: str) -> "StorePath":
        return self.parent / name

    def relative_to(self, other: "StorePath") -> str:
        if not self.path.startswith(other.path + "/"):
            raise ValueError(f"{self} is not inside {other}")
        return self.path[len(other.path) + 1 :]

    def exists(self) -> bool:
        return self.fs.exists(self.path)

    def is_file(self) -> bool:
        return self.fs.isfile(self.path)

    def is_dir(self) -> bool:
        return self.fs.isdir(self.path)

    def mkdir(self, parents: bool = False, exist_ok: bool = False) -> None:
        """Nothing to create in a bucket; like Path.mkdir, FileExistsError when something is there."""
        if not exist_ok and self.exists():
            raise FileExistsError(str(self))

    def stat(self) -> StoreStat:
        info = self.fs.info(self.path)
        modified = info.get("LastModified") or info.get("mtime")
        stamp = modified.timestamp() if hasattr(modified, "timestamp") else float(modified or 0)
        return StoreStat(int(info.get("size") or 0), stamp)

    def read_bytes(self) -> bytes:
        return self.fs.cat_file(self.path)

    def read_text(self, encoding: str = "utf-8") -> str:
        return self.read_bytes().decode(encoding)

    def open(self, mode: str = "rb", encoding: str | None = None, newline: str | None = None) -> IO[Any]:
        """A file to read, fetched READ_BLOCK bytes at a time (writes go through write_atomic or staged)."""
        if set(mode) - {"r", "b", "t"}:
            raise ValueError(f"{self} opens for reading only (mode {mode!r}); write with write_atomic or staged")
        text = {"encoding": encoding or "utf-8", "newline": newline} if "b" not in mode else {}
        return self.fs.open(self.path, mode, block_size=READ_BLOCK, cache_type="readahead", **text)

    def unlink(self, missing_ok: bool = False) -> None:
        # S3 deletes a missing key without complaint: look first when missing is an error.
        if not missing_ok and not self.is_file():
            raise FileNotFoundError(str(self))
        self.fs.rm_file(self.path)

    def iterdir(self) -> Iterator["StorePath"]:
        for entry in self.fs.ls(self.path, detail=False):
            if entry.strip("/") != self.path:
                yield StorePath(self.fs, entry)

    def glob(self, pattern: str) -> Iterator["StorePath"]:
        for entry in sorted(self.fs.glob(f"{self.path}/{pattern}")):
            yield StorePath(self.fs, entry)


# A job artifact's path: on disk or in a bucket.
ArtifactPath = Union[Path, StorePath]


def artifact_root(settings: "Settings") -> ArtifactPath:
    """The folder every job's folder is under: `settings.data_dir`, or the bucket and prefix of
    `settings.data_url` (`s3://bucket/prefix`)."""
    if not settings.data_url:
        return Path(settings.data_dir)
    scheme, _, rest = settings.data_url.partition("://")
    bucket = rest.strip("/").split("/")[0]
    if scheme != "s3" or not bucket:
        raise SpiderError(
            f"SPIDER_DATA_URL is {settings.data_url!r}: give an S3 bucket and an optional prefix, "
            "s3://bucket/prefix (or leave it unset to keep artifacts in SPIDER_DATA_DIR)"
        )
    return StorePath(s3_filesystem(settings.s3_endpoint_url), rest)


_filesystems: dict[tuple[Any, ...], Any] = {}


def s3_filesystem(endpoint_url: str | None) -> Any:
    """This process's S3 client for `endpoint_url` (None: AWS, or botocore's AWS_ENDPOINT_URL).
    Credentials and region come the usual AWS ways (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY /
    AWS_SESSION_TOKEN, AWS_PROFILE, an instance role; AWS_REGION or AWS_DEFAULT_REGION).
    Listings are never cached: other machines write the same bucket."""
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    key = (endpoint_url, region, os.getpid())
    fs = _filesystems.get(key)
    if fs is None:
        try:
            import s3fs
        except ImportError:
            raise SpiderError("SPIDER_DATA_URL names an S3 bucket: install s3fs (pip install 'spider[server]')") from None
        client_kwargs = {k: v for k, v in (("endpoint_url", endpoint_url), ("region_name", region)) if v}
        fs = s3fs.S3FileSystem(client_kwargs=client_kwargs, use_listings_cache=False, skip_instance_cache=True)
        _filesystems[key] = fs
    return fs


def unreachable_errors() -> tuple[type[BaseException], ...]:
    """What a bucket that cannot be reached raises (its endpoint down or refusing, no
    credentials): the store is unavailable, nothing is wrong with the request. (Refusals of one
    request, such as a denied key, arrive from s3fs as OSErrors.)"""
    try:
        from botocore.exceptions import BotoCoreError
    except ImportError:
        return ()
    return (BotoCoreError,)


# -- writing: a reader sees a file whole or not at all ---------------------------------------------


def write_atomic(path: ArtifactPath, data: bytes | str) -> None:
    """Write a file so that readers see either nothing or all of it: temp file + rename on disk,
    one PUT in a bucket."""
    payload = data.encode() if isinstance(data, str) else data
    if isinstance(path, StorePath):
        path.fs.pipe_file(path.path, payload)
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(payload)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@contextmanager
def staged(path: ArtifactPath) -> Iterator[Path]:
    """A local file to write `path`'s content into (by any writer: pyarrow, tarfile, ...). When the
    block ends without an error it is published whole at `path` (renamed beside it on disk;
    uploaded to a bucket, where a multipart upload appears only once completed); on an error it
    is removed and `path` is left as it was."""
    if isinstance(path, StorePath):
        with tempfile.TemporaryDirectory(prefix="spider-stage-") as scratch:
            tmp = Path(scratch) / path.name
            yield tmp
            path.fs.put_file(str(tmp), path.path)
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        yield tmp
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)  # a failed write leaves no half file beside the job's files


def remove(path: ArtifactPath) -> None:
    """Remove a file or a folder with everything in it; nothing there is no error."""
    if isinstance(path, StorePath):
        try:
            path.fs.rm(path.path, recursive=True)
        except FileNotFoundError:
            pass
        return
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


# -- between the store and a worker's own disk -------------------------------------------------------


def fetch(source: ArtifactPath, local: Path) -> Path:
    """A local copy of a file or folder of the store: `source` itself when the store is this disk,
    else downloaded to `local` (replacing what was there; a folder is swapped in whole)."""
    if isinstance(source, Path):
        return source
    local.parent.mkdir(parents=True, exist_ok=True)
    tmp = local.with_name(f".{local.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        if source.is_dir():
            for key in source.fs.find(source.path):
                target = tmp / StorePath(source.fs, key).relative_to(source)
                target.parent.mkdir(parents=True, exist_ok=True)
                source.fs.get_file(key, str(target))
        else:
            source.fs.get_file(source.path, str(tmp))
        remove(local)
        tmp.rename(local)
    finally:
        remove(tmp)
    return local


def publish(local: Path, target: ArtifactPath) -> None:
    """Put a local file or folder at `target` in the store, each file whole (nothing to do when
    `target` is `local` itself). A folder's files appear one by one: whoever needs it whole is
    told it is there by a file written after it (a checkpoint's meta.json)."""
    if isinstance(target, Path):
        if target.resolve() != local.resolve():
            remove(target)
            (shutil.copytree if local.is_dir() else shutil.copy2)(local, target)
        return
    if local.is_dir():
        for file in sorted(p for p in local.rglob("*") if p.is_file()):
            target.fs.put_file(str(file), (target / file.relative_to(local).as_posix()).path)
    else:
        target.fs.put_file(str(local), target.path)
