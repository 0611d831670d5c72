"""One exception root for the project (see CONVENTIONS.md, item 6)."""

from __future__ import annotations


class NcfStreamError(Exception):
    """Root of every error this project raises on purpose."""


class BadInput(NcfStreamError, ValueError):
    """Input a user can fix: a malformed file line, an invalid option, a bad request."""


class ConfigError(BadInput):
    """A setting that cannot work (a port out of range, an unknown format)."""


class GroupError(NcfStreamError):
    """A group of trainers cannot go on: a trainer is gone, timed out, or out of step
    (ncf_stream.group); the whole group must start again."""
