"""User paths: local directories and `gs://` buckets through one layer, etils `epath` (which orbax uses too).

`path(p)` turns what a user passed (`--workdir`, `--export`, `train.init_checkpoint`, `vision.init`,
`evaluate --workdir/--out/--data_dir`, `load_frozen`) into an `epath.Path`; the code never calls `open()` or
`pathlib` on such a path. A local path behaves as before; a `gs://` one is checked first (`preflight`).

Backend: `gs://` goes through `gcsfs` (fsspec), never TensorFlow's gfile, also where TensorFlow is installed
(`EPATH_USE_TF=false`, set here before epath picks a backend): gcsfs and orbax's tensorstore both honour an
emulator endpoint, so production and the tests run the same code. On real GCS they use Application Default
Credentials (`gcloud auth application-default login`, or a TPU VM's service account). For a GCS emulator set
`STORAGE_EMULATOR_HOST=http://host:port`; `TENSORSTORE_GCS_HTTP_URL` (orbax's array data) follows it unless set.

What does not go through this layer: TensorBoard event files and `jax.profiler` traces are written by
TensorFlow / the profiler, so for a remote directory they are written to a local temporary folder and copied
up with `upload_tree` (the trainer does this on each flush and at the end).
"""

from __future__ import annotations

import os
import pathlib
import socket
import urllib.parse

from etils import epath

REMOTE_SCHEMES = ("gs://",)
GCS_ENDPOINT = "https://storage.googleapis.com"
PREFLIGHT_TIMEOUT_S = 5.0


def _configure_backend() -> None:
    """gcsfs for gs:// (see the module docstring); set before epath's first (cached) backend choice."""
    os.environ["EPATH_USE_TF"] = "false"
    # gcsfs's experimental zonal/HNS layer asks the storage-control API for each bucket's type; an emulator has
    # none (a warning per call), and orbax never renames, so the plain GCS filesystem is used.
    os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")
    emulator = os.environ.get("STORAGE_EMULATOR_HOST")
    if emulator:
        os.environ.setdefault("TENSORSTORE_GCS_HTTP_URL", emulator)
    try:
        from etils.epath import gpath

        gpath._is_tf_installed.cache_clear()  # in case epath chose before this module was imported
    except (ImportError, AttributeError):
        pass


_configure_backend()


def is_remote(p) -> bool:
    return str(p).startswith(REMOTE_SCHEMES)


def path(p) -> epath.Path:
    """`p` (a str, pathlib.Path or epath.Path) as an `epath.Path`: a `gs://` URI kept as one, a local path with
    `~` expanded."""
    if isinstance(p, epath.Path) and is_remote(p):
        return p
    text = os.fspath(p)
    if is_remote(text):
        return epath.Path(text)
    return epath.Path(os.path.expanduser(text))


def endpoint() -> str:
    """The GCS endpoint gs:// paths use: `STORAGE_EMULATOR_HOST` if set, else Google's."""
    _configure_backend()
    return os.environ.get("STORAGE_EMULATOR_HOST") or GCS_ENDPOINT


_checked: set[str] = set()


def preflight(p, timeout_s: float = PREFLIGHT_TIMEOUT_S) -> None:
    """For a `gs://` path, fail within `timeout_s` with a clear error if its GCS endpoint cannot be reached
    (the storage clients would retry for minutes); nothing for a local path. Checked once per endpoint."""
    if not is_remote(p):
        return
    url = endpoint()
    if url in _checked:
        return
    parsed = urllib.parse.urlparse(url if "://" in url else f"http://{url}")
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        socket.create_connection((parsed.hostname, port), timeout=timeout_s).close()
    except OSError as e:
        emulator = "STORAGE_EMULATOR_HOST" in os.environ
        hint = ("STORAGE_EMULATOR_HOST points at it: start the emulator or unset the variable" if emulator else
                "check the network, or set STORAGE_EMULATOR_HOST=http://HOST:PORT for a GCS emulator")
        raise ConnectionError(f"cannot reach the GCS endpoint {url} for {p} within {timeout_s:.0f} s ({e}); "
                              f"{hint}") from None
    _checked.add(url)


def _gcs_filesystem():
    """The gcsfs filesystem epath uses for gs:// (one cached instance)."""
    from etils.epath import backend

    return backend.fsspec_backend.fs("gs://")


def files_under(directory) -> list[epath.Path]:
    """Every file under `directory`, recursively, sorted (epath's `rglob` refuses gs://). A gs:// listing is
    read afresh: other writers (orbax's tensorstore) may have added objects since gcsfs cached one."""
    directory = path(directory)
    if not is_remote(directory):
        local = pathlib.Path(os.fspath(directory))  # epath's rglob refuses `**` even locally
        return sorted(epath.Path(p) for p in local.rglob("*") if p.is_file())
    fs, root = _gcs_filesystem(), os.fspath(directory).removeprefix("gs://").rstrip("/")
    fs.invalidate_cache()
    return sorted(epath.Path("gs://" + name) for name in fs.find(root))


def refresh(p) -> None:
    """Forget gcsfs's cached listings (a gs:// path whose objects another client may have written)."""
    if is_remote(p):
        _gcs_filesystem().invalidate_cache()


def upload_tree(local, remote) -> None:
    """Copy every file under the local directory `local` to the same relative path under `remote` (a
    directory of any kind), overwriting what is there."""
    local, remote = path(local), path(remote)
    if not local.is_dir():
        return
    for file in files_under(local):
        target = remote / file.relative_to(local).as_posix()
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(file.read_bytes())
