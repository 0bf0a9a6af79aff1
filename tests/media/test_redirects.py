"""Downloads redirected to the object store (MSC3860 ``allow_redirect``), and
the S3 provider's options seen on the stored objects, against a real
S3-compatible server (moto) over loopback."""

from __future__ import annotations

import os
import shutil
from typing import Any
from urllib.parse import parse_qs, quote, urlsplit

import treq
from twisted.trial import unittest

from mediarepo.config import parse_config
from mediarepo.errors import ConfigError
from mediarepo.media import provider_tasks
from mediarepo.media.paths import local_media_path, local_thumbnail_dir
from tests import images
from tests.integration.test_federation import FederationTestCase
from tests.media.test_storage_providers import DOWNLOAD, THUMBNAIL, S3TestCase
from tests.s3 import BUCKET, MotoServer
from tests.utils import SERVER_NAME, Response

ADMIN = "/_synapse/admin/v1"
# Headers a redirected client must see as our own answer gives them.
SAME_HEADERS = ("content-type", "content-disposition")


async def fetch(url: str, headers: dict[str, str] | None = None, **kwargs: Any) -> Response:
    """A GET as a client makes it, redirects not followed."""
    all_headers: dict[str | bytes, list[str | bytes]] = {k: [v] for k, v in (headers or {}).items()}
    response = await treq.get(url, headers=all_headers, allow_redirects=False, **kwargs)
    body = await response.content()
    raw = {
        k.decode().lower(): [v.decode("latin-1") for v in vs]
        for k, vs in response.headers.getAllRawHeaders()
    }
    return Response(response.code, raw, body)


class RedirectTestCase(S3TestCase):
    async def get(self, path: str, headers: dict[str, str] | None = None) -> Response:
        all_headers = {"Authorization": f"Bearer {self.token}", **(headers or {})}
        return await fetch(self.base_url + path, all_headers, pool=self.pool)

    async def assert_redirect_serves_as_direct(self, path: str) -> str:
        """``path`` with ``allow_redirect=true`` is a 307 whose Location gives
        what ``path`` itself gives; returns the Location."""
        direct = await self.get(path)
        self.assertEqual(direct.code, 200, direct.body)
        joiner = "&" if "?" in path else "?"
        redirected = await self.get(path + joiner + "allow_redirect=true")
        self.assertEqual(redirected.code, 307, redirected.body)
        self.assertEqual(redirected.body, b"")
        self.assertIn("no-store", redirected.header("Cache-Control") or "")
        location = redirected.header("Location")
        assert location is not None
        followed = await fetch(location)
        self.assertEqual(followed.code, 200, followed.body)
        self.assertEqual(followed.body, direct.body)
        for name in SAME_HEADERS:
            self.assertEqual(followed.header(name), direct.header(name), name)
        return location


class PresignedRedirectTests(RedirectTestCase):
    provider_options = {"download_redirect": "presigned", "presigned_url_expiry": "10m"}

    async def test_download_redirected_to_a_presigned_url(self) -> None:
        data = os.urandom(200_000)
        media_id = await self.upload(self.token, data, "text/plain", "r\u00e9sum\u00e9 notes.txt")
        location = await self.assert_redirect_serves_as_direct(f"{DOWNLOAD}/{media_id}")
        url = urlsplit(location)
        self.assertEqual(f"{url.scheme}://{url.netloc}", self.moto.endpoint_url)
        self.assertEqual(url.path, f"/{BUCKET}/{local_media_path(media_id)}")
        query = parse_qs(url.query)
        self.assertEqual(query["X-Amz-Expires"], ["600"])
        # Range requests work through the redirect.
        ranged = await fetch(location, {"Range": "bytes=1000-1999"})
        self.assertEqual((ranged.code, ranged.body), (206, data[1000:2000]))
        # A file name in the path is the one the redirected client sees.
        named = await self.get(f"{DOWNLOAD}/{media_id}/other.txt?allow_redirect=true")
        named_location = named.header("Location")
        assert named_location is not None
        followed = await fetch(named_location)
        self.assertEqual(followed.header("Content-Disposition"), "inline; filename=other.txt")

    async def test_without_allow_redirect_or_on_legacy_endpoints_the_bytes_come(self) -> None:
        data = b"served by us"
        media_id = await self.upload(self.token, data)
        for path in (
            f"{DOWNLOAD}/{media_id}",
            f"{DOWNLOAD}/{media_id}?allow_redirect=false",
        ):
            r = await self.get(path)
            self.assertEqual((r.code, r.body), (200, data), path)

    async def test_thumbnail_redirected(self) -> None:
        media_id = await self.upload(self.token, images.jpeg(640, 480), "image/jpeg")
        location = await self.assert_redirect_serves_as_direct(
            f"{THUMBNAIL}/{media_id}?width=96&height=96&method=scale"
        )
        self.assertIn("/local_thumbnails/", location)

    async def test_redirect_decided_without_reading_the_object(self) -> None:
        """Media held only by the store (as on an instance that never had
        it): the redirect is decided from the row and the config, and only
        the client reads the object."""
        data = os.urandom(100_000)
        media_id = await self.upload(self.token, data)
        key = local_media_path(media_id)
        os.unlink(self.local_file(key))
        self.moto.record_requests()
        r = await self.get(f"{DOWNLOAD}/{media_id}?allow_redirect=true")
        self.assertEqual(r.code, 307)
        self.assertEqual(self.moto.object_reads(key), 0)
        # At most one look at the object (a HEAD, remembered) and no other request.
        self.assertLessEqual({r.method for r in self.moto.recorded_requests()}, {"HEAD"})
        # Served here instead, the bytes are read from the store: the count sees reads.
        r = await self.get(f"{DOWNLOAD}/{media_id}")
        self.assertEqual((r.code, r.body), (200, data))
        self.assertEqual(self.moto.object_reads(key), 1)

    async def test_thumbnail_redirect_decided_without_reading_the_object(self) -> None:
        media_id = await self.upload(self.token, images.jpeg(640, 480), "image/jpeg")
        await self.server.repository.thumbnails.settle()
        shutil.rmtree(self.local_file(local_thumbnail_dir(media_id)))
        prefix = local_thumbnail_dir(media_id)
        path = f"{THUMBNAIL}/{media_id}?width=96&height=96&method=scale"
        self.moto.record_requests()
        r = await self.get(path + "&allow_redirect=true")
        self.assertEqual(r.code, 307)
        self.assertIn(f"/{prefix}/", r.header("Location") or "")
        self.assertEqual(self.moto.object_reads(prefix), 0)
        r = await self.get(path)
        self.assertEqual(r.code, 200)
        self.assertEqual(self.moto.object_reads(prefix), 1)

    async def test_quarantined_and_pending_media_never_redirected(self) -> None:
        admin = await self.register("root", admin=True)
        media_id = await self.upload(self.token, b"to be quarantined")
        r = await self.get(f"{DOWNLOAD}/{media_id}?allow_redirect=true")
        self.assertEqual(r.code, 307)
        await self.request(
            "POST", f"{ADMIN}/media/quarantine/{SERVER_NAME}/{media_id}", token=admin, body=b"{}"
        )
        r = await self.get(f"{DOWNLOAD}/{media_id}?allow_redirect=true")
        self.assertEqual(r.code, 404)

        created = await self.request("POST", "/_matrix/media/v1/create", token=self.token)
        pending = created.json()["content_uri"].rsplit("/", 1)[1]
        r = await self.get(f"{DOWNLOAD}/{pending}?allow_redirect=true&timeout_ms=100")
        self.assertEqual((r.code, r.json()["errcode"]), (504, "M_NOT_YET_UPLOADED"))

        deleted = await self.upload(self.token, b"to be deleted")
        r = await self.request("DELETE", f"{ADMIN}/media/{SERVER_NAME}/{deleted}", token=admin)
        self.assertEqual(r.code, 200, r.body)
        r = await self.get(f"{DOWNLOAD}/{deleted}?allow_redirect=true")
        self.assertEqual(r.code, 404)

    async def test_a_copy_missing_from_the_store_is_not_redirected_to(self) -> None:
        data = b"only on local disk now"
        media_id = await self.upload(self.token, data)
        self.moto.client().delete_object(Bucket=BUCKET, Key=local_media_path(media_id))
        r = await self.get(f"{DOWNLOAD}/{media_id}?allow_redirect=true")
        self.assertEqual((r.code, r.body), (200, data))


class PresignedRedirectPostgresTests(PresignedRedirectTests):
    engine = "psycopg2"


class LocalOnlyRedirectTests(RedirectTestCase):
    """The provider keeps only other servers' media: ours is not in it."""

    provider_flags = {"store_local": False}
    provider_options = {"download_redirect": "presigned"}

    async def test_local_only_media_served_directly(self) -> None:
        media_id = await self.upload(self.token, b"local only")
        r = await self.get(f"{DOWNLOAD}/{media_id}?allow_redirect=true")
        self.assertEqual((r.code, r.body), (200, b"local only"))


class LocalOnlyRedirectPostgresTests(LocalOnlyRedirectTests):
    engine = "psycopg2"


class AsynchronousCopyRedirectTests(RedirectTestCase):
    """A copy still queued for the provider is not redirected to."""

    start_moto = False
    provider_flags = {"store_synchronous": False}
    provider_options = {"download_redirect": "presigned"}

    async def test_pending_copy_served_directly_then_redirected(self) -> None:
        self.patch(provider_tasks, "RETRY_BASE_SECONDS", 0.0)
        data = os.urandom(50_000)
        media_id = await self.upload(self.token, data)
        tasks = self.server.repository.storage.tasks
        await tasks.wait_idle()
        r = await self.get(f"{DOWNLOAD}/{media_id}?allow_redirect=true")
        self.assertEqual((r.code, r.body), (200, data))
        # An older object under the same key is not taken for the queued copy.
        self.moto.start()
        self.moto.client().put_object(
            Bucket=BUCKET, Key=local_media_path(media_id), Body=b"x" * len(data)
        )
        r = await self.get(f"{DOWNLOAD}/{media_id}?allow_redirect=true")
        self.assertEqual((r.code, r.body), (200, data))
        # Once the copy is made, the client is sent to it.
        await tasks.run_due()
        await tasks.wait_idle()
        await self.assert_redirect_serves_as_direct(f"{DOWNLOAD}/{media_id}")


class AsynchronousCopyRedirectPostgresTests(AsynchronousCopyRedirectTests):
    engine = "psycopg2"


class CdnRedirectTests(RedirectTestCase):
    async def set_up(self) -> None:
        await super().set_up()
        await self.server.stop()
        entry = self.moto.provider_config()
        # The bucket itself stands in for the CDN in front of it.
        self.cdn = f"{self.moto.endpoint_url}/{BUCKET}/"
        entry["config"].update(download_redirect=self.cdn, prefix="media/")
        self.extra_config = {"media_storage_providers": [entry]}
        await self.start_server()

    async def test_download_redirected_under_the_base_url(self) -> None:
        data = os.urandom(30_000)
        media_id = await self.upload(self.token, data, "image/png", "a b.png")
        path = f"{DOWNLOAD}/{media_id}"
        direct = await self.get(path)
        r = await self.get(path + "?allow_redirect=true")
        self.assertEqual(r.code, 307)
        location = r.header("Location")
        assert location is not None
        url = urlsplit(location)
        key = "media/" + local_media_path(media_id)
        self.assertEqual(f"{url.scheme}://{url.netloc}{url.path}", self.cdn + quote(key))
        query = parse_qs(url.query)
        # The CDN asks the bucket with the query it was given, in a request it
        # signs (S3 honours response-* parameters only in signed requests).
        origin_url = self.moto.client().generate_presigned_url(
            "get_object",
            Params={
                "Bucket": BUCKET,
                "Key": key,
                "ResponseContentType": query["response-content-type"][0],
                "ResponseContentDisposition": query["response-content-disposition"][0],
            },
        )
        followed = await fetch(origin_url)
        self.assertEqual((followed.code, followed.body), (200, direct.body))
        for name in SAME_HEADERS:
            self.assertEqual(followed.header(name), direct.header(name), name)
        ranged = await fetch(origin_url, {"Range": "bytes=-100"})
        self.assertEqual((ranged.code, ranged.body), (206, data[-100:]))


class CdnRedirectPostgresTests(CdnRedirectTests):
    engine = "psycopg2"


class S3OptionsTests(S3TestCase):
    provider_options = {
        "storage_class": "STANDARD_IA",
        "prefix": "synapse/media/",
        "server_side_encryption": "AES256",
        "multipart_threshold": "5M",
        "multipart_chunksize": "5M",
    }

    async def test_stored_objects_carry_the_options(self) -> None:
        data = os.urandom(11 * 1024 * 1024)
        media_id = await self.upload(self.token, data)
        key = "synapse/media/" + local_media_path(media_id)
        self.assertEqual(self.moto.keys(), {key})
        head = self.moto.client().head_object(Bucket=BUCKET, Key=key)
        self.assertEqual(head["StorageClass"], "STANDARD_IA")
        self.assertEqual(head["ServerSideEncryption"], "AES256")
        self.assertEqual(head["ContentLength"], len(data))
        # Three parts of at most 5M: a multipart ETag ends with the count.
        self.assertTrue(head["ETag"].strip('"').endswith("-3"), head["ETag"])
        os.unlink(self.local_file(local_media_path(media_id)))
        r = await self.download(media_id)
        self.assertEqual((r.code, r.body), (200, data))


class S3OptionsPostgresTests(S3OptionsTests):
    engine = "psycopg2"


class KmsOptionsTests(S3TestCase):
    KEY_ID = "arn:aws:kms:us-east-1:123456789012:key/media"
    provider_options = {
        "server_side_encryption": "aws:kms",
        "sse_kms_key_id": KEY_ID,
        "multipart_threshold": "5M",
        "multipart_chunksize": "5M",
    }

    async def test_objects_name_the_kms_key_whole_or_in_parts(self) -> None:
        for size in (1000, 6 * 1024 * 1024):
            data = os.urandom(size)
            media_id = await self.upload(self.token, data)
            head = self.moto.client().head_object(Bucket=BUCKET, Key=local_media_path(media_id))
            self.assertEqual(
                (head["ServerSideEncryption"], head["SSEKMSKeyId"], head["ContentLength"]),
                ("aws:kms", self.KEY_ID, size),
            )


class KmsOptionsPostgresTests(KmsOptionsTests):
    engine = "psycopg2"


class CustomerKeyTests(S3TestCase):
    KEY = "k" * 32
    provider_options = {"sse_customer_key": KEY, "sse_customer_algo": "AES256"}

    async def test_objects_encrypted_with_the_customer_key(self) -> None:
        data = b"secret media"
        media_id = await self.upload(self.token, data)
        key = local_media_path(media_id)
        # (moto keeps the bytes as sent and reports no SSE-C on them: what
        # is checked is that every request carrying the key works.)
        os.unlink(self.local_file(key))
        r = await self.download(media_id)
        self.assertEqual((r.code, r.body), (200, data))
        # Redirects stay off: the client would need the key.
        r = await self.request(
            "GET", f"{DOWNLOAD}/{media_id}?allow_redirect=true", token=self.token
        )
        self.assertEqual((r.code, r.body), (200, data))


class CustomerKeyPostgresTests(CustomerKeyTests):
    engine = "psycopg2"


class FederationLocationTests(FederationTestCase):
    async def set_up(self) -> None:
        await super().set_up()
        self.moto = MotoServer(self.workdir)
        self.addCleanup(self.moto.release)
        self.moto.start()
        entry = self.moto.provider_config()
        entry["config"]["download_redirect"] = "presigned"
        self.c = await self.start_peer("c", media_storage_providers=[entry])
        self.c_token = await self.register(self.c, "carol")

    async def test_federation_download_answers_with_a_location(self) -> None:
        data = os.urandom(40_000)
        media_id = await self.upload_to(self.c, self.c_token, data, "application/pdf")
        r = await self.signed_get(
            self.a, self.c, f"/_matrix/federation/v1/media/download/{media_id}"
        )
        self.assertEqual(r.code, 200)
        self.assertIn(b"\r\nLocation: " + self.moto.endpoint_url.encode(), r.body)
        self.assertNotIn(data[:100], r.body)
        # Another server follows it and gets the bytes.
        r = await self.download_via_a(self.c, media_id)
        self.assertEqual((r.code, r.body), (200, data))


class RedirectConfigTests(unittest.TestCase):
    def parse(self, **options: Any) -> Any:
        entry = MotoServer("/tmp").provider_config()
        entry["config"].update(options)
        data = {"server_name": "example.org", "media_storage_providers": [entry]}
        return parse_config(data, "/tmp").media_storage_providers[0].backend

    def test_defaults_and_values(self) -> None:
        backend = self.parse()
        self.assertIsNone(backend.download_redirect)
        self.assertEqual(backend.presigned_url_expiry_seconds, 3600)
        self.assertEqual(self.parse(download_redirect="https://cdn.example/m").download_redirect,
                         "https://cdn.example/m")  # fmt: skip

    def test_refused(self) -> None:
        for options in (
            {"download_redirect": "ftp://cdn.example/"},
            {"download_redirect": "cdn.example"},
            {"download_redirect": "presigned", "sse_customer_key": "k" * 32},
            {"presigned_url_expiry": "8d"},
            {"presigned_url_expiry": 0},
            {"server_side_encryption": "rot13"},
            {"multipart_chunksize": "1M"},
        ):
            with self.assertRaises(ConfigError, msg=str(options)):
                self.parse(**options)
