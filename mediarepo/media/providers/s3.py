"""An S3-compatible object store, configured like the Synapse S3 storage
provider module (``s3_storage_provider.S3StorageProviderBackend``).

Objects are kept under ``prefix`` + the media store's relative path, so the
bucket mirrors the local layout. Every boto3 call runs on this provider's own
thread pool; uploads go through boto3's transfer manager (multipart above its
threshold, read from the local file part by part), downloads are streamed a
chunk at a time with back-pressure.

With ``download_redirect`` set, a client that allows it is sent to the
object itself: a presigned GET (``presigned``) or the object's key under a
public base URL (a CDN in front of the bucket). Either way the response
headers we would have sent travel in the URL (``response-content-type``,
``response-content-disposition``), so the client sees the same ones.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import IO, Any, TypeVar
from urllib.parse import quote, urlencode

import boto3
import botocore.config
from boto3.s3.transfer import TransferConfig
from botocore.exceptions import ClientError
from twisted.internet.interfaces import IConsumer, IReactorFromThreads
from twisted.internet.threads import deferToThreadPool
from twisted.python.threadpool import ThreadPool

from mediarepo.config_storage import PRESIGNED_REDIRECT, S3ProviderConfig
from mediarepo.media.providers import StorageProvider
from mediarepo.media.responder import Responder, ThreadedProducer

logger = logging.getLogger(__name__)

T = TypeVar("T")

_NOT_FOUND_CODES = frozenset({"404", "NoSuchKey", "NotFound"})
# Objects listed and deleted per request (S3's maximum).
_DELETE_BATCH = 1000


def _is_not_found(error: ClientError) -> bool:
    code = str(error.response.get("Error", {}).get("Code", ""))
    return code in _NOT_FOUND_CODES


# Attempts of one request, the first included (botocore's standard retries,
# with backoff): a store that refuses connections costs up to 3 s before the
# provider task queue takes over.
MAX_ATTEMPTS = 3


class S3Provider(StorageProvider):
    def __init__(self, settings: S3ProviderConfig, reactor: IReactorFromThreads) -> None:
        self.settings = settings
        self.name = f"s3:{settings.bucket}/{settings.prefix}"
        self._reactor = reactor
        self._threadpool = ThreadPool(
            minthreads=1, maxthreads=settings.threadpool_size, name=f"s3-{settings.bucket}"
        )
        # Clients are thread-safe; sessions are not, so one client is made here.
        self._client: Any = boto3.session.Session().client(
            "s3",
            region_name=settings.region_name,
            endpoint_url=settings.endpoint_url,
            aws_access_key_id=settings.access_key_id,
            aws_secret_access_key=settings.secret_access_key,
            aws_session_token=settings.session_token,
            config=botocore.config.Config(
                max_pool_connections=settings.threadpool_size,
                connect_timeout=10,
                read_timeout=60,
                retries={"max_attempts": MAX_ATTEMPTS, "mode": "standard"},
                # Presigned URLs too: SigV4 is what every store accepts.
                signature_version="s3v4",
            ),
        )
        # use_threads=False: the transfer runs in the calling thread (ours).
        self._transfer = TransferConfig(
            multipart_threshold=settings.multipart_threshold,
            multipart_chunksize=settings.multipart_chunksize,
            use_threads=False,
        )
        self.redirects = settings.download_redirect is not None

    def start(self) -> None:
        self._threadpool.start()

    def stop(self) -> None:
        self._threadpool.stop()

    def key(self, relative_path: str) -> str:
        return self.settings.prefix + relative_path

    def _encryption_args(self) -> dict[str, str]:
        if self.settings.sse_customer_key is None:
            return {}
        return {
            "SSECustomerKey": self.settings.sse_customer_key,
            "SSECustomerAlgorithm": self.settings.sse_customer_algo,
        }

    def _store_args(self) -> dict[str, str]:
        """What every stored object is written with."""
        extra = {"StorageClass": self.settings.storage_class, **self._encryption_args()}
        if self.settings.server_side_encryption is not None:
            extra["ServerSideEncryption"] = self.settings.server_side_encryption
            if self.settings.sse_kms_key_id is not None:
                extra["SSEKMSKeyId"] = self.settings.sse_kms_key_id
        return extra

    async def in_pool(self, func: Callable[..., T], *args: object) -> T:
        """Run a blocking boto3 call on this provider's thread pool."""
        return await deferToThreadPool(self._reactor, self._threadpool, func, *args)

    async def fetch(self, relative_path: str) -> Responder | None:
        key = self.key(relative_path)

        def get() -> tuple[Any, int] | None:
            try:
                answer = self._client.get_object(
                    Bucket=self.settings.bucket, Key=key, **self._encryption_args()
                )
            except ClientError as e:
                if _is_not_found(e):
                    return None
                raise
            return answer["Body"], int(answer["ContentLength"])

        found = await self.in_pool(get)
        if found is None:
            return None
        return S3Responder(self, key, found[0], found[1])

    def get_range(self, key: str, start: int, length: int) -> Any:
        """The body of bytes ``start`` to ``start + length`` of ``key`` (blocking)."""
        answer = self._client.get_object(
            Bucket=self.settings.bucket,
            Key=key,
            Range=f"bytes={start}-{start + length - 1}",
            **self._encryption_args(),
        )
        return answer["Body"]

    async def exists(self, relative_path: str, size: int | None = None) -> bool:
        def head() -> bool:
            try:
                answer = self._client.head_object(
                    Bucket=self.settings.bucket,
                    Key=self.key(relative_path),
                    **self._encryption_args(),
                )
            except ClientError as e:
                if _is_not_found(e):
                    return False
                raise
            return size is None or int(answer["ContentLength"]) == size

        return await self.in_pool(head)

    async def store(self, relative_path: str, local_path: str) -> None:
        extra = self._store_args()

        def upload() -> None:
            self._client.upload_file(
                local_path,
                self.settings.bucket,
                self.key(relative_path),
                ExtraArgs=extra,
                Config=self._transfer,
            )

        await self.in_pool(upload)

    async def redirect_url(
        self, relative_path: str, content_type: str, content_disposition: str
    ) -> str | None:
        target = self.settings.download_redirect
        if target is None:
            return None
        key = self.key(relative_path)
        if target == PRESIGNED_REDIRECT:
            params = {
                "Bucket": self.settings.bucket,
                "Key": key,
                "ResponseContentType": content_type,
                "ResponseContentDisposition": content_disposition,
            }
            # Signing is computation, but finding the credentials may be I/O
            # (an instance profile, a refresh).
            url: str = await self.in_pool(
                lambda: self._client.generate_presigned_url(
                    "get_object",
                    Params=params,
                    ExpiresIn=self.settings.presigned_url_expiry_seconds,
                )
            )
            return url
        # The CDN passes the query on to the bucket (in a request it signs):
        # S3 honours these only in signed requests.
        query = urlencode(
            {
                "response-content-type": content_type,
                "response-content-disposition": content_disposition,
            },
            quote_via=quote,
        )
        return f"{target.rstrip('/')}/{quote(key)}?{query}"

    async def delete(self, relative_path: str) -> None:
        await self.in_pool(
            lambda: self._client.delete_object(
                Bucket=self.settings.bucket, Key=self.key(relative_path)
            )
        )

    async def delete_directory(self, relative_path: str) -> None:
        prefix = self.key(relative_path.rstrip("/") + "/")

        def delete_all() -> None:
            pages = self._client.get_paginator("list_objects_v2").paginate(
                Bucket=self.settings.bucket,
                Prefix=prefix,
                PaginationConfig={"PageSize": _DELETE_BATCH},
            )
            for page in pages:
                keys = [{"Key": item["Key"]} for item in page.get("Contents", [])]
                if keys:
                    answer = self._client.delete_objects(
                        Bucket=self.settings.bucket, Delete={"Objects": keys, "Quiet": True}
                    )
                    errors = answer.get("Errors") or []
                    if errors:
                        first = errors[0]
                        raise OSError(
                            f"{len(errors)} objects under {prefix} not deleted, such as"
                            f" {first.get('Key')}: {first.get('Code')} {first.get('Message')}"
                        )

        await self.in_pool(delete_all)

    def stream(
        self,
        read: Callable[[int], bytes],
        length: int,
        consumer: IConsumer,
        copy_to: IO[bytes] | None,
    ) -> ThreadedProducer:
        return ThreadedProducer(read, length, consumer, self._threadpool, self._reactor, copy_to)


class S3Responder(Responder):
    """An object being read; the first read continues the GET that found it."""

    def __init__(self, provider: S3Provider, key: str, body: Any, size: int) -> None:
        self._provider = provider
        self._key = key
        self._body: Any = body
        self.size = size

    async def write_to_consumer(
        self, consumer: IConsumer, start: int, length: int, copy_to: IO[bytes] | None = None
    ) -> None:
        if start != 0 or self._body is None:
            # A range elsewhere (or a second read) needs a GET of its own.
            self.close()
            self._body = await self._provider.in_pool(
                self._provider.get_range, self._key, start, length
            )
        try:
            await self._provider.stream(self._body.read, length, consumer, copy_to).run()
        finally:
            self.close()

    def close(self) -> None:
        body, self._body = self._body, None
        if body is not None:
            body.close()
