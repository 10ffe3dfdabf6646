"""The web interface (/ui) in a real Chromium (Debian's `chromium`, driven by Playwright) against the
session's real server; and GET /{domain}/train/progress through HTTP.

Each browser test saves a screenshot in ``$SIMSERVER_SCREENSHOTS`` (default ``var/screenshots``;
the README's come from ``SIMSERVER_SCREENSHOTS=docs/screenshots``). Without Chromium the browser
tests skip, saying how to install it; with ``SIMSERVER_REQUIRE_BROWSER=1`` (CI) they fail instead.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
import requests

from simserver.progress import STAGES
from tests.integration.conftest import DEMO, ROOT

CHROMIUM = os.environ.get("CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
REQUIRED = os.environ.get("SIMSERVER_REQUIRE_BROWSER") == "1"
SHOTS = Path(os.environ.get("SIMSERVER_SCREENSHOTS") or ROOT / "var" / "screenshots")
DRESS = DEMO / "fashion" / "dress" / "google.png"
# Two categories of the fashion demo, four images each: a training of a few seconds.
TINY_SET = {
    f"{label}/{p.name}": p
    for label in ("dress", "boot")
    for p in sorted((DEMO / "fashion" / label).iterdir())[:4]
}


def tiny_zip() -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, path in TINY_SET.items():
            zf.writestr(name, path.read_bytes())
    return buf.getvalue()


# Module scope, not session: Playwright's sync API keeps an event loop running in this thread until it
# stops, and every later test that calls asyncio.run() (the unit tests run after these) would fail.
@pytest.fixture(scope="module")
def browser():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        sync_playwright = None
    if CHROMIUM is None or sync_playwright is None:
        message = (
            "no Chromium on PATH: install it with `sudo apt-get install -y chromium` (Debian/Ubuntu)"
            if CHROMIUM is None
            else "playwright is not installed: `make install`"
        ) + " to run the browser tests"
        if REQUIRED:
            pytest.fail(f"SIMSERVER_REQUIRE_BROWSER=1 but {message}")
        pytest.skip(message)
    with sync_playwright() as pw:
        # --no-sandbox: CI runs as root, where Chromium's sandbox refuses to start.
        b = pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield b
        b.close()


@pytest.fixture
def page(browser, server):
    context = browser.new_context(viewport={"width": 1100, "height": 860}, base_url=server.url)
    context.set_default_timeout(60_000)
    pg = context.new_page()
    pg.on("dialog", lambda d: d.accept())  # the confirmations (delete, activate)
    yield pg
    context.close()


def shot(pg, name: str) -> None:
    """A full-page screenshot, as a 256-colour PNG (a third of the size; the README shows them)."""
    from PIL import Image

    SHOTS.mkdir(parents=True, exist_ok=True)
    png = Image.open(io.BytesIO(pg.screenshot(full_page=True))).convert("RGB")
    png.quantize(256, method=Image.Quantize.MEDIANCUT).save(SHOTS / f"{name}.png", optimize=True)


def open_page(pg, name: str, domain: str) -> None:
    pg.goto(f"/ui/#{name}?domain={domain}")
    pg.wait_for_selector("main h2")


def card_ids(pg, selector: str = "#results .card") -> list[str]:
    return pg.eval_on_selector_all(selector, "els => els.map(e => e.dataset.id)")


def api_search(server, domain: str, data: bytes, **fields) -> dict:
    r = requests.post(
        f"{server.url}/{domain}/search", files={"image": ("q.png", data)}, data=fields, timeout=60
    )
    assert r.status_code == 200, r.text
    return r.json()


def test_search_by_upload_filter_and_more_like_this(page, server):
    open_page(page, "search", "fashion")
    page.set_input_files("#query-file", str(DRESS))
    page.wait_for_selector("#results .card")
    expected = api_search(server, "fashion", DRESS.read_bytes(), top_k="5")
    got = card_ids(page)
    # The query image is indexed: it is its own nearest neighbour, and the gallery is the API's answer.
    assert got[0] == "dress/google.png" and got == [h["id"] for h in expected["results"]]

    page.select_option("#label-filter", ["boot", "coat"])
    page.click("#search-button")
    page.wait_for_function("document.querySelector('#results-heading').textContent.includes('results')")
    labels = "[...document.querySelectorAll('#results .card .label')].map(e => e.textContent)"
    page.wait_for_function(f"{labels}.every(l => ['boot', 'coat'].includes(l))")
    filtered = api_search(
        server, "fashion", DRESS.read_bytes(), top_k="5", filter='{"label": {"in": ["boot", "coat"]}}'
    )
    assert card_ids(page) == [h["id"] for h in filtered["results"]] and set(card_ids(page)).isdisjoint(got)

    first = card_ids(page)[0]
    page.click("#results .card >> nth=0")
    page.click("#more-like-this")
    page.wait_for_function("document.querySelector('#results-heading').textContent.startsWith('More like')")
    similar = requests.get(
        f"{server.url}/fashion/similar",
        params={"id": first, "top_k": 5, "filter": '{"label": {"in": ["boot", "coat"]}}'},
        timeout=30,
    ).json()
    assert card_ids(page) == [h["id"] for h in similar["results"]] and first not in card_ids(page)
    assert page.text_content("#item-details").count(first) == 1
    shot(page, "search")


def test_corrupt_upload_shows_the_servers_message(page, server):
    bad = b"\x89PNG\r\n\x1a\n this is not an image"
    r = requests.post(f"{server.url}/fashion/search", files={"image": ("broken.png", bad)}, timeout=30)
    assert r.status_code == 400
    open_page(page, "search", "fashion")
    page.set_input_files("#query-file", {"name": "broken.png", "mimeType": "image/png", "buffer": bad})
    box = page.wait_for_selector("form .error:not([hidden])")
    assert r.json()["error"] in box.text_content() and box.text_content().startswith("400")
    shot(page, "search-error")
    # Readable on a phone: at 390 px nothing is wider than the window (no sideways scrolling).
    page.set_viewport_size({"width": 390, "height": 844})
    assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")
    assert page.is_visible("#search-button") and page.is_visible("form .error")


def test_supplier_check(page, server):
    peanuts = sorted((DEMO / "almonds-suppliers" / "peanuts").iterdir())[:2]
    other = sorted((DEMO / "almonds-suppliers" / "olive").iterdir())[:1]
    files = [*peanuts, *other]
    # Two files named alike (fluent-emoji-3d.webp): the page sends the second as "… (2).webp".
    names = [p.name for p in peanuts] + [other[0].name.replace(".webp", " (2).webp")]
    assert names[0] == other[0].name
    r = requests.post(
        f"{server.url}/almonds-suppliers/relevance",
        files=[("images", (n, p.read_bytes())) for n, p in zip(names, files, strict=True)],
        timeout=60,
    ).json()
    open_page(page, "supplier", "almonds-suppliers")
    page.set_input_files("#site-files", [str(p) for p in files])
    page.click("#check-button")
    verdict = page.wait_for_selector("#verdict h3").text_content()
    assert verdict.startswith("Relevant" if r["relevant"] else "Not relevant")
    shown = page.eval_on_selector_all(
        "#site-images .site-image", "els => els.map(e => [e.dataset.name, e.classList.contains('similar')])"
    )
    assert shown == [[im["name"], im["similar"]] for im in r["images"]]
    shot(page, "supplier")


def _submit(server, domain: str, mode: str = "pretrained") -> str:
    r = requests.post(
        f"{server.url}/{domain}/train/submit",
        files={"archive": ("set.zip", tiny_zip())},
        data={"mode": mode},
        timeout=60,
    )
    assert r.status_code == 200, r.text
    return r.json()["task_id"]


def test_train_progress_route(server):
    url = f"{server.url}/scratch/train/progress"
    task_id = _submit(server, "scratch")
    seen: list[dict] = []
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        r = requests.get(url, params={"task_id": task_id}, timeout=10)
        if r.status_code == 404 and not seen:  # the job record is written as the task starts
            time.sleep(0.2)
            continue
        assert r.status_code == 200, r.text
        seen.append(r.json())
        if seen[-1]["stage"] in ("done", "failed"):
            break
        time.sleep(0.2)
    last = seen[-1]
    assert last["stage"] == "done", seen
    assert last["done"] == last["total"] and last["eta_seconds"] == 0 and last["seconds"] > 0
    order = [STAGES.index(p["stage"]) for p in seen]
    assert order == sorted(order)  # stages only move forward
    assert all(p["total"] == 0 or 0 <= p["done"] <= p["total"] for p in seen)
    # Read from the artifact store: the answer stays after the task, and names the stage of the
    # task, not the server's memory (the job record's domain must match).
    assert requests.get(url, params={"task_id": task_id}, timeout=10).json()["stage"] == "done"

    def refused(path: str, params: dict, status: int, words: str) -> None:
        r = requests.get(f"{server.url}{path}", params=params, timeout=10)
        assert r.status_code == status and words in r.json()["error"], r.text

    refused("/scratch/train/progress", {"task_id": "no-such-task"}, 404, "unknown task")
    refused("/fashion/train/progress", {"task_id": task_id}, 404, "unknown task")
    refused("/nowhere/train/progress", {"task_id": task_id}, 404, "unknown domain")
    refused(
        "/scratch/train/progress", {"task_id": "../../etc"}, 400, "task_id"
    )  # the route declares the pattern
    refused("/scratch/train/progress", {}, 400, "task_id")
    cli = subprocess.run(
        [sys.executable, "-m", "simserver.cli", "train-progress", "scratch", task_id, "--url", server.url],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert cli.returncode == 0 and json.loads(cli.stdout)["stage"] == "done", cli.stderr


def test_client_and_cli_follow_the_progress(server, tmp_path):
    from simserver.client import Client, NotFound

    polled: list[str] = []
    with Client(server.url) as client:
        scratch = client.domain("scratch")
        reply = scratch.train(
            tiny_zip(), mode="pretrained", poll=0.2, stages=lambda p: polled.append(p.stage)
        )
        assert polled[-1] == "done" and reply.indexed == len(TINY_SET)
        with pytest.raises(NotFound, match="unknown task"):
            scratch.training_progress("no-such-task")
    archive = tmp_path / "tiny.zip"
    archive.write_bytes(tiny_zip())
    cli = subprocess.run(
        [sys.executable, "-m", "simserver.cli", "train", "scratch", str(archive), "--mode", "pretrained"]
        + ["--url", server.url, "--poll", "0.2"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert cli.returncode == 0, cli.stderr
    assert json.loads(cli.stdout)["indexed"] == len(TINY_SET)
    assert "scratch: done" in cli.stderr  # the last stage's bar


def test_training_with_live_progress_then_rollback(page, server):
    open_page(page, "training", "scratch")
    page.set_input_files(
        "#train-file", {"name": "tiny.zip", "mimeType": "application/zip", "buffer": tiny_zip()}
    )
    page.select_option("#train-mode", "finetune")
    page.click("#train-button")
    page.wait_for_selector("#train-stage[data-stage=done]", timeout=240_000)
    stages = page.eval_on_selector_all("#train-stages li", "els => els.map(e => e.dataset.stage)")
    assert stages[-1] == "done" and len(stages) >= 2, stages  # progress was shown on the way
    assert [STAGES.index(s) for s in stages] == sorted(STAGES.index(s) for s in stages)
    heading = page.text_content("#train-result h3")
    trained = requests.get(f"{server.url}/scratch/versions", timeout=10).json()[0]
    assert trained["active"] and trained["version"] in heading and f"{len(TINY_SET)} images" in heading
    assert page.is_visible("#promotion") and page.is_visible("table.metrics")
    page.wait_for_selector(f"#versions tr.active[data-version='{trained['version']}']")
    shot(page, "training")

    # A newer version with one more item (no training); then activate the trained one from the page.
    extra = DEMO / "food" / "drink" / sorted(p.name for p in (DEMO / "food" / "drink").iterdir())[0]
    r = requests.post(
        f"{server.url}/scratch/items",
        files=[("images", (extra.name, extra.read_bytes()))],
        data={"label": "drink", "ids": "extra-drink"},
        timeout=60,
    )
    assert r.status_code == 200, r.text
    assert api_search(server, "scratch", extra.read_bytes())["results"][0]["id"] == "extra-drink"
    page.reload()
    page.wait_for_selector(f"#versions tr[data-version='{trained['version']}'] button.activate")
    page.click(f"#versions tr[data-version='{trained['version']}'] button.activate")
    page.wait_for_selector("#versions tr.active small")  # the new active version: "(= <trained>)"
    assert trained["version"] in page.text_content("#versions tr.active")
    deadline = time.monotonic() + 30  # the index service follows the pointer (polled every second)
    while (first := api_search(server, "scratch", extra.read_bytes())["results"][0]["id"]) == "extra-drink":
        assert time.monotonic() < deadline, "search still serves the newer version"
        time.sleep(0.5)
    # The page's search says the same: the extra item is gone.
    open_page(page, "search", "scratch")
    page.set_input_files("#query-file", str(extra))
    page.wait_for_selector("#results .card")
    assert card_ids(page)[0] == first and "extra-drink" not in card_ids(page)
    shot(page, "rollback-search")


def test_catalog_browse_and_delete(page, server):
    open_page(page, "catalog", "scratch")
    page.wait_for_selector("#catalog-grid .card")
    listed = requests.get(f"{server.url}/scratch/items", params={"limit": 24}, timeout=10).json()
    assert card_ids(page, "#catalog-grid .card") == [i["id"] for i in listed["items"]]
    page.select_option("#catalog-label", "boot")
    page.wait_for_function(
        "[...document.querySelectorAll('#catalog-grid .label')].every(e => e.textContent === 'boot')"
    )
    victim = card_ids(page, "#catalog-grid .card")[0]
    page.click(f"#catalog-grid .card[data-id='{victim}'] button.danger")  # confirmed by the dialog handler
    page.wait_for_function(f"!document.querySelector(\"#catalog-grid .card[data-id='{victim}']\")")
    assert requests.get(f"{server.url}/scratch/items/{victim}", timeout=10).status_code == 404
    shot(page, "catalog")
