"""Server names and media IDs, which arrive in every download path and pick
the files we open: the spec's grammar is accepted, nothing else is, and
whatever is accepted is safe as a path component."""

from __future__ import annotations

import os

from hypothesis import given
from hypothesis import strategies as st
from twisted.trial import unittest

from mediarepo.identifiers import is_valid_server_name
from mediarepo.media.paths import (
    MediaPaths,
    UnsafePathError,
    is_valid_media_id,
    local_media_path,
    local_thumbnail_path,
    random_media_id,
    remote_media_path,
    remote_thumbnail_path,
)
from tests.fuzz.strategies import hostile_text, media_ids, server_names

STORE = MediaPaths("/srv/media_store")


class ServerNamePropertyTests(unittest.TestCase):
    @given(server_names)
    def test_spec_grammar_accepted(self, name: str) -> None:
        self.assertTrue(is_valid_server_name(name))

    @given(
        st.one_of(
            hostile_text,
            st.text(max_size=300),
            # A real name with something hostile where the port goes, or after it.
            st.builds(
                lambda n, tail: n + ":" + tail,
                server_names.filter(lambda n: ":" not in n),
                st.one_of(
                    hostile_text,
                    st.text("0123456789\u00b2\u0661\u0663\uff11", min_size=1, max_size=6),
                ),
            ),
            st.builds(lambda n, tail: n + tail, server_names, hostile_text),
        )
    )
    def test_anything_else_refused_without_raising(self, name: str) -> None:
        """Accepted names are ASCII host[:port] with nothing a path or URL
        could treat specially; refusal is ``False``, never an exception."""
        if not is_valid_server_name(name):
            return
        self.assertRegex(name, r"\A[A-Za-z0-9.\-\[\]:]{1,255}\Z")
        if name.startswith("["):
            port = name.partition("]")[2].removeprefix(":")
        else:
            port = name.partition(":")[2]
        if port:
            self.assertRegex(port, r"\A[0-9]{1,5}\Z")
            self.assertTrue(0 < int(port) < 65536)

    @given(server_names, st.integers(65536, 10**6))
    def test_port_out_of_range_refused(self, name: str, port: int) -> None:
        host = name.rsplit(":", 1)[0] if not name.endswith("]") else name
        self.assertFalse(is_valid_server_name(f"{host}:{port}"))
        self.assertFalse(is_valid_server_name(f"{host}:0"))
        # Digits of other scripts look like a port to str.isdigit() and int().
        self.assertFalse(is_valid_server_name(f"{host}:\u0661"))
        self.assertFalse(is_valid_server_name(f"{host}:\u00b2"))

    @given(server_names, media_ids.filter(lambda m: len(m) >= 5))
    def test_accepted_names_make_store_paths(self, name: str, file_id: str) -> None:
        """A name the checks let through never fails the path guard later
        (which would be a 500, not a 404)."""
        for relative in (
            remote_media_path(name, file_id),
            remote_thumbnail_path(name, file_id, 32, 32, "image/png", "scale"),
        ):
            path = STORE.absolute(relative)
            self.assertTrue(path.startswith(STORE.base + os.sep))
            self.assertIn(os.sep + name + os.sep, path)


class MediaIdPropertyTests(unittest.TestCase):
    @given(media_ids)
    def test_spec_ids_accepted(self, media_id: str) -> None:
        self.assertTrue(is_valid_media_id(media_id))

    @given(st.one_of(hostile_text, st.text(max_size=300)))
    def test_accepted_ids_are_the_spec_alphabet(self, media_id: str) -> None:
        if is_valid_media_id(media_id):
            self.assertRegex(media_id, r"\A[A-Za-z0-9_-]{1,255}\Z")

    @given(media_ids.filter(lambda m: len(m) >= 5))
    def test_path_round_trip(self, media_id: str) -> None:
        """Synapse's layout splits the ID into ab/cd/rest under the store;
        the parts join back to the ID and the path stays inside."""
        relative = local_media_path(media_id)
        top, *parts = relative.split(os.sep)
        self.assertEqual((top, len(parts), "".join(parts)), ("local_content", 3, media_id))
        self.assertTrue(STORE.absolute(relative).startswith(STORE.base + os.sep))
        thumbnail = local_thumbnail_path(media_id, 640, 480, "image/jpeg", "crop")
        self.assertTrue(STORE.absolute(thumbnail).startswith(STORE.base + os.sep))

    @given(st.one_of(hostile_text, st.sampled_from(["..", ".", "../..", "a/../../b", "/etc"])))
    def test_path_guard(self, file_id: str) -> None:
        """Whatever the ID, a path is inside the store or refused."""
        try:
            relative = local_media_path(file_id)
        except UnsafePathError:
            return
        self.assertTrue(STORE.absolute(relative).startswith(STORE.base + os.sep))

    def test_new_ids_are_valid(self) -> None:
        for _ in range(1000):
            media_id = random_media_id()
            self.assertRegex(media_id, r"\A[A-Za-z]{24}\Z")
            self.assertTrue(is_valid_media_id(media_id))
            local_media_path(media_id)
