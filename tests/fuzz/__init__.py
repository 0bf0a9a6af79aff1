"""Property-based tests of every parser that reads hostile input, and the
schemathesis run over the spec's media OpenAPI.

Importing the package loads the hypothesis profile its modules run under:
``MEDIAREPO_HYPOTHESIS_PROFILE`` picks one (``mediarepo``, the default, or
``thorough`` for a long local hunt). Examples are bounded so the whole set takes seconds; no
deadline, because two cores are shared with the rest of the suite and a slow
example is not a failure. No example database: trial runs in a scratch
directory it empties each time, and a failure prints the example and the
blob that replays it (``@reproduce_failure``).
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

_COMMON = settings(
    deadline=None,
    database=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile("mediarepo", _COMMON, max_examples=150)
settings.register_profile("thorough", _COMMON, max_examples=5000)
settings.load_profile(os.environ.get("MEDIAREPO_HYPOTHESIS_PROFILE", "mediarepo"))
