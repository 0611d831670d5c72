"""The admin API's gate and its one action: deleting a user or an item.

Both servers call :class:`Admin`; it knows nothing of HTTP or gRPC. It is on only
when the ``admin_token`` setting holds a secret, and a request must carry it as
``Authorization: Bearer <token>`` (gRPC: the ``authorization`` metadata key).
The token is compared in constant time (:func:`hmac.compare_digest`), so the
time an answer takes says nothing of how much of a guess was right.

A deletion is never applied on the request's thread: the engine's state has one
writer, the loop. :meth:`Admin.delete` enqueues it (``Engine.request_delete``) and
answers at once (202); the loop applies it before its next batch, and the next
snapshot, within one publish interval, no longer holds the entity. It reaches the
next checkpoint, but not Kafka: a delete event on the topic is the durable,
replicated way (docs/operations.md, "Forgetting").
"""

from __future__ import annotations

import hmac
from collections.abc import Callable
from dataclasses import dataclass

from ncf_stream.errors import NcfStreamError

DELETABLE = ("user", "item")  # what an admin request may delete
OFF = "the admin API is off: no admin_token is configured"


class AdminError(NcfStreamError):
    """A refused admin request; ``status`` is its HTTP status."""

    status = 400
    kind = "admin_error"


class AdminOff(AdminError):
    """No admin token is configured: the endpoints do not exist."""

    status, kind = 404, "not_found"


class NotAuthenticated(AdminError):
    """No ``Authorization: Bearer`` credential."""

    status, kind = 401, "unauthenticated"


class Forbidden(AdminError):
    """A credential, but not the token."""

    status, kind = 403, "forbidden"


@dataclass(frozen=True)
class DeleteAccepted:
    """What a deletion request will do."""

    kind: str  # "user" or "item"
    id: str
    known: bool  # whether the served snapshot knows the id (an unknown one is a no-op)
    detail: str


class Admin:
    def __init__(self, token: str | None, request: Callable[[str, str], None],
                 knows: Callable[[str, str], bool], off_reason: str = OFF) -> None:
        """``request(kind, id)`` enqueues a deletion; ``knows(kind, id)``: whether the
        served snapshot knows the id; ``off_reason``: what a request hears without a token."""
        self._token = None if token is None else token.encode("utf-8")
        self._request, self._knows = request, knows
        self._off_reason = off_reason

    @classmethod
    def off(cls, reason: str = OFF) -> Admin:
        """The gate of a server without an admin token (or of a replica, which applies
        no deletions: ``reason`` says so): every request is AdminOff."""
        return cls(None, lambda kind, external_id: None, lambda kind, external_id: False,
                   reason)

    @property
    def enabled(self) -> bool:
        return self._token is not None

    def authorize(self, authorization: str | None) -> None:
        """Raise unless ``authorization`` (the header's value) carries the token."""
        if self._token is None:
            raise AdminOff(self._off_reason)
        scheme, _, credential = (authorization or "").strip().partition(" ")
        if scheme.lower() != "bearer" or not credential.strip():
            raise NotAuthenticated("send 'Authorization: Bearer <admin token>'")
        given = credential.strip().encode("utf-8", "surrogatepass")
        if not hmac.compare_digest(given, self._token):
            raise Forbidden("the bearer token is not the admin token")

    def delete(self, kind: str, external_id: str) -> DeleteAccepted:
        """Enqueue the deletion (after :meth:`authorize`); what it will do."""
        if kind not in DELETABLE:
            raise ValueError(f"kind must be one of {DELETABLE}, not {kind!r}")
        known = self._knows(kind, external_id)
        self._request(kind, external_id)
        detail = (f"the {kind} and everything derived from it leave the next snapshot "
                  "(within one publish interval) and the next checkpoint"
                  if known else f"no such {kind} in the served snapshot: applied anyway, "
                  "in case it arrived since; an unknown id is a no-op")
        return DeleteAccepted(kind, external_id, known, detail)
