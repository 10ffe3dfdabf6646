"""Image + text: the text encoder's port against onnxruntime, text and hybrid search and matching
across shops through the shared real server (the food demo domain has titles and shops), checked
against the same computation done here from the store, and every refusal."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import requests

from tests.integration.conftest import DEMO, ROOT
from tests.integration.test_http import assert_error


@pytest.fixture(scope="module")
def text_encoder(builtin_tag):
    from simserver.text_encoder import TextEncoder

    return TextEncoder("builtin")


@pytest.mark.parametrize("runtime", ["tflite", "savedmodel"])
def test_port_reproduces_onnxruntime_on_the_same_onnx(text_encoder, runtime):
    """Both runtimes: the served one (TFLite, what the fixture loads) and the SavedModel's TF."""
    import onnxruntime as ort

    from simserver.minilm_port import onnx_path
    from simserver.text_encoder import TextEncoder

    assert text_encoder.runtime == "tflite"
    if runtime == "savedmodel":
        text_encoder = TextEncoder("builtin", runtime="savedmodel")
        assert text_encoder.runtime == "savedmodel"

    texts = ["Almonds, blanched 500 g", "blanched almonds 0.5kg", "HAZELNUTS 500 GR", "x", "tea " * 200]
    ids, mask = text_encoder.tokenize(texts)
    assert ids.shape[1] == 128  # the long one truncated to the model's 128 word pieces
    session = ort.InferenceSession(str(onnx_path()), providers=["CPUExecutionProvider"])
    outputs = session.run(None, {"input_ids": ids.astype(np.int64), "attention_mask": mask.astype(np.int64)})
    reference = next(o for o in outputs if o.shape == (len(texts), 384))  # the pooled sentence vectors
    ours = text_encoder.raw(texts)
    cos = np.sum(reference * ours, axis=1) / (
        np.linalg.norm(reference, axis=1) * np.linalg.norm(ours, axis=1)
    )
    assert cos.min() >= 0.999, cos
    # And the vocabulary is the model's: a reworded title is nearer its product than another product.
    v = text_encoder.encode(texts[:3])
    assert v[0] @ v[1] > v[0] @ v[2] + 0.1


def _oracle(demo_store, text_encoder):
    """The food version the server serves, and its text index built here from the store."""
    from simserver.domain_config import load_domains
    from simserver.hybrid import TextIndex, item_text
    from simserver.repository import Repository
    from simserver.store import LocalStore

    cfg = load_domains(ROOT / "domains")["food"]
    repo = Repository(LocalStore(demo_store))
    catalog = repo.load("food", repo.current_version("food"))
    dense = {
        s.sid: text_encoder.encode([item_text(it, cfg.text.fields) for it in s.items])
        for s in catalog.segments
    }
    return cfg, TextIndex(catalog, cfg.text, dense)


@pytest.fixture(scope="module")
def oracle(demo_store, text_encoder):
    return _oracle(demo_store, text_encoder)


def _post(server, route: str, files=None, **data) -> requests.Response:
    return requests.post(
        f"{server.url}/food/{route}",
        data={k: v if isinstance(v, str) else json.dumps(v) for k, v in data.items()},
        files=files,
        timeout=60,
    )


def test_text_search_equals_the_oracle_and_filters_apply(server, oracle, text_encoder):
    from simserver.filters import parse_filter
    from simserver.text_config import Weights

    cfg, ti = oracle
    query = "chopstiks 0.75l"  # a typo and another unit spelling than any shop's
    r = _post(server, "search", text=query, top_k="5", filter={"metadata.shop": {"in": ["google", "fluent"]}})
    assert r.status_code == 200, r.text
    got = r.json()["results"]
    assert [h["metadata"]["shop"] in ("google", "fluent") for h in got] == [True] * 5
    assert got[0]["metadata"]["product"] == "chopsticks"

    tvec = text_encoder.encode([query])[0]
    scores = {"text": ti.text_scores(tvec, query)}
    mask = ti.mask(parse_filter({"metadata.shop": {"in": ["google", "fluent"]}}))
    want = ti.search(scores, 5, mask, Weights(), "weighted")
    assert [h["id"] for h in got] == [ti.items[c.row].id for c in want]
    assert [h["scores"]["text"] for h in got] == pytest.approx([c.score for c in want], abs=1e-4)


@pytest.mark.parametrize("fusion", ["weighted", "rrf"])
def test_hybrid_search_fuses_both_and_equals_the_oracle(server, oracle, encoder, text_encoder, fusion):
    from simserver.builder import decode_batch
    from simserver.ingest import read_folder
    from simserver.text_config import Weights

    cfg, ti = oracle
    name = "drink/baby_bottle-twitter.png"
    sample = next(s for s in read_folder(DEMO / "food", cfg.limits).samples if s.name == name)
    query = "BABY BOTLE 12 PIECES"
    weights = {"image": 0.3, "text": 0.7}
    r = _post(
        server,
        "search",
        files={"image": ("q.png", (DEMO / "food" / name).read_bytes())},
        text=query,
        weights=weights,
        fusion=fusion,
        top_k="5",
    )
    assert r.status_code == 200, r.text
    got = r.json()["results"]
    assert set(got[0]["scores"]) == {"image", "text"}
    vec = encoder.encode(decode_batch([sample]))[0]
    scores = {"image": ti.image_scores(vec), "text": ti.text_scores(text_encoder.encode([query])[0], query)}
    want = ti.search(scores, 5, ti.mask(None), Weights(**weights), fusion)
    assert [h["id"] for h in got] == [ti.items[c.row].id for c in want]
    assert got[0]["metadata"]["product"] == "baby_bottle"


def test_match_by_id_and_by_text_finds_each_other_shop(server, oracle, text_encoder):
    from simserver.text_config import Weights

    cfg, ti = oracle
    r = _post(server, "match", id="drink/baby_bottle-google.png")
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["group"] == "google"
    assert [m["group"] for m in body["matches"]] == ["fluent", "twitter"]
    for m in body["matches"]:
        assert m["hit"]["metadata"]["shop"] == m["group"]
        assert m["hit"]["metadata"]["product"] == "baby_bottle"
        assert m["same_product"] is (m["match_score"] >= body["threshold"])
        assert m["match_score"] == pytest.approx(
            0.5 * m["hit"]["scores"]["image"] + 0.5 * m["hit"]["scores"]["text"]
        )
    # A text alone, the query's own shop given: only the other two answer; a threshold of 1 says "no".
    r = _post(server, "match", text="Spoon, 12 pcs", group="google", threshold="1")
    assert r.status_code == 200, r.text
    matches = r.json()["matches"]
    assert [m["group"] for m in matches] == ["fluent", "twitter"]
    query = "Spoon, 12 pcs"
    scores = {"text": ti.text_scores(text_encoder.encode([query])[0], query)}
    shops = np.asarray([it.metadata["shop"] for it in ti.items])
    want = [
        ti.items[ti.search(scores, 1, shops == g, Weights(), "weighted")[0].row].id
        for g in ("fluent", "twitter")
    ]
    assert [m["hit"]["id"] for m in matches] == want
    assert matches[1]["hit"]["metadata"]["product"] == "spoon"  # the twitter shop's title is "spoon 12pk"
    assert not any(m["same_product"] for m in matches)


def test_client_and_cli(server):
    from simserver.client import Client

    food = Client(server.url).domain("food")
    reply = food.search_text("hot pepper", top_k=3, fusion="rrf")
    assert len(reply.results) == 3 and reply.results[0].scores is not None
    assert food.match(id="drink/baby_bottle-google.png").matches[0].group == "fluent"
    out = subprocess.run(
        [sys.executable, "-m", "simserver.cli", "match", "food", "--text", "taco 250g", "--url", server.url],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert {m["group"] for m in json.loads(out.stdout)["matches"]} == {"google", "twitter", "fluent"}


def test_refusals(server):
    img = {"image": ("q.png", (DEMO / "food" / "drink/baby_bottle-google.png").read_bytes())}
    assert_error(_post(server, "search", text="  "), 400, "text", "empty")
    assert_error(_post(server, "search", text="a" * 1001), 400, "text", "limit of 1000")
    assert_error(
        _post(server, "search", text="tea", weights={"image": 0, "text": 0}), 400, "weights", "positive"
    )
    assert_error(_post(server, "search", text="tea", weights={"image": -1, "text": 1}), 400, "weights")
    assert_error(_post(server, "search", text="tea", weights="{not json"), 400, "weights", "json")
    assert_error(_post(server, "search", text="tea", weights={"img": 1}), 400, "weights")
    assert_error(_post(server, "search", files=img, text="tea", fusion="max"), 400, "fusion")
    assert_error(_post(server, "search", top_k="3"), 400, "image", "text")
    r = requests.post(f"{server.url}/fashion/search", data={"text": "dress"}, timeout=30)
    assert_error(r, 400, "no text configured")
    r = requests.post(f"{server.url}/fashion/match", data={"text": "dress"}, timeout=30)
    assert_error(r, 400, "no text configured")
    assert_error(_post(server, "match"), 400, "id", "image")
    assert_error(_post(server, "match", id="drink/baby_bottle-google.png", text="x"), 400, "not both")
    assert_error(_post(server, "match", id="no/such.png"), 404, "no item")
    assert_error(_post(server, "match", text="tea", threshold="2"), 400, "threshold")
    r = requests.post(f"{server.url}/nope/match", data={"text": "x"}, timeout=30)
    assert_error(r, 404, "unknown domain")


def test_match_groups_pairs_every_item_as_the_oracle_does(server, oracle):
    from simserver.client import Client
    from simserver.hybrid import absolute
    from simserver.text_config import Weights

    cfg, ti = oracle
    reply = Client(server.url).domain("food").match_groups("google", "twitter")
    shops = np.asarray([it.metadata["shop"] for it in ti.items])
    want = {}
    for r in np.flatnonzero(shops == "google"):
        scores = {
            "image": ti.image_scores(ti.image_vector(int(r))),
            "text": ti.text_scores(ti.text_vectors[r], ti.texts[r]),
        }
        found = ti.search(scores, 1, shops == "twitter", Weights(), "weighted")[0]
        want[ti.items[r].id] = (ti.items[found.row].id, absolute(found.scores, Weights()))
    assert {p.id: p.hit.id for p in reply.pairs} == {k: v[0] for k, v in want.items()}
    assert [p.match_score for p in reply.pairs] == sorted((p.match_score for p in reply.pairs), reverse=True)
    assert all(p.same_product is (p.match_score >= reply.threshold) for p in reply.pairs)
    right = np.mean(
        [p.hit.metadata["product"] == ti.items[ti.rows[p.id]].metadata["product"] for p in reply.pairs]
    )
    assert right > 0.8  # bench match: fused Recall@1 0.92 over all shop pairs
    groups = f"{server.url}/food/match/groups"
    assert_error(
        requests.post(groups, json={"group": "google", "against": "google"}, timeout=30), 400, "different"
    )
    assert_error(
        requests.post(groups, json={"group": "google", "against": "nope"}, timeout=30), 400, "against"
    )
    r = requests.post(f"{server.url}/fashion/match/groups", json={"group": "a", "against": "b"}, timeout=30)
    assert_error(r, 400, "no text configured")
