"""Errors of the RAM-block DMA mapper."""

from __future__ import annotations

from ramdiscard.errors import ResourceExhausted


class IovaExhausted(ResourceExhausted):
    """No free IOVA range is large enough; nothing was allocated."""
