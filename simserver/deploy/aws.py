"""Create or update the image-similarity CloudFormation stack (deploy/aws/stack.yaml).

``simserver deploy aws`` (:mod:`simserver.cli.deploy`) is the command; this module checks the
arguments, builds the request, and either lists the AWS calls a dry run would make or makes them:
validate the template, create the stack if absent or update it if present ("No updates are to be
performed" counts as success), wait for CloudFormation. boto3's standard configuration applies:
credentials chain, AWS_REGION / AWS_DEFAULT_REGION (or --region), and AWS_ENDPOINT_URL (e.g. a moto
server in the tests).
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from botocore.exceptions import ClientError, WaiterError

from simserver.settings import PROJECT_ROOT

logger = logging.getLogger(__name__)

TEMPLATE = PROJECT_ROOT / "deploy" / "aws" / "stack.yaml"
CAPABILITIES = ["CAPABILITY_IAM"]
TAGS = [{"Key": "project", "Value": "image-similarity"}]
NO_UPDATES = "No updates are to be performed"

STACK_NAME_RE = re.compile(r"^[A-Za-z][A-Za-z0-9-]{0,127}$")
VPC_RE = re.compile(r"^vpc-[0-9a-f]{8,17}$")
SUBNET_RE = re.compile(r"^subnet-[0-9a-f]{8,17}$")
# The same patterns as the template's AllowedPattern, so mistakes fail here and not 10 minutes in.
IMAGE_RE = re.compile(
    r"^(?P<account>[0-9]{12})\.dkr\.ecr\.(?P<region>[a-z0-9-]+)\.amazonaws\.com(\.cn)?/[a-z0-9._/-]+"
    r"(:[A-Za-z0-9._-]+|@sha256:[a-f0-9]{64})$"
)
SECRET_RE = re.compile(
    r"^arn:aws[a-z-]*:secretsmanager:(?P<region>[a-z0-9-]+):(?P<account>[0-9]{12}):secret:"
    r"[A-Za-z0-9/_+=.@-]+-[A-Za-z0-9]{6}$"
)
# Fargate CPU units -> allowed memory (MiB) among the template's AllowedValues.
FARGATE_MEMORY = {
    "1024": ["3072", "4096", "6144", "8192"],
    "2048": ["4096", "6144", "8192", "12288", "16384"],
    "4096": ["8192", "12288", "16384"],
}
# Stack states that cannot be updated, with what to do about them.
STUCK = {
    "ROLLBACK_COMPLETE": "its creation failed and was rolled back; delete it "
    "(aws cloudformation delete-stack --stack-name {name}) and run again",
    "ROLLBACK_FAILED": "its creation failed and so did the rollback; delete it in the console and run again",
    "DELETE_FAILED": "a deletion failed; finish deleting it in the console and run again",
    "REVIEW_IN_PROGRESS": "it has an unexecuted change set; execute or delete it first",
}


class DeployError(Exception):
    """An expected failure: the command prints its message on stderr and exits 1."""


# ----------------------------------------------------------------------------- arguments


def _checked(regex: re.Pattern[str], what: str) -> Callable[[str], str]:
    def check(value: str) -> str:
        value = value.strip()
        if not regex.match(value):
            raise argparse.ArgumentTypeError(f"not {what}: {value!r}")
        return value

    return check


def _subnet_list(value: str) -> list[str]:
    ids = [s.strip() for s in value.split(",") if s.strip()]
    if not ids:
        raise argparse.ArgumentTypeError("no subnet id given")
    for s in ids:
        if not SUBNET_RE.match(s):
            raise argparse.ArgumentTypeError(f"not a subnet id (subnet-...): {s!r}")
    return ids


def _count(value: str) -> int:
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {value!r}") from None
    if not 0 <= n <= 50:
        raise argparse.ArgumentTypeError(f"must be 0..50: {n}")
    return n


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The command's options, each checked as it is parsed (mistakes fail here, not 10 minutes in)."""
    p.add_argument("--stack-name", required=True, type=_checked(STACK_NAME_RE, "a CloudFormation stack name"))
    p.add_argument(
        "--image-uri",
        required=True,
        type=_checked(IMAGE_RE, "an ECR image URI (<account>.dkr.ecr.<region>.amazonaws.com/<repo>:<tag>)"),
    )
    p.add_argument("--vpc-id", required=True, type=_checked(VPC_RE, "a VPC id (vpc-...)"))
    p.add_argument(
        "--subnets",
        required=True,
        type=_subnet_list,
        help="comma-separated public subnets (2+ Availability Zones) for the load balancer; "
        "also the tasks' subnets unless --task-subnets is given",
    )
    p.add_argument(
        "--task-subnets",
        type=_subnet_list,
        help="comma-separated subnets for the tasks (private subnets with a NAT gateway or VPC endpoints)",
    )
    p.add_argument(
        "--assign-public-ip",
        choices=["ENABLED", "DISABLED"],
        help="public IPs for the tasks; default: ENABLED without --task-subnets (tasks in the public "
        "subnets), DISABLED with it",
    )
    p.add_argument(
        "--api-key-secret-arn",
        required=True,
        type=_checked(SECRET_RE, "a full Secrets Manager secret ARN (…:secret:<name>-AbCdEf)"),
    )
    p.add_argument("--region", help="AWS region (default: AWS_REGION / AWS_DEFAULT_REGION / profile)")
    p.add_argument("--desired-count", type=_count, default=2)
    p.add_argument("--min-capacity", type=_count, default=1, help="autoscaling minimum")
    p.add_argument("--max-capacity", type=_count, default=4, help="autoscaling maximum")
    p.add_argument("--cpu", choices=sorted(FARGATE_MEMORY), default="2048", help="Fargate CPU units")
    p.add_argument("--memory", default="4096", help="Fargate memory (MiB), valid for --cpu")
    p.add_argument("--search-requires-key", action="store_true", help="reads need the API key too")
    p.add_argument("--template", type=Path, default=TEMPLATE, help="CloudFormation template")
    p.add_argument("--timeout-minutes", type=int, default=40, help="how long to wait for CloudFormation")
    p.add_argument("--dry-run", action="store_true", help="print the AWS calls as JSON lines, call nothing")


def check_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """What no single option can check; ``parser.error`` (exit 2) on a mistake. Fills defaults that
    depend on other options."""
    if len(args.subnets) < 2:
        parser.error(
            "--subnets: an Application Load Balancer needs subnets in at least two Availability Zones"
        )
    if args.min_capacity > args.max_capacity:
        parser.error(f"--min-capacity {args.min_capacity} is above --max-capacity {args.max_capacity}")
    if args.memory not in FARGATE_MEMORY[args.cpu]:
        parser.error(f"--memory {args.memory} is not valid with --cpu {args.cpu}: {FARGATE_MEMORY[args.cpu]}")
    if args.timeout_minutes < 1:
        parser.error("--timeout-minutes must be at least 1")
    if args.assign_public_ip is None:
        args.assign_public_ip = "DISABLED" if args.task_subnets else "ENABLED"


# ----------------------------------------------------------------------------- the request


def stack_parameters(args: argparse.Namespace) -> list[dict[str, str]]:
    values = {
        "ImageUri": args.image_uri,
        "DesiredCount": str(args.desired_count),
        "MinCapacity": str(args.min_capacity),
        "MaxCapacity": str(args.max_capacity),
        "Cpu": args.cpu,
        "Memory": args.memory,
        "VpcId": args.vpc_id,
        "AlbSubnetIds": ",".join(args.subnets),
        "TaskSubnetIds": ",".join(args.task_subnets or args.subnets),
        "AssignPublicIp": args.assign_public_ip,
        "ApiKeySecretArn": args.api_key_secret_arn,
        "SearchRequiresKey": "1" if args.search_requires_key else "0",
    }
    return [{"ParameterKey": k, "ParameterValue": v} for k, v in values.items()]


def read_template(path: Path, params: list[dict[str, str]]) -> str:
    """The template's text, after checking it declares every parameter this script passes."""
    import yaml

    class Loader(yaml.SafeLoader):
        pass

    # CloudFormation short forms (!Ref, !Sub, ...): keep the value, drop the tag.
    def any_tag(loader: yaml.SafeLoader, _suffix: str, node: yaml.Node) -> Any:
        if isinstance(node, yaml.MappingNode):
            return loader.construct_mapping(node)
        if isinstance(node, yaml.SequenceNode):
            return loader.construct_sequence(node)
        assert isinstance(node, yaml.ScalarNode)  # the composer makes only these three kinds
        return loader.construct_scalar(node)

    Loader.add_multi_constructor("!", any_tag)
    try:
        body = path.read_text()
    except OSError as e:
        raise DeployError(f"cannot read the template {path}: {e.strerror}") from None
    try:
        declared = (yaml.load(body, Loader=Loader) or {}).get("Parameters") or {}
    except yaml.YAMLError as e:
        raise DeployError(f"the template {path} is not valid YAML: {e}") from None
    if len(body.encode()) > 51_200:  # CloudFormation's limit for an inline TemplateBody
        raise DeployError(f"the template {path} is over 51,200 bytes: upload it to S3 and use a TemplateURL")
    missing = [p["ParameterKey"] for p in params if p["ParameterKey"] not in declared]
    if missing:
        raise DeployError(f"the template {path} does not declare the parameters {missing}")
    return body


def stack_request(args: argparse.Namespace, body: str, params: list[dict[str, str]]) -> dict[str, Any]:
    """Keyword arguments shared by CreateStack and UpdateStack."""
    return {
        "StackName": args.stack_name,
        "TemplateBody": body,
        "Parameters": params,
        "Capabilities": CAPABILITIES,
        "Tags": TAGS,
    }


def resolve_region(region: str | None) -> str | None:
    """--region, else boto3's own resolution (environment, config file). Makes no call."""
    import boto3

    return boto3.session.Session(region_name=region).region_name


# ----------------------------------------------------------------------------- dry run


def dry_run(
    args: argparse.Namespace, body: str, params: list[dict[str, str]], region: str | None
) -> list[dict[str, Any]]:
    """Every AWS call a real run may make, in order (both branches: create and update); calls nothing."""
    rel = args.template.resolve()
    try:
        rel = rel.relative_to(PROJECT_ROOT)
    except ValueError:
        pass
    digest = hashlib.sha256(body.encode()).hexdigest()[:16]
    template = f"<{rel}: {len(body.encode())} bytes, sha256 {digest}…>"
    request = stack_request(args, template, params)
    name = {"StackName": args.stack_name}
    wait = {"Delay": 15, "MaxAttempts": args.timeout_minutes * 4}
    calls: list[dict[str, Any]] = []

    def emit(action: str, params: dict[str, Any], when: str | None = None) -> None:
        line: dict[str, Any] = {"action": action, "region": region}
        if when:
            line["when"] = when
        line["params"] = params
        calls.append(line)

    emit("cloudformation:ValidateTemplate", {"TemplateBody": template})
    emit("cloudformation:DescribeStacks", name)
    emit("cloudformation:CreateStack", {**request, "OnFailure": "ROLLBACK"}, "the stack does not exist")
    emit("cloudformation:wait", {"waiter": "stack_create_complete", **name, "WaiterConfig": wait})
    emit("cloudformation:UpdateStack", request, "the stack exists")
    emit("cloudformation:wait", {"waiter": "stack_update_complete", **name, "WaiterConfig": wait})
    emit("cloudformation:DescribeStacks", name, "print the outputs")
    return calls


# ----------------------------------------------------------------------------- real run


def _error_message(e: Exception) -> str:
    err = getattr(e, "response", {}).get("Error", {})
    return err.get("Message") or str(e)


def stack_status(cf: Any, name: str) -> str | None:
    try:
        stacks = cf.describe_stacks(StackName=name)["Stacks"]
    except ClientError as e:
        if "does not exist" in _error_message(e):
            return None
        raise
    return stacks[0]["StackStatus"] if stacks else None


def failure_reasons(cf: Any, name: str, limit: int = 8) -> list[str]:
    """The newest FAILED events of the stack, oldest first (best effort)."""
    try:
        events = cf.describe_stack_events(StackName=name)["StackEvents"]
    except Exception:  # only decorates an error being reported anyway
        return []
    failed = [e for e in events if e.get("ResourceStatus", "").endswith("FAILED")][:limit]
    return [
        f"{e.get('LogicalResourceId')} ({e.get('ResourceType')}): {e.get('ResourceStatusReason', '')}"
        for e in reversed(failed)
    ]


def _wait(cf: Any, waiter: str, name: str, minutes: int) -> None:
    try:
        cf.get_waiter(waiter).wait(StackName=name, WaiterConfig={"Delay": 15, "MaxAttempts": minutes * 4})
    except WaiterError as e:
        status = stack_status(cf, name) or "gone"
        reasons = failure_reasons(cf, name)
        detail = "".join(f"\n  {r}" for r in reasons)
        if "Max attempts exceeded" in str(e):
            raise DeployError(
                f"stack {name} still {status} after {minutes} min; it goes on in CloudFormation{detail}"
            ) from None
        raise DeployError(f"stack {name} ended {status}{detail}") from None


def deploy(cf: Any, args: argparse.Namespace, body: str, params: list[dict[str, str]]) -> dict[str, Any]:
    """Validate, create or update, wait; returns what is printed: status and outputs."""
    name = args.stack_name
    logger.info("validating %s", args.template.name)
    try:
        cf.validate_template(TemplateBody=body)
    except ClientError as e:
        raise DeployError(f"CloudFormation rejected the template: {_error_message(e)}") from None

    status = stack_status(cf, name)
    request = stack_request(args, body, params)
    if status is None or status == "DELETE_COMPLETE":
        logger.info("creating stack %s (ECS service, load balancer, bucket: about 5-10 minutes)", name)
        try:
            cf.create_stack(**request, OnFailure="ROLLBACK")
        except ClientError as e:
            raise DeployError(f"CreateStack failed: {_error_message(e)}") from None
        _wait(cf, "stack_create_complete", name, args.timeout_minutes)
        action = "created"
    elif status in STUCK:
        raise DeployError(f"stack {name} is {status}: {STUCK[status].format(name=name)}")
    elif status.endswith("_IN_PROGRESS"):
        raise DeployError(f"stack {name} is busy ({status}); wait for it to finish and run again")
    else:
        logger.info("updating stack %s (was %s)", name, status)
        try:
            cf.update_stack(**request)
        except ClientError as e:
            if NO_UPDATES not in _error_message(e):
                raise DeployError(f"UpdateStack failed: {_error_message(e)}") from None
            logger.info("no changes: the stack already matches")
            action = "unchanged"
        else:
            _wait(cf, "stack_update_complete", name, args.timeout_minutes)
            action = "updated"

    stack = cf.describe_stacks(StackName=name)["Stacks"][0]
    return {
        "stack": name,
        "action": action,
        "status": stack["StackStatus"],
        "outputs": {o["OutputKey"]: o["OutputValue"] for o in stack.get("Outputs", [])},
    }


def region_for(args: argparse.Namespace) -> str | None:
    """The stack's region; refuses an image from another region, which the tasks could not pull."""
    region = resolve_region(args.region)
    image = IMAGE_RE.match(args.image_uri)
    assert image is not None  # --image-uri is parsed with _checked(IMAGE_RE, ...)
    image_region = image["region"]
    if region and image_region != region:
        raise DeployError(
            f"the image is in {image_region} but the stack goes to {region}: push the image to an ECR "
            f"repository in {region} (the task execution role pulls from the stack's region only)"
        )
    return region


def run(args: argparse.Namespace, client: Any = None) -> dict[str, Any] | list[dict[str, Any]]:
    """The dry run's list of calls, or the real run's result (``client``: a CloudFormation client,
    e.g. a stubbed one; default: boto3's for the region). Raises :class:`DeployError` and botocore's
    errors."""
    params = stack_parameters(args)
    body = read_template(args.template, params)
    region = region_for(args)
    if args.dry_run:
        return dry_run(args, body, params, region)
    if region is None:
        raise DeployError("no AWS region: pass --region or set AWS_REGION")
    if client is None:
        import boto3

        client = boto3.session.Session(region_name=region).client("cloudformation")
    return deploy(client, args, body, params)
