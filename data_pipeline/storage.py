"""fsspec URLs: local paths, ``file://``, ``s3://`` (endpoint and credentials from the usual
S3 settings, e.g. ``AWS_ENDPOINT_URL``), ``gs://``."""

from __future__ import annotations

import os
import stat

import fsspec

from data_pipeline.errors import DataPipelineError

# fsspec protocols whose implementation is a separate package that is not in the pins
_OPTIONAL_BACKENDS = {"gs": "gcsfs", "gcs": "gcsfs", "az": "adlfs", "abfs": "adlfs",
                      "abfss": "adlfs"}


def _s3_options() -> dict:
    # s3fs reads keys from the environment itself; the endpoint for S3-compatible servers
    # (MinIO, moto, Ceph) comes from AWS_ENDPOINT_URL[_S3] so that every tool agrees.
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    opts: dict = {}
    if endpoint:
        opts["endpoint_url"] = endpoint
    region = os.environ.get("AWS_DEFAULT_REGION") or os.environ.get("AWS_REGION")
    if region:
        opts.setdefault("client_kwargs", {})["region_name"] = region
    return opts


def filesystem(url: str, **storage_options):
    """(fs, path) for a URL; ``storage_options`` override the environment defaults."""
    protocol = url.split("://", 1)[0] if "://" in url else "file"
    opts = _s3_options() if protocol in ("s3", "s3a") else {}
    opts.update(storage_options)
    try:
        fs, path = fsspec.core.url_to_fs(url, **opts)
    except ImportError as e:
        package = _OPTIONAL_BACKENDS.get(protocol)
        if package is None:
            raise
        raise DataPipelineError(
            f"{url}: {protocol}:// URLs need the {package} package, which is not in avmoe's "
            f"pinned requirements; install it (pip install {package}) on every machine that "
            f"reads or writes this URL, or use s3:// ({e})") from None
    return fs, path


def is_local_fs(fs) -> bool:
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    return protocol in ("file", "local")


def not_a_regular_file(path: str) -> str | None:
    """Why the local ``path`` cannot be read as a file ("a directory", "a FIFO", ...), or None
    (also None when it does not exist: the caller reports that its own way). Readers check
    this first: opening a FIFO blocks until a writer comes, so it must never be opened."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return None
    if stat.S_ISREG(mode):
        return None
    kind = ("a directory" if stat.S_ISDIR(mode) else "a FIFO" if stat.S_ISFIFO(mode) else
            "a socket" if stat.S_ISSOCK(mode) else "a device" if stat.S_ISCHR(mode) or
            stat.S_ISBLK(mode) else "not a regular file")
    return f"is {kind}, not a regular file"


def read_file(fs, path: str) -> bytes:
    """All bytes of ``path``; on local disk a directory or FIFO raises ``IsADirectoryError`` /
    ``OSError`` naming it instead of blocking."""
    if is_local_fs(fs):
        problem = not_a_regular_file(path)
        if problem:
            raise IsADirectoryError(f"{path} {problem}")
    return fs.cat_file(path)


def join(base: str, name: str) -> str:
    return base.rstrip("/") + "/" + name


def is_local(url: str) -> bool:
    return "://" not in url or url.startswith("file://")


def local_path(url: str) -> str:
    return url[len("file://"):] if url.startswith("file://") else url


def worker_env(url: str) -> dict | None:
    """A Ray ``runtime_env`` forwarding the driver's S3 settings to Ray workers (decode tasks,
    training workers): workers started before the variables were set (a long-lived local
    Ray, tests) would not see them. On a cluster whose nodes have their own credentials the
    driver has none and this is None."""
    if not url.startswith(("s3://", "s3a://")):
        return None
    names = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN",
             "AWS_DEFAULT_REGION", "AWS_REGION", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3")
    env = {k: os.environ[k] for k in names if k in os.environ}
    return {"env_vars": env} if env else None


def cache_dir() -> str:
    """The local cache of avmoe: ``AVMOE_CACHE_DIR``, else ``$XDG_CACHE_HOME/avmoe``
    (``~/.cache/avmoe``)."""
    return os.environ.get("AVMOE_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "avmoe")
