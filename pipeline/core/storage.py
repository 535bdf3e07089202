"""One way to reach every URI: local paths, file://, s3:// (any fsspec protocol in principle).

The S3 endpoint and region come from `StorageConfig` or, when unset there, from the standard
AWS environment (AWS_ENDPOINT_URL, AWS_REGION / AWS_DEFAULT_REGION); credentials always come from
the AWS chain (environment, ~/.aws, instance roles) and are never stored, logged or saved with a
config. The same settings build the fsspec filesystem (s3fs) and the pyarrow filesystem, which
Ray Data and Ray Train need and which ignores AWS_ENDPOINT_URL on its own.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlparse

import fsspec
from fsspec.core import split_protocol

from model.weights.fileio import read_bytes, remove_temporaries, write_bytes_atomic


@dataclass(repr=False)
class StorageConfig:
    endpoint_url: str | None = None  # S3-compatible endpoint, e.g. http://127.0.0.1:9000
    region: str | None = None

    def __repr__(self) -> str:  # configs get printed (errors, Ray): never a URL's secret
        endpoint = redact(self.endpoint_url) if self.endpoint_url else None
        return f"StorageConfig(endpoint_url={endpoint!r}, region={self.region!r})"


def redact(text: str) -> str:
    """Hide credentials that may sit in URLs (scheme://user:secret@host)."""
    return re.sub(r"(\w+://)[^/@\s]+:[^/@\s]+@", r"\1***@", text)


def safe_file_name(text: str, limit: int = 64) -> str:
    """A name from user data (a class name) that is safe as one file name: letters, digits,
    `.-_` only, no leading dot, at most `limit` characters. `../x` cannot leave its folder."""
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", text).lstrip(".")[:limit]
    return name or "_"


def join(uri: str, *parts: str) -> str:
    return "/".join([uri.rstrip("/"), *(p.strip("/") for p in parts)])


def is_local(uri: str) -> bool:
    return split_protocol(uri)[0] in (None, "file", "local")


def absolute(uri: str) -> str:
    """A local path made absolute against the caller's working directory; other URIs as given.

    Every stage resolves its local URIs in the driver, before anything reaches Ray: a Ray
    worker runs in a working directory of its own, so a relative path would land there."""
    protocol, path = split_protocol(uri)
    if protocol not in (None, "file", "local"):
        return uri
    resolved = os.path.abspath(os.path.expanduser(path))
    return resolved if protocol is None else f"{protocol}://{resolved}"


class Storage:
    def __init__(self, config: StorageConfig | None = None) -> None:
        self.config = config or StorageConfig()
        self._arrow_s3: Any = None  # one pyarrow S3 client for every table this object reads

    @property
    def endpoint_url(self) -> str | None:
        return (
            self.config.endpoint_url
            or os.environ.get("AWS_ENDPOINT_URL_S3")
            or os.environ.get("AWS_ENDPOINT_URL")
        )

    @property
    def region(self) -> str | None:
        return (
            self.config.region
            or os.environ.get("AWS_REGION")
            or os.environ.get("AWS_DEFAULT_REGION")
        )

    def options(self, uri: str) -> dict[str, Any]:
        """fsspec storage options for `uri`."""
        if split_protocol(uri)[0] not in ("s3", "s3a"):
            return {}
        options: dict[str, Any] = {}
        if self.endpoint_url:
            options["endpoint_url"] = self.endpoint_url
        if self.region:
            options["client_kwargs"] = {"region_name": self.region}
        return options

    def fs(self, uri: str) -> tuple[fsspec.AbstractFileSystem, str]:
        return fsspec.core.url_to_fs(uri, **self.options(uri))

    def arrow_fs(self, uri: str) -> tuple[Any, str]:
        """(pyarrow.fs.FileSystem, path) with the same endpoint and region as fs()."""
        from pyarrow import fs as pafs

        protocol, path = split_protocol(uri)
        if protocol in ("s3", "s3a"):
            if self._arrow_s3 is None:  # a client is a connection pool: made once
                kwargs: dict[str, Any] = {}
                if self.endpoint_url:
                    parsed = urlparse(self.endpoint_url)
                    kwargs["endpoint_override"] = parsed.netloc
                    kwargs["scheme"] = parsed.scheme or "https"
                if self.region:
                    kwargs["region"] = self.region
                self._arrow_s3 = pafs.S3FileSystem(**kwargs)
            return self._arrow_s3, path
        if is_local(uri):
            return pafs.LocalFileSystem(), os.path.abspath(path)
        fs, fs_path = self.fs(uri)
        return pafs.PyFileSystem(pafs.FSSpecHandler(fs)), fs_path

    def uri_of(self, uri_like: str, path: str) -> str:
        """A path returned by fs(uri_like) (no protocol) back to a URI of the same kind."""
        protocol = split_protocol(uri_like)[0]
        return path if protocol in (None, "file", "local") else f"{protocol}://{path}"

    # -- files ----------------------------------------------------------------------------------

    def write_bytes(self, uri: str, data: bytes) -> None:
        """Atomic: a temporary name and a rename locally, one complete upload on object stores."""
        write_bytes_atomic(uri, data, self.options(uri))

    def read_bytes(self, uri: str) -> bytes:
        return read_bytes(uri, self.options(uri))

    def upload_file(self, local_path: str, uri: str) -> None:
        """A local file to `uri` without reading it into memory, as atomically as write_bytes:
        a hidden temporary and a rename locally, one (multipart) upload on object stores."""
        import shutil
        import uuid

        from model.weights.fileio import TEMPORARY_MARK

        fs, path = self.fs(uri)
        if is_local(uri):
            parent, _, name = path.rpartition("/")
            os.makedirs(parent, exist_ok=True)
            tmp = os.path.join(parent, f".{name}{TEMPORARY_MARK}{uuid.uuid4().hex}")
            shutil.copyfile(local_path, tmp)
            os.replace(tmp, path)
        else:
            fs.put_file(local_path, path)

    def exists(self, uri: str) -> bool:
        fs, path = self.fs(uri)
        return fs.exists(path)

    def list_files(self, prefix: str) -> list[tuple[str, int]]:
        """Every file under prefix, recursively: sorted [(uri, size)]; [] if there is none."""
        fs, path = self.fs(prefix)
        if not fs.exists(path):
            return []
        if fs.isfile(path):
            return [(prefix, int(fs.size(path)))]
        found = fs.find(path, detail=True)
        return sorted(
            (self.uri_of(prefix, p), int(info.get("size") or 0))
            for p, info in found.items()
            if info.get("type", "file") == "file"
        )

    def list_folder(self, folder: str) -> dict[str, int]:
        """The files directly in `folder` (not below its sub-folders), name -> size, from one
        paginated listing; {} when there is none. What a stage's resume reads instead of a
        request per unit."""
        fs, path = self.fs(folder)
        try:
            entries = fs.ls(path, detail=True, refresh=True)
        except FileNotFoundError:
            return {}
        return {entry["name"].rstrip("/").rsplit("/", 1)[-1]: int(entry.get("size") or 0)
                for entry in entries if entry.get("type", "file") == "file"}  # fmt: skip

    def glob(self, pattern: str) -> list[str]:
        """URIs matching a glob pattern (`*`, `**`, `?`, `[...]`), sorted."""
        fs, path = self.fs(pattern)
        return sorted(self.uri_of(pattern, p) for p in fs.glob(path))

    def remove_file(self, uri: str) -> None:
        fs, path = self.fs(uri)
        fs.rm_file(path)

    def remove_temporaries(self, prefix: str) -> int:
        """Remove what writers killed mid-write left under prefix (write_bytes_atomic's hidden
        temporaries); how many. Object stores have none: an upload is whole or absent."""
        fs, path = self.fs(prefix)
        is_local = "file" in fs.protocol or "local" in fs.protocol
        return remove_temporaries(path) if is_local and fs.isdir(path) else 0

    def remove_tree(self, uri: str) -> None:
        fs, path = self.fs(uri)
        if fs.exists(path):
            fs.rm(path, recursive=True)


def model_files(uri: str) -> str:
    """Where this process reads a model folder's files: an hf://org/name model fetched into
    the Hugging Face cache; any other URI made absolute."""
    from model.weights.hub import download_model, hub_repo

    return download_model(uri) if hub_repo(uri) else absolute(uri)


def model_location(uri: str) -> tuple[str, str]:
    """-> (the URI Ray workers load the model from: a Hub model as given, since each worker
    fetches it into its own node's cache, any other URI made absolute; the folder this process
    reads the model's files from, to check and fingerprint it)."""
    from model.weights.hub import hub_repo

    return (uri if hub_repo(uri) else absolute(uri)), model_files(uri)


def read_model_config(storage: Storage, files: str, what: str, hint: str) -> dict[str, Any]:
    """The config of the exported model at `files` (its config.json's "config"), in one GET;
    an error naming `what` is missing there and `hint`, what to do, when there is none."""
    try:
        return json.loads(storage.read_bytes(join(files, "config.json")))["config"]
    except FileNotFoundError:
        raise FileNotFoundError(f"no {what} at {files}: {hint}") from None


def read_json(storage: Storage, uri: str, default: Any = None) -> Any:
    """A JSON file, or `default` when there is none: one GET (no HEAD first)."""
    try:
        return json.loads(storage.read_bytes(uri))
    except FileNotFoundError:
        return default


def require_model_folders(storage: Storage, section: str, **uris: str | None) -> None:
    """Plan-time check of the exported models a config names (`key=uri`, None: not given)."""
    from model.weights.hub import hub_repo

    for key, uri in uris.items():
        if uri and hub_repo(uri) is None and not storage.exists(join(absolute(uri), "config.json")):
            raise FileNotFoundError(f"{section}.{key}={uri}: no exported model there (a folder "
                                    f"with config.json and model.safetensors)")  # fmt: skip


# What an unreachable endpoint looks like from botocore/s3fs and from pyarrow's S3 client (the
# AWS SDK over curl). Not a bare "connection refused": Ray's own connections say that too.
_UNREACHABLE = re.compile(r"Could not connect to the endpoint URL|Couldn't connect to server|"
                          r"NETWORK_CONNECTION|EndpointConnectionError|"
                          r"Connect timeout on endpoint URL")  # fmt: skip
_ENDPOINT_URL = re.compile(r"(?:Could not connect to|Connect timeout on) the endpoint URL: "
                           r"\"?(?P<url>[^\"\s]+)")  # fmt: skip


def unreachable_endpoint(error: BaseException, storage: Storage | None = None) -> str | None:
    """When `error` (or its cause, or a Ray task error's remote traceback) says the object
    store could not be reached: the endpoint it names, else the configured one; else None."""
    texts, seen = [], set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        texts.append(f"{type(error).__name__}: {error}")
        error = error.__cause__ or error.__context__
    text = "\n".join(texts)
    if not _UNREACHABLE.search(text):
        return None
    if url := _ENDPOINT_URL.search(text):
        parsed = urlparse(url.group("url"))
        return f"{parsed.scheme}://{parsed.netloc}"
    return (storage or Storage()).endpoint_url or "the AWS S3 endpoint"
