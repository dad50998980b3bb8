"""Safe creation and opening of the files ramdiscard writes or reads as data.

Every file that holds guest memory (dumps, snapshots, migration files) is written through
:func:`create_output`; every such file read back goes through :func:`open_input`; RAM
backing files are opened with :func:`open_backing`. The rules, for every caller:

* An existing path that is not a regular file (a FIFO, a device node, a socket, a
  directory, a symbolic link for outputs) is refused with :class:`FileRefused`, a one-line
  message naming the path and what it is. It is decided by ``lstat``/``stat`` *before*
  anything is opened, so a FIFO never blocks and a device node is never opened (opening
  some devices has effects); opens use ``O_NONBLOCK`` and ``fstat`` re-checks the opened
  file, in case the path was swapped in between.
* An output is written to a new file created with ``O_EXCL`` (mode 0600, ``fchmod`` so
  the umask cannot loosen or tighten it) in the destination's directory, synced, then
  renamed over the destination. The destination is never opened, truncated or removed:
  on any failure only the temporary file this call created is removed (after checking
  that the name still refers to it), and an existing destination keeps its content, mode
  and inode.
* An output that is a file backing guest memory in this process (any open
  :class:`~ramdiscard.hostmem.RamBlock` with a file descriptor, registered through
  :func:`register_guest_memory`) is refused: compared by device and inode number, so
  hard links and other spellings of the path are caught too.
* :func:`unlink_created` removes a path only if it still names the inode the caller
  created; ramdiscard never removes a file it did not create.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import stat
import threading
from collections.abc import Iterator
from typing import BinaryIO, NamedTuple

from ramdiscard.errors import InvalidArgument

OUTPUT_MODE = 0o600


class FileRefused(InvalidArgument, OSError):
    """A path was refused before anything was written or removed; the message is one line
    naming the path and the reason. ``errno`` is the matching error number."""

    def __init__(self, code: int, message: str) -> None:
        OSError.__init__(self, code, message)

    def __str__(self) -> str:
        return str(self.strerror)


class ExistingData(InvalidArgument):
    """A backing file already holds data and the caller did not allow discarding it."""


class FileId(NamedTuple):
    """A file's identity: (st_dev, st_ino)."""

    dev: int
    ino: int

    @classmethod
    def of(cls, st: os.stat_result) -> FileId:
        return cls(st.st_dev, st.st_ino)


_guest_lock = threading.Lock()
_guest_files: dict[FileId, list[str]] = {}


def register_guest_memory(fd: int, label: str) -> FileId:
    """Record that the file open as ``fd`` backs guest memory (``label`` names it in
    errors); :func:`create_output` refuses it until :func:`unregister_guest_memory`."""
    fid = FileId.of(os.fstat(fd))
    with _guest_lock:
        _guest_files.setdefault(fid, []).append(label)
    return fid


def unregister_guest_memory(fid: FileId, label: str) -> None:
    """Undo one :func:`register_guest_memory`; unknown entries are ignored."""
    with _guest_lock:
        labels = _guest_files.get(fid)
        if labels is not None and label in labels:
            labels.remove(label)
            if not labels:
                del _guest_files[fid]


def guest_memory_user(fid: FileId) -> str | None:
    """The label of a RAM block backed by the file ``fid``, or None."""
    with _guest_lock:
        labels = _guest_files.get(fid)
        return labels[0] if labels else None


def describe_mode(mode: int) -> str:
    """What kind of file ``mode`` is, in words."""
    kinds = (
        (stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"),
        (stat.S_ISDIR, "a directory"), (stat.S_ISLNK, "a symbolic link"),
    )  # fmt: skip
    for test, name in kinds:
        if test(mode):
            return name
    return "not a regular file"


def _refuse_kind(path: str, what: str, mode: int) -> FileRefused:
    code = errno.EISDIR if stat.S_ISDIR(mode) else errno.EINVAL
    return FileRefused(code, f"{what} {path!r} is {describe_mode(mode)}, not a regular file; left untouched")


def check_output(path: str | os.PathLike[str], what: str) -> os.stat_result | None:
    """Check that ``path`` may be replaced by an output: missing, or a regular file (not a
    symbolic link) that backs no guest memory. Returns its ``lstat`` (None if missing).
    Raises FileRefused; opens nothing."""
    p = os.fspath(path)
    try:
        st = os.lstat(p)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise FileRefused(exc.errno or errno.EIO, f"{what} {p!r}: {exc.strerror}") from None
    if not stat.S_ISREG(st.st_mode):
        raise _refuse_kind(p, what, st.st_mode)
    user = guest_memory_user(FileId.of(st))
    if user is not None:
        raise FileRefused(
            errno.EBUSY, f"{what} {p!r} is the file backing guest memory ({user}); left untouched"
        )
    return st


@contextlib.contextmanager
def create_output(
    path: str | os.PathLike[str], what: str = "output", *, durable: bool = True
) -> Iterator[BinaryIO]:
    """Write a new file at ``path`` (see the module rules): yields a ``w+b`` file object
    on a temporary file in the same directory; when the block ends without an exception,
    the file gets mode 0600, is flushed (and fsynced with the directory if ``durable``)
    and renamed to ``path``. An exception in the block (or from the rename) removes the
    temporary file and leaves ``path`` as it was. Raises FileRefused for a refused
    ``path``, OSError from the filesystem."""
    p = os.fspath(path)
    check_output(p, what)
    directory, name = os.path.split(p)
    directory = directory or "."
    flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    for _ in range(16):
        tmp = os.path.join(directory, f".{name}.{secrets.token_hex(6)}.tmp")
        try:
            fd = os.open(tmp, flags, OUTPUT_MODE)
            break
        except FileExistsError:
            continue
        except OSError as exc:
            raise FileRefused(
                exc.errno or errno.EIO, f"{what} {p!r}: cannot create a file in {directory!r}: {exc.strerror}"
            ) from None
    else:
        raise FileRefused(errno.EEXIST, f"{what} {p!r}: no free temporary name in {directory!r}")
    own = FileId.of(os.fstat(fd))
    done = False
    try:
        os.fchmod(fd, OUTPUT_MODE)
        with os.fdopen(fd, "w+b", closefd=False) as f:
            yield f
            f.flush()
            if durable:
                os.fsync(fd)
        check_output(p, what)
        os.rename(tmp, p)
        done = True
        if durable:
            _fsync_dir(directory)
    finally:
        os.close(fd)
        if not done:
            unlink_created(tmp, own)


def _fsync_dir(directory: str) -> None:
    dfd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def unlink_created(path: str | os.PathLike[str], fid: FileId) -> bool:
    """Remove ``path`` if it still names the file ``fid`` (one this process created).
    True if removed; never raises."""
    with contextlib.suppress(OSError):
        if FileId.of(os.lstat(path)) == fid:
            os.unlink(path)
            return True
    return False


def _open_regular(p: str, flags: int, what: str, mode: int = OUTPUT_MODE) -> int:
    """Open ``p`` with ``flags | O_NONBLOCK``; refuse anything but a regular file before
    and after opening. Returns a blocking fd."""
    with contextlib.suppress(FileNotFoundError):
        st = os.stat(p)
        if not stat.S_ISREG(st.st_mode):
            raise _refuse_kind(p, what, st.st_mode)
    try:
        fd = os.open(p, flags | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC, mode)
    except OSError as exc:
        raise FileRefused(exc.errno or errno.EIO, f"{what} {p!r}: {exc.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise _refuse_kind(p, what, st.st_mode)
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def open_input(path: str | os.PathLike[str], what: str = "input") -> BinaryIO:
    """Open an existing regular file for reading (``rb``); a FIFO, device node, socket or
    directory is refused with FileRefused without blocking or opening it."""
    p = os.fspath(path)
    fd = _open_regular(p, os.O_RDONLY, what)
    return os.fdopen(fd, "rb")


class Backing(NamedTuple):
    """An open backing file: its fd, whether this call created it, its identity."""

    fd: int
    created: bool
    fid: FileId


def open_backing(path: str | os.PathLike[str], what: str, *, readonly: bool = False) -> Backing:
    """Open (or create, mode 0600, unless ``readonly``) a regular file to back guest
    memory. A non-regular path is refused (FileRefused), never opened if it is one when
    checked; ``created`` tells whether this call created the file (``O_EXCL``)."""
    p = os.fspath(path)
    if readonly:
        fd = _open_regular(p, os.O_RDONLY, what)
        return Backing(fd, False, FileId.of(os.fstat(fd)))
    try:
        fd = os.open(p, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, OUTPUT_MODE)
    except FileExistsError:
        fd = _open_regular(p, os.O_RDWR, what)
        return Backing(fd, False, FileId.of(os.fstat(fd)))
    except OSError as exc:
        raise FileRefused(exc.errno or errno.EIO, f"{what} {p!r}: {exc.strerror}") from None
    return Backing(fd, True, FileId.of(os.fstat(fd)))


__all__ = [
    "OUTPUT_MODE",
    "Backing",
    "ExistingData",
    "FileId",
    "FileRefused",
    "check_output",
    "create_output",
    "describe_mode",
    "guest_memory_user",
    "open_backing",
    "open_input",
    "register_guest_memory",
    "unlink_created",
    "unregister_guest_memory",
]
