"""File access for run directories, behind pyarrow filesystems so `s3://`, `gs://`, `hdfs://` work too.

Every write is atomic: data goes to a temporary name in the same folder and is renamed into place
once complete, so a reader (or a resumed stage) never sees half a file. Temporary names start with
`.tmp-` and carry the final name, so a stage that owns a shard can clean up after a killed writer.
"""

from __future__ import annotations

import hashlib
import os
import posixpath
import uuid

import pyarrow.fs as pafs

TMP_PREFIX = ".tmp-"


def resolve(url: str | os.PathLike) -> tuple[pafs.FileSystem, str]:
    """Return (filesystem, path) for a local path or a URL such as `s3://bucket/run`."""
    url = os.fspath(url)
    if "://" in url and not url.startswith("file://"):
        return pafs.FileSystem.from_uri(url)
    if url.startswith("file://"):
        url = url[len("file://") :]
    return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(url))


def join(*parts: str) -> str:
    return posixpath.join(*parts)


def exists(fs: pafs.FileSystem, path: str) -> bool:
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def makedirs(fs: pafs.FileSystem, path: str) -> None:
    fs.create_dir(path, recursive=True)


def listdir(fs: pafs.FileSystem, path: str) -> list[str]:
    """Base names in a folder (empty if it does not exist)."""
    if not exists(fs, path):
        return []
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=False))
    return sorted(posixpath.basename(i.path) for i in infos)


def read_bytes(fs: pafs.FileSystem, path: str) -> bytes:
    with fs.open_input_stream(path) as f:
        return f.read()


def tmp_name(path: str) -> str:
    folder, name = posixpath.split(path)
    return posixpath.join(folder, f"{TMP_PREFIX}{name}.{os.getpid()}-{uuid.uuid4().hex[:8]}")


def commit(fs: pafs.FileSystem, tmp: str, path: str) -> None:
    """Rename a finished temporary file into place (atomic on local and POSIX filesystems)."""
    fs.move(tmp, path)


def atomic_write_bytes(fs: pafs.FileSystem, path: str, data: bytes) -> None:
    makedirs(fs, posixpath.dirname(path))
    tmp = tmp_name(path)
    with fs.open_output_stream(tmp) as f:
        f.write(data)
    commit(fs, tmp, path)


def remove_tmp_files(fs: pafs.FileSystem, folder: str, final_names: set[str] | None = None) -> int:
    """Delete leftovers of killed writers; only those for `final_names` when given (shard ownership)."""
    removed = 0
    for name in listdir(fs, folder):
        if not name.startswith(TMP_PREFIX):
            continue
        final = name[len(TMP_PREFIX) :].rsplit(".", 1)[0]
        if final_names is None or final in final_names:
            _delete(fs, join(folder, name))
            removed += 1
    return removed


def _delete(fs: pafs.FileSystem, path: str) -> None:
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.Directory:
        fs.delete_dir(path)
    elif info.type == pafs.FileType.File:
        fs.delete_file(path)


def remove(fs: pafs.FileSystem, path: str) -> None:
    _delete(fs, path)


def sha256_file(fs: pafs.FileSystem, path: str, into=None, chunk: int = 1 << 22) -> tuple[str, int]:
    """(hex digest, size in bytes) of a file, streamed. With `into` (a hashlib object) the file's bytes
    are fed into it and its digest so far is returned: how multi-file digests are built."""
    h = into if into is not None else hashlib.sha256()
    size = 0
    with fs.open_input_stream(path) as f:
        while True:
            block = f.read(chunk)
            if not block:
                break
            h.update(block)
            size += len(block)
    return h.hexdigest(), size


LOCAL = pafs.LocalFileSystem()
