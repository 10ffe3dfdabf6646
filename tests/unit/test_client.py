"""simserver.client builds the requests the HTTP API expects (checked on the wire, via httpx.MockTransport);
its behaviour against a real server is in tests/integration/test_client.py."""

from __future__ import annotations

import io
import zipfile
from email.parser import BytesParser
from email.policy import HTTP

import httpx
import pytest

from simserver.client import Client

SEARCH_REPLY = {"domain": "my domain", "version": "v1", "results": []}


class Recorder:
    def __init__(self, reply: dict) -> None:
        self.reply = reply
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        request.read()
        self.requests.append(request)
        return httpx.Response(200, json=self.reply)


def parts(request: httpx.Request) -> list[tuple[str, str | None, bytes]]:
    """(field, file name, content) of each multipart part."""
    head = f"Content-Type: {request.headers['content-type']}\r\n\r\n".encode()
    msg = BytesParser(policy=HTTP).parsebytes(head + request.content)
    out = []
    for part in msg.iter_parts():
        field = part.get_param("name", header="content-disposition")
        content = part.get_payload(decode=True)  # a form-data part is not multipart: its bytes
        assert isinstance(field, str) and isinstance(content, bytes)
        out.append((field, part.get_filename(), content))
    return out


def client_with(reply: dict, **kwargs) -> tuple[Client, Recorder]:
    rec = Recorder(reply)
    return Client("http://simserver.test/prefix/", transport=httpx.MockTransport(rec), **kwargs), rec


def test_search_request_path_fields_file_name_and_key(tmp_path):
    image = tmp_path / "query.png"
    image.write_bytes(b"PNG-ish bytes")
    client, rec = client_with(SEARCH_REPLY, api_key="s3cret")
    reply = client.domain("my domain").search(image, top_k=7)
    assert reply.domain == "my domain"
    (req,) = rec.requests
    assert req.method == "POST" and str(req.url) == "http://simserver.test/prefix/my%20domain/search"
    assert req.headers["authorization"] == "Bearer s3cret"
    assert int(req.headers["content-length"]) == len(req.content)  # the server refuses chunked (411)
    assert parts(req) == [("top_k", None, b"7"), ("image", "query.png", b"PNG-ish bytes")]

    client.domain("d").search(b"raw")  # no top_k: left to the server; bytes get a name
    assert parts(rec.requests[-1]) == [("image", "image", b"raw")]
    assert "authorization" not in client_with(SEARCH_REPLY)[0]._http.headers


def test_relevance_zips_a_folder_and_names_every_image(tmp_path):
    site = tmp_path / "site"
    (site / "sub").mkdir(parents=True)
    (site / "a.jpg").write_bytes(b"A")
    (site / "sub" / "b.jpg").write_bytes(b"B")
    reply = {
        "domain": "d", "version": "v", "relevant": False, "fraction": 0.0, "target": "t",
        "image_threshold": 0.1, "site_threshold": 0.25, "images": [], "skipped": [],
    }  # fmt: skip
    client, rec = client_with(reply)
    client.domain("d").relevance(
        archive=site, images=[b"x", ("named.png", io.BytesIO(b"y"))], nearest=0, site_threshold=0.5
    )
    got = parts(rec.requests[0])
    fields = {(f, n): c for f, n, c in got}
    assert fields[("nearest", None)] == b"0" and fields[("site_threshold", None)] == b"0.5"
    assert ("image_threshold", None) not in fields
    with zipfile.ZipFile(io.BytesIO(fields[("archive", "site.zip")])) as zf:
        assert sorted(zf.namelist()) == ["a.jpg", "sub/b.jpg"]
    assert [(n, c) for f, n, c in got if f == "images"] == [("image-0", b"x"), ("named.png", b"y")]


def test_train_submit_and_polls(tmp_path):
    archive = tmp_path / "set.zip"
    archive.write_bytes(b"PK zip bytes")
    client, rec = client_with({"task_id": "abc", "status": "in_progress"})
    assert client.domain("d").submit_training(archive, mode="finetune") == "abc"
    assert parts(rec.requests[0]) == [("mode", None, b"finetune"), ("archive", "set.zip", b"PK zip bytes")]
    assert str(rec.requests[0].url).endswith("/prefix/d/train/submit")
    rec.reply = {
        "task_id": "abc",
        "status": "completed",
        "created_at": "2026-01-01T00:00:00",
        "executed_at": None,
    }
    assert client.domain("d").training_status("abc").done
    assert str(rec.requests[1].url) == "http://simserver.test/prefix/d/train/status?task_id=abc"


def test_missing_file_and_text_mode_are_refused_before_sending(tmp_path):
    client, rec = client_with(SEARCH_REPLY)
    with pytest.raises(FileNotFoundError):
        client.domain("d").search(tmp_path / "nope.png")
    with pytest.raises(TypeError), (tmp_path / "t.txt").open("w+") as text:
        client.domain("d").search(text)
    assert rec.requests == []
