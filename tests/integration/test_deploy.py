"""AWS deployment: the CloudFormation template (cfn-lint + required properties), `simserver deploy aws`
(dry run makes no call; create then update against moto's standalone server; error paths with a stubbed
client) and `simserver bento export` (a real `bentoml build` + export + Docker build context).

The template tests and the dry-run / stubbed tests take a few seconds; the moto and export tests are
marked slow (a server; a Bento build that locks requirements against the package index).
"""

from __future__ import annotations

import ast
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import requests
import yaml

from tests.integration.conftest import ROOT, MotoServer, Server

TEMPLATE = ROOT / "deploy" / "aws" / "stack.yaml"
CLI = [sys.executable, "-m", "simserver.cli"]
DEPLOY = [*CLI, "deploy", "aws"]
EXPORT = [*CLI, "bento", "export"]

ACCOUNT = "123456789012"  # moto's default account
SECRET_ARN = f"arn:aws:secretsmanager:us-east-1:{ACCOUNT}:secret:sim-api-key-AbCdEf"
IMAGE = f"{ACCOUNT}.dkr.ecr.us-east-1.amazonaws.com/image-similarity"
DRY_ARGS = [
    "--stack-name",
    "sim-test",
    "--image-uri",
    f"{IMAGE}:v1",
    "--vpc-id",
    "vpc-0123456789abcdef0",
    "--subnets",
    "subnet-0123456789abcdef0,subnet-0123456789abcdef1",
    "--api-key-secret-arn",
    SECRET_ARN,
    "--region",
    "us-east-1",
]


# ----------------------------------------------------------------------------- helpers


class CfnLoader(yaml.SafeLoader):
    """YAML loader that turns CloudFormation short forms into their long JSON forms."""


def _cfn_tag(loader: yaml.SafeLoader, suffix: str, node: yaml.Node) -> dict[str, Any]:
    if isinstance(node, yaml.MappingNode):
        value: Any = loader.construct_mapping(node, deep=True)
    elif isinstance(node, yaml.SequenceNode):
        value = loader.construct_sequence(node, deep=True)
    else:
        assert isinstance(node, yaml.ScalarNode)  # the composer makes only these three kinds
        value = loader.construct_scalar(node)
    if suffix == "Ref":
        return {"Ref": value}
    if suffix == "GetAtt" and isinstance(value, str):
        value = value.split(".", 1)
    return {f"Fn::{suffix}": value}


CfnLoader.add_multi_constructor("!", _cfn_tag)


@pytest.fixture(scope="module")
def template() -> dict[str, Any]:
    return yaml.load(TEMPLATE.read_text(), Loader=CfnLoader)


def resources_of(template: dict[str, Any], rtype: str) -> dict[str, dict[str, Any]]:
    return {k: v for k, v in template["Resources"].items() if v["Type"] == rtype}


def the(template: dict[str, Any], rtype: str) -> dict[str, Any]:
    found = resources_of(template, rtype)
    assert len(found) == 1, f"expected one {rtype}, found {sorted(found)}"
    return next(iter(found.values()))


def statements(role: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for policy in role["Properties"].get("Policies", []):
        out.extend(policy["PolicyDocument"]["Statement"])
    return out


def as_list(x: Any) -> list[Any]:
    return x if isinstance(x, list) else [x]


def clean_env(**extra: str) -> dict[str, str]:
    """The environment without any AWS setting (no real credentials can leak into a test)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(
        AWS_SHARED_CREDENTIALS_FILE=os.devnull,
        AWS_CONFIG_FILE=os.devnull,
        AWS_EC2_METADATA_DISABLED="true",  # never ask an instance-metadata address for credentials
    )
    env.update(extra)
    return env


def run_deploy(args: list[str], env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*DEPLOY, *args], env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout
    )


class ConnectionCounter:
    """A TCP listener on 127.0.0.1 that counts connections and closes each one at once."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.sock.settimeout(0.2)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.count = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            self.count += 1
            conn.close()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.sock.close()


@pytest.fixture
def counter():
    c = ConnectionCounter()
    yield c
    c.close()


# ----------------------------------------------------------------------------- the template


def test_cfn_lint_passes():
    exe = Path(sys.executable).with_name("cfn-lint")
    cmd = [str(exe)] if exe.exists() else [shutil.which("cfn-lint") or "cfn-lint"]
    proc = subprocess.run([*cmd, str(TEMPLATE)], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 0 and not proc.stdout.strip(), proc.stdout + proc.stderr


def test_parameters(template):
    params = template["Parameters"]
    for name in ("ImageUri", "DesiredCount", "Cpu", "Memory", "VpcId", "AlbSubnetIds", "TaskSubnetIds"):
        assert name in params, name
    assert params["VpcId"]["Type"] == "AWS::EC2::VPC::Id"
    assert params["AlbSubnetIds"]["Type"] == "List<AWS::EC2::Subnet::Id>"
    assert params["ApiKeySecretArn"]["Type"] == "String"


def test_bucket_versioned_encrypted_private_retained(template):
    bucket = the(template, "AWS::S3::Bucket")
    assert bucket["DeletionPolicy"] == "Retain" and bucket["UpdateReplacePolicy"] == "Retain"
    props = bucket["Properties"]
    assert props["VersioningConfiguration"] == {"Status": "Enabled"}
    rules = props["BucketEncryption"]["ServerSideEncryptionConfiguration"]
    assert rules and all(
        r["ServerSideEncryptionByDefault"]["SSEAlgorithm"] in ("AES256", "aws:kms", "aws:kms:dsse")
        for r in rules
    )
    assert props["PublicAccessBlockConfiguration"] == {
        "BlockPublicAcls": True,
        "BlockPublicPolicy": True,
        "IgnorePublicAcls": True,
        "RestrictPublicBuckets": True,
    }
    assert "BucketName" not in props  # generated: no collisions between stacks or accounts
    policy = the(template, "AWS::S3::BucketPolicy")["Properties"]["PolicyDocument"]["Statement"]
    assert any(s["Effect"] == "Deny" and "aws:SecureTransport" in json.dumps(s) for s in policy)


def test_task_definition_health_check_secret_store_and_logs(template):
    td = the(template, "AWS::ECS::TaskDefinition")["Properties"]
    assert td["RequiresCompatibilities"] == ["FARGATE"] and td["NetworkMode"] == "awsvpc"
    assert td["Cpu"] == {"Ref": "Cpu"} and td["Memory"] == {"Ref": "Memory"}
    (container,) = td["ContainerDefinitions"]
    assert container["Image"] == {"Ref": "ImageUri"}
    assert [p["ContainerPort"] for p in container["PortMappings"]] == [3000]
    assert container["HealthCheck"]["Command"] == [
        "CMD-SHELL",
        "curl -f http://localhost:3000/livez || exit 1",
    ]
    env = {e["Name"]: e["Value"] for e in container["Environment"]}
    assert env["STORE_URI"] == {"Fn::Sub": "s3://${StoreBucket}/store"}
    assert "API_KEY" not in env
    assert container["Secrets"] == [{"Name": "API_KEY", "ValueFrom": {"Ref": "ApiKeySecretArn"}}]
    logs = container["LogConfiguration"]
    assert logs["LogDriver"] == "awslogs"
    assert logs["Options"]["awslogs-group"] == {"Ref": "LogGroup"}
    assert template["Resources"]["LogGroup"]["Properties"]["RetentionInDays"] == {"Ref": "LogRetentionDays"}
    assert td["TaskRoleArn"] == {"Fn::GetAtt": ["TaskRole", "Arn"]}
    assert td["ExecutionRoleArn"] == {"Fn::GetAtt": ["ExecutionRole", "Arn"]}


def test_load_balancer_listener_and_readyz(template):
    tg = the(template, "AWS::ElasticLoadBalancingV2::TargetGroup")["Properties"]
    assert tg["HealthCheckPath"] == "/readyz" and tg["Port"] == 3000 and tg["TargetType"] == "ip"
    attrs = {a["Key"]: a["Value"] for a in tg["TargetGroupAttributes"]}
    assert int(attrs["deregistration_delay.timeout_seconds"]) <= 60
    listener = the(template, "AWS::ElasticLoadBalancingV2::Listener")["Properties"]
    assert listener["Port"] == 80 and listener["DefaultActions"][0]["Type"] == "forward"
    svc = the(template, "AWS::ECS::Service")
    assert svc["DependsOn"] == "Listener"
    props = svc["Properties"]
    assert props["LaunchType"] == "FARGATE" and props["DesiredCount"] == {"Ref": "DesiredCount"}
    assert props["LoadBalancers"][0]["ContainerPort"] == 3000
    assert props["HealthCheckGracePeriodSeconds"] >= 60


def test_security_groups_alb_public_tasks_from_alb_only(template):
    sgs = resources_of(template, "AWS::EC2::SecurityGroup")
    alb = sgs["AlbSecurityGroup"]["Properties"]["SecurityGroupIngress"]
    assert [(r["FromPort"], r["ToPort"], r["CidrIp"]) for r in alb] == [(80, 80, "0.0.0.0/0")]
    tasks = sgs["TaskSecurityGroup"]["Properties"]["SecurityGroupIngress"]
    assert len(tasks) == 1 and "CidrIp" not in tasks[0] and "CidrIpv6" not in tasks[0]
    assert tasks[0]["SourceSecurityGroupId"] == {"Fn::GetAtt": ["AlbSecurityGroup", "GroupId"]}
    assert (tasks[0]["FromPort"], tasks[0]["ToPort"]) == (3000, 3000)
    assert not resources_of(template, "AWS::EC2::SecurityGroupIngress")  # no rule added elsewhere
    lb = the(template, "AWS::ElasticLoadBalancingV2::LoadBalancer")["Properties"]
    assert lb["SecurityGroups"] == [{"Fn::GetAtt": ["AlbSecurityGroup", "GroupId"]}]
    net = the(template, "AWS::ECS::Service")["Properties"]["NetworkConfiguration"]["AwsvpcConfiguration"]
    assert net["SecurityGroups"] == [{"Fn::GetAtt": ["TaskSecurityGroup", "GroupId"]}]


def test_task_role_limited_to_the_bucket(template):
    role = template["Resources"]["TaskRole"]
    assert "ManagedPolicyArns" not in role["Properties"]
    stmts = statements(role)
    by_resource = {json.dumps(s["Resource"], sort_keys=True): s for s in stmts}
    objects = by_resource[json.dumps({"Fn::Sub": "${StoreBucket.Arn}/*"})]
    bucket = by_resource[json.dumps({"Fn::GetAtt": ["StoreBucket", "Arn"]})]
    assert sorted(as_list(objects["Action"])) == ["s3:DeleteObject", "s3:GetObject", "s3:PutObject"]
    assert as_list(bucket["Action"]) == ["s3:ListBucket"]
    assert len(stmts) == 2 and all(s["Effect"] == "Allow" for s in stmts)
    assert all("*" not in a for s in stmts for a in as_list(s["Action"]))


def test_execution_role_reads_only_that_secret(template):
    stmts = statements(template["Resources"]["ExecutionRole"])
    assert "ManagedPolicyArns" not in template["Resources"]["ExecutionRole"]["Properties"]
    secret = [s for s in stmts if any(a.startswith("secretsmanager:") for a in as_list(s["Action"]))]
    assert len(secret) == 1
    assert as_list(secret[0]["Action"]) == ["secretsmanager:GetSecretValue"]
    assert secret[0]["Resource"] == {"Ref": "ApiKeySecretArn"}
    actions = {a for s in stmts for a in as_list(s["Action"])}
    assert {"ecr:BatchGetImage", "ecr:GetAuthorizationToken", "logs:PutLogEvents"} <= actions
    # Only the ECR token call (which has no resource-level permission) may use Resource "*".
    assert all(s["Resource"] != "*" or as_list(s["Action"]) == ["ecr:GetAuthorizationToken"] for s in stmts)


def test_cpu_target_tracking_autoscaling(template):
    target = the(template, "AWS::ApplicationAutoScaling::ScalableTarget")["Properties"]
    assert target["ScalableDimension"] == "ecs:service:DesiredCount" and target["ServiceNamespace"] == "ecs"
    assert "Service.Name" in target["ResourceId"]["Fn::Sub"]
    policy = the(template, "AWS::ApplicationAutoScaling::ScalingPolicy")["Properties"]
    assert policy["PolicyType"] == "TargetTrackingScaling"
    tt = policy["TargetTrackingScalingPolicyConfiguration"]
    assert tt["PredefinedMetricSpecification"]["PredefinedMetricType"] == "ECSServiceAverageCPUUtilization"
    assert tt["TargetValue"] == {"Ref": "CpuTargetPercent"}
    assert template["Parameters"]["CpuTargetPercent"]["Default"] == 60


def test_outputs(template):
    outputs = template["Outputs"]
    assert outputs["LoadBalancerDNSName"]["Value"] == {"Fn::GetAtt": ["LoadBalancer", "DNSName"]}
    assert outputs["BucketName"]["Value"] == {"Ref": "StoreBucket"}


# ----------------------------------------------------------------------------- deploy aws, no AWS


def test_dry_run_prints_the_create_actions_and_calls_nothing(counter):
    # No credentials at all and an endpoint that counts connections: any AWS call would show up.
    proc = run_deploy([*DRY_ARGS, "--dry-run"], clean_env(AWS_ENDPOINT_URL=counter.url), timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    lines = [json.loads(line) for line in proc.stdout.splitlines()]
    actions = [line["action"] for line in lines]
    assert actions == [
        "cloudformation:ValidateTemplate",
        "cloudformation:DescribeStacks",
        "cloudformation:CreateStack",
        "cloudformation:wait",
        "cloudformation:UpdateStack",
        "cloudformation:wait",
        "cloudformation:DescribeStacks",
    ]
    create = lines[2]["params"]
    assert create["StackName"] == "sim-test" and create["Capabilities"] == ["CAPABILITY_IAM"]
    assert create["OnFailure"] == "ROLLBACK"
    params = {p["ParameterKey"]: p["ParameterValue"] for p in create["Parameters"]}
    assert params["ImageUri"] == f"{IMAGE}:v1"
    assert (
        params["AlbSubnetIds"]
        == params["TaskSubnetIds"]
        == "subnet-0123456789abcdef0,subnet-0123456789abcdef1"
    )
    assert params["AssignPublicIp"] == "ENABLED"  # tasks in the load balancer's public subnets
    assert params["ApiKeySecretArn"] == SECRET_ARN and params["DesiredCount"] == "2"
    assert "stack.yaml" in create["TemplateBody"] and lines[0]["region"] == "us-east-1"
    assert lines[3]["params"]["waiter"] == "stack_create_complete"
    time.sleep(0.3)
    assert counter.count == 0


def test_the_connection_counter_sees_a_real_run(counter):
    """Control for the test above: without --dry-run the same setup does reach the endpoint."""
    env = clean_env(
        AWS_ENDPOINT_URL=counter.url,
        AWS_ACCESS_KEY_ID="testing",
        AWS_SECRET_ACCESS_KEY="testing",
        AWS_MAX_ATTEMPTS="1",
    )
    proc = run_deploy(DRY_ARGS, env, timeout=60)
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr and "error:" in proc.stderr
    assert counter.count >= 1


@pytest.mark.parametrize(
    "change, message",
    [
        (["--subnets", "subnet-0123456789abcdef0"], "at least two Availability Zones"),
        (["--subnets", "sn-1,sn-2"], "not a subnet id"),
        (["--vpc-id", "vpc-xyz"], "not a VPC id"),
        (
            ["--api-key-secret-arn", "arn:aws:secretsmanager:us-east-1:123456789012:secret:noid"],
            "full Secrets",
        ),
        (["--image-uri", "docker.io/library/python:3.11"], "not an ECR image URI"),
        (["--cpu", "1024", "--memory", "16384"], "not valid with --cpu 1024"),
        (["--min-capacity", "5", "--max-capacity", "2"], "above --max-capacity"),
    ],
)
def test_bad_arguments_exit_2_with_a_message(deploy_module, capsys, change, message):
    with pytest.raises(SystemExit) as exc:
        deploy_module.aws_main([*DRY_ARGS, *change, "--dry-run"])
    out, err = capsys.readouterr()
    assert exc.value.code == 2 and message in err and out == "", err


def test_image_region_must_match_the_stack_region():
    proc = run_deploy([*DRY_ARGS, "--region", "eu-west-1", "--dry-run"], clean_env(), timeout=60)
    assert proc.returncode == 1 and "push the image to an ECR repository in eu-west-1" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_no_region_and_no_credentials_are_clear_errors():
    args = [a for a in DRY_ARGS if a not in ("--region", "us-east-1")]
    proc = run_deploy(args, clean_env(), timeout=60)
    assert proc.returncode == 1 and "no AWS region" in proc.stderr and "Traceback" not in proc.stderr
    proc = run_deploy(DRY_ARGS, clean_env(), timeout=60)
    assert proc.returncode == 1 and "no AWS credentials" in proc.stderr and "Traceback" not in proc.stderr


# ----------------------------------------------------------------------------- deploy aws, stubbed client


@pytest.fixture
def deploy_module():
    """The command's module: ``aws_main(argv, client=…)`` runs `simserver deploy aws` with a given client."""
    from simserver.cli import deploy

    return deploy


@pytest.fixture
def stubbed():
    import boto3
    from botocore.stub import Stubber

    client = boto3.session.Session(
        aws_access_key_id="testing", aws_secret_access_key="testing", region_name="us-east-1"
    ).client("cloudformation", endpoint_url="http://127.0.0.1:9")  # never reached: the stubber answers
    with Stubber(client) as stub:
        yield client, stub
        stub.assert_no_pending_responses()


def _stack(status: str, outputs: dict[str, str] | None = None) -> dict[str, Any]:
    return {
        "Stacks": [
            {
                "StackName": "sim-test",
                "CreationTime": "2026-01-01T00:00:00Z",
                "StackStatus": status,
                "Outputs": [{"OutputKey": k, "OutputValue": v} for k, v in (outputs or {}).items()],
            }
        ]
    }


def test_no_updates_to_perform_is_success(deploy_module, stubbed, capsys):
    client, stub = stubbed
    stub.add_response("validate_template", {})
    stub.add_response("describe_stacks", _stack("CREATE_COMPLETE"))
    stub.add_client_error(
        "update_stack",
        service_error_code="ValidationError",
        service_message="No updates are to be performed.",
    )
    stub.add_response("describe_stacks", _stack("CREATE_COMPLETE", {"BucketName": "b"}))
    assert deploy_module.aws_main(DRY_ARGS, client=client) == 0
    out = json.loads(capsys.readouterr().out)
    assert out == {
        "stack": "sim-test",
        "action": "unchanged",
        "status": "CREATE_COMPLETE",
        "outputs": {"BucketName": "b"},
    }


@pytest.mark.parametrize(
    "status, message",
    [("ROLLBACK_COMPLETE", "delete-stack --stack-name sim-test"), ("UPDATE_IN_PROGRESS", "is busy")],
)
def test_stacks_that_cannot_be_updated(deploy_module, stubbed, capsys, status, message):
    client, stub = stubbed
    stub.add_response("validate_template", {})
    stub.add_response("describe_stacks", _stack(status))
    assert deploy_module.aws_main(DRY_ARGS, client=client) == 1
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_failed_creation_reports_the_failed_resources(deploy_module, stubbed, capsys):
    client, stub = stubbed
    stub.add_response("validate_template", {})
    stub.add_client_error("describe_stacks", "ValidationError", "Stack with id sim-test does not exist")
    stub.add_response("create_stack", {"StackId": "arn:aws:cloudformation:us-east-1:1:stack/sim-test/x"})
    stub.add_response("describe_stacks", _stack("ROLLBACK_COMPLETE"))  # the waiter's first poll
    stub.add_response("describe_stacks", _stack("ROLLBACK_COMPLETE"))
    event = {
        "StackId": "x",
        "EventId": "e1",
        "StackName": "sim-test",
        "Timestamp": "2026-01-01T00:00:00Z",
        "LogicalResourceId": "Service",
        "ResourceType": "AWS::ECS::Service",
        "ResourceStatus": "CREATE_FAILED",
        "ResourceStatusReason": "tasks failed to start",
    }
    stub.add_response("describe_stack_events", {"StackEvents": [event]})
    assert deploy_module.aws_main(DRY_ARGS, client=client) == 1
    err = capsys.readouterr().err
    assert "ended ROLLBACK_COMPLETE" in err and "Service (AWS::ECS::Service): tasks failed to start" in err


def test_rejected_template_is_a_clear_error(deploy_module, stubbed, capsys):
    client, stub = stubbed
    stub.add_client_error("validate_template", "ValidationError", "Template format error: bad")
    assert deploy_module.aws_main(DRY_ARGS, client=client) == 1
    assert "CloudFormation rejected the template: Template format error: bad" in capsys.readouterr().err


# ----------------------------------------------------------------------------- against moto's server


@pytest.fixture(scope="module")
def moto(tmp_path_factory):
    """moto's standalone server on a free 127.0.0.1 port, with a VPC, two subnets and the API key secret."""
    import boto3

    srv = MotoServer(tmp_path_factory.mktemp("moto-cfn") / "moto.log")
    url = srv.url
    session = boto3.session.Session(
        aws_access_key_id="testing", aws_secret_access_key="testing", region_name="us-east-1"
    )

    def client(service: str):
        return session.client(service, endpoint_url=url)

    ec2 = client("ec2")
    vpc = ec2.create_vpc(CidrBlock="10.20.0.0/16")["Vpc"]["VpcId"]
    subnets = [
        ec2.create_subnet(VpcId=vpc, CidrBlock=f"10.20.{i}.0/24", AvailabilityZone=f"us-east-1{az}")[
            "Subnet"
        ]["SubnetId"]
        for i, az in enumerate("ab")
    ]
    secret = client("secretsmanager").create_secret(Name="sim-api-key", SecretString="key-1")["ARN"]
    env = clean_env(AWS_ENDPOINT_URL=url, AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing")
    yield {"url": url, "client": client, "vpc": vpc, "subnets": subnets, "secret": secret, "env": env}
    srv.stop()


def _moto_args(moto, image_tag: str, desired: int) -> list[str]:
    return [
        "--stack-name",
        "sim-moto",
        "--image-uri",
        f"{IMAGE}:{image_tag}",
        "--vpc-id",
        moto["vpc"],
        "--subnets",
        ",".join(moto["subnets"]),
        "--api-key-secret-arn",
        moto["secret"],
        "--region",
        "us-east-1",
        "--desired-count",
        str(desired),
    ]


def _physical_ids(moto) -> dict[str, str]:
    summaries = moto["client"]("cloudformation").list_stack_resources(StackName="sim-moto")
    # moto lists the resource types it cannot model with empty fields.
    return {
        r["LogicalResourceId"]: r["PhysicalResourceId"]
        for r in summaries["StackResourceSummaries"]
        if r["LogicalResourceId"]
    }


def _policy(iam, role: str, name: str) -> dict[str, Any]:
    doc = iam.get_role_policy(RoleName=role, PolicyName=name)["PolicyDocument"]
    # moto 5.2.5 returns inline policies created through CloudFormation as the repr of a Python dict.
    return ast.literal_eval(doc) if isinstance(doc, str) else doc


@pytest.mark.slow
def test_create_then_update_against_moto(moto):
    client = moto["client"]

    # 1. create
    proc = run_deploy(_moto_args(moto, "v1", 2), moto["env"])
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    created = json.loads(proc.stdout)
    assert created["action"] == "created" and created["status"] == "CREATE_COMPLETE"
    outputs = created["outputs"]
    bucket, dns = outputs["BucketName"], outputs["LoadBalancerDNSName"]
    assert dns.endswith(".elb.amazonaws.com") and outputs["StoreUri"] == f"s3://{bucket}/store"
    ids = _physical_ids(moto)

    # What moto models of the created resources, wired as the template says.
    s3 = client("s3")
    rules = s3.get_bucket_encryption(Bucket=bucket)["ServerSideEncryptionConfiguration"]["Rules"]
    assert rules[0]["ApplyServerSideEncryptionByDefault"]["SSEAlgorithm"] == "AES256"
    ecs = client("ecs")
    (service,) = ecs.describe_services(cluster=ids["Cluster"], services=[ids["Service"]])["services"]
    assert service["desiredCount"] == 2
    task = ecs.describe_task_definition(taskDefinition=service["taskDefinition"])["taskDefinition"]
    (container,) = task["containerDefinitions"]
    assert container["image"] == f"{IMAGE}:v1"
    assert container["secrets"] == [{"name": "API_KEY", "valueFrom": moto["secret"]}]
    assert {"name": "STORE_URI", "value": f"s3://{bucket}/store"} in container["environment"]
    assert container["healthCheck"]["command"][1] == "curl -f http://localhost:3000/livez || exit 1"
    assert container["logConfiguration"]["options"]["awslogs-group"] == ids["LogGroup"]
    elb = client("elbv2")
    (tg,) = elb.describe_target_groups(TargetGroupArns=[ids["TargetGroup"]])["TargetGroups"]
    assert tg["HealthCheckPath"] == "/readyz" and tg["Port"] == 3000 and tg["TargetType"] == "ip"
    (listener,) = elb.describe_listeners(ListenerArns=[ids["Listener"]])["Listeners"]
    assert listener["Port"] == 80
    iam = client("iam")
    doc = _policy(iam, ids["TaskRole"], "store-bucket")
    assert sorted(json.dumps(s["Resource"]) for s in doc["Statement"]) == sorted(
        [json.dumps(f"arn:aws:s3:::{bucket}/*"), json.dumps(f"arn:aws:s3:::{bucket}")]
    )
    doc = _policy(iam, ids["ExecutionRole"], "pull-log-secret")
    assert [s["Resource"] for s in doc["Statement"] if s["Sid"] == "ApiKeySecret"] == [moto["secret"]]
    ec2 = client("ec2")
    (task_sg,) = ec2.describe_security_groups(GroupIds=[ids["TaskSecurityGroup"]])["SecurityGroups"]
    (rule,) = task_sg["IpPermissions"]
    assert rule["FromPort"] == 3000 and not rule["IpRanges"]
    assert [p["GroupId"] for p in rule["UserIdGroupPairs"]] == [ids["AlbSecurityGroup"]]
    groups = client("logs").describe_log_groups(logGroupNamePrefix=ids["LogGroup"])["logGroups"]
    assert groups[0]["retentionInDays"] == 30

    # 2. a second run updates the same stack: new image, more tasks
    proc = run_deploy(_moto_args(moto, "v2", 3), moto["env"])
    assert proc.returncode == 0, proc.stderr
    updated = json.loads(proc.stdout)
    assert updated["action"] == "updated" and updated["status"] == "UPDATE_COMPLETE"
    assert updated["outputs"]["BucketName"] == bucket  # same bucket: the store survives deployments
    ids2 = _physical_ids(moto)
    assert ids2["Service"] == ids["Service"] and ids2["StoreBucket"] == bucket
    (service,) = ecs.describe_services(cluster=ids2["Cluster"], services=[ids2["Service"]])["services"]
    assert service["desiredCount"] == 3
    # A changed image registers a new task definition revision, and the service moves to it. (moto 5.2.5
    # loses the container fields of a task definition updated through CloudFormation, so the image of the
    # new revision is not asserted here.)
    assert ids2["TaskDefinition"] != ids["TaskDefinition"] and ids2["TaskDefinition"].endswith(":2")
    assert service["taskDefinition"] == ids2["TaskDefinition"]
    stacks = client("cloudformation").describe_stacks(StackName="sim-moto")["Stacks"]
    params = {p["ParameterKey"]: p["ParameterValue"] for p in stacks[0]["Parameters"]}
    assert params["ImageUri"] == f"{IMAGE}:v2" and params["DesiredCount"] == "3"


# ----------------------------------------------------------------------------- bento export


@pytest.mark.slow
def test_export_bento_writes_archive_and_docker_context(tmp_path, demo_store):
    """A real `bentoml build` (needs the package index, or UV_OFFLINE=1 with a warm uv cache) in a
    throw-away BENTOML_HOME holding a copy of the encoder model."""
    home = Path(os.environ.get("BENTOML_HOME", ROOT / "var" / "bentoml"))
    model_name = os.environ.get("BUILTIN_MODEL", "efficientnet-lite0-imagenet")
    if not (home / "models" / model_name / "latest").exists():
        pytest.skip(f"no {model_name} model in {home}: run `make encoder` first")
    scratch = tmp_path / "bentoml"
    # The Bento carries both built-in models: the image encoder and the text encoder.
    for name in (model_name, "paraphrase-minilm-l3-text"):
        shutil.copytree(home / "models" / name, scratch / "models" / name)
    env = dict(os.environ, BENTOML_HOME=str(scratch), BENTOML_DO_NOT_TRACK="True")
    out = tmp_path / "export"
    proc = subprocess.run(
        [*EXPORT, "--out", str(out)],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout)
    name, version = result["tag"].split(":")
    assert name == "image-similarity" and result["built"] is True
    model_tag = (home / "models" / model_name / "latest").read_text().strip()
    assert f"{model_name}:{model_tag}" in result["models"]

    # the portable archive: the Bento plus its model
    archive = Path(result["archive"])
    assert archive == out / f"{name}-{version}.tar.gz"
    with tarfile.open(archive) as tar:
        names = set(tar.getnames())
    assert {"./bento.yaml", "./src/service.py", "./env/docker/Dockerfile"} <= names
    assert {"./src/simserver/ui/index.html", "./src/simserver/ui/pages/dupes.js"} <= names
    assert f"./models/{model_name}/{model_tag}/model.yaml" in names
    # ... which `bentoml import` reads into another BentoML home, with both models.
    other = dict(env, BENTOML_HOME=str(tmp_path / "imported"))
    imported = subprocess.run(
        [sys.executable, "-m", "bentoml", "import", str(archive)],
        env=other,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert imported.returncode == 0, imported.stderr[-3000:]
    assert (tmp_path / "imported" / "bentos" / name / version / "bento.yaml").is_file()
    for model in result["models"]:
        m_name, m_tag = model.split(":")
        assert (tmp_path / "imported" / "models" / m_name / m_tag / "model.yaml").is_file(), model

    # the Docker build context
    ctx = Path(result["context"])
    assert ctx == out / f"{name}-{version}"
    for rel in ("bento.yaml", "src/service.py", "src/domains/fashion.yaml", "env/python/requirements.txt"):
        assert (ctx / rel).is_file(), rel
    assert (ctx / "models" / model_name / "latest").read_text() == model_tag
    assert (ctx / "models" / model_name / model_tag / "saved_model" / "saved_model.pb").is_file()
    dockerfile = (ctx / "env" / "docker" / "Dockerfile").read_text()
    assert "FROM python:3.11" in dockerfile and "ENTRYPOINT" in dockerfile and "EXPOSE 3000" in dockerfile
    # The image gets curl (the ECS health check runs it) and every --no-deps package, whether from the
    # Bento itself or from the block `simserver bento export` appends.
    assert re.search(r"apt-get install[^\n]*\bcurl\b", dockerfile)
    locked = (ctx / "env" / "python" / "requirements.txt").read_text().lower()
    nodeps = ROOT / "requirements-nodeps.txt"
    wanted = [
        line.split("==")[0].strip().lower()
        for line in (nodeps.read_text().splitlines() if nodeps.exists() else [])
        if line.strip() and not line.startswith("#")
    ]
    if any(f"\n{name}==" not in f"\n{locked}" for name in wanted):
        assert "uv pip install --no-deps -r $BENTO_PATH/env/deploy/requirements-nodeps.txt" in dockerfile
        assert (ctx / "env" / "deploy" / "requirements-nodeps.txt").read_text() == nodeps.read_text()
    if result["dockerfile_additions"]:
        assert dockerfile.rstrip().endswith("USER bentoml")  # the server does not run as root

    # The context's models/ is a valid BentoML model store (what the container's BentoML reads).
    found = subprocess.run(
        [sys.executable, "-m", "bentoml", "models", "get", f"{model_name}:latest", "-o", "path"],
        env=dict(env, BENTOML_HOME=str(ctx), COLUMNS="4000"),  # rich wraps long paths at 80 columns
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert found.returncode == 0, found.stderr
    assert Path(found.stdout.strip()) == ctx / "models" / model_name / model_tag

    # The exported Bento serves from an empty BENTOML_HOME, away from the source tree: `bentoml import`
    # brings the Bento and its encoder model; domains come from the Bento's own src/domains.
    empty_home = tmp_path / "empty-home"
    clean = {k: v for k, v in env.items() if k not in ("PYTHONPATH", "DOMAINS_DIR", "STORE_URI")}
    clean["BENTOML_HOME"] = str(empty_home)
    imported = subprocess.run(
        [sys.executable, "-m", "bentoml", "import", str(archive)],
        env=clean,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert imported.returncode == 0, imported.stderr[-2000:]
    clean.update(
        STORE_URI=f"file://{demo_store}",
        BENTOML_RESULT_STORE=str(tmp_path / "tasks.db"),
        STORE_CACHE_DIR=str(tmp_path / "cache"),
    )
    srv = Server(clean, tmp_path / "bento-serve.log", target=result["tag"], cwd=tmp_path)
    try:
        srv.wait_ready()
        query = (ROOT / "demo" / "fashion" / "dress" / "google.png").read_bytes()
        hit = requests.post(f"{srv.url}/fashion/search", files={"image": ("q.png", query)}, timeout=60)
        assert hit.status_code == 200, hit.text
        assert hit.json()["results"][0]["name"] == "dress/google.png"
        # The web interface ships in the Bento (bentofile.yaml includes simserver/ui/**): the page
        # and every script and style sheet it loads, byte for byte the source tree's.
        ui_dir = ROOT / "simserver" / "ui"
        page = requests.get(f"{srv.url}/ui/", timeout=30)
        assert page.status_code == 200 and page.content == (ui_dir / "index.html").read_bytes()
        assets = re.findall(r'(?:src|href)="([^":]+\.(?:js|css))"', page.text)
        assert {"app.js", "style.css", "pages/dupes.js", "pages/training.js"} <= set(assets)
        assert len(assets) == len(list(ui_dir.glob("pages/*.js"))) + 2  # every page is loaded
        for asset in assets:
            got = requests.get(f"{srv.url}/ui/{asset}", timeout=30)
            assert got.status_code == 200 and got.content == (ui_dir / asset).read_bytes(), asset
    finally:
        srv.stop()
