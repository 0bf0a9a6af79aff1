"""MediaStorage: the chain of storage providers, local store first.

Callers ask for files by their store-relative path and never learn which
provider answered. Object stores join the chain after the local store
without any caller changing.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from mediarepo.media.providers import StorageProvider
from mediarepo.media.providers.local import LocalMediaStore
from mediarepo.media.responder import Responder
from mediarepo.media.upload_sink import UploadSink, WrittenUpload

logger = logging.getLogger(__name__)


class MediaStorage:
    def __init__(self, local: LocalMediaStore, providers: list[StorageProvider]) -> None:
        self.local = local
        self.providers = providers
        self._uploads_in_progress: set[UploadSink] = set()

    @property
    def chain(self) -> list[StorageProvider]:
        return [self.local, *self.providers]

    def begin_upload(self, media_id: str) -> UploadSink:
        sink = self.local.new_upload(media_id)
        self._uploads_in_progress.add(sink)
        return sink

    def end_upload(self, sink: UploadSink) -> None:
        self._uploads_in_progress.discard(sink)

    def staging_paths_in_use(self) -> set[str]:
        return {sink.temp_path for sink in self._uploads_in_progress}

    @property
    def uploads_in_progress(self) -> int:
        return len(self._uploads_in_progress)

    def abort_all_uploads(self) -> None:
        """Roll back every upload still receiving its body (at shutdown)."""
        for sink in list(self._uploads_in_progress):
            sink.abort()
            self.end_upload(sink)

    async def publish(
        self, upload: WrittenUpload, relative_path: str, same_as: Sequence[str] = ()
    ) -> bool:
        """Put a finished upload at ``relative_path`` in the local store
        (sharing the bytes of a file in ``same_as`` if one is still there),
        then copy it to the other providers. Returns whether bytes were shared."""
        local_path, shared = await self.local.publish(upload, relative_path, same_as)
        for provider in self.providers:
            await provider.store(relative_path, local_path)
        return shared

    async def store_file(self, relative_path: str, data: bytes) -> None:
        """Store a generated file (a thumbnail) locally, then with the other providers."""
        local_path = await self.local.write_file(relative_path, data)
        for provider in self.providers:
            await provider.store(relative_path, local_path)

    async def local_copy(self, relative_path: str) -> str | None:
        """A path on local disk holding ``relative_path``, for work that needs
        a real file (Pillow); ``None`` if the local store lacks it."""
        return await self.local.local_path(relative_path)

    async def exists(self, relative_path: str) -> bool:
        """Whether any provider has ``relative_path``."""
        for provider in self.chain:
            responder = await provider.fetch(relative_path)
            if responder is not None:
                responder.close()
                return True
        return False

    async def fetch(self, relative_path: str) -> Responder | None:
        """The first provider's copy of ``relative_path``, or ``None``."""
        for provider in self.chain:
            responder = await provider.fetch(relative_path)
            if responder is not None:
                return responder
        return None

    async def delete(self, relative_path: str) -> None:
        for provider in self.chain:
            await provider.delete(relative_path)

    async def delete_directory(self, relative_path: str) -> None:
        for provider in self.chain:
            await provider.delete_directory(relative_path)
