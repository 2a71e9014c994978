"""A folder held open by a file descriptor, so that what is written into it cannot be redirected.

Paths are checked when a job is submitted and started, but a folder swapped for a symlink later
would redirect every write that goes by name. A `SafeDir` opens the folder once (walking from
the jobs root one component at a time, refusing symlinks) and does every file operation relative
to that descriptor with `O_NOFOLLOW`: a later swap of any path component changes nothing.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path
from typing import IO, Any

from service.scoring import ScoringError

_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
_NOFOLLOW = os.O_NOFOLLOW | os.O_CLOEXEC


class SafeDir:
    """An open folder; file names given to its methods are plain names inside it."""

    def __init__(self, fd: int, path: Path) -> None:
        self.fd = fd
        self.path = path

    @classmethod
    def open(cls, path: Path, root: Path | None = None) -> SafeDir:
        """Open (creating as needed) `path`; under `root`, every component below the root is
        opened without following symlinks."""
        path = Path(path)
        if root is None:
            path.mkdir(parents=True, exist_ok=True)
            return cls(os.open(path, _DIR), path)
        try:
            parts = path.relative_to(root).parts
        except ValueError:
            raise ScoringError(f"{path} is outside {root}") from None
        fd = os.open(root, _DIR)
        try:
            for part in parts:
                try:
                    os.mkdir(part, 0o755, dir_fd=fd)
                except FileExistsError:
                    pass
                try:
                    child = os.open(part, _DIR | os.O_NOFOLLOW, dir_fd=fd)
                except OSError as exc:
                    if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                        raise ScoringError(
                            f"output path component {part!r} is a symlink or not a folder: refused"
                        ) from None
                    raise
                os.close(fd)
                fd = child
        except BaseException:
            os.close(fd)
            raise
        return cls(fd, path)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def open_fd(self, name: str, flags: int, mode: int = 0o644) -> int:
        """`os.open` of a name inside the folder, never following a symlink."""
        return os.open(name, flags | _NOFOLLOW, mode, dir_fd=self.fd)

    def file(self, name: str, mode: str) -> IO[Any]:
        """A file object: "rb", "wb" (create/truncate), "r+b" or "ab" (create)."""
        flags = {
            "rb": os.O_RDONLY,
            "wb": os.O_WRONLY | os.O_CREAT | os.O_TRUNC,
            "r+b": os.O_RDWR,
            "ab": os.O_WRONLY | os.O_CREAT | os.O_APPEND,
        }[mode]
        return os.fdopen(self.open_fd(name, flags), mode)

    def read_bytes(self, name: str) -> bytes:
        with self.file(name, "rb") as f:
            return f.read()

    def write_atomic(self, name: str, data: bytes, tmp_prefix: str = "_tmp-") -> None:
        """Write `name` whole or not at all (temp file, fsync, rename, all inside the folder)."""
        tmp = tmp_prefix + name
        with self.file(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        self.replace(tmp, name)

    def replace(self, src: str, dst: str) -> None:
        os.replace(src, dst, src_dir_fd=self.fd, dst_dir_fd=self.fd)

    def unlink(self, name: str) -> None:
        os.unlink(name, dir_fd=self.fd)

    def names(self) -> list[str]:
        return os.listdir(self.fd)

    def size(self, name: str) -> int | None:
        """The size of a regular file inside the folder, or None if there is none."""
        try:
            st = os.stat(name, dir_fd=self.fd, follow_symlinks=False)
        except FileNotFoundError:
            return None
        return st.st_size if stat.S_ISREG(st.st_mode) else None
