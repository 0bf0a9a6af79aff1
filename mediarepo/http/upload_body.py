"""One upload body on its way in.

A route that takes a streamed body (``http/server.py``'s ``upload_route``)
is asked, as soon as the request's headers are in and before any byte of the
body is read, whether it accepts the body: it authenticates the uploader,
checks the declared length and says where the body goes. Until it answers
the connection is not read (what came with the headers waits here); once it
accepts, every chunk goes to the :class:`UploadSink`, which writes it off the
reactor; when it refuses, the request answers at once and nothing is stored.
:class:`StreamedUpload` owns that state, so that the request does not.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Coroutine
from typing import Any, Protocol

import attrs
from prometheus_client import Counter
from twisted.internet import defer
from twisted.python.failure import Failure

from mediarepo.errors import Codes, MatrixError
from mediarepo.media.upload_sink import UploadSink
from mediarepo.values import Requester

logger = logging.getLogger(__name__)

uploads_rejected = Counter(
    "mediarepo_uploads_rejected_total", "Uploads refused before being stored", ["reason"]
)


@attrs.frozen
class AcceptedUpload:
    """An upload body accepted from its request's headers: where it goes,
    and who sends it."""

    sink: UploadSink
    uploader: Requester


class FlowControl(Protocol):
    """The connection's transport, as far as reading the body goes."""

    def pauseProducing(self) -> None: ...
    def resumeProducing(self) -> None: ...


class StreamedUpload:
    """The state of one upload body: being accepted (chunks that arrive
    meanwhile are held), accepted (chunks go to the sink), refused, taken by
    the handler once the body is whole, or abandoned."""

    def __init__(
        self,
        accepting: Coroutine[Any, Any, AcceptedUpload],
        transport: FlowControl,
        abandon: Callable[[UploadSink], object],
        refuse_early: Callable[[MatrixError], None],
    ) -> None:
        self._transport = transport
        self._abandon = abandon
        self._refuse_early = refuse_early
        self._accepted: AcceptedUpload | None = None
        self._error: MatrixError | None = None
        self._held_chunks: list[bytes] = []
        self._body_complete = False
        # The client went away, or the body was refused for its size.
        self._gone = False
        self._settled = False
        self._when_settled: Callable[[], None] | None = None
        deciding: defer.Deferred[AcceptedUpload] = defer.ensureDeferred(accepting)
        if not deciding.called:
            # Read no body until the upload is accepted.
            transport.pauseProducing()
        deciding.addCallbacks(self._accept, self._refuse)

    def _accept(self, upload: AcceptedUpload) -> None:
        self._settled = True
        if self._gone:
            self._abandon(upload.sink)
            return
        self._accepted = upload
        upload.sink.set_flow_control(self._transport.pauseProducing, self._resume)
        for chunk in self._held_chunks:
            upload.sink.write(chunk)
        self._held_chunks = []
        self._resume()
        self._run_when_settled()

    def _refuse(self, failure: Failure) -> None:
        self._settled = True
        self._held_chunks = []
        error = failure.value
        if not isinstance(error, MatrixError):
            logger.error("accepting an upload failed", exc_info=failure.getTracebackObject())
            error = MatrixError(500, Codes.UNKNOWN, "Internal server error")
        if self._gone:
            return
        self._error = error
        if self._body_complete:
            # The body is in already (it was empty): the request is answered
            # the usual way, its handler raising this error from take().
            self._run_when_settled()
        else:
            uploads_rejected.labels(error.errcode).inc()
            self._refuse_early(error)

    def _resume(self) -> None:
        # Once the whole body is in, the channel pauses the transport itself
        # until the response is done; resuming it then would break that.
        if not self._body_complete and not self._gone:
            self._transport.resumeProducing()

    def _run_when_settled(self) -> None:
        then, self._when_settled = self._when_settled, None
        if then is not None:
            then()

    def write(self, data: bytes) -> None:
        """A chunk of the body, on the reactor thread."""
        if self._accepted is not None:
            self._accepted.sink.write(data)
        elif not self._settled:
            # What arrived with the headers, before the transport paused.
            self._held_chunks.append(data)

    def body_complete(self, then: Callable[[], None]) -> None:
        """The whole body is in: ``then`` (processing the request) runs once
        the upload is accepted or refused, at once if it is already."""
        self._body_complete = True
        if self._settled:
            then()
        else:
            self._when_settled = then

    def take(self) -> AcceptedUpload:
        """Hand the received body over to the handler, who must complete or
        abandon it; raises the error that refused it."""
        if self._error is not None:
            raise self._error
        upload, self._accepted = self._accepted, None
        if upload is None:
            raise MatrixError(400, Codes.UNKNOWN, "Request has no upload body")
        return upload

    def abandon(self) -> None:
        """Nobody takes the body (the client went away, or it was refused
        for its size): roll back what was stored of it."""
        self._gone = True
        self._held_chunks = []
        upload, self._accepted = self._accepted, None
        if upload is not None:
            self._abandon(upload.sink)
