"""Where a run's checkpoints and records live: a local folder or a URI of a filesystem pyarrow understands
(s3://, gs://, hdfs://, file://). Thin wrappers over pyarrow.fs so the trainer treats both the same way.

On one machine the run folder is the storage; on a cluster, rank 0 runs on another node than the driver, so
whatever the driver must read (metrics, the export reference batch, checkpoints) goes through this storage.
"""

from __future__ import annotations

import os
import tempfile
from typing import List, Tuple

import pyarrow.fs as pafs


def is_uri(path: str) -> bool:
    return "://" in path


def join(root: str, *parts: str) -> str:
    if is_uri(root):
        return "/".join([root.rstrip("/"), *parts])
    return os.path.join(root, *parts)


def _fs(path: str) -> Tuple[pafs.FileSystem, str]:
    if is_uri(path):
        return pafs.FileSystem.from_uri(path)
    return pafs.LocalFileSystem(), os.path.abspath(path)


def exists(path: str) -> bool:
    fs, p = _fs(path)
    return fs.get_file_info(p).type != pafs.FileType.NotFound


def write_bytes(path: str, data: bytes) -> None:
    """Atomic on local disks (temp file + rename); object stores write whole objects anyway."""
    fs, p = _fs(path)
    fs.create_dir(os.path.dirname(p), recursive=True)
    if isinstance(fs, pafs.LocalFileSystem):
        tmp = p + ".tmp"
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, p)
        return
    with fs.open_output_stream(p) as f:
        f.write(data)


def read_bytes(path: str) -> bytes:
    fs, p = _fs(path)
    with fs.open_input_stream(p) as f:
        return f.read()


def list_dirs(root: str) -> List[str]:
    """Names of the sub-folders of `root` (empty if it does not exist)."""
    fs, p = _fs(root)
    if fs.get_file_info(p).type == pafs.FileType.NotFound:
        return []
    infos = fs.get_file_info(pafs.FileSelector(p, recursive=False))
    return sorted(os.path.basename(i.path) for i in infos if i.type == pafs.FileType.Directory)


def local_copy(path: str) -> Tuple[str, bool]:
    """A local folder with the contents of `path`: `path` itself when it is local, else a download into a temp
    folder (the caller removes it when the second value is True)."""
    if not is_uri(path):
        return os.path.abspath(path), False
    fs, p = _fs(path)
    dst = tempfile.mkdtemp(prefix="pimm-dl-")
    pafs.copy_files(p, dst, source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
    return dst, True


def upload_file(local: str, dst: str) -> None:
    fs, p = _fs(dst)
    fs.create_dir(os.path.dirname(p), recursive=True)
    pafs.copy_files(local, p, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)


def delete_dir(path: str) -> None:
    fs, p = _fs(path)
    if fs.get_file_info(p).type != pafs.FileType.NotFound:
        fs.delete_dir(p)
