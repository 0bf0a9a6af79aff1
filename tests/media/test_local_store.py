"""The local store's directories: made again when a purge removed them, and
removed when a deletion empties them (never the store's top-level ones)."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any, ParamSpec, TypeVar

from twisted.internet import defer
from twisted.internet.interfaces import IReactorFromThreads
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool
from twisted.trial import unittest
from zope.interface import implementer

from mediarepo.media.cache import SmallFileCache
from mediarepo.media.providers import local
from mediarepo.media.providers.local import LocalFiles, in_directory
from mediarepo.media.staging import UploadStaging

P = ParamSpec("P")
R = TypeVar("R")


@implementer(IReactorFromThreads)
class ImmediateReactor(Clock):
    """A clock whose calls "from a thread" run at once, on this thread."""

    def callFromThread(self, callable: Callable[..., Any], *args: object, **kwargs: object) -> None:
        callable(*args, **kwargs)


class DirectoryTests(unittest.TestCase):
    def setUp(self) -> None:
        self.base = os.path.abspath(self.mktemp())
        os.makedirs(self.base)

    def test_in_directory_survives_a_purge_in_between(self) -> None:
        directory = os.path.join(self.base, "local_content", "ab", "cd")
        attempts: list[None] = []

        def create() -> str:
            attempts.append(None)
            if len(attempts) == 1:
                # What a purge does to the directory it has just emptied.
                os.rmdir(directory)
            with open(os.path.join(directory, "efgh"), "xb"):
                pass
            return "created"

        self.assertEqual(in_directory(directory, create), "created")
        self.assertEqual(len(attempts), 2)
        self.assertTrue(os.path.isfile(os.path.join(directory, "efgh")))

    def test_deletion_removes_what_it_empties(self) -> None:
        store = LocalFiles(self.base, ThreadPool(), ImmediateReactor())
        kept = os.path.join(self.base, "local_content", "ab", "xy", "kept")
        gone = os.path.join(self.base, "local_content", "ab", "cd", "gone")
        remote = os.path.join(self.base, "remote_content", "other.example", "ab", "cd", "file")
        for path in (kept, gone, remote):
            os.makedirs(os.path.dirname(path))
            open(path, "wb").close()
        for path in (gone, remote):
            os.unlink(path)
            store._remove_emptied_directories(path)
        # ab still holds xy; the remote origin's directory went with its last file.
        self.assertEqual(os.listdir(os.path.join(self.base, "local_content", "ab")), ["xy"])
        self.assertEqual(os.listdir(os.path.join(self.base, "remote_content")), [])
        os.unlink(kept)
        store._remove_emptied_directories(kept)
        self.assertEqual(os.listdir(os.path.join(self.base, "local_content")), [])
        self.assertEqual(
            sorted(os.listdir(self.base)), [".mediarepo_tmp", "local_content", "remote_content"]
        )

    def counting_store(
        self, run_at_once: bool = True
    ) -> tuple[LocalFiles, list[Callable[[], None]]]:
        """A store whose pool lists its jobs and, unless told not to, runs
        each at once on this thread (else each when called)."""
        jobs: list[Callable[[], None]] = []

        class CountingPool(ThreadPool):
            """Lists each job; runs it at once on this thread unless told not to."""

            def callInThreadWithCallback(
                self,
                onResult: Callable[[bool, Any], object] | None,
                func: Callable[P, R],
                *args: P.args,
                **kw: P.kwargs,
            ) -> None:
                def job() -> None:
                    try:
                        result = func(*args, **kw)
                    except Exception:
                        if onResult is not None:
                            onResult(False, Failure())
                    else:
                        if onResult is not None:
                            onResult(True, result)

                jobs.append(job)
                if run_at_once:
                    job()

        store = LocalFiles(self.base, CountingPool(), ImmediateReactor())
        jobs.clear()
        return store, jobs

    def make_media(self, count: int) -> tuple[list[str], list[str], str]:
        """``count`` media's content files and thumbnail directories (relative
        paths), and a file beside them that stays (absolute)."""
        files = [f"local_content/ab/c{i}/efgh" for i in range(count)]
        directories = [f"local_thumbnails/ab/c{i}/efgh" for i in range(count)]
        kept = os.path.join(self.base, "local_content", "ab", "zz", "kept")
        for relative in [*files, *(d + "/32-32-image-jpeg-crop" for d in directories)]:
            path = os.path.join(self.base, relative)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            open(path, "wb").close()
        os.makedirs(os.path.dirname(kept))
        open(kept, "wb").close()
        return files, directories, kept

    def assert_only_kept_left(self, kept: str) -> None:
        self.assertEqual(os.listdir(os.path.join(self.base, "local_content", "ab")), ["zz"])
        self.assertEqual(os.listdir(os.path.join(self.base, "local_thumbnails")), [])
        self.assertTrue(os.path.isfile(kept))

    def test_delete_many_in_one_pool_job(self) -> None:
        # A few media's files and thumbnail directories go in a single job
        # of the pool, not several per media.
        files, directories, kept = self.make_media(3)
        store, jobs = self.counting_store()
        # One missing file does not stop the rest.
        files.append("local_content/ab/qq/missing")

        self.successResultOf(defer.ensureDeferred(store.delete_many(files, directories)))

        self.assertEqual(len(jobs), 1)
        self.assert_only_kept_left(kept)

    def test_large_deletion_split_between_jobs(self) -> None:
        self.patch(local, "DELETE_JOB_PATHS", 4)
        files, directories, kept = self.make_media(30)
        store, jobs = self.counting_store()

        self.successResultOf(defer.ensureDeferred(store.delete_many(files, directories)))

        self.assertEqual(len(jobs), local.DELETE_JOBS)
        self.assert_only_kept_left(kept)

    def test_failed_job_fails_the_deletion_and_the_others_go_on(self) -> None:
        self.patch(local, "DELETE_JOB_PATHS", 4)
        files, _, _ = self.make_media(30)
        store, jobs = self.counting_store(run_at_once=False)
        # A directory given as a file: unlink refuses it.
        os.makedirs(os.path.join(self.base, "local_content", "ab", "dir", "efgh"))
        paths = ["local_content/ab/dir/efgh", *files]

        deletion = defer.ensureDeferred(store.delete_many(paths, []))
        self.assertEqual(len(jobs), local.DELETE_JOBS)
        jobs[0]()
        # Failed, but it waits for the jobs still running.
        self.assertNoResult(deletion)
        for job in jobs[1:]:
            job()
        failure = self.failureResultOf(deletion)

        self.assertIsInstance(failure.value, IsADirectoryError)
        # Left: the files the failed job had after the directory, no other.
        left = [f for f in files if os.path.exists(os.path.join(self.base, f))]
        self.assertEqual(left, paths[0 :: local.DELETE_JOBS][1:])


class SmallFileCacheTests(unittest.TestCase):
    def test_forget_under_many_directories_at_once(self) -> None:
        cache = SmallFileCache(Clock(), 1 << 20, 60.0)
        kept = ["/s/local_thumbnails/ab/cd/efgh2/32-32", "/s/local_content/ab/cd/efgh"]
        gone = [
            "/s/local_thumbnails/ab/cd/efgh/32-32",
            "/s/local_thumbnails/ab/cd/efgh/96-96",
            "/s/remote_thumbnail/o.test/ab/cd/ijkl/deeper/x",
        ]
        for path in kept + gone:
            cache.put(path, b"x")
        cache.forget_under(
            ["/s/local_thumbnails/ab/cd/efgh", "/s/remote_thumbnail/o.test/ab/cd/ijkl/", "/none"]
        )
        self.assertEqual([p for p in kept + gone if cache.get(p) is not None], kept)

    def test_forget_under_nested_and_look_alike_directories(self) -> None:
        cache = SmallFileCache(Clock(), 1 << 20, 60.0)
        kept = ["/s/x-y", "/s/x.z/a", "/s/w/x/a", "/s/xa"]
        gone = ["/s/x/a", "/s/x/b/c", "/s/x/b-c/d", "/s/x/c", "/s/y/z/a"]
        for path in kept + gone:
            cache.put(path, b"x")
        # Nested (/s/x, /s/x/b), a name that sorts between a directory and
        # its files (/s/x-y: "-" comes before "/"), a look-alike (/s/xa).
        cache.forget_under(["/s/x/b", "/s/x-y/", "/s/x", "/s/y/z", "/s/x!"])
        self.assertEqual([p for p in kept + gone if cache.get(p) is not None], kept)


class StagingIdleTests(unittest.TestCase):
    """What a shutdown waits for: the last upload in progress to end."""

    def setUp(self) -> None:
        base = os.path.abspath(self.mktemp())
        os.makedirs(base)
        self.staging = UploadStaging(LocalFiles(base, ThreadPool(), ImmediateReactor()))

    def test_fires_when_the_last_upload_ends(self) -> None:
        self.assertTrue(self.staging.when_idle().called)
        first, second = self.staging.begin("aaaaaaaaaa"), self.staging.begin("bbbbbbbbbb")
        idle = self.staging.when_idle()
        self.staging.end(first)
        self.assertFalse(idle.called)
        self.staging.end(second)
        self.assertTrue(idle.called)

    def test_a_waiter_given_up_on_is_left_alone(self) -> None:
        sink = self.staging.begin("aaaaaaaaaa")
        clock = Clock()
        idle = self.staging.when_idle()
        idle.addTimeout(1, clock)
        clock.advance(1)
        self.failureResultOf(idle, defer.TimeoutError)
        self.staging.end(sink)  # no AlreadyCalledError

    def test_rolling_back_all_ends_them(self) -> None:
        self.staging.begin("aaaaaaaaaa")
        self.staging.begin("bbbbbbbbbb")
        idle = self.staging.when_idle()
        self.successResultOf(defer.ensureDeferred(self.staging.abort_all()))
        self.assertTrue(idle.called)
        self.assertEqual(self.staging.in_progress, 0)
