"""Typed Python client for the image-similarity server's HTTP API.

::

    from simserver.client import Client

    with Client("http://127.0.0.1:3000", api_key=None) as client:
        food = client.domain("food")
        reply = food.search("demo/food/drink/google.png", top_k=5)   # -> SearchReply
        for hit in reply.results:
            print(hit.score, hit.label, hit.name)
        picture = food.image(reply.results[0].id, version=reply.version)  # -> StoredImage
        trained = client.domain("scratch").train("set.zip", progress=lambda s: print(s.status))

Every reply is the pydantic model the server itself answers with (:mod:`simserver.schemas`), so
fields are named as in the JSON (``top_k``, ``results``, ``encoder``, ``version``, ...). Every
refusal raises :class:`SimserverError` (a subclass per status family, e.g. :class:`NotFound`)
carrying the server's ``error`` text; a server that cannot be reached raises
:class:`ConnectionFailed`.

Images and archives can be given as a path (``str`` / :class:`os.PathLike`), ``bytes``, a binary
file object, or a ``(file_name, bytes | file)`` pair; the file name is sent with the upload (the
server names skipped files and relevance images by it). A file object is sent whole, from its
start. An archive can also be a folder's path: it is zipped on the fly.

Why not ``bentoml.SyncHTTPClient``: it has no path parameters, so it posts to the literal
``/{domain}/search`` and gets ``404 unknown domain '{domain}'``.
"""

from __future__ import annotations

import io
import json
import logging
import os
import tempfile
import time
import zipfile
from collections.abc import Callable, Iterable
from contextlib import ExitStack
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import IO, Any, Literal, TypedDict, TypeVar, Unpack
from urllib.parse import quote, unquote

import httpx
from pydantic import BaseModel, TypeAdapter, ValidationError

from simserver.finetune import TrainingMode
from simserver.schemas import (
    DeleteReply,
    DomainInfo,
    DuplicateCalibration,
    DuplicateCheckReply,
    DuplicateGroupsReply,
    EncoderStats,
    GroupPairsReply,
    ItemPage,
    ItemRecord,
    ItemsReply,
    MatchReply,
    RelevanceReply,
    SearchReply,
    SimilarityReply,
    TrainProgress,
    TrainReply,
    VersionInfo,
)

__all__ = [
    "BadRequest",
    "Client",
    "Conflict",
    "ConnectionFailed",
    "DomainClient",
    "FileInput",
    "Forbidden",
    "NotFound",
    "ProtocolError",
    "Refused",
    "ServerFault",
    "SimserverError",
    "StoredImage",
    "TaskStatus",
    "TooLarge",
    "TrainingTimeout",
    "Unauthorized",
    "error_for",
    "zip_folder",
]

logger = logging.getLogger(__name__)

DEFAULT_URL = "http://127.0.0.1:3000"

FileInput = (
    str | os.PathLike[str] | bytes | bytearray | memoryview | IO[bytes] | tuple[str, bytes | IO[bytes]]
)
"""An image or archive: a path, raw bytes, a binary file object, or ``(file_name, bytes | file)``."""

Metric = Literal["cosine", "l1", "l2"]
M = TypeVar("M", bound=BaseModel)


# -- exceptions --------------------------------------------------------------------------------------
class SimserverError(Exception):
    """Anything the client raises. ``status`` is the HTTP status (None when there was no answer),
    ``error`` the server's ``error`` text (or what went wrong on the way)."""

    def __init__(
        self, status: int | None, error: str, *, method: str = "", url: str = "", task_id: str | None = None
    ) -> None:
        self.status = status
        self.error = error
        self.method = method
        self.url = url
        #: the training task this error belongs to (``DomainClient.train`` and friends)
        self.task_id = task_id
        where = f" ({method} {url})" if method else ""
        super().__init__(f"{status} {error}{where}" if status is not None else f"{error}{where}")


class Refused(SimserverError):
    """4xx: the server refused the request as sent."""


class BadRequest(Refused):
    """400: bad input (a corrupt image, ``top_k`` out of range, an invalid archive, ...)."""


class Unauthorized(Refused):
    """401: no API key sent (``Client(api_key=...)``)."""


class Forbidden(Refused):
    """403: the API key was not accepted."""


class NotFound(Refused):
    """404: unknown domain, item or task."""


class Conflict(Refused):
    """409: e.g. the domain has no version yet, is already training, or ``version`` is no longer served."""


class TooLarge(Refused):
    """413: the upload, an image or an archive exceeds the domain's limits."""


class ServerFault(SimserverError):
    """5xx (or any other unexpected status): the server's fault, or not ready (503)."""


class ConnectionFailed(SimserverError):
    """The server could not be reached or did not answer in time (``status`` is None)."""


class ProtocolError(SimserverError):
    """The server answered, but not with what the API promises (not JSON, wrong shape)."""


class TrainingTimeout(SimserverError, TimeoutError):
    """``DomainClient.train`` gave up waiting; the task goes on on the server (see ``task_id``)."""


_BY_STATUS: dict[int, type[Refused]] = {
    400: BadRequest,
    401: Unauthorized,
    403: Forbidden,
    404: NotFound,
    409: Conflict,
    413: TooLarge,
}


def error_for(status: int, error: str, *, method: str = "", url: str = "") -> SimserverError:
    """The exception for an HTTP error status."""
    if status in _BY_STATUS:
        cls: type[SimserverError] = _BY_STATUS[status]
    elif 400 <= status < 500:
        cls = Refused
    else:
        cls = ServerFault
    return cls(status, error, method=method, url=url)


def _error_text(response: httpx.Response) -> str:
    """The server's ``error``; for a body that is not the API's error JSON (a proxy's page), its start."""
    try:
        body = response.json()
    except ValueError:
        body = None
    if isinstance(body, dict) and isinstance(body.get("error"), str):
        return body["error"]
    if isinstance(body, list) and len(body) == 1 and isinstance(body[0], dict) and "error" in body[0]:
        return str(body[0]["error"])
    text = response.text.strip()
    return text[:500] if text else (response.reason_phrase or "no error message")


# -- reply types that are the client's own -------------------------------------------------------------
class TaskStatus(BaseModel):
    """``GET /{domain}/train/status``: where a training task is."""

    task_id: str
    status: Literal["pending", "in_progress", "completed", "failed", "canceled"]
    created_at: datetime | None = None
    executed_at: datetime | None = None

    @property
    def done(self) -> bool:
        """True once the task finished, successfully or not."""
        return self.status in ("completed", "failed", "canceled")


@dataclass(frozen=True)
class StoredImage:
    """``GET /{domain}/images/{id}``: the stored image of a search result."""

    data: bytes
    media_type: str
    name: str | None
    label: str | None
    version: str | None

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the image's bytes to ``path``; returns it."""
        out = Path(path)
        out.write_bytes(self.data)
        return out


_DOMAIN_LIST = TypeAdapter(list[DomainInfo])
_VERSION_LIST = TypeAdapter(list[VersionInfo])


def _filter_text(filter: dict | None) -> str | None:
    return None if filter is None else json.dumps(filter)


def _id_path(item_id: str) -> str:
    """An item id in a URL path: ids may hold '/', kept; everything else unsafe is quoted."""
    return quote(str(item_id), safe="/")


# -- uploads -------------------------------------------------------------------------------------------
def _file_part(
    value: FileInput, default_name: str, stack: ExitStack, zip_dirs: bool = False
) -> tuple[str, bytes | IO[bytes]]:
    """``(file_name, content)`` for httpx; a path is opened (streamed with a known length) and closed
    by ``stack``; with ``zip_dirs``, a folder is zipped first (archives)."""
    if isinstance(value, tuple):
        name, content = value
        if isinstance(content, bytearray | memoryview):
            content = bytes(content)
        return str(name), _sized(content)
    if isinstance(value, str | os.PathLike):
        path = Path(value)
        if zip_dirs and path.is_dir():
            return f"{path.resolve().name or 'archive'}.zip", stack.enter_context(zip_folder(path))
        if not path.is_file():
            raise FileNotFoundError(f"no such file: {path}")
        return path.name, stack.enter_context(path.open("rb"))
    if isinstance(value, bytes | bytearray | memoryview):
        return default_name, bytes(value)
    if hasattr(value, "read"):
        file_name = getattr(value, "name", None)
        name = Path(file_name).name if isinstance(file_name, str) and file_name else default_name
        return name, _sized(value)
    raise TypeError(f"expected a path, bytes or a binary file object, not {type(value).__name__}")


def zip_folder(folder: str | os.PathLike[str]) -> IO[bytes]:
    """A zip of every file under ``folder`` (paths relative to it), in a temporary file: what a
    training or relevance ``archive`` can be made from. ``DomainClient`` does this for a folder path."""
    root = Path(folder)
    out = tempfile.TemporaryFile()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as zf:
        for path in sorted(root.rglob("*")):
            if path.is_file() and not path.is_symlink():
                zf.write(path, path.relative_to(root).as_posix())
    out.seek(0)
    return out


def _sized(content: bytes | IO[bytes]) -> bytes | IO[bytes]:
    """httpx sends a file object of unknown length chunked, which the server refuses (411): read those."""
    if isinstance(content, bytes):
        return content
    if isinstance(content, io.TextIOBase):
        raise TypeError("open the file in binary mode ('rb')")
    try:
        seekable = content.seekable()
    except (AttributeError, ValueError):
        seekable = False
    return content if seekable else content.read()


def _form(**fields: object) -> dict[str, str]:
    """Form fields that were given, as strings (None means: leave it to the server)."""
    return {k: str(v) for k, v in fields.items() if v is not None}


# -- the client ----------------------------------------------------------------------------------------
class Client:
    """A connection to one image-similarity server.

    :param url: the server's base URL, e.g. ``http://127.0.0.1:3000`` (a path prefix is kept).
    :param api_key: sent as ``Authorization: Bearer <key>`` (needed for training when the server
        has ``API_KEY`` set, and for every route with ``SEARCH_REQUIRES_KEY``).
    :param timeout: seconds to wait for one answer (connecting: at most 10 s); a training is
        waited for separately (``DomainClient.train(timeout=...)``).
    :param transport: an httpx transport (tests: ``httpx.MockTransport``).

    Thread-safe; use it as a context manager or call :meth:`close`.
    """

    def __init__(
        self,
        url: str = DEFAULT_URL,
        api_key: str | None = None,
        timeout: float = 120.0,
        *,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.url = url.rstrip("/")
        headers = {"Accept": "application/json"}
        if api_key:
            headers["Authorization"] = f"Bearer {api_key}"
        self._http = httpx.Client(
            base_url=self.url + "/",
            headers=headers,
            timeout=httpx.Timeout(timeout, connect=min(10.0, timeout)),
            transport=transport,
        )

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def __repr__(self) -> str:
        return f"Client({self.url!r})"

    # -- plumbing ------------------------------------------------------------------------------------
    def _send(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        """Send one request; return a 2xx response, raise the mapped :class:`SimserverError` otherwise."""
        url = f"{self.url}/{path}"
        logger.debug("%s %s", method, url)
        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.TimeoutException as exc:
            raise ConnectionFailed(
                None, f"no answer from {self.url} in time ({type(exc).__name__})", method=method, url=url
            ) from exc
        except httpx.TransportError as exc:
            raise ConnectionFailed(
                None, f"cannot reach {self.url}: {exc or type(exc).__name__}", method=method, url=url
            ) from exc
        logger.debug("%s %s -> %d", method, url, response.status_code)
        if not response.is_success:
            raise error_for(response.status_code, _error_text(response), method=method, url=url)
        return response

    def _json(self, method: str, path: str, **kwargs: Any) -> Any:
        response = self._send(method, path, **kwargs)
        try:
            return response.json()
        except ValueError as exc:
            raise ProtocolError(
                response.status_code,
                f"reply is not JSON: {response.text[:200]!r}",
                method=method,
                url=f"{self.url}/{path}",
            ) from exc

    def _model(self, model: type[M], method: str, path: str, **kwargs: Any) -> M:
        body = self._json(method, path, **kwargs)
        try:
            return model.model_validate(body)
        except ValidationError as exc:
            raise ProtocolError(
                200, f"reply is not a {model.__name__}: {exc}", method=method, url=f"{self.url}/{path}"
            ) from exc

    def _upload(
        self,
        model: type[M],
        path: str,
        files: Iterable[tuple[str, FileInput, str, bool]],
        data: dict[str, str],
    ) -> M:
        """POST multipart ``files`` (field, input, default file name, zip a folder?) and ``data``;
        parse the reply as ``model``."""
        with ExitStack() as stack:
            parts = [(field, _file_part(value, name, stack, zips)) for field, value, name, zips in files]
            return self._model(model, "POST", path, files=parts, data=data)

    # -- routes ----------------------------------------------------------------------------------------
    def domain(self, name: str) -> DomainClient:
        """The routes of one domain (no request is made: an unknown name fails on first use, 404)."""
        return DomainClient(self, name)

    def domains(self) -> list[DomainInfo]:
        """``GET /domains``: each domain's version, item count, encoder, metric, labels, evaluation."""
        body = self._json("GET", "domains")
        try:
            return _DOMAIN_LIST.validate_python(body)
        except ValidationError as exc:
            raise ProtocolError(200, f"reply is not a list of DomainInfo: {exc}", url=self.url) from exc

    def stats(self) -> EncoderStats:
        """``GET /stats``: the encoder's adaptive batching since the server started."""
        return self._model(EncoderStats, "GET", "stats")

    def similarity(
        self, image_a: FileInput, image_b: FileInput, metric: Metric | None = None
    ) -> SimilarityReply:
        """``POST /similarity``: distance and score of two images with the built-in encoder
        (``metric``: cosine, l1 or l2; default cosine)."""
        return self._upload(
            SimilarityReply,
            "similarity",
            [("image_a", image_a, "image_a", False), ("image_b", image_b, "image_b", False)],
            _form(metric=metric),
        )

    def ready(self) -> bool:
        """``GET /readyz``: True when every service is up; False while starting (503) or unreachable."""
        return self._probe("readyz")

    def live(self) -> bool:
        """``GET /livez``: True when the server process answers."""
        return self._probe("livez")

    def _probe(self, path: str) -> bool:
        try:
            self._send("GET", path)
            return True
        except (ConnectionFailed, ServerFault):
            return False

    def wait_ready(self, timeout: float = 180.0, interval: float = 0.5) -> float:
        """Poll ``/readyz`` until it answers 200; returns the seconds waited.
        Raises :class:`ConnectionFailed` if it does not within ``timeout`` s."""
        start = time.monotonic()
        while not self.ready():
            if time.monotonic() - start > timeout:
                raise ConnectionFailed(
                    None, f"{self.url} not ready after {timeout:g} s", url=f"{self.url}/readyz"
                )
            time.sleep(interval)
        return time.monotonic() - start


class DomainClient:
    """The routes under ``/{domain}/`` (from :meth:`Client.domain`)."""

    def __init__(self, client: Client, name: str) -> None:
        self.client = client
        self.name = name
        self._prefix = quote(name, safe="")

    def __repr__(self) -> str:
        return f"DomainClient({self.client.url!r}, {self.name!r})"

    def info(self) -> DomainInfo:
        """This domain's entry of ``GET /domains``; :class:`NotFound` if the server has no such domain."""
        for d in self.client.domains():
            if d.name == self.name:
                return d
        raise NotFound(404, f"unknown domain {self.name!r}", method="GET", url=f"{self.client.url}/domains")

    def search(self, image: FileInput, top_k: int | None = None, filter: dict | None = None) -> SearchReply:
        """``POST /{domain}/search``: the most similar indexed images, best first
        (``top_k``: 1..100, default the domain's; ``filter``: e.g. ``{"label": "dress"}``)."""
        return self.client._upload(
            SearchReply,
            f"{self._prefix}/search",
            [("image", image, "image", False)],
            _form(top_k=top_k, filter=_filter_text(filter)),
        )

    def similar(self, item_id: str, top_k: int | None = None, filter: dict | None = None) -> SearchReply:
        """``GET /{domain}/similar``: more like a stored item (its stored vector), itself excluded."""
        params = _form(id=item_id, top_k=top_k, filter=_filter_text(filter))
        return self.client._model(SearchReply, "GET", f"{self._prefix}/similar", params=params)

    # -- the catalog ------------------------------------------------------------------------------
    def add_items(
        self,
        archive: FileInput | None = None,
        images: Iterable[FileInput] = (),
        label: str | None = None,
        ids: Iterable[str] | None = None,
        on_duplicate: Literal["allow", "skip", "reject"] | None = None,
    ) -> ItemsReply:
        """``POST /{domain}/items``: add or replace items by id, without a training: a zip in the
        training layout (or a folder, zipped here) and/or ``images`` files that all take ``label``
        (``ids``: one per file; default ``<label>/<file name>``). ``on_duplicate``: allow (default),
        skip or reject (a :class:`Conflict`) items that duplicate existing ones."""
        files: list[tuple[str, FileInput, str, bool]] = []
        if archive is not None:
            files.append(("archive", archive, "items.zip", True))
        files += [("images", img, f"image-{i}", False) for i, img in enumerate(images)]
        data: dict[str, Any] = _form(label=label, on_duplicate=on_duplicate)
        if ids is not None:
            data["ids"] = [str(i) for i in ids]
        return self.client._upload(ItemsReply, f"{self._prefix}/items", files, data)

    def list_items(self, label: str | None = None, offset: int = 0, limit: int = 100) -> ItemPage:
        """``GET /{domain}/items``: one page of the catalog."""
        params = _form(label=label, offset=offset, limit=limit)
        return self.client._model(ItemPage, "GET", f"{self._prefix}/items", params=params)

    def item(self, item_id: str) -> ItemRecord:
        """``GET /{domain}/items/{id}``; :class:`NotFound` if unknown."""
        return self.client._model(ItemRecord, "GET", f"{self._prefix}/items/{_id_path(item_id)}")

    def delete_item(self, item_id: str) -> DeleteReply:
        """``DELETE /{domain}/items/{id}``; :class:`NotFound` if unknown."""
        return self.client._model(DeleteReply, "DELETE", f"{self._prefix}/items/{_id_path(item_id)}")

    def delete_items(self, ids: Iterable[str] | None = None, filter: dict | None = None) -> DeleteReply:
        """``POST /{domain}/items/delete``: by ``ids`` or by ``filter`` (one of them)."""
        body: dict[str, Any] = {"ids": list(ids)} if ids is not None else {"filter": filter}
        return self.client._model(DeleteReply, "POST", f"{self._prefix}/items/delete", json=body)

    def versions(self) -> list[VersionInfo]:
        """``GET /{domain}/versions``, newest first."""
        body = self.client._json("GET", f"{self._prefix}/versions")
        return _VERSION_LIST.validate_python(body)

    def activate(self, version: str) -> VersionInfo:
        """``POST /{domain}/versions/{version}/activate``: serve that version's catalog again."""
        return self.client._model(
            VersionInfo, "POST", f"{self._prefix}/versions/{quote(version, safe='')}/activate"
        )

    def relevance(
        self,
        archive: FileInput | None = None,
        images: Iterable[FileInput] = (),
        image_threshold: float | None = None,
        site_threshold: float | None = None,
        nearest: int | None = None,
    ) -> RelevanceReply:
        """``POST /{domain}/relevance``: does a supplier site (its images as a zip ``archive``, or a
        folder zipped here, and/or as ``images`` files) sell the domain's ``target_label``?
        Thresholds and ``nearest`` (neighbours listed per image) default to the server's."""
        files: list[tuple[str, FileInput, str, bool]] = []
        if archive is not None:
            files.append(("archive", archive, "site.zip", True))
        files += [("images", img, f"image-{i}", False) for i, img in enumerate(images)]
        return self.client._upload(
            RelevanceReply,
            f"{self._prefix}/relevance",
            files,
            _form(image_threshold=image_threshold, site_threshold=site_threshold, nearest=nearest),
        )

    def image(self, item_id: str, version: str | None = None) -> StoredImage:
        """``GET /{domain}/images/{id}``: an item's stored image. With ``version`` (the search's),
        :class:`Conflict` if that version is no longer served."""
        params = _form(version=version)
        r = self.client._send("GET", f"{self._prefix}/images/{_id_path(item_id)}", params=params)
        headers = r.headers
        return StoredImage(
            data=r.content,
            media_type=headers.get("content-type", "application/octet-stream"),
            name=unquote(headers["x-item-name"]) if "x-item-name" in headers else None,
            label=unquote(headers["x-item-label"]) if "x-item-label" in headers else None,
            version=headers.get("x-index-version"),
        )

    # -- training (a BentoML task) ----------------------------------------------------------------
    def submit_training(
        self, archive: FileInput, mode: TrainingMode | None = None, catalog: str | None = None
    ) -> str:
        """``POST /{domain}/train/submit``: start training on a zip of ``<category>/<image>``
        (+ optional ``metadata.csv``), or a folder of them (zipped here); returns the task id at once.
        ``mode``: auto, finetune or pretrained (default: the domain's)."""
        with ExitStack() as stack:
            part = _file_part(archive, "archive.zip", stack, zip_dirs=True)
            body = self.client._json(
                "POST",
                f"{self._prefix}/train/submit",
                files=[("archive", part)],
                data=_form(mode=mode, catalog=catalog),
            )
        if not isinstance(body, dict) or not isinstance(body.get("task_id"), str):
            raise ProtocolError(200, f"submit reply has no task_id: {str(body)[:200]}", url=self.client.url)
        logger.info("domain %s: training task %s submitted", self.name, body["task_id"])
        return body["task_id"]

    def training_status(self, task_id: str) -> TaskStatus:
        """``GET /{domain}/train/status``."""
        return self._task(TaskStatus, "status", task_id)

    def training_progress(self, task_id: str) -> TrainProgress:
        """``GET /{domain}/train/progress``: stage, images done / total, seconds, ETA (any replica
        answers). :class:`NotFound` for a task unknown to the store (also for a moment right after
        the submit, before the task has started)."""
        return self._task(TrainProgress, "progress", task_id)

    def training_result(self, task_id: str) -> TrainReply:
        """``GET /{domain}/train/get``: the result of a completed task. A failed task raises its
        error (e.g. :class:`BadRequest` for an invalid archive); one still running raises
        :class:`BadRequest` ("not completed yet")."""
        return self._task(TrainReply, "get", task_id)

    def _task(self, model: type[M], route: str, task_id: str, task: str = "train") -> M:
        """``GET /{domain}/<task>/<route>?task_id=``; an error carries the task id."""
        try:
            return self.client._model(
                model, "GET", f"{self._prefix}/{task}/{route}", params={"task_id": task_id}
            )
        except SimserverError as exc:
            exc.task_id = task_id
            raise

    def train(
        self,
        archive: FileInput,
        mode: TrainingMode | None = None,
        progress: Callable[[TaskStatus], object] | None = None,
        poll: float = 0.5,
        timeout: float | None = 3600.0,
        catalog: str | None = None,
        stages: Callable[[TrainProgress], object] | None = None,
    ) -> TrainReply:
        """Submit a training, wait for it and return its result (the domain then serves the new
        version). ``progress(status)`` is called after every status poll (every ``poll`` s), and
        ``stages(progress)`` with the training's progress (:meth:`training_progress`) then. A
        failed training raises its error (with ``task_id`` set); after ``timeout`` s (None: no
        limit) :class:`TrainingTimeout`, while the task goes on on the server."""
        task_id = self.submit_training(archive, mode, catalog)
        start = time.monotonic()
        while True:
            status = self.training_status(task_id)
            logger.debug("domain %s: task %s %s", self.name, task_id, status.status)
            if progress is not None:
                progress(status)
            if stages is not None:
                try:
                    stages(self.training_progress(task_id))
                except NotFound:  # not started yet: no record
                    pass
            if status.done:
                break
            if timeout is not None and time.monotonic() - start > timeout:
                raise TrainingTimeout(
                    None,
                    f"training {task_id} of {self.name!r} still {status.status} after {timeout:g} s",
                    task_id=task_id,
                )
            time.sleep(poll)
        if status.status == "canceled":
            raise SimserverError(None, f"training {task_id} of {self.name!r} was canceled", task_id=task_id)
        result = self.training_result(task_id)  # a failed task raises its error here
        logger.info("domain %s: task %s indexed version %s", self.name, task_id, result.version)
        return result

    # -- image + text (domains with text configured) ----------------------------------------------
    def search_text(
        self,
        text: str | None = None,
        image: FileInput | None = None,
        top_k: int | None = None,
        filter: dict | None = None,
        weights: dict[str, float] | None = None,
        fusion: str | None = None,
    ) -> SearchReply:
        """``POST /{domain}/search`` with a ``text`` query, alone or with an ``image`` (fused by
        ``weights`` ``{"image": .., "text": ..}`` and ``fusion``: ``weighted`` or ``rrf``); each
        hit's ``scores`` holds the modalities' own scores."""
        files = [("image", image, "image", False)] if image is not None else []
        return self.client._upload(
            SearchReply,
            f"{self._prefix}/search",
            files,
            _form(
                text=text,
                top_k=top_k,
                filter=_filter_text(filter),
                weights=None if weights is None else json.dumps(weights),
                fusion=fusion,
            ),
        )

    def match(
        self,
        id: str | None = None,
        image: FileInput | None = None,
        text: str | None = None,
        group: str | None = None,
        weights: dict[str, float] | None = None,
        fusion: str | None = None,
        threshold: float | None = None,
    ) -> MatchReply:
        """``POST /{domain}/match``: the best match in each other group (the domain's
        ``text.group`` column) for a stored item (``id``) or an ``image`` and/or a ``text``."""
        files = [("image", image, "image", False)] if image is not None else []
        return self.client._upload(
            MatchReply,
            f"{self._prefix}/match",
            files,
            _form(
                id=id,
                text=text,
                group=group,
                weights=None if weights is None else json.dumps(weights),
                fusion=fusion,
                threshold=threshold,
            ),
        )

    def match_groups(
        self,
        group: str,
        against: str,
        weights: dict[str, float] | None = None,
        fusion: str | None = None,
        threshold: float | None = None,
        *,
        task: bool = False,
        poll: float = 0.5,
        timeout: float | None = 3600.0,
    ) -> GroupPairsReply:
        """``POST /{domain}/match/groups``: every item of ``group`` with its best match in ``against``;
        synchronous (small catalogs), or with ``task`` submitted as a task for the whole catalog,
        waited for (``/status`` every ``poll`` s, :class:`TrainingTimeout` after ``timeout`` s)."""
        options = MatchGroupsOptions(weights=weights, fusion=fusion, threshold=threshold)
        if task:
            task_id = self.submit_match_groups(group, against, **options)
            self._wait(self.match_groups_status, task_id, "match groups", poll, timeout)
            return self.match_groups_result(task_id)
        body = _match_groups_body(group, against, options)
        return self.client._model(GroupPairsReply, "POST", f"{self._prefix}/match/groups", json=body)

    def submit_match_groups(self, group: str, against: str, **options: Unpack[MatchGroupsOptions]) -> str:
        """``POST /{domain}/match/groups/submit``: start matching ``group`` against ``against`` as a
        task (options as :meth:`match_groups`'); returns the task id."""
        body = _match_groups_body(group, against, options)
        return self._submitted(self.client._json("POST", f"{self._prefix}/match/groups/submit", json=body))

    def match_groups_status(self, task_id: str) -> TaskStatus:
        """``GET /{domain}/match/groups/status``."""
        return self._task(TaskStatus, "status", task_id, "match/groups")

    def match_groups_result(self, task_id: str) -> GroupPairsReply:
        """``GET /{domain}/match/groups/get``: a failed task raises its error (e.g. an unknown group)."""
        return self._task(GroupPairsReply, "get", task_id, "match/groups")

    def _submitted(self, body: Any) -> str:
        if not isinstance(body, dict) or not isinstance(body.get("task_id"), str):
            raise ProtocolError(200, f"submit reply has no task_id: {str(body)[:200]}", url=self.client.url)
        return body["task_id"]

    @staticmethod
    def _wait(
        status: Callable[[str], TaskStatus], task_id: str, what: str, poll: float, timeout: float | None
    ) -> None:
        start = time.monotonic()
        while not status(task_id).done:
            if timeout is not None and time.monotonic() - start > timeout:
                raise TrainingTimeout(None, f"{what} {task_id} still running", task_id=task_id)
            time.sleep(poll)

    # -- duplicates ---------------------------------------------------------------------------------
    def check_duplicates(
        self, images: Iterable[FileInput] = (), archive: FileInput | None = None
    ) -> DuplicateCheckReply:
        """``POST /{domain}/duplicates/check``: is each image a copy of a catalog item?"""
        files: list[tuple[str, FileInput, str, bool]] = []
        if archive is not None:
            files.append(("archive", archive, "images.zip", True))
        files += [("images", img, f"image-{i}", False) for i, img in enumerate(images)]
        return self.client._upload(DuplicateCheckReply, f"{self._prefix}/duplicates/check", files, {})

    def submit_duplicates(self) -> str:
        """``POST /{domain}/duplicates/submit``: start the whole-catalog scan; returns the task id."""
        return self._submitted(self.client._json("POST", f"{self._prefix}/duplicates/submit", json={}))

    def duplicates_status(self, task_id: str) -> TaskStatus:
        return self._task(TaskStatus, "status", task_id, "duplicates")

    def duplicates_result(self, task_id: str) -> DuplicateGroupsReply:
        return self._task(DuplicateGroupsReply, "get", task_id, "duplicates")

    def find_duplicates(self, poll: float = 0.5, timeout: float | None = 3600.0) -> DuplicateGroupsReply:
        """Submit the whole-catalog scan, wait for it, return its groups and ``to_remove``."""
        task_id = self.submit_duplicates()
        self._wait(self.duplicates_status, task_id, "duplicates scan", poll, timeout)
        return self.duplicates_result(task_id)

    def calibrate_duplicates(self) -> DuplicateCalibration:
        """``POST /{domain}/duplicates/calibrate``: calibrate on the served catalog now."""
        return self.client._model(
            DuplicateCalibration, "POST", f"{self._prefix}/duplicates/calibrate", json={}
        )


class MatchGroupsOptions(TypedDict, total=False):
    """The optional fields of a match-groups request (as ``POST /{domain}/match``'s)."""

    weights: dict[str, float] | None
    fusion: str | None
    threshold: float | None


def _match_groups_body(group: str, against: str, options: MatchGroupsOptions) -> dict[str, Any]:
    body: dict[str, Any] = {"group": group, "against": against}
    body.update({k: v for k, v in options.items() if v is not None})
    return body
