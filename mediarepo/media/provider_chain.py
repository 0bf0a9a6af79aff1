"""ProviderChain: the chain of storage providers, local store first.

Callers ask for files by their store-relative path and never learn which
provider answered. Writes go to the local store, then to each configured
provider that wants the file (``store_local`` for our media and its
thumbnails, ``store_remote`` for other servers'), at once when the provider
is ``store_synchronous`` and through the queue of provider tasks otherwise.
Reads try the local store, then each provider in order; a file found in a
provider is brought back to the local store as it streams. Deletions reach
every provider through the same queue.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence

import attrs
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime

from mediarepo.errors import Codes, MatrixError, NotFoundError
from mediarepo.media.cache import ExpiringCache
from mediarepo.media.paths import is_local_path, is_remote_path
from mediarepo.media.provider_tasks import ProviderTasks
from mediarepo.media.providers import StorageProvider
from mediarepo.media.providers.local import LocalFiles
from mediarepo.media.responder import Responder
from mediarepo.media.staging import UploadStaging
from mediarepo.media.upload_sink import UploadSink, WrittenUpload
from mediarepo.storage.provider_task_rows import ProviderOperation

logger = logging.getLogger(__name__)

# How long a provider's copy, once seen whole, is taken to be there without
# asking again. Media never changes under its path; deleted or quarantined
# media is refused by its row before a copy is looked for.
HELD_COPY_SECONDS = 600.0


class StorageUnavailableError(MatrixError):
    """A storage provider failed; the request may succeed later."""

    def __init__(self, message: str) -> None:
        super().__init__(503, Codes.UNKNOWN, message)


@attrs.frozen
class StoredFile:
    """Bytes to answer with, known from their row and not yet opened: where
    they are in the provider chain and how long they are. A client may be
    sent to a provider's copy of them (:meth:`ProviderChain.redirect_url`)
    without anything being read here; only serving them opens them."""

    relative_path: str
    length: int
    # Finds the bytes (raising NotFoundError if there are none), for
    # :meth:`open`: a thumbnail whose file is gone is made again first.
    opener: Callable[[], Awaitable[Responder]] = attrs.field(eq=False, repr=False)

    async def open(self) -> Responder:
        return await self.opener()


@attrs.frozen
class ProviderSlot:
    """A provider in the chain, with Synapse's ``media_storage_providers`` flags."""

    provider: StorageProvider
    store_local: bool
    store_remote: bool
    store_synchronous: bool

    def wants(self, relative_path: str) -> bool:
        if is_local_path(relative_path):
            return self.store_local
        if is_remote_path(relative_path):
            return self.store_remote
        return False  # URL previews stay local, as in Synapse


class ProviderChain:
    def __init__(
        self,
        local: LocalFiles,
        slots: Sequence[ProviderSlot],
        tasks: ProviderTasks,
        clock: IReactorTime,
    ) -> None:
        self._local = local
        self._staging = UploadStaging(local)
        # Every write that finds the local disk full reports here.
        self.full = local.full
        self.slots = list(slots)
        self.tasks = tasks
        # (provider name, path) of copies known to be whole.
        self._held: ExpiringCache[tuple[str, str], bool] = ExpiringCache(clock, HELD_COPY_SECONDS)

    @property
    def providers(self) -> list[StorageProvider]:
        return [slot.provider for slot in self.slots]

    # -- uploads staged in the local store ------------------------------------------

    def begin_upload(self, media_id: str) -> UploadSink:
        return self._staging.begin(media_id)

    def end_upload(self, sink: UploadSink) -> None:
        self._staging.end(sink)

    @property
    def uploads_in_progress(self) -> int:
        return self._staging.in_progress

    def when_uploads_idle(self) -> Deferred[None]:
        """Fires once no upload is receiving its body."""
        return self._staging.when_idle()

    async def abort_all_uploads(self) -> None:
        """Roll back every upload still receiving its body (at shutdown);
        returns once their staging files are gone."""
        await self._staging.abort_all()

    def place_upload(
        self,
        upload: WrittenUpload,
        relative_path: str,
        same_as: Sequence[str] = (),
        *,
        replace_orphan: bool = False,
    ) -> bool:
        """Make a staged upload durable at ``relative_path`` in the local
        store (blocking: the storage layer runs it inside the transaction
        recording it); returns whether bytes were shared. See
        :meth:`UploadStaging.place_upload`."""
        _, shared = self._staging.place_upload(
            upload, relative_path, same_as, replace_orphan=replace_orphan
        )
        return shared

    def remove_staged(self, upload: WrittenUpload) -> None:
        """Drop an upload's staging name once its media is recorded (blocking)."""
        self._staging.remove_staged(upload.temp_path)

    async def sweep_staging(
        self, max_age_seconds: float, recorded: Callable[[list[str]], Awaitable[set[str]]]
    ) -> int:
        """Remove what crashed uploads left; see :meth:`UploadStaging.sweep`."""
        return await self._staging.sweep(max_age_seconds, recorded)

    # -- writing ------------------------------------------------------------------

    async def publish(
        self, upload: WrittenUpload, relative_path: str, same_as: Sequence[str] = ()
    ) -> bool:
        """Put a finished upload at ``relative_path`` in the local store
        (sharing the bytes of a file in ``same_as`` if one is still there),
        then hand it to the providers. Returns whether bytes were shared.

        If that fails (a synchronous provider is down), the file is removed
        again and the error raised (:class:`StorageUnavailableError` for a
        provider).
        """
        with self._local.full.converting("publish"):
            local_path, shared = await self._staging.publish(upload, relative_path, same_as)
        try:
            await self.to_providers(relative_path, local_path)
        except BaseException:
            await self._local.delete(relative_path)
            raise
        return shared

    async def store_file(self, relative_path: str, data: bytes) -> None:
        """Store a generated file (a thumbnail) locally, then with the providers."""
        with self._local.full.converting("thumbnail"):
            local_path = await self._local.write_file(relative_path, data)
        await self.to_providers(relative_path, local_path)

    def local_file(self, relative_path: str) -> str:
        """Where ``relative_path`` is (or goes) in the local store."""
        return self._local.paths.absolute(relative_path)

    def providers_want(self, relative_path: str) -> bool:
        """Whether any provider keeps a copy of ``relative_path``."""
        return any(slot.wants(relative_path) for slot in self.slots)

    async def to_providers(self, relative_path: str, local_path: str) -> None:
        """Give a file now in the local store to the providers that keep it:
        synchronous ones store it now (raising :class:`StorageUnavailableError`
        if one fails, after undoing the others), asynchronous ones get a task."""
        wanting = [slot for slot in self.slots if slot.wants(relative_path)]
        stored: list[StorageProvider] = []
        for slot in wanting:
            if not slot.store_synchronous:
                continue
            try:
                await slot.provider.store(relative_path, local_path)
            except Exception as e:
                logger.warning("storing %s at %s failed: %s", relative_path, slot.provider.name, e)
                # Undone where it was done; the failed provider has nothing.
                for provider in stored:
                    await self._queue(provider, relative_path, ProviderOperation.DELETE)
                raise StorageUnavailableError(
                    "The media could not be stored; try again later"
                ) from e
            stored.append(slot.provider)
            await self.tasks.stored(slot.provider, relative_path)
        for slot in wanting:
            if not slot.store_synchronous:
                await self._queue(slot.provider, relative_path, ProviderOperation.STORE)

    async def _queue(
        self, provider: StorageProvider, relative_path: str, operation: ProviderOperation
    ) -> None:
        await self.tasks.queue(provider, relative_path, operation)

    # -- reading ------------------------------------------------------------------

    async def fetch(self, relative_path: str) -> Responder | None:
        """The first copy of ``relative_path`` in the chain, or ``None``.

        A provider's copy comes back to the local store as it is served.
        Raises :class:`StorageUnavailableError` if the file was found nowhere
        and a provider could not be asked.
        """
        responder = await self._local.fetch(relative_path)
        if responder is not None:
            return responder
        failed = False
        for provider in self.providers:
            try:
                responder = await provider.fetch(relative_path)
            except Exception as e:
                logger.warning("reading %s from %s failed: %s", relative_path, provider.name, e)
                failed = True
                continue
            if responder is not None:
                return self._local.bringing_back(responder, relative_path)
        if failed:
            raise StorageUnavailableError("Media storage is unavailable; try again later")
        return None

    def stored_file(self, relative_path: str, length: int) -> StoredFile:
        """``relative_path``, of ``length`` bytes by its row, to be opened
        only when its bytes are served."""

        async def open_file() -> Responder:
            responder = await self.fetch(relative_path)
            if responder is None:
                logger.warning("%s has a row but no file in any provider", relative_path)
                raise NotFoundError()
            return responder

        return StoredFile(relative_path, length, open_file)

    async def redirect_url(
        self, file: StoredFile, content_type: str, content_disposition: str
    ) -> str | None:
        """Where a client may fetch ``file``, with these response headers: a
        URL of the first provider with redirects on that holds the whole file
        (not one still owed its copy). ``None``: serve the bytes here. Nothing
        is read to decide: the file's length comes from its row, and whether
        a provider holds it is asked once (a HEAD) and remembered."""
        path = file.relative_path
        for slot in self.slots:
            provider = slot.provider
            if not provider.redirects or not slot.wants(path):
                continue
            try:
                if await self._holds(provider, path, file.length):
                    return await provider.redirect_url(path, content_type, content_disposition)
            except Exception as e:
                # The bytes are here: a provider that cannot answer costs no download.
                logger.warning("no redirect to %s for %s: %s", provider.name, path, e)
        return None

    async def _holds(self, provider: StorageProvider, relative_path: str, size: int) -> bool:
        key = (provider.name, relative_path)
        if self._held.get(key):
            return True
        # A copy still queued may be missing or (a reservation's content
        # written again after a crash) not yet this file.
        if await self.tasks.copy_queued(provider, relative_path):
            return False
        if not await provider.exists(relative_path, size):
            return False
        self._held.put(key, True)
        return True

    async def local_copy(self, relative_path: str) -> str | None:
        """A path on local disk holding ``relative_path``, for work that needs
        a real file (Pillow), brought back from a provider if need be;
        ``None`` if no provider has it."""
        path = await self._local.local_path(relative_path)
        if path is not None:
            return path
        responder = await self.fetch(relative_path)
        if responder is None:
            return None
        return await self._local.bring_back(responder, relative_path)

    async def exists(self, relative_path: str) -> bool:
        """Whether any provider has ``relative_path``."""
        if await self._local.exists(relative_path):
            return True
        for provider in self.providers:
            try:
                if await provider.exists(relative_path):
                    return True
            except Exception as e:
                raise StorageUnavailableError(
                    "Media storage is unavailable; try again later"
                ) from e
        return False

    # -- deleting ------------------------------------------------------------------

    async def delete(self, relative_path: str) -> None:
        await self.delete_many([relative_path], [])

    async def delete_local(
        self, relative_paths: Sequence[str], directories: Sequence[str] = ()
    ) -> None:
        """Delete files and directories from the local store only, in one
        job of its pool (URL previews and their thumbnails, which only it
        keeps; a host's copy of media deleted through another host)."""
        await self._local.delete_many(relative_paths, directories)

    async def delete_directory(self, relative_path: str) -> None:
        await self.delete_many([], [relative_path])

    async def delete_many(self, files: Sequence[str], directories: Sequence[str]) -> None:
        """Delete ``files`` and ``directories`` locally now, and in every
        provider through the task queue (at once in the background, retried
        until it is done: a provider that is down never holds up a purge)."""
        await self._local.delete_many(files, directories)
        if not (files or directories):
            return
        for provider in self.providers:
            for relative_path in files:
                self._held.forget((provider.name, relative_path))
            await self.tasks.queue_deletions(provider, files, directories)
