"""Every route's refusals through the real gateway, in-process (fake services behind it)."""

from __future__ import annotations

import io
import time
import zipfile

import pytest
from PIL import Image

from simserver.errors import BadArchive, Conflict, UnknownItem
from tests.gateway.conftest import error_of, png


def zip_of(entries: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in entries.items():
            zf.writestr(name, data)
    return buf.getvalue()


def search(gw, domain: str = "shop", data: bytes | None = None, **form):
    files = {"image": ("q.png", png() if data is None else data)}
    return gw.client.post(f"/{domain}/search", files=files, data={k: str(v) for k, v in form.items()})


# -- search -------------------------------------------------------------------------------------------------
def test_search_sends_pixels_and_returns_the_index_reply(gw):
    r = search(gw, top_k=2)
    assert r.status_code == 200, r.text
    assert r.json()["domain"] == "shop" and len(r.json()["results"]) == 2
    ((method, kwargs),) = gw.index["shop"].calls
    assert method == "search" and kwargs["top_k"] == 2 and kwargs["image"].shape == (224, 224, 3)
    search(gw)
    assert gw.index["shop"].calls[-1][1]["top_k"] == 5  # the domain's default top_k
    assert gw.encoder.calls == []  # the gateway never encodes a search: the index service does


@pytest.mark.parametrize("top_k", [0, 101, "many", 2.5])
def test_search_top_k_out_of_range(gw, top_k):
    error_of(search(gw, top_k=top_k), 400, "top_k")
    assert gw.index["shop"].calls == []


@pytest.mark.parametrize(
    "data, status, words",
    [
        (b"not an image at all", 400, ["image", "not an image"]),
        (b"", 400, ["image"]),
        (png()[:60], 400, ["image"]),  # truncated
        (b"\x00" * 70_000, 413, ["image", "limit"]),  # over the domain's max_upload_bytes
    ],
)
def test_search_bad_images(gw, data, status, words):
    error_of(search(gw, data=data), status, *words)
    assert gw.index["shop"].calls == []


def test_search_too_many_pixels(gw):
    buf = io.BytesIO()
    Image.new("L", (1100, 1000)).save(buf, "PNG")  # 1.1 MP > the domain's 1 MP, still a small file
    error_of(search(gw, data=buf.getvalue()), 413, "pixels")


def test_search_missing_or_text_image_field(gw):
    error_of(gw.client.post("/shop/search", files={"other": ("q.png", png())}), 400, "image")
    error_of(gw.client.post("/shop/search", data={"image": "http://127.0.0.1:1/x.png"}), 400, "file")


def multipart(gw, path: str, parts: list[tuple[str, tuple]]):
    """A multipart POST with exactly these parts (repeated names too), with its Content-Length."""
    from urllib3 import encode_multipart_formdata

    body, ctype = encode_multipart_formdata(parts)
    return gw.client.post(path, content=body, headers={"Content-Type": ctype})


def test_a_one_value_field_sent_twice_is_refused(gw):
    two_images = [("image", ("a.png", png())), ("image", ("b.png", png(color="blue")))]
    error_of(multipart(gw, "/shop/search", two_images), 400, "image", "2 times")
    two_top_k = [("image", ("a.png", png())), ("top_k", "2"), ("top_k", "3")]
    error_of(multipart(gw, "/shop/search", two_top_k), 400, "top_k", "2 times")
    assert gw.index["shop"].calls == []
    # A list field takes several: relevance's images.
    assert (
        multipart(
            gw, "/nuts/relevance", [("images", ("a.png", png())), ("images", ("b.png", png()))]
        ).status_code
        == 200
    )


def test_search_refused_by_the_index_service_keeps_status_and_message(gw):
    gw.index["shop"].refuse["search"] = Conflict("domain 'shop' has no index yet: train it first")
    message = error_of(search(gw), 409, "no index yet")
    assert message == "domain 'shop' has no index yet: train it first"  # unwrapped, not nested JSON


def test_an_internal_4xx_that_is_no_refusal_is_a_server_fault(gw):
    """BentoML's own 400 from an internal service (input validation) means a gateway bug: 500,
    without internals in the reply."""
    from http import HTTPStatus

    from bentoml.exceptions import BentoMLException

    body = '{"error": "1 validation error for Input", "detail": [{"loc": ["image"], "msg": "bad"}]}'

    async def broken(image, top_k):
        raise BentoMLException(body, error_code=HTTPStatus.BAD_REQUEST)

    gw.index["shop"].search = broken
    try:
        r = search(gw)
    finally:
        del gw.index["shop"].search
    assert r.status_code == 500 and "validation" not in r.text


def test_unknown_domain_on_every_domain_route(gw):
    for method, path in [
        ("post", "/hats/search"),
        ("post", "/hats/train/submit"),
        ("post", "/hats/relevance"),
        ("get", "/hats/images/0"),
    ]:
        kwargs = {"files": {"image": ("q.png", png())}} if method == "post" else {}
        error_of(getattr(gw.client, method)(path, **kwargs), 404, "unknown domain", "hats")


def test_body_limits_and_multipart_shape(gw):
    r = gw.client.post(
        "/shop/search",
        content=b"x",
        headers={"Content-Type": "multipart/form-data", "Content-Length": "1"},
    )
    error_of(r, 400, "boundary")
    r = gw.client.post(
        "/shop/search", content=b"x" * 10, headers={"Content-Type": "multipart/form-data; boundary=b"}
    )
    error_of(r, 400)
    # The largest upload any route takes (the default 200 MiB: `nuts`, /similarity) + 1 MiB.
    limit = 200 * 2**20 + 2**20
    r = gw.client.post("/shop/search", content=b"", headers={"Content-Length": str(limit + 1)})
    assert error_of(r, 413).endswith(f"the limit is {limit}")


# -- training --------------------------------------------------------------------------------------------
def run_task(gw, domain: str, archive: bytes, **form) -> tuple[str, object]:
    r = gw.client.post(f"/{domain}/train/submit", files={"archive": ("set.zip", archive)}, data=form or None)
    assert r.status_code == 200, r.text
    task_id = r.json()["task_id"]
    for _ in range(200):
        status = gw.client.get(f"/{domain}/train/status", params={"task_id": task_id}).json()["status"]
        if status in ("completed", "failed"):
            break
        time.sleep(0.05)
    return status, gw.client.get(f"/{domain}/train/get", params={"task_id": task_id})


def test_training_submits_to_the_trainer_then_reloads_the_index(gw):
    archive = zip_of({"a/1.png": png()})
    status, r = run_task(gw, "shop", archive, mode="pretrained")
    assert status == "completed" and r.json()["version"] == "v2"
    ((method, kwargs),) = gw.trainer.calls
    assert (method, kwargs["domain"], kwargs["archive"], kwargs["mode"]) == (
        "train",
        "shop",
        archive,
        "pretrained",
    )
    assert [m for m, _ in gw.index["shop"].calls] == ["reload"]
    task_id = r.request.url.params["task_id"]
    assert kwargs["task_id"] == task_id  # the trainer writes the task's progress under it
    record = gw.service.JobRecords(gw.service.artifact_store()).get(task_id)
    assert record["status"] == "completed" and record["result"]["version"] == "v2"
    progress = gw.client.get("/shop/train/progress", params={"task_id": task_id})
    assert progress.status_code == 200 and progress.json()["stage"] == "done", progress.text
    for path, params, code in [
        ("/shop/train/progress", {"task_id": "unknown"}, 404),
        ("/nowhere/train/progress", {"task_id": task_id}, 404),
        ("/shop/train/progress", {"task_id": "a b"}, 400),
        ("/shop/train/progress", {}, 400),
        ("/shop/train/progress", {"task_id": task_id, "extra": "1"}, 400),
    ]:
        r = gw.client.get(path, params=params)
        assert r.status_code == code and r.json()["error"], (path, params, r.text)


def test_training_refusals_fail_the_task_with_their_status(gw):
    gw.trainer.refuse["train"] = BadArchive("not a zip archive")
    status, r = run_task(gw, "shop", b"PK nonsense")
    assert status == "failed"
    assert error_of(r, 400) == "not a zip archive"
    record = gw.service.JobRecords(gw.service.artifact_store()).get(r.request.url.params["task_id"])
    assert (record["status"], record["http_status"], record["error"]) == ("failed", 400, "not a zip archive")
    gw.trainer.refuse["train"] = Conflict("domain 'shop' is already training; try again when it finishes")
    error_of(run_task(gw, "shop", zip_of({"a/1.png": png()}))[1], 409, "already training")
    assert not [m for m, _ in gw.index["shop"].calls if m == "reload"]


def test_training_upload_limits_and_fields(gw):
    status, r = run_task(gw, "shop", b"\x00" * 70_000)
    assert status == "failed"
    error_of(r, 413, "archive", "limit")
    # BentoML stores a task before it parses the form: the gateway checks the choices and the file
    # first, so these are 400s at submit (they used to be tasks that failed later).
    r = gw.client.post(
        "/shop/train/submit",
        files={"archive": ("set.zip", zip_of({"a/1.png": png()}))},
        data={"mode": "sometimes"},
    )
    error_of(r, 400, "mode", "'sometimes'", "finetune")
    r = gw.client.post("/shop/train/submit", files={"other": ("x.zip", b"")})
    error_of(r, 400, "archive", "missing")
    r = gw.client.post("/shop/train/submit", files={"archive": ("a.zip", b"")}, data={"mode": '"finetune"'})
    assert r.status_code == 200, r.text  # a JSON-typed choice, as BentoML's own clients send it
    error_of(
        gw.client.put("/shop/train/cancel", params={"task_id": r.json()["task_id"]}),
        405,
        "cannot be cancelled",
    )
    # The body replayed to BentoML after the check is the one sent: the archive and the mode arrive.
    for _ in range(100):
        if gw.trainer.calls:
            break
        time.sleep(0.05)
    task_id = r.json()["task_id"]
    assert gw.trainer.calls == [
        ("train", {"domain": "shop", "archive": b"", "mode": "finetune", "catalog": None, "task_id": task_id})
    ]


def test_training_catalog_field(gw):
    r = gw.client.post(
        "/shop/train/submit",
        files={"archive": ("set.zip", zip_of({"a/1.png": png()}))},
        data={"catalog": "both"},
    )
    error_of(r, 400, "catalog", "replace, merge")  # at submit, before BentoML stores a task
    assert gw.trainer.calls == []
    status, r = run_task(gw, "shop", zip_of({"a/1.png": png()}), catalog="merge")
    assert status == "completed" and gw.trainer.calls[-1][1]["catalog"] == "merge"


def test_training_status_of_unknown_tasks(gw):
    error_of(gw.client.get("/shop/train/status", params={"task_id": "nope"}), 404)
    error_of(gw.client.get("/shop/train/get", params={"task_id": "nope"}), 404)
    error_of(gw.client.get("/shop/train/status"), 400, "task_id")


# -- relevance -------------------------------------------------------------------------------------------
def test_relevance_forwards_bytes_and_client_names(gw):
    r = gw.client.post(
        "/nuts/relevance",
        files=[("images", ("one.png", png())), ("images", ("two.png", png(color="blue")))],
        data={"nearest": "2"},
    )
    assert r.status_code == 200, r.text
    ((method, kwargs),) = gw.index["nuts"].calls
    assert kwargs["names"] == ["one.png", "two.png"] and kwargs["images"][0] == png()
    assert kwargs["archive"] is None and kwargs["nearest"] == 2


def test_relevance_refusals(gw):
    error_of(
        gw.client.post("/shop/relevance", files={"images": ("a.png", png())}), 400, "target_label", "nuts"
    )
    error_of(gw.client.post("/nuts/relevance", data={"nearest": "2"}), 400, "archive", "images")
    for field, value in [("image_threshold", "2"), ("site_threshold", "-0.1"), ("nearest", "21")]:
        r = gw.client.post("/nuts/relevance", files={"images": ("a.png", png())}, data={field: value})
        error_of(r, 400, field)
    gw.index["nuts"].refuse["relevance"] = BadArchive("no usable image in the site's upload")
    error_of(gw.client.post("/nuts/relevance", files={"images": ("a.png", b"x")}), 400, "no usable image")


# -- similarity ------------------------------------------------------------------------------------------
def test_similarity_encodes_both_images_once(gw):
    r = gw.client.post("/similarity", files={"image_a": ("a.png", png()), "image_b": ("b.png", png())})
    assert r.status_code == 200, r.text
    assert r.json()["score"] == pytest.approx(1.0) and r.json()["metric"] == "cosine"
    ((method, kwargs),) = gw.encoder.calls
    assert kwargs["images"].shape == (2, 224, 224, 3) and kwargs["encoder"] == "builtin"


def test_similarity_refusals(gw):
    files = {"image_a": ("a.png", png()), "image_b": ("b.png", b"nope")}
    error_of(gw.client.post("/similarity", files=files), 400, "image_b")
    error_of(gw.client.post("/similarity", files={"image_a": ("a.png", png())}), 400, "image_b")
    files = {"image_a": ("a.png", png()), "image_b": ("b.png", png())}
    error_of(gw.client.post("/similarity", files=files, data={"metric": "hamming"}), 400, "metric")
    assert gw.encoder.calls == []


# -- read-only routes ------------------------------------------------------------------------------------
def test_domains_and_stats(gw):
    domains = gw.client.get("/domains").json()
    assert [d["name"] for d in domains] == ["nuts", "shop"] and domains[1]["count"] == 3
    assert gw.client.get("/stats").json() == {"batching": {}, "export_templates_ready": True}


def test_image_refusals(gw):
    gw.index["shop"].refuse["item"] = UnknownItem("domain 'shop' has no item 7 in its current version")
    error_of(gw.client.get("/shop/images/7"), 404, "no item 7")
    gw.index["shop"].refuse.clear()
    error_of(gw.client.get("/shop/images/0", params={"version": "v0"}), 409, "no longer served", "v1")
    error_of(gw.client.get("/shop/images/a/0.png"), 404, "missing from the store")
    assert gw.index["shop"].calls[-1] == ("item", {"item_id": "a/0.png"})  # an id may hold '/'


# -- the living catalog ----------------------------------------------------------------------------------
def test_search_filter_is_parsed_and_forwarded(gw):
    r = search(gw, filter='{"label": {"in": ["a", "b"]}, "metadata.price": {"lt": 50}}')
    assert r.status_code == 200, r.text
    assert gw.index["shop"].calls[-1][1]["filter"] == {
        "label": {"in": ["a", "b"]},
        "metadata.price": {"lt": 50.0},
    }
    error_of(search(gw, filter="{nope"), 400, "filter", "JSON")
    error_of(search(gw, filter='{"colour": "red"}'), 400, "unknown field")
    error_of(search(gw, filter='{"metadata.price": {"gte": "x"}}'), 400, "number")
    assert len(gw.index["shop"].calls) == 1  # refused before the image is decoded or sent


def test_similar(gw):
    r = gw.client.get("/shop/similar", params={"id": "a/0.png", "top_k": 2, "filter": '{"label": "a"}'})
    assert r.status_code == 200, r.text
    assert gw.index["shop"].calls[-1] == (
        "similar",
        {"item_id": "a/0.png", "top_k": 2, "filter": {"label": {"eq": "a"}}},
    )
    error_of(gw.client.get("/shop/similar"), 400, "id")
    error_of(gw.client.get("/shop/similar", params={"id": "x", "top_k": 0}), 400, "top_k")
    error_of(gw.client.get("/shop/similar", params={"id": "x", "filter": "[]"}), 400, "JSON object")
    error_of(gw.client.get("/nope/similar", params={"id": "x"}), 404, "unknown domain")
    gw.index["shop"].refuse["similar"] = UnknownItem("domain 'shop' has no item 'x'")
    error_of(gw.client.get("/shop/similar", params={"id": "x"}), 404, "no item")


def test_add_items(gw):
    r = multipart(
        gw,
        "/shop/items",
        [
            ("images", ("a.png", png(), "image/png")),
            ("images", ("b.png", png(), "image/png")),
            ("label", "coat"),
            ("ids", "sku-1"),
            ("ids", "sku/2"),
        ],
    )
    assert r.status_code == 200, r.text
    assert r.json() == {
        "version": "v2",
        "added": 2,
        "replaced": 0,
        "skipped": [],
        "count": 4,
        "duplicates": [],
    }
    method, kwargs = gw.index["shop"].calls[-1]
    assert method == "upsert" and kwargs["label"] == "coat" and kwargs["ids"] == ["sku-1", "sku/2"]
    assert kwargs["on_duplicate"] == "allow"
    one = [("images", ("a.png", png(), "image/png")), ("label", "coat")]
    r = multipart(gw, "/shop/items", [*one, ("on_duplicate", "skip")])
    assert r.status_code == 200, r.text and gw.index["shop"].calls[-1][1]["on_duplicate"] == "skip"
    error_of(multipart(gw, "/shop/items", [*one, ("on_duplicate", "maybe")]), 400, "on_duplicate")
    assert kwargs["names"] == ["a.png", "b.png"] and kwargs["archive"] is None
    r = gw.client.post("/shop/items", files={"archive": ("a.zip", zip_of({"a/x.png": png()}))})
    assert r.status_code == 200, r.text and gw.index["shop"].calls[-1][1]["archive"]
    error_of(gw.client.post("/shop/items", data={"label": "x"}), 400, "archive")
    gw.index["shop"].refuse["upsert"] = BadArchive("ids: 1 ids for 2 files")
    error_of(multipart(gw, "/shop/items", [("images", ("a.png", png(), "image/png"))]), 400, "ids")


def test_item_routes(gw):
    r = gw.client.get("/shop/items", params={"label": "a", "offset": 5, "limit": 10})
    assert r.status_code == 200 and r.json()["total"] == 1
    assert gw.index["shop"].calls[-1] == ("list_items", {"label": "a", "offset": 5, "limit": 10})
    error_of(gw.client.get("/shop/items", params={"limit": 0}), 400, "limit")
    error_of(gw.client.get("/shop/items", params={"offset": -1}), 400, "offset")
    assert gw.client.get("/shop/items/a/0.png").json()["id"] == "a/0.png"
    r = gw.client.delete("/shop/items/a/0.png")
    assert r.status_code == 200 and r.json()["deleted"] == 1
    assert gw.index["shop"].calls[-1] == ("delete", {"ids": ["a/0.png"], "filter": None, "must_exist": True})
    gw.index["shop"].refuse["delete"] = UnknownItem("domain 'shop' has no item 'zz'")
    error_of(gw.client.delete("/shop/items/zz"), 404, "no item")
    gw.index["shop"].refuse.clear()
    r = gw.client.post("/shop/items/delete", json={"ids": ["a", "b/c"]})
    assert r.status_code == 200 and r.json()["deleted"] == 2
    r = gw.client.post("/shop/items/delete", json={"filter": {"label": "a"}})
    assert r.status_code == 200 and gw.index["shop"].calls[-1][1]["filter"] == {"label": {"eq": "a"}}
    error_of(gw.client.post("/shop/items/delete", json={}), 400, "exactly one")
    error_of(gw.client.post("/shop/items/delete", json={"ids": ["a"], "filter": {}}), 400, "exactly one")
    error_of(gw.client.post("/shop/items/delete", json={"filter": {"x": 1}}), 400, "unknown field")
    # An empty filter matches every item: refused, the catalog untouched.
    error_of(gw.client.post("/shop/items/delete", json={"filter": {}}), 400, "empty filter")
    error_of(gw.client.get("/nope/items"), 404, "unknown domain")


def test_versions_routes(gw):
    assert gw.client.get("/shop/versions").json()[0]["kind"] == "train"
    r = gw.client.post("/shop/versions/v1/activate")
    assert r.status_code == 200 and r.json()["activated_from"] == "v1"
    gw.index["shop"].refuse["activate"] = UnknownItem("domain 'shop' has no version 'v0'")
    error_of(gw.client.post("/shop/versions/v0/activate"), 404, "no version")


def test_similarity_with_a_domain_uses_its_index_service(gw):
    files = {"image_a": ("a.png", png()), "image_b": ("b.png", png(color="blue"))}
    r = gw.client.post("/similarity", files=files, data={"domain": "shop"})
    assert r.status_code == 200, r.text
    assert r.json()["same_label"] is True and r.json()["domain"] == "shop"
    ((method, kwargs),) = gw.index["shop"].calls
    assert method == "pair" and kwargs["images"].shape == (2, 224, 224, 3)
    assert gw.encoder.calls == []  # the domain's service encodes, with its served encoder
    error_of(gw.client.post("/similarity", files=files, data={"domain": "nope"}), 404, "unknown domain")
    error_of(
        gw.client.post("/similarity", files=files, data={"domain": "shop", "metric": "l1"}), 400, "metric"
    )
    r = gw.client.post("/similarity", files=files)
    assert r.status_code == 200 and r.json()["metric"] == "cosine" and r.json()["same_label"] is None


def test_duplicates_routes_refuse_input_and_cancel(gw):
    for route in ("submit", "calibrate"):
        error_of(gw.client.post(f"/shop/duplicates/{route}", json=[None, None]), 400, "takes no input")
        error_of(gw.client.post(f"/shop/duplicates/{route}", content=b"not json"), 400, "takes no input")
    error_of(gw.client.put("/shop/duplicates/cancel", params={"task_id": "x"}), 405, "cannot be cancelled")
    error_of(gw.client.post("/shop/duplicates", json={}), 405, "duplicates/submit")
    error_of(
        gw.client.post("/nope/duplicates/check", files={"image": ("a.png", png())}), 404, "unknown domain"
    )
    error_of(gw.client.post("/shop/duplicates/check", data={"x": "1"}), 400)


def test_match_groups_task_routes_refuse_before_storing_a_task(gw):
    body = {"group": "a", "against": "b"}
    error_of(gw.client.post("/shop/match/groups/submit", json=body), 400, "no text configured")
    error_of(gw.client.post("/nope/match/groups/submit", json=body), 404, "unknown domain")
    error_of(gw.client.put("/shop/match/groups/cancel", params={"task_id": "x"}), 405, "cannot be cancelled")
    error_of(gw.client.get("/shop/match/groups/status", params={"task_id": "x"}), 404)
