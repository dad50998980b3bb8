"""Migration, snapshots and restore that never touch discarded memory.

* :func:`save` / :func:`load`: snapshot to / restore from a file (sparse snapshot file,
  or a plain stream for pipes and in-memory files).
* :func:`migrate_to` / :func:`receive_from`: live-migration style transfer over TCP.
* Format: :mod:`ramdiscard.migration.stream` and ``docs/migration-format.md``.
"""

from ramdiscard.migration.destination import load
from ramdiscard.migration.progress import Progress, ProgressFn
from ramdiscard.migration.source import MigrationStats, save
from ramdiscard.migration.stream import MigrationError, StreamError
from ramdiscard.migration.tcp import migrate_to, receive_from

__all__ = [
    "MigrationError",
    "MigrationStats",
    "Progress",
    "ProgressFn",
    "StreamError",
    "load",
    "migrate_to",
    "receive_from",
    "save",
]
