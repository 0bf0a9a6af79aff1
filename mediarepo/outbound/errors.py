"""What can go wrong when we fetch something from another host."""

from __future__ import annotations


class OutboundRequestError(Exception):
    """No answer: the host could not be resolved or reached, refused the
    connection, failed TLS, or did not answer in time."""


class BlockedAddressError(OutboundRequestError):
    """The host (or a redirect's host) resolves to an address in a blocked
    range: nothing was sent to it."""


class BodyReadError(Exception):
    """An answer's body did not arrive whole: the peer stalled, trickled, or
    the connection broke."""


class BodyTooLargeError(BodyReadError):
    """The body is over the reader's limit (nothing more of it is read)."""


class PeerStalledError(BodyReadError):
    """The peer sent nothing for the idle timeout, or too little over a
    rate window."""
