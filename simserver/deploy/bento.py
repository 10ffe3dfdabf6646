"""Build the Bento and write what an image build needs: a Bento archive and a Docker build context.

``simserver bento export`` (:mod:`simserver.cli.deploy`) is the command:

1. `bentoml build` from the repository root (bentofile.yaml), unless a tag names a Bento already built;
2. `bentoml export <tag> <out>/<name>-<version>.tar.gz` (a portable archive, models included, that
   `bentoml import` reads). gzip, not BentoML's default `.bento` (xz): the archive is mostly float32
   weights, which xz compresses 2% better (97.6 vs 99.4 MB) in ~10x the time (78 s vs 8 s on 2 cores);
3. `<out>/<name>-<version>/`: the Docker build context, made without `bentoml containerize` (so without a
   Docker engine): the Bento's folder from the BentoML store (`bentoml.get(tag).path`) plus the
   BentoML models it needs under `models/` (what `bentoml containerize` adds), with the Bento's own
   `env/docker/Dockerfile`. `docker build -t IMAGE <context>` builds the server image.

The generated Dockerfile misses two things the server needs, so a marked block is appended that adds
them only when missing: `curl` (the ECS container health check runs `curl -f .../livez`; the
python:3.11-slim base has no curl) and the packages of requirements-nodeps.txt, which the project installs
with `pip --no-deps` (tensorflow-hub, tf-keras) and which are therefore not in the Bento's requirements.

The encoder model must be in BENTOML_HOME (`make encoder`). `bentoml build` locks the Python
requirements with `uv pip compile`, which needs the package index (PyPI) or, with UV_OFFLINE=1, a uv
cache from an earlier build.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from simserver.settings import PROJECT_ROOT

logger = logging.getLogger(__name__)

NODEPS = PROJECT_ROOT / "requirements-nodeps.txt"
MARK = "# ---- appended by `simserver bento export`"


class ExportError(Exception):
    """An expected failure: the command prints it on stderr and exits 1."""


def run_bentoml(*args: str) -> str:
    """Run the BentoML CLI of this interpreter from the repository root; stdout on success."""
    cmd = [sys.executable, "-m", "bentoml", *args]
    # A wide console: BentoML prints through rich, which wraps long lines (tags, paths) at 80 columns.
    env = dict(os.environ, COLUMNS="4000")
    proc = subprocess.run(cmd, cwd=PROJECT_ROOT, env=env, text=True, capture_output=True)
    if proc.returncode != 0:
        tail = "\n".join((proc.stderr + proc.stdout).strip().splitlines()[-15:])
        raise ExportError(f"`bentoml {' '.join(args)}` failed (exit {proc.returncode}):\n{tail}")
    return proc.stdout


def check_model(name: str) -> str:
    import bentoml
    from bentoml.exceptions import NotFound

    try:
        return str(bentoml.models.get(f"{name}:latest").tag)
    except NotFound:
        raise ExportError(
            f"the encoder model {name!r} is not in BENTOML_HOME={os.environ['BENTOML_HOME']}; "
            "build it first: `make encoder` (or `simserver encoder build`)"
        ) from None


def build() -> str:
    logger.info("bentoml build (locks requirements with uv against the package index)")
    out = run_bentoml("build", "-o", "tag")
    match = re.search(r"__tag__:(\S+)", out)
    if not match:
        raise ExportError(f"`bentoml build` printed no tag:\n{out[-2000:]}")
    return match.group(1)


def bento_models(bento_dir: Path) -> list[str]:
    """Tags of the BentoML-registry models the Bento's services declare."""
    import yaml

    info = yaml.safe_load((bento_dir / "bento.yaml").read_text())
    entries = list(info.get("models") or [])
    for svc in info.get("services") or []:
        entries.extend(svc.get("models") or [])
    tags: list[str] = []
    for m in entries:
        tag = m if isinstance(m, str) else m.get("tag")
        registry = "bentoml" if isinstance(m, str) else m.get("registry", "bentoml")
        if tag and registry == "bentoml" and tag not in tags:
            tags.append(tag)
    return tags


def _requirement_names(text: str) -> set[str]:
    names = set()
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        if line and not line.startswith("-"):
            names.add(re.split(r"[<>=!~\[; ]", line, maxsplit=1)[0].lower().replace("_", "-"))
    return names


def patch_dockerfile(context: Path) -> list[str]:
    """Append what the server needs and the generated Dockerfile lacks; returns what was added."""
    dockerfile = context / "env" / "docker" / "Dockerfile"
    text = dockerfile.read_text()
    added, lines = [], []
    if not re.search(r"apt-get install[^\n]*\bcurl\b", text):
        added.append("curl")
        lines.append(
            "RUN apt-get update && apt-get install -q -y --no-install-recommends curl "
            "&& rm -rf /var/lib/apt/lists/*"
        )
    if NODEPS.exists():
        locked = _requirement_names((context / "env" / "python" / "requirements.txt").read_text())
        if _requirement_names(NODEPS.read_text()) - locked:
            target = context / "env" / "deploy" / NODEPS.name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(NODEPS, target)
            added.append(NODEPS.name)
            # `COPY . ./` above has already put env/deploy/ under $BENTO_PATH.
            lines.append(f"RUN uv pip install --no-deps -r $BENTO_PATH/env/deploy/{NODEPS.name}")
    if lines:
        block = [
            "",
            f"{MARK}: what bentofile.yaml does not express (see deploy/aws/README.md)",
            "USER root",
            *lines,
            "USER bentoml",
            "",
        ]
        dockerfile.write_text(text.rstrip("\n") + "\n" + "\n".join(block))
    return added


def make_context(bento_dir: Path, context: Path) -> list[str]:
    if context.exists():
        shutil.rmtree(context)
    shutil.copytree(bento_dir, context, symlinks=True)
    models = bento_models(bento_dir)
    import bentoml

    for tag in models:
        src = Path(bentoml.models.get(tag).path)
        name, version = tag.split(":", 1)
        dest = context / "models" / name
        shutil.copytree(src, dest / version, symlinks=True)
        (dest / "latest").write_text(version)
    return models


def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


def export(out: Path, tag: str | None, archive: bool) -> dict[str, Any]:
    t0 = time.monotonic()
    model_name = os.environ.get("BUILTIN_MODEL", "efficientnet-lite0-imagenet")
    check_model(model_name)
    built = tag is None
    tag = tag or build()
    t_build = time.monotonic() - t0
    import bentoml
    from bentoml.exceptions import BentoMLException

    try:
        bento_dir = Path(bentoml.get(tag).path)  # what `bentoml get <tag> -o path` prints
    except BentoMLException as e:
        raise ExportError(f"no Bento {tag!r} in BENTOML_HOME={os.environ['BENTOML_HOME']}: {e}") from None
    name, version = bento_dir.parent.name, bento_dir.name
    out.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {"tag": f"{name}:{version}", "built": built, "bento_dir": str(bento_dir)}
    if archive:
        path = out / f"{name}-{version}.tar.gz"
        logger.info("bentoml export %s:%s %s", name, version, path)
        run_bentoml("export", f"{name}:{version}", str(path))
        result["archive"] = str(path)
        result["archive_bytes"] = _size(path)
    context = out / f"{name}-{version}"
    logger.info("writing the Docker build context %s", context)
    result["models"] = make_context(bento_dir, context)
    result["dockerfile_additions"] = patch_dockerfile(context)
    result["context"] = str(context)
    result["dockerfile"] = str(context / "env" / "docker" / "Dockerfile")
    result["context_bytes"] = _size(context)
    result["seconds"] = {"build": round(t_build, 1), "total": round(time.monotonic() - t0, 1)}
    return result
