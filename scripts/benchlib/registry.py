"""Every scenario by name, in the order a run takes them, what each needs,
and how one is run. The scenarios live in ``scenarios.py`` and the modules
beside it, which import their shared types from ``scenarios.py``; this
module imports them all, so that nothing imports back up."""

from __future__ import annotations

from benchlib.httpclient import RequestFailed
from benchlib.preview import run_preview
from benchlib.procmon import is_alive
from benchlib.results import Result
from benchlib.scenarios import (
    Options,
    Scenario,
    ScenarioFailed,
    ScenarioSkipped,
    Target,
    create_put,
    download_large,
    download_small,
    download_small_legacy,
    thumbnail_cached,
    thumbnail_dynamic,
    thumbnail_upload,
    thumbnail_upload_heic,
    thumbnail_upload_video,
    upload_large,
    upload_small,
)
from benchlib.scenarios_remote import remote_fetch
from benchlib.scenarios_scale import SCALE_SCENARIOS
from benchlib.scenarios_thumbnails import thumbnail_cold

SCENARIOS: dict[str, Scenario] = {
    "upload_small": upload_small,
    "upload_large": upload_large,
    "download_small": download_small,
    "download_small_legacy": download_small_legacy,
    "download_large": download_large,
    "thumbnail_upload": thumbnail_upload,
    "thumbnail_upload_heic": thumbnail_upload_heic,
    "thumbnail_upload_video": thumbnail_upload_video,
    "thumbnail_dynamic": thumbnail_dynamic,
    "thumbnail_cached": thumbnail_cached,
    "create_put": create_put,
    "preview": run_preview,
    "thumbnail_cold": thumbnail_cold,
    "remote_fetch": remote_fetch,
    **SCALE_SCENARIOS,
}

# Scenarios that need Pillow (to make or read JPEGs).
NEEDS_PILLOW = {
    "thumbnail_upload",
    "thumbnail_dynamic",
    "thumbnail_cached",
    "thumbnail_cold",
    "preview",
}
# Scenarios that need an origin on loopback TLS (its certificates and key).
NEEDS_ORIGIN = {"remote_fetch"}
# Scenarios that also need pillow-heif or PyAV (to make their sources).
NEEDS_HEIF = {"thumbnail_upload_heic"}
NEEDS_AV = {"thumbnail_upload_video"}


async def run_scenario(name: str, target: Target, opts: Options) -> list[Result]:
    """Run one scenario; a skip or failure becomes a result row instead of an exception."""
    if target.pid is not None and not is_alive(target.pid):
        results = [Result(target.label, name, status="failed", reason="server is not running")]
    else:
        try:
            results = await SCENARIOS[name](target, opts)
        except ScenarioSkipped as e:
            results = [Result(target.label, name, status="skipped", reason=str(e))]
        except (ScenarioFailed, RequestFailed) as e:
            results = [Result(target.label, name, status="failed", reason=str(e))]
    for result in results:
        result.server_info = result.server_info or dict(target.info)
    return results
