"""ComfyUI model folders of this pack, registered without hiding what other packs or users registered."""
from __future__ import annotations

import os

import folder_paths


def register_model_folder(name: str, extensions) -> None:
    """Add ``models/<name>`` for ``extensions``, merging with an existing registration.

    Paths from extra_model_paths.yaml and extensions another pack registered for the same folder (e.g.
    IPAdapter_plus's ``.bin`` in ``models/ipadapter``) are kept: replacing the entry would hide those
    users' files from every loader's dropdown.
    """
    default = os.path.join(folder_paths.models_dir, name)
    if name in folder_paths.folder_names_and_paths:
        paths, exts = folder_paths.folder_names_and_paths[name]
        paths = list(paths) if default in paths else list(paths) + [default]
        exts = set(exts) | set(extensions)
    else:
        paths, exts = [default], set(extensions)
    folder_paths.folder_names_and_paths[name] = (paths, exts)
    # folder_paths caches listings per folder name; a new extension must be seen on the next listing
    cache = getattr(folder_paths, "filename_list_cache", None)
    if isinstance(cache, dict):
        cache.pop(name, None)
