"""Typed errors of the store. Every message names the offending path/value and what to do."""
from __future__ import annotations


class StoreError(Exception):
    """The store on disk, or a call into it, is not what the contract says."""


class VideoNotStoredError(StoreError, KeyError):
    """A video that failed, is still pending, or is not in the store was asked for.

    Subclasses KeyError so that `video_id in reader`-style code and mapping idioms behave; the message
    says which of failed / pending / unknown it is.
    """

    def __init__(self, video_id: str, status: str, message: str) -> None:
        super().__init__(message)
        self.video_id = video_id
        self.status = status  # "failed" | "pending" | "unknown"

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])
