"""segflow's user-facing error: a leaf module (it imports nothing of segflow's)."""

from __future__ import annotations


class SegflowError(Exception):
    """An expected failure a user can act on; its message is one line naming the file and the fix."""
