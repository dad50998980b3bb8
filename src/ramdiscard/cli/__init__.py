"""Command-line interface: ``ramdiscard demo | bench | ...``."""
