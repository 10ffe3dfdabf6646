"""simserver.client (and its CLI commands) against a real `bentoml serve`, as a new user would use it."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import zipfile

import pytest

from simserver.client import (
    BadRequest,
    Client,
    Conflict,
    ConnectionFailed,
    NotFound,
    SimserverError,
    StoredImage,
    TaskStatus,
)
from simserver.schemas import (
    DomainInfo,
    EncoderStats,
    RelevanceReply,
    SearchReply,
    SimilarityReply,
    TrainReply,
)
from tests.integration.conftest import DEMO, ROOT, free_port

DRESS = DEMO / "fashion/dress/google.png"
ALMONDS = DEMO / "almonds-suppliers"


@pytest.fixture(scope="module")
def client(server):
    with Client(server.url, timeout=60) as c:
        yield c


def test_domains_stats_and_probes(client):
    assert client.ready() and client.live()
    domains = {d.name: d for d in client.domains()}
    assert {"fashion", "food", "almonds-suppliers", "scratch"} <= set(domains)
    fashion = domains["fashion"]
    assert isinstance(fashion, DomainInfo) and fashion.version and fashion.count == 141
    assert fashion.encoder == "builtin" and fashion.metric == "cosine" and fashion.top_k == 5
    assert client.domain("food").info().count == domains["food"].count
    assert isinstance(client.stats(), EncoderStats)


def test_search_inputs_and_stored_image(client):
    fashion = client.domain("fashion")
    reply = fashion.search(DRESS, top_k=3)  # a Path
    assert isinstance(reply, SearchReply) and reply.domain == "fashion" and reply.version
    names = [h.name for h in reply.results]
    assert len(names) == 3 and names[0] == "dress/google.png" and "dress/twitter.png" in names
    top = reply.results[0]
    assert top.label == "dress" and top.score > 0.999 and abs(top.distance) < 1e-3
    assert len(fashion.search(str(DRESS)).results) == 5  # the domain's default top_k
    # bytes, a file object and a named pair find the same thing
    with DRESS.open("rb") as f:
        for image in (DRESS.read_bytes(), f, ("q.png", DRESS.read_bytes())):
            assert fashion.search(image, top_k=1).results[0].id == top.id

    stored = fashion.image(top.id, version=reply.version)
    assert isinstance(stored, StoredImage)
    assert stored.data == DRESS.read_bytes() and stored.media_type == "image/png"
    assert (stored.name, stored.label, stored.version) == ("dress/google.png", "dress", reply.version)


def test_similarity(client):
    same = client.similarity(DRESS, DRESS.read_bytes())
    assert isinstance(same, SimilarityReply) and same.metric == "cosine" and same.score > 0.999
    other = client.similarity(DRESS, DEMO / "fashion/dress/twitter.png", metric="l2")
    assert other.metric == "l2" and other.distance > 0.01 and other.score < same.score


def test_relevance_with_a_folder_and_files(client, tmp_path):
    site = tmp_path / "site"
    site.mkdir()
    peanuts = sorted((ALMONDS / "peanuts").iterdir())[:2]
    others = sorted((ALMONDS / "random").iterdir())[:2]
    for p in peanuts + others:
        (site / f"{p.parent.name}-{p.name}").write_bytes(p.read_bytes())
    nuts = client.domain("almonds-suppliers")
    reply = nuts.relevance(archive=site, nearest=2)  # a folder: zipped by the client
    assert (
        isinstance(reply, RelevanceReply)
        and reply.target == "peanuts"
        and reply.domain == "almonds-suppliers"
    )
    by_name = {i.name: i for i in reply.images}
    assert set(by_name) == {p.name for p in site.iterdir()}
    assert all(len(i.nearest) == 2 for i in reply.images)
    assert all(by_name[f"peanuts-{p.name}"].similar for p in peanuts), reply
    assert reply.fraction >= 0.5 and reply.relevant

    files = nuts.relevance(images=[("a.png", others[0].read_bytes()), others[1]], site_threshold=1)
    assert [i.name for i in files.images] == ["a.png", others[1].name]
    assert files.site_threshold == 1 and files.relevant is False and files.skipped == []


def test_errors_carry_the_servers_message(client, server):
    with pytest.raises(NotFound) as exc:
        client.domain("nope").search(DRESS)
    assert exc.value.status == 404 and "unknown domain 'nope'" in exc.value.error
    assert str(exc.value).startswith("404 unknown domain 'nope'")
    with pytest.raises(BadRequest) as exc:
        client.domain("fashion").search(b"this is not an image")
    assert exc.value.status == 400 and exc.value.error
    with pytest.raises(BadRequest) as exc:
        client.domain("fashion").search(DRESS, top_k=0)
    assert "top_k" in exc.value.error
    with pytest.raises(NotFound):
        client.domain("fashion").image("no/such item")
    with pytest.raises(Conflict) as exc:
        client.domain("fashion").image("dress/google.png", version="19990101T000000-000000")
    assert "no longer served" in exc.value.error
    with pytest.raises(ConnectionFailed) as exc, Client(f"http://127.0.0.1:{free_port()}") as down:
        down.domains()
    assert exc.value.status is None and "cannot reach" in exc.value.error
    with Client(f"http://127.0.0.1:{free_port()}") as down:
        assert not down.ready()


def _run_cli(*args: str, url: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "simserver.cli", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "SIMSERVER_URL": url},
    )


def test_cli_search_and_error(server):
    out = _run_cli("search", "fashion", str(DRESS), "--top-k", "2", url=server.url)
    assert out.returncode == 0, out.stderr
    assert [h["name"] for h in json.loads(out.stdout)["results"]][0] == "dress/google.png"
    out = _run_cli("search", "nope", str(DRESS), url=server.url)
    assert out.returncode == 1 and json.loads(out.stderr)["status"] == 404, out.stderr


def test_train_with_progress(train_server):
    """One small training (mode=pretrained: no fine-tuning) on the train server's `ft` domain; the
    session server's `scratch` must stay empty for tests/integration/test_http.py."""
    files = {}
    for label in ("boot", "dress"):
        for p in sorted((DEMO / "fashion" / label).iterdir()):
            files[f"{label}/{p.name}"] = p.read_bytes()
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in files.items():
            zf.writestr(name, data)
    seen: list[TaskStatus] = []
    with Client(train_server.url) as c:
        ft = c.domain("ft")
        reply = ft.train(("set.zip", buf.getvalue()), mode="pretrained", progress=seen.append, poll=0.2)
        assert (
            isinstance(reply, TrainReply) and reply.indexed == 6 and reply.labels == {"boot": 3, "dress": 3}
        )
        assert reply.evaluation is not None and reply.evaluation.mode == "pretrained"
        assert seen and seen[-1].status == "completed" and seen[-1].created_at is not None
        assert len({s.task_id for s in seen}) == 1
        assert ft.training_result(seen[-1].task_id).version == reply.version
        assert ft.search(DRESS).version == reply.version

        # A task that fails raises its error, with the task id.
        with pytest.raises(SimserverError) as exc:
            ft.train(b"not a zip", progress=seen.append, poll=0.2)
        assert isinstance(exc.value, BadRequest) and "zip" in exc.value.error and exc.value.task_id
        assert ft.training_status(exc.value.task_id).status == "failed"
