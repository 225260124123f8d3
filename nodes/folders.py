"""ComfyUI model folders of this pack, registered without hiding what other packs or users registered; file
inputs resolved inside ComfyUI's folders only; file fingerprints for ComfyUI's change check."""
from __future__ import annotations

import hashlib
import os
import re

import folder_paths

from ..errors import InputError


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


# ------------------------------------------------------------------------------------------ file inputs

FINGERPRINT_HASH_LIMIT = 64 << 20   # files up to this size are fingerprinted by content, larger ones by stat


def model_file(folder: str, name: str, what: str) -> str:
    """Full path of ``name``, which must be one of the files ComfyUI lists for model folder ``folder``.

    ``what`` names the node and input in messages. Nothing outside the list is ever opened: an absolute path
    or a name with ``..`` is refused with the same message as any other unknown name, so the message says
    nothing about the server's files.
    """
    if not isinstance(name, str) or name not in folder_paths.get_filename_list(folder):
        raise InputError(f"{what}: the file given is not in the list of models/{folder}; choose one of the listed "
                         f"files (put new files into models/{folder} and refresh)")
    return folder_paths.get_full_path_or_raise(folder, name)


def user_file(name: str, what: str) -> str:
    """Full path of a file in ComfyUI's input folder, or in output/temp with ComfyUI's annotation
    (``'x.safetensors [output]'``): the rules ComfyUI's own loaders use, plus no escaping the folder.

    Refused with a message that shows no server path: absolute paths, ``..``, control characters, and links
    that lead outside the folder.
    """
    if not isinstance(name, str) or not name.strip():
        raise InputError(f"{what}: no file given; choose a file from the list")
    rel, base = folder_paths.annotated_filepath(name)
    kind = "output" if name.endswith("[output]") else "temp" if name.endswith("[temp]") else "input"
    base = base or folder_paths.get_input_directory()
    if escapes_folder(rel):
        raise InputError(f"{what}: only files inside ComfyUI's {kind} folder can be used: give a name relative "
                         "to it, without '..' or a leading '/' (choose one from the list)")
    path = os.path.join(base, rel)
    root = os.path.realpath(base)
    if os.path.commonpath([os.path.realpath(path), root]) != root:
        raise InputError(f"{what}: the file is a link that leads outside ComfyUI's {kind} folder; copy the file "
                         f"itself into the {kind} folder")
    if not os.path.isfile(path):
        raise InputError(f"{what}: {rel!r} is not a file in ComfyUI's {kind} folder; choose one from the list "
                         "(refresh it after adding files)")
    return path


def escapes_folder(rel: str) -> bool:
    """An absolute path (POSIX, Windows drive or share), a '..' step, or a control character (NUL)."""
    parts = rel.replace("\\", "/").split("/")
    return (os.path.isabs(rel) or rel.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", rel) is not None
            or ".." in parts or any(ord(c) < 32 for c in rel))


def file_fingerprint(path: str) -> str:
    """What ComfyUI compares to decide whether a file-reading node runs again (``fingerprint_inputs``).

    Small files (identities) by content, so an overwrite within the file system's time resolution still counts;
    model files by size, modification time and inode (hashing gigabytes on every queue would be slow).
    """
    st = os.stat(path)
    if st.st_size <= FINGERPRINT_HASH_LIMIT:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        return "sha256:" + h.hexdigest()
    return f"stat:{st.st_size}:{st.st_mtime_ns}:{st.st_ino}"


def fingerprint_or_name(resolve, name) -> str:
    """``file_fingerprint`` of what ``resolve(name)`` gives; the name itself when it does not resolve (then the
    node runs and reports the problem)."""
    try:
        return file_fingerprint(resolve(name))
    except (OSError, ValueError):
        return f"unresolved:{name!r}"


def folder_fingerprint(folders) -> str:
    """``fingerprint_inputs`` of a node that reads a folder of files (an insightface pack): every file's relative
    name, size and modification time."""
    h = hashlib.sha256()
    for folder in folders:
        for dirpath, _, files in sorted(os.walk(folder)):
            for f in sorted(files):
                st = os.stat(os.path.join(dirpath, f))
                h.update(f"{os.path.relpath(os.path.join(dirpath, f), folder)}:{st.st_size}:{st.st_mtime_ns};".encode())
    return "files:" + h.hexdigest()
