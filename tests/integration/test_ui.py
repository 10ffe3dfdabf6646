"""The web interface (/ui) in a real Chromium (Debian's `chromium`, driven by Playwright) against the
session's real server; and GET /{domain}/train/progress through HTTP.

Each browser test saves a screenshot in ``$SIMSERVER_SCREENSHOTS`` (default ``var/screenshots``;
the README's come from ``SIMSERVER_SCREENSHOTS=docs/screenshots``). Without Chromium the browser
tests skip, saying how to install it; with ``SIMSERVER_REQUIRE_BROWSER=1`` (CI) they fail instead.
"""

from __future__ import annotations

import base64
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
from tests.integration.conftest import DEMO, ROOT, SCRATCH_YAML, TEST_DATA, Server, server_env

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


def mirrored(data: bytes) -> bytes:
    """The image mirrored (alpha kept): a copy as a re-lister makes it, not a look-alike."""
    from PIL import Image, ImageOps

    buf = io.BytesIO()
    ImageOps.mirror(Image.open(io.BytesIO(data))).save(buf, "PNG")
    return buf.getvalue()


def png(name: str, data: bytes) -> dict:
    return {"name": name, "mimeType": "image/png", "buffer": data}


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
    # The page's images first (thumbnails load lazily): those in the window, loaded or failed.
    pg.wait_for_function(
        "[...document.images].filter(i => i.getBoundingClientRect().top < innerHeight).every(i => i.complete)"
    )
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


def test_drop_a_query_image(page, server):
    """A drag and drop: a DataTransfer holding the file, dispatched on the drop zone."""
    open_page(page, "search", "fashion")
    zone = "label.drop[for=query-file]"
    transfer = page.evaluate_handle(
        """([b64, name]) => {
          const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
          const dt = new DataTransfer();
          dt.items.add(new File([bytes], name, { type: "image/png" }));
          return dt;
        }""",
        [base64.b64encode(DRESS.read_bytes()).decode(), "dropped.png"],
    )
    page.dispatch_event(zone, "dragover", {"dataTransfer": transfer})
    assert "over" in page.get_attribute(zone, "class")  # the zone shows it will take the drop
    page.dispatch_event(zone, "drop", {"dataTransfer": transfer})
    page.wait_for_selector("#results .card")
    expected = api_search(server, "fashion", DRESS.read_bytes(), top_k=page.input_value("#top-k"))
    assert (
        card_ids(page) == [h["id"] for h in expected["results"]] and card_ids(page)[0] == "dress/google.png"
    )
    assert page.get_attribute(".drop-preview img", "alt") == "dropped.png"
    assert "over" not in page.get_attribute(zone, "class")
    shot(page, "search-drop")


def test_keyboard_pick_then_paste_a_query_image(page, server):
    """Keyboard only: Enter or Space on the focused drop zone opens the file picker; then Ctrl+V of
    an image (a paste event carrying the file) runs a new search with it."""
    open_page(page, "search", "fashion")
    zone = "label.drop[for=query-file]"
    # The picker's click is recorded and cancelled: whether headless Chromium then shows a file
    # chooser varied between runs; what the page owes the keyboard user is the click.
    page.evaluate(
        """() => document.getElementById("query-file").addEventListener("click", (e) => {
          window.pickerOpened = (window.pickerOpened || 0) + 1;
          e.preventDefault();
        })"""
    )
    page.focus(zone)
    page.keyboard.press("Enter")
    page.keyboard.press(" ")
    assert page.evaluate("window.pickerOpened") == 2
    page.set_input_files("#query-file", str(DRESS))  # what the picker then hands the page
    page.wait_for_selector("#results .card")
    assert card_ids(page)[0] == "dress/google.png"
    boot = sorted((DEMO / "fashion" / "boot").iterdir())[0]
    page.evaluate(
        """([b64, name]) => {
          const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
          const dt = new DataTransfer();
          dt.items.add(new File([bytes], name, { type: "image/png" }));
          document.dispatchEvent(new ClipboardEvent("paste", { clipboardData: dt }));
        }""",
        [base64.b64encode(boot.read_bytes()).decode(), "pasted.png"],
    )
    first = f"boot/{boot.name}"
    page.wait_for_function(f"document.querySelector('#results .card')?.dataset.id === {first!r}")
    expected = api_search(server, "fashion", boot.read_bytes(), top_k=page.input_value("#top-k"))
    assert card_ids(page) == [h["id"] for h in expected["results"]]
    assert page.get_attribute(".drop-preview img", "alt") == "pasted.png"


def test_duplicates_check_shows_a_copy_beside_its_original(page, server):
    copy, hammer = mirrored(DRESS.read_bytes()), (TEST_DATA / "hammer1.webp").read_bytes()
    files = [("copy.png", copy), ("hammer1.webp", hammer)]
    r = requests.post(
        f"{server.url}/fashion/duplicates/check",
        files=[("images", (n, d)) for n, d in files],
        timeout=120,
    )
    assert r.status_code == 200, r.text
    reply = r.json()
    threshold = reply["threshold"]
    assert [res["duplicate"] for res in reply["results"]] == [True, False]
    open_page(page, "dupes", "fashion")
    page.set_input_files(
        "#dupe-files",
        [png("copy.png", copy), {"name": "hammer1.webp", "mimeType": "image/webp", "buffer": hammer}],
    )
    page.wait_for_selector("#dupe-results .dupe-result")
    rows = page.eval_on_selector_all(
        "#dupe-results .dupe-result",
        """els => els.map(e => [e.dataset.name, e.dataset.duplicate,
              [...e.querySelectorAll('.match')].map(m => [m.dataset.id, m.dataset.kind])])""",
    )
    assert rows == [
        [
            res["name"],
            str(res["duplicate"]).lower(),
            [[m["id"], "copy" if m["same_item"] >= threshold else "look-alike"] for m in res["matches"]],
        ]
        for res in reply["results"]
    ]
    copy_row = "#dupe-results .dupe-result[data-name='copy.png']"
    assert "A copy of dress/google.png" in page.text_content(f"{copy_row} .facts")
    assert rows[0][2][0] == ["dress/google.png", "copy"]  # the original, side by side with the upload
    page.wait_for_function(
        f"document.querySelector(\"{copy_row} .match[data-id='dress/google.png'] img\").naturalWidth > 0"
    )
    assert "Not a copy" in page.text_content("#dupe-results .dupe-result[data-name='hammer1.webp'] .facts")
    shot(page, "duplicates")
    page.set_viewport_size({"width": 390, "height": 844})  # a phone: no sideways scrolling
    assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")


def ensure_trained(server, domain: str = "scratch") -> None:
    """The tiny set, if the domain has no version yet (run alone; in file order a test above trained it)."""
    from simserver.client import Client

    with Client(server.url) as client:
        if client.domain(domain).info().version is None:
            client.domain(domain).train(tiny_zip(), mode="pretrained", poll=0.2)


def test_catalog_add_images_then_remove_duplicate_extras(page, server):
    """Two uploads of a dress already in the catalog, added from the catalog page; the duplicates
    page finds the group (as the API does), keeps the oldest and removes the extras."""
    ensure_trained(server)
    original = DRESS.read_bytes()
    open_page(page, "catalog", "scratch")
    page.set_input_files("#add-files", [png("original.png", original), png("again.png", original)])
    page.fill("#add-label", "listing")
    page.click("#add-button")
    page.wait_for_selector("#add-result:has-text('Added')")
    listed = requests.get(f"{server.url}/scratch/items", params={"label": "listing"}, timeout=10).json()
    added = sorted(i["id"] for i in listed["items"])
    assert added == ["listing/again.png", "listing/original.png"]
    total = requests.get(f"{server.url}/scratch/items", params={"limit": 1}, timeout=10).json()["total"]
    assert page.text_content("#add-result").startswith("Added 2, replaced 0, skipped 0;")
    assert f"{total} items now" in page.text_content("#add-result")
    shot(page, "catalog-add")

    open_page(page, "dupes", "scratch")
    page.click("#groups-button")
    page.wait_for_selector("#groups-status[data-status=done]", timeout=180_000)
    task = requests.post(f"{server.url}/scratch/duplicates/submit", timeout=30).json()["task_id"]
    deadline = time.monotonic() + 120  # the index service kept the page's scan of this version
    while requests.get(
        f"{server.url}/scratch/duplicates/status", params={"task_id": task}, timeout=10
    ).json()["status"] in ("pending", "in_progress"):
        assert time.monotonic() < deadline
        time.sleep(0.2)
    reply = requests.get(f"{server.url}/scratch/duplicates/get", params={"task_id": task}, timeout=10).json()
    shown = page.eval_on_selector_all(
        "#groups .group",
        "els => els.map(e => [e.dataset.keep, [...e.querySelectorAll('.match.extra')]"
        ".map(m => m.dataset.id)])",
    )
    assert shown == [[g["keep"], g["duplicates"]] for g in reply["groups"]]
    ours = next(g for g in reply["groups"] if set(added) <= {g["keep"], *g["duplicates"]})
    shot(page, "duplicate-groups")
    page.click(f"#groups .group[data-keep='{ours['keep']}'] button.remove-extras")  # confirmed
    page.wait_for_selector(f"#groups .group.removed[data-keep='{ours['keep']}'] .done")
    for extra in ours["duplicates"]:
        assert requests.get(f"{server.url}/scratch/items/{extra}", timeout=10).status_code == 404
    assert requests.get(f"{server.url}/scratch/items/{ours['keep']}", timeout=10).status_code == 200


KEY = "ui-secret"


@pytest.fixture(scope="module")
def keyed_server(tmp_path_factory, builtin_tag):
    """A server whose one domain is empty and whose changes need API key ``KEY``."""
    tmp = tmp_path_factory.mktemp("keyed-server")
    domains = tmp / "domains"
    domains.mkdir()
    keyed = SCRATCH_YAML.replace("name: scratch", "name: keyed") + "training: {holdout_fraction: 0.5}\n"
    (domains / "keyed.yaml").write_text(keyed)
    env = server_env(tmp / "store", domains, tmp)
    env["API_KEY"] = KEY
    srv = Server(env, tmp / "server.log")
    srv.wait_ready()
    yield srv
    srv.stop()


def shuffled_zip() -> bytes:
    """18 products dealt into 3 labels that mean nothing: hold-out queries (half, per the yaml) whose
    first result has another label are all but certain (each has two chances in three)."""
    products = sorted(p for p in (DEMO / "fashion").iterdir() if (p / "google.png").exists())[:18]
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for i, p in enumerate(products):
            zf.writestr(f"set{i % 3}/{p.name}.png", (p / "google.png").read_bytes())
    return buf.getvalue()


def test_api_key_field_and_worst_queries(browser, keyed_server):
    """Training without the key shows the server's 401, a wrong key its 403; the right key (kept in
    the tab's sessionStorage) goes through to a new version, whose worst queries the page shows
    (their thumbnails fetched with the key)."""
    url = f"{keyed_server.url}/keyed/train/submit"
    archive = {"archive": ("set.zip", shuffled_zip())}
    missing = requests.post(url, files=archive, timeout=60)
    wrong = requests.post(url, files=archive, headers={"Authorization": "Bearer nope"}, timeout=60)
    assert (missing.status_code, wrong.status_code) == (401, 403)
    context = browser.new_context(viewport={"width": 1100, "height": 860}, base_url=keyed_server.url)
    context.set_default_timeout(60_000)
    pg = context.new_page()
    try:
        open_page(pg, "training", "keyed")

        def train() -> None:
            pg.set_input_files(
                "#train-file", {"name": "set.zip", "mimeType": "application/zip", "buffer": shuffled_zip()}
            )
            pg.select_option("#train-mode", "pretrained")
            pg.click("#train-button")

        def set_key(key: str) -> None:
            pg.eval_on_selector("#train-button", "b => (b.dataset.stale = '1')")
            pg.fill("#api-key", key)
            pg.locator("#api-key").blur()  # a change event, as when a person leaves the field
            pg.wait_for_selector("#train-button:not([data-stale])")  # the page is drawn again

        for status, reply, key in ((401, missing, None), (403, wrong, "nope")):
            if key:
                set_key(key)
            train()
            box = pg.wait_for_selector("form .error:not([hidden])")
            assert box.text_content() == f"{status}: {reply.json()['error']} (enter the API key at the top)"
        set_key(KEY)
        assert pg.evaluate("sessionStorage.getItem('simserver.apiKey')") == KEY
        train()
        pg.wait_for_selector("#train-stage[data-stage=done]", timeout=240_000)
        newest = requests.get(f"{keyed_server.url}/keyed/versions", timeout=10).json()[0]
        pg.wait_for_selector(
            f"#versions tr.active[data-version='{newest['version']}']"
        )  # the list, with the key
        assert newest["version"] in pg.text_content("#train-result h3") and not pg.is_visible("form .error")
        worst = newest["evaluation"]["worst_queries"]
        shown = pg.eval_on_selector_all(
            "#worst-queries .worst-query",
            "els => els.map(e => [...e.querySelectorAll('.match')].map(m => m.dataset.id))",
        )
        assert worst and shown == [[w["id"], w["first"]["id"]] for w in worst]
        assert all(w["first"]["label"] != w["label"] for w in worst)
        # With a key set the thumbnails are fetched with it (an <img src> could not send it).
        pg.wait_for_function(
            "[...document.querySelectorAll('#worst-queries img')].every(i => i.naturalWidth > 0)"
        )
        shot(pg, "api-key")
    finally:
        context.close()
