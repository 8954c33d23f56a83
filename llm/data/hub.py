"""Files of a Hugging Face hub dataset, downloaded into the hub cache, or the cached copies when offline."""

from __future__ import annotations

import glob
import logging
import os
from collections.abc import Callable

from llm.errors import DataError

log = logging.getLogger(__name__)


def hub_dataset_files(
    repo_id: str,
    folder: str,
    keep: Callable[[str], bool],
    *,
    max_files: int | None = None,
    cache_dir: str | os.PathLike | None = None,
    what: str = "",
    fallback: str = "use local files",
) -> list[str]:
    """Local paths of the files of a hub dataset under `folder` whose repo paths `keep` accepts, sorted.

    Downloads go to the hub cache (resumable, with huggingface_hub's progress bars).
    When the hub cannot be reached (no network, HF_HUB_OFFLINE) the cached copies
    are used with a warning; with none cached it is a ConnectionError saying what to do.
    """
    import huggingface_hub  # only the hub sources need it

    described = f"{repo_id} ({what})" if what else repo_id
    try:
        names = sorted(
            f.path
            for f in huggingface_hub.HfApi().list_repo_tree(repo_id, folder or None, repo_type="dataset",
                                                            recursive=True)
            if isinstance(f, huggingface_hub.hf_api.RepoFile) and keep(f.path)
        )[:max_files]
        paths = [
            huggingface_hub.hf_hub_download(repo_id, name, repo_type="dataset", cache_dir=cache_dir) for name in names
        ]
    except Exception as e:  # no network, offline mode, DNS, proxy: huggingface_hub raises many kinds
        cached = _cached_hub_files(repo_id, folder, keep, cache_dir)[:max_files]
        if cached:
            log.warning("hub unreachable (%s); using the %d cached files of %s", e, len(cached), described)
            return cached
        raise ConnectionError(
            f"cannot fetch {described} from the Hugging Face hub and no files are cached: "
            f"{type(e).__name__}: {e}. Connect to the internet (and unset HF_HUB_OFFLINE), or {fallback}"
        ) from e
    if not paths:
        raise DataError(f"{described}: the hub dataset has no matching files under {folder or 'its root'}/")
    return paths


def _cached_hub_files(repo_id: str, folder: str, keep: Callable[[str], bool],
                      cache_dir: str | os.PathLike | None) -> list[str]:
    """Files of `folder` already in the local hub cache that `keep` accepts."""
    import huggingface_hub

    try:
        snapshot = huggingface_hub.snapshot_download(
            repo_id,
            repo_type="dataset",
            allow_patterns=f"{folder}/**" if folder else None,
            cache_dir=cache_dir,
            local_files_only=True,
        )
    except Exception:  # nothing cached: the caller reports the original error
        return []
    found = glob.glob(os.path.join(snapshot, folder, "**", "*"), recursive=True)
    return sorted(p for p in found if os.path.isfile(p) and keep(os.path.relpath(p, snapshot)))
