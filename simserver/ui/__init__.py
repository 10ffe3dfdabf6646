"""The web interface at ``/ui``: static HTML/CSS/JS (no build step, no network), served by the
gateway from this folder. ``index.html`` loads ``app.js`` (navigation, API calls, shared widgets)
and one script per page in ``pages/``; each page registers itself with ``UI.page(...)``, so a new
page is one new file and one ``<script>`` line."""

from __future__ import annotations

from pathlib import Path

STATIC_DIR = Path(__file__).resolve().parent


def mount(app) -> None:  # a FastAPI/Starlette app
    """Serve the interface at ``/ui/`` (``/ui`` redirects there)."""
    from starlette.staticfiles import StaticFiles

    app.mount("/ui", StaticFiles(directory=STATIC_DIR, html=True), name="ui")
