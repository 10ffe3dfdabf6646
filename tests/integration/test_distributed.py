"""Distributed builds on Ray Data (simserver/distributed.py) against the local build: the same items,
vectors (cosine >= 0.9999 per item) and search results, from a folder and from moto's S3 server;
resuming; the CLI. One local Ray of 2 CPUs for the module (Ray takes seconds to start)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from tests.integration.conftest import DEMO, ROOT, PretrainedBackend
from tests.integration.test_s3 import moto  # noqa: F401 - the module's moto server fixture

DOMAIN = "fashion"


@pytest.fixture(scope="module")
def ray_address(builtin_tag):
    import ray

    # Ray's workers run at nice 15 by default: on a machine busy with other tests they would crawl.
    os.environ["RAY_worker_niceness"] = "0"
    from simserver.distributed import start_ray

    start_ray(None, num_cpus=2)
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """The fashion demo set, plus a corrupt image and a metadata.csv (an id and a field)."""
    root = tmp_path_factory.mktemp("source") / DOMAIN
    shutil.copytree(DEMO / DOMAIN, root)
    (root / "boot" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (root / "metadata.csv").write_text(
        "filename,id,colour\nboot/google.png,sku-1,brown\ndress/google.png,,red\n"
    )
    return root


@pytest.fixture(scope="module")
def cfg(domains_dir):
    from simserver.domain_config import load_domains

    return load_domains(domains_dir)[DOMAIN]


@pytest.fixture(scope="module")
def local_build(tmp_path_factory, encoder, cfg, source):
    """The local build (`simserver domain build --mode pretrained`'s pipeline): the reference."""
    from simserver.ingest import read_folder
    from simserver.repository import Repository
    from simserver.store import LocalStore
    from simserver.training import train_domain

    repo = Repository(LocalStore(tmp_path_factory.mktemp("local-store")))
    report = train_domain(
        repo, cfg, read_folder(source, cfg.limits), PretrainedBackend(encoder), mode="pretrained"
    )
    return report, repo.load(DOMAIN, report.version)


def assert_equivalent(local, ray_report, ray_catalog) -> None:
    report, catalog = local
    assert ray_report.indexed == report.indexed == len(ray_catalog)
    assert ray_report.labels == report.labels
    assert (
        sorted(s.name for s in ray_report.skipped)
        == sorted(s.name for s in report.skipped)
        == ["boot/broken.png"]
    )
    expected = {it.id: it for it in catalog.iter_items()}
    got = {it.id: it for it in ray_catalog.iter_items()}
    assert got.keys() == expected.keys()
    assert got["sku-1"].metadata == {"colour": "brown"} and got["dress/google.png"].metadata == {
        "colour": "red"
    }
    for item_id, it in expected.items():
        other = got[item_id]
        assert (other.name, other.label, other.image_key, other.media_type, other.metadata) == (
            it.name,
            it.label,
            it.image_key,
            it.media_type,
            it.metadata,
        )
        a, b = catalog.vector(item_id), ray_catalog.vector(item_id)
        assert float(a @ b / np.linalg.norm(a) / np.linalg.norm(b)) >= 0.9999, item_id
    for key in ("index_kind", "count", "labels", "encoder_id", "encoder", "dim", "metric"):
        assert ray_catalog.meta[key] == catalog.meta[key], key
    assert ray_report.meta["evaluation"]["pretrained"] == report.meta["evaluation"]["pretrained"]
    ids, vectors = catalog.live()
    for query in vectors[::7]:
        want = [h.id for h in catalog.search(query[None], 5)[0]]
        assert [h.id for h in ray_catalog.search(query[None], 5)[0]] == want


def test_ray_build_from_a_folder_equals_the_local_build_and_resumes(
    tmp_path, ray_address, cfg, source, local_build
):
    from simserver.distributed import RayOptions, build_on_ray
    from simserver.repository import Repository
    from simserver.store import LocalStore

    store = tmp_path / "store"
    repo = Repository(LocalStore(store))
    done: list[int] = []
    report = build_on_ray(repo, cfg, str(source), f"file://{store}", RayOptions(shard_size=40), done.append)
    assert sum(done) == report.indexed + 1  # every listed image, the broken one too
    assert report.meta["build"]["shards"] == 4 and report.meta["build"]["resumed"] == 0
    assert report.meta["build"]["pruned"] == 0
    assert repo.current_version(DOMAIN) == report.version
    assert_equivalent(local_build, report, repo.load(DOMAIN, report.version))

    # A re-run of the same build through the CLI: the shards written are not encoded again.
    shards = sorted(LocalStore(store).list(f"domains/{DOMAIN}/builds/"))
    assert len(shards) == 4
    (store / shards[2]).unlink()
    stale = store / f"domains/{DOMAIN}/builds/0123456789abcdef/shards/000000.parquet"  # an older build's
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"shard")
    out = subprocess.run(
        [sys.executable, "-m", "simserver.cli", "domain", "build", DOMAIN, "--engine", "ray",
         "--data", str(source), "--store", f"file://{store}", "--address", ray_address,
         "--shard-size", "40", "--workers", "1"],
        capture_output=True, text=True, timeout=300, cwd=ROOT,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    line = json.loads(out.stdout.strip().splitlines()[-1])
    assert line["built"] and line["build"]["id"] == report.meta["build"]["id"]
    assert (line["build"]["shards"], line["build"]["resumed"], line["build"]["pruned"]) == (4, 3, 1)
    assert not stale.exists() and sorted(LocalStore(store).list(f"domains/{DOMAIN}/builds/")) == shards
    assert line["indexed"] == report.indexed and line["labels"] == report.labels
    assert [s["name"] for s in line["skipped"]] == ["boot/broken.png"] and line["seconds"] > 0
    assert (store / shards[2]).is_file() and repo.current_version(DOMAIN) == line["version"] != report.version
    assert_equivalent(local_build, report, repo.load(DOMAIN, line["version"]))


@pytest.mark.usefixtures("moto")
def test_ray_build_with_s3_source_and_store_equals_the_local_build(ray_address, cfg, source, local_build):
    import boto3

    from simserver.distributed import RayOptions, build_on_ray
    from simserver.repository import Repository
    from simserver.store import open_store

    s3 = boto3.client("s3")
    s3.create_bucket(Bucket="sim-source")
    for path in sorted(p for p in source.rglob("*") if p.is_file()):
        s3.put_object(
            Bucket="sim-source", Key=f"sets/{DOMAIN}/{path.relative_to(source)}", Body=path.read_bytes()
        )
    repo = Repository(open_store("s3://sim-test/ray"))
    report = build_on_ray(
        repo, cfg, f"s3://sim-source/sets/{DOMAIN}/", "s3://sim-test/ray", RayOptions(workers=2)
    )
    assert repo.current_version(DOMAIN) == report.version
    assert any(k.endswith(".parquet") for k in repo.store.list(f"domains/{DOMAIN}/builds/"))
    assert_equivalent(local_build, report, repo.load(DOMAIN, report.version))


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--data", "/nonexistent/images"], "is not a folder"),
        (["--data", "demo/fashion", "--mode", "finetune"], "indexes with the pretrained encoder"),
        (["--data", "demo/fashion", "--workers", "0"], "at least 1"),
    ],
)
def test_cli_refuses_bad_ray_builds_with_a_message(tmp_path, extra, message):
    out = subprocess.run(
        [sys.executable, "-m", "simserver.cli", "domain", "build", DOMAIN, "--engine", "ray",
         "--store", f"file://{tmp_path}", *extra],
        capture_output=True, text=True, timeout=120, cwd=ROOT,
    )  # fmt: skip
    assert out.returncode == 2 and message in out.stderr, out.stderr[-2000:]
