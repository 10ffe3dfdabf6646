"""The Ray cluster for distributed builds (deploy/aws/ray-cluster.yaml): Ray's own cluster-config schema
(as `ray up` checks it, after filling in Ray's defaults), the same image as the serving stack, builds
placed on the workers."""

from __future__ import annotations

import copy
import re
from typing import Any

import pytest
import yaml

from tests.integration.conftest import ROOT
from tests.integration.test_deploy import TEMPLATE, CfnLoader

CLUSTER = ROOT / "deploy" / "aws" / "ray-cluster.yaml"


@pytest.fixture(scope="module")
def cluster() -> dict[str, Any]:
    return yaml.safe_load(CLUSTER.read_text())


def validate(config: dict[str, Any]) -> None:
    from ray.autoscaler._private.util import fillout_defaults, validate_config

    validate_config(fillout_defaults(copy.deepcopy(config)))


def test_the_cluster_passes_rays_schema_and_the_schema_catches_mistakes(cluster):
    import jsonschema

    validate(cluster)
    misspelled = copy.deepcopy(cluster)
    node = misspelled["available_node_types"]["cpu_worker"]
    node["max_worker_count"] = node.pop("max_workers")
    with pytest.raises(jsonschema.ValidationError, match="max_worker_count"):
        validate(misspelled)
    no_resources = copy.deepcopy(cluster)
    del no_resources["available_node_types"]["head"]["resources"]
    with pytest.raises(jsonschema.ValidationError, match="resources"):
        validate(no_resources)


def test_same_image_and_region_as_the_serving_stack(cluster):
    stack = yaml.load(TEMPLATE.read_text(), Loader=CfnLoader)
    image = cluster["docker"]["image"]
    assert re.fullmatch(stack["Parameters"]["ImageUri"]["AllowedPattern"], image), image
    assert f".dkr.ecr.{cluster['provider']['region']}.amazonaws.com/" in image
    assert cluster["provider"]["type"] == "aws"
    options = " ".join(cluster["docker"]["run_options"])
    assert "BENTOML_HOME=/home/bentoml/bento" in options and "--workdir /home/bentoml/bento/src" in options


def test_encoder_actors_run_on_workers_not_on_the_head(cluster):
    nodes = cluster["available_node_types"]
    assert nodes[cluster["head_node_type"]]["resources"] == {"CPU": 0}
    workers = [n for name, n in nodes.items() if name != cluster["head_node_type"]]
    assert workers and all(n["resources"]["CPU"] >= 1 and n["max_workers"] >= 1 for n in workers)
    assert all(n["node_config"]["IamInstanceProfile"]["Name"] for n in nodes.values())
    assert cluster["max_workers"] >= max(n["max_workers"] for n in workers)
