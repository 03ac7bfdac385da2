"""Writing an HDF5 file whose write errors come back to Python instead of breaking HDF5.

When a write fails inside HDF5 (a full disk, a quota), closing the file fails as well: HDF5
keeps the half-closed file, h5py prints "Exception ignored ... Can't close file" tracebacks
while objects are freed, and the library crashes (segmentation fault) when it shuts down at
exit. `H5Output` hands HDF5 a file object (h5py's ``fileobj`` driver) that keeps the first
failed write and drops the ones after it, so HDF5 always closes cleanly; the kept OSError is
raised by `H5Output.check` (call it between blocks of work, to stop early) and on close.
"""

from __future__ import annotations

import os
from pathlib import Path
from types import TracebackType

import h5py

__all__ = ["H5Output"]


class _KeepErrorFile:
    """A binary file for h5py's ``fileobj`` driver: a failed write is kept in ``error`` and
    reported as done; once one failed, writes and truncations are dropped (the file is
    removed anyway) and its size is what HDF5 believes it wrote."""

    def __init__(self, path: Path) -> None:
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o666)
        self.error: OSError | None = None
        self._pos = 0
        self._end = 0  # the end of everything HDF5 wrote, dropped writes included

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        if whence == os.SEEK_SET:
            self._pos = offset
        elif whence == os.SEEK_CUR:
            self._pos += offset
        else:
            self._pos = self._size() + offset
        return self._pos

    def tell(self) -> int:
        return self._pos

    def _size(self) -> int:
        return max(os.fstat(self.fd).st_size, self._end)

    def read(self, size: int = -1) -> bytes:
        if size < 0:
            size = max(self._size() - self._pos, 0)
        data = os.pread(self.fd, size, self._pos)
        self._pos += len(data)
        return data

    def readinto(self, buffer: memoryview) -> int:
        data = self.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)

    def write(self, data: bytes | memoryview) -> int:
        view = memoryview(data).cast("B")
        if self.error is None:
            try:
                done = 0
                while done < len(view):  # pwrite may write less than asked
                    done += os.pwrite(self.fd, view[done:], self._pos + done)
            except OSError as err:
                self.error = err
        self._pos += len(view)
        self._end = max(self._end, self._pos)
        return len(view)

    def truncate(self, size: int | None = None) -> int:
        size = self._pos if size is None else size
        if self.error is None:
            try:
                os.ftruncate(self.fd, size)
            except OSError as err:
                self.error = err
        self._end = size
        return size

    def flush(self) -> None:
        pass  # unbuffered: every write went to the operating system

    def close(self) -> None:
        os.close(self.fd)


class H5Output:
    """A new HDF5 file at ``path`` (``h5py.File`` in ``file``), for writing.

    Use as a context manager: on leaving, the file is closed and a kept write error raised
    (as the cause when the block raised something else: HDF5 may trip over dropped data).
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._sink = _KeepErrorFile(self.path)
        try:
            self.file = h5py.File(self._sink, "w")
        except BaseException:
            self._sink.close()
            raise

    def check(self) -> None:
        """Raise the first failed write, if any (as an OSError naming the file)."""
        err = self._sink.error
        if err is not None:
            raise OSError(err.errno, err.strerror, str(self.path)) from err

    def close(self) -> None:
        try:
            self.file.close()
        finally:
            self._sink.close()
        self.check()

    def __enter__(self) -> H5Output:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if value is None:
            self.close()
            return
        try:
            self.close()
        except OSError as write_error:
            if isinstance(value, Exception):  # the full disk is the cause; not a Ctrl-C
                raise write_error from value
