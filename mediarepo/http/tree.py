"""The resource tree of a listener, mirroring Synapse's media layout:

* ``/_matrix/media/{r0,v3,v1}/...``: the legacy (unauthenticated download) API;
* ``/_matrix/client/v1/media/...``: the authenticated API of Matrix 1.11;
* ``/_matrix/federation/v1/media/...`` and ``/_matrix/key/v2/...``: federation;
* ``/_synapse/admin/v1/...``: Synapse's media admin API;
* ``/_synapse/metrics``: Prometheus, when the listener has ``metrics``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import attrs
from prometheus_client.twisted import MetricsResource
from twisted.web.resource import IResource, Resource

from mediarepo.config_listeners import ListenerConfig
from mediarepo.http.admin import AdminHandler, admin_routes
from mediarepo.http.auth import Authenticator, FederationAuthenticator
from mediarepo.http.download import DownloadHandler
from mediarepo.http.federation_api import FederationMediaHandler, KeyServerHandler
from mediarepo.http.media_config import MediaConfigHandler
from mediarepo.http.preview import PreviewHandler
from mediarepo.http.server import PATH_SEGMENT, Directory, Route, Router, route, upload_route
from mediarepo.http.thumbnail import ThumbnailHandler
from mediarepo.http.upload import UploadHandler
from mediarepo.media.ratelimit import OriginLimiter
from mediarepo.media.repository import MediaRepository
from mediarepo.media.uploads import LocalUploads
from mediarepo.media.url_previewer import UrlPreviewer

_MEDIA_KEY = rf"(?P<server_name>{PATH_SEGMENT})/(?P<media_id>{PATH_SEGMENT})"
_DOWNLOAD = rf"download/{_MEDIA_KEY}(?:/(?P<file_name>{PATH_SEGMENT}))?"

_THUMBNAIL = rf"thumbnail/{_MEDIA_KEY}"


@attrs.frozen
class Handlers:
    upload: UploadHandler
    download: DownloadHandler
    config: MediaConfigHandler
    thumbnail: ThumbnailHandler
    federation: FederationMediaHandler
    keys: KeyServerHandler
    admin: AdminHandler
    preview: PreviewHandler

    @classmethod
    def create(
        cls,
        repository: MediaRepository,
        uploads: LocalUploads,
        auth: Authenticator,
        federation_auth: FederationAuthenticator,
        keys_response: Callable[[], dict[str, Any]],
        admin: AdminHandler,
        previewer: UrlPreviewer | None = None,
    ) -> Handlers:
        return cls(
            upload=UploadHandler(uploads, auth),
            download=DownloadHandler(repository, auth),
            config=MediaConfigHandler(repository.config.max_upload_size, auth),
            thumbnail=ThumbnailHandler(repository, auth),
            federation=FederationMediaHandler(
                repository,
                federation_auth,
                OriginLimiter(repository.config.federation.inbound_rate, repository.clock),
            ),
            keys=KeyServerHandler(keys_response),
            admin=admin,
            preview=PreviewHandler(previewer, auth),
        )


def legacy_media_routes(handlers: Handlers, version: str) -> list[Route]:
    """The routes under ``/_matrix/media/{version}``; ``create`` exists
    only in v1 and the upload into a reservation only in v3."""
    routes = [
        upload_route(
            "upload", ["POST"], r"upload/?", handlers.upload.accept_new, handlers.upload.on_post
        ),
        route("download", ["GET"], _DOWNLOAD, handlers.download.on_legacy_get),
        route("thumbnail", ["GET"], _THUMBNAIL, handlers.thumbnail.on_legacy_get),
        route("config", ["GET"], r"config", handlers.config.on_get),
        route("preview_url", ["GET"], r"preview_url", handlers.preview.on_get),
    ]
    if version == "v1":
        routes.append(route("create", ["POST"], r"create", handlers.upload.on_create))
    if version == "v3":
        routes.append(
            upload_route(
                "upload_reserved",
                ["PUT"],
                rf"upload/{_MEDIA_KEY}/?",
                handlers.upload.accept_reserved,
                handlers.upload.on_put,
            )
        )
    return routes


def authenticated_media_routes(handlers: Handlers) -> list[Route]:
    return [
        route("client_download", ["GET"], _DOWNLOAD, handlers.download.on_authenticated_get),
        route("client_thumbnail", ["GET"], _THUMBNAIL, handlers.thumbnail.on_authenticated_get),
        route("client_config", ["GET"], r"config", handlers.config.on_get),
        route("client_preview_url", ["GET"], r"preview_url", handlers.preview.on_get),
    ]


_Child = TypeVar("_Child", bound=IResource)


def federation_media_routes(handlers: Handlers) -> list[Route]:
    return [
        route(
            "federation_download",
            ["GET"],
            rf"download/(?P<media_id>{PATH_SEGMENT})",
            handlers.federation.on_download,
        ),
        route(
            "federation_thumbnail",
            ["GET"],
            rf"thumbnail/(?P<media_id>{PATH_SEGMENT})",
            handlers.federation.on_thumbnail,
        ),
    ]


def key_routes(handlers: Handlers) -> list[Route]:
    # The /{keyId} form is deprecated; like Synapse, it answers with every key.
    return [route("keys", ["GET"], rf"server(?:/{PATH_SEGMENT})?/?", handlers.keys.on_get)]


def _child(parent: Resource, name: str, child: _Child) -> _Child:
    parent.putChild(name.encode(), child)
    return child


def build_tree(listener: ListenerConfig, handlers: Handlers, enable_metrics: bool) -> IResource:
    root = Directory()
    matrix = _child(root, "_matrix", Directory())
    if listener.serves_media:
        media = _child(matrix, "media", Directory())
        for version in ("r0", "v3", "v1"):
            _child(media, version, Router(legacy_media_routes(handlers, version)))
        client_v1 = _child(_child(matrix, "client", Directory()), "v1", Directory())
        _child(client_v1, "media", Router(authenticated_media_routes(handlers)))
        federation_v1 = _child(_child(matrix, "federation", Directory()), "v1", Directory())
        _child(federation_v1, "media", Router(federation_media_routes(handlers)))
    if listener.resource_names & {"federation", "keys"}:
        _child(_child(matrix, "key", Directory()), "v2", Router(key_routes(handlers)))
    serves_metrics = "metrics" in listener.resource_names and enable_metrics
    if serves_metrics and listener.type == "metrics":
        # A dedicated metrics listener answers on any path, as Synapse's does.
        return MetricsResource()
    synapse = Directory()
    if listener.serves_media:
        # Synapse's media workers serve the media admin API beside the media.
        admin = _child(synapse, "admin", Directory())
        _child(admin, "v1", Router(admin_routes(handlers.admin)))
    if serves_metrics:
        _child(synapse, "metrics", MetricsResource())
    if synapse.children:
        root.putChild(b"_synapse", synapse)
    return root
