"""POST /{domain}/relevance through a real `bentoml serve`: a domain with a target label, trained
on the bundled almonds-suppliers images (target stand-in: peanuts), judges whole sites."""

from __future__ import annotations

import io

import pytest
import requests
from PIL import Image

from tests.integration.conftest import DEMO
from tests.integration.test_finetune_http import train_mode
from tests.integration.test_http import assert_error, make_zip

ALMONDS = DEMO / "almonds-suppliers"


def _variant(path, flip: bool = True) -> bytes:
    """A site's copy of a catalogue image: mirrored and re-encoded as JPEG (new bytes)."""
    rgba = Image.open(path).convert("RGBA")  # emoji have transparent backgrounds: put them on white
    img = Image.alpha_composite(Image.new("RGBA", rgba.size, "white"), rgba).convert("RGB")
    if flip:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=90)
    return buf.getvalue()


@pytest.fixture(scope="module")
def nuts(train_server):
    files = {f"{p.parent.name}/{p.name}": p.read_bytes() for p in sorted(ALMONDS.rglob("*.*")) if p.is_file()}
    status, r = train_mode(train_server, make_zip(files), None, domain="nuts")
    assert status == "completed", r.text
    return train_server, r.json()


def relevance(server, domain="nuts", archive=None, images=(), **fields) -> requests.Response:
    files = []
    if archive is not None:
        files.append(("archive", ("site.zip", archive)))
    files += [("images", (name, data)) for name, data in images]
    return requests.post(
        f"{server.url}/{domain}/relevance",
        files=files,
        data={k: str(v) for k, v in fields.items()},
        timeout=120,
    )


def test_training_calibrates_the_image_threshold(nuts):
    server, result = nuts
    domains = {d["name"]: d for d in requests.get(f"{server.url}/domains", timeout=10).json()}
    assert domains["nuts"]["version"] == result["version"]
    assert result["labels"]["peanuts"] == 3
    cal = result["relevance"]
    # Every image scored by a probe fitted without it (not one hold-out image): all 3 peanuts are
    # positives. The reply shows the probe's size; its weights stay in the version's meta.json.
    assert (
        cal["method"].startswith("cross-fitted probe")
        and cal["target"] == "peanuts"
        and cal["positives"] == 3
    )
    assert cal["scorer"] == "probe" and cal["probe"] == {"features": 1280}
    assert cal["negatives"] == sum(result["labels"].values()) - 3 and cal["rule"] == "youden"
    assert 0 <= cal["image_threshold"] <= 1 and cal["precision"] is not None
    lo, hi = cal["recall_ci95"]
    assert 0 <= lo <= cal["recall"] <= hi <= 1 and cal["site_rule"] == "likelihood"
    # /relevance uses it unless the request says otherwise.
    image = _variant(sorted((ALMONDS / "random").iterdir())[0])
    body = relevance(server, images=[("x.jpg", image)]).json()
    assert (
        body["image_threshold"] == cal["image_threshold"] and body["site_threshold"] == cal["site_threshold"]
    )
    assert body["site_rule"] == "likelihood" and body["basis"]["positives"] == 3 and body["scorer"] == "probe"
    assert body["basis"]["image_recall"] == cal["recall"] and body["basis"]["relevant_share"] == 0.25


def test_sites_with_and_without_the_target(nuts):
    server, trained = nuts
    peanuts = [(f"p{i}.jpg", _variant(p)) for i, p in enumerate(sorted((ALMONDS / "peanuts").iterdir()))]
    others = [(f"o{i}.jpg", _variant(p)) for i, p in enumerate(sorted((ALMONDS / "random").iterdir())[:9])]

    seller = relevance(server, archive=make_zip(dict(peanuts + others[:5])))
    assert seller.status_code == 200, seller.text
    body = seller.json()
    assert body["version"] == trained["version"] and body["target"] == "peanuts"
    assert (
        body["site_threshold"] == trained["relevance"]["site_threshold"] and body["site_rule"] == "likelihood"
    )
    assert isinstance(body["image_threshold"], float) and body["log_likelihood_ratio"] > 0
    by_name = {i["name"]: i for i in body["images"]}
    assert set(by_name) == {n for n, _ in peanuts + others[:5]}
    assert all(by_name[n]["similar"] for n, _ in peanuts), body
    assert body["relevant"] is True and body["fraction"] >= 3 / 8
    for img in body["images"]:
        assert len(img["nearest"]) == 3 and img["margin"] <= img["similarity"]
        # each neighbour is a search Hit: the same fields as /search results
        assert all(
            set(n) - {"scores"} == {"id", "name", "label", "score", "distance", "metadata"}
            for n in img["nearest"]
        )
        assert img["similar"] == (img["score"] >= body["image_threshold"]) and 0 <= img["score"] <= 1

    # The same kind of site without the product, sent as repeated `images` files.
    other_site = relevance(server, images=others)
    assert other_site.status_code == 200, other_site.text
    body = other_site.json()
    assert (
        body["relevant"] is False and body["fraction"] < body["site_threshold"] and len(body["images"]) == 9
    )
    assert body["log_likelihood_ratio"] < 0

    # Per-request thresholds override the calibrated and configured ones.
    everything = relevance(server, images=others, image_threshold=-1, nearest=1).json()
    assert everything["fraction"] == 1.0 and everything["relevant"] is True
    assert everything["image_threshold"] == -1 and all(len(i["nearest"]) == 1 for i in everything["images"])
    # The request's own image threshold has no calibrated recall: the configured fixed site threshold.
    assert (everything["site_rule"], everything["site_threshold"], everything["basis"]) == (
        "fixed",
        0.25,
        None,
    )
    lenient = relevance(server, archive=make_zip(dict(peanuts[:1] + others)), site_threshold=0.05).json()
    assert (
        lenient["site_threshold"] == 0.05
        and lenient["relevant"] is True
        and lenient["site_rule"] == "request"
    )


def test_relevance_bad_input(nuts, train_server):
    server, _ = nuts
    good = _variant(sorted((ALMONDS / "peanuts").iterdir())[0])
    assert_error(relevance(server, domain="ft", images=[("a.jpg", good)]), 400, "target_label")
    assert_error(relevance(server, domain="nope", images=[("a.jpg", good)]), 404, "unknown domain")
    assert_error(relevance(server), 400, "archive", "images")
    assert_error(relevance(server, images=[("bad.png", b"not an image")]), 400, "no usable image")
    assert_error(relevance(server, archive=b"not a zip"), 400, "not a valid zip")
    assert_error(relevance(server, archive=make_zip({"../x.jpg": good})), 400, "..")
    assert_error(relevance(server, images=[("a.jpg", good)], site_threshold=2), 400, "site_threshold")
    assert_error(relevance(server, images=[("a.jpg", good)], nearest=99), 400, "nearest")
    mixed = relevance(server, images=[("a.jpg", good), ("bad.png", b"\x89PNG broken")])
    assert mixed.status_code == 200, mixed.text
    assert [s["name"] for s in mixed.json()["skipped"]] == ["bad.png"] and len(mixed.json()["images"]) == 1
