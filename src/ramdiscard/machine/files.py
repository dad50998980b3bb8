"""The files a machine creates on the host, and their removal at close.

Rules:

* :meth:`MachineFiles.workdir` is where file-backed devices without a ``path`` get their
  memory file: the directory given to the machine, else a temporary directory of the
  machine's own (in /dev/shm when it exists: guest memory belongs in memory).
* :meth:`MachineFiles.files_dir` is where default snapshot, migration and dump files go:
  a temporary directory on disk (not /dev/shm: a snapshot holds as much as the guest has
  populated).
* :meth:`MachineFiles.remove_created` removes every file recorded with
  :meth:`MachineFiles.record_created`, but only if its path still names the file the
  machine created (:func:`~ramdiscard.fileio.unlink_created`); the caller does so while
  the files' RAM blocks still hold the lock on them. :meth:`MachineFiles.remove_dirs`
  then removes the machine's own directories. Neither raises.
* Creating a directory or recording a file is not interrupted by SIGINT/SIGTERM
  (:func:`~ramdiscard.interrupts.deferred`), so nothing created goes unrecorded.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from ramdiscard import interrupts
from ramdiscard.fileio import FileId, unlink_created


class MachineFiles:
    """Host files and directories of one machine; see the module rules."""

    def __init__(self, workdir: str | Path | None = None) -> None:
        self._workdir = Path(workdir) if workdir is not None else None
        self._own_workdir: Path | None = None
        self._own_files_dir: Path | None = None
        self._created: list[tuple[Path, FileId]] = []

    def workdir(self) -> Path:
        """The directory for device memory files (created if needed)."""
        if self._workdir is None:
            base = "/dev/shm" if os.path.isdir("/dev/shm") else None
            with interrupts.deferred():
                self._own_workdir = Path(tempfile.mkdtemp(prefix=f"ramdiscard-{os.getpid()}-", dir=base))
            self._workdir = self._own_workdir
        self._workdir.mkdir(parents=True, exist_ok=True)
        return self._workdir

    def files_dir(self) -> Path:
        """The temporary directory for default snapshot, migration and dump files."""
        if self._own_files_dir is None:
            with interrupts.deferred():
                self._own_files_dir = Path(tempfile.mkdtemp(prefix=f"ramdiscard-files-{os.getpid()}-"))
        return self._own_files_dir

    def record_created(self, path: Path, file_id: FileId) -> None:
        """Remember that the machine created ``path`` (identified by ``file_id``)."""
        self._created.append((path, file_id))

    def remove_created(self) -> None:
        """Remove the recorded files that still are the ones created; raises nothing."""
        for path, file_id in self._created:
            unlink_created(path, file_id)
        self._created.clear()

    def remove_dirs(self) -> None:
        """Remove the machine's own temporary directories; raises nothing."""
        if self._own_workdir is not None:
            shutil.rmtree(self._own_workdir, ignore_errors=True)
        if self._own_files_dir is not None:
            shutil.rmtree(self._own_files_dir, ignore_errors=True)
