"""``simserver deploy aws`` (the CloudFormation stack) and ``simserver bento export`` (the Bento,
its archive and a Docker build context). Walk-through: deploy/aws/README.md."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any

from simserver.cli.common import FAILED, HelpFormatter, fail
from simserver.settings import PROJECT_ROOT

logger = logging.getLogger(__name__)

AWS_DESCRIPTION = (
    "Create or update the image-similarity stack on ECS Fargate (deploy/aws/stack.yaml). --dry-run prints "
    "every AWS call it would make, one JSON object a line, and calls nothing. Otherwise it validates the "
    "template, creates the stack if absent or updates it if present, waits for CloudFormation, and prints "
    "the stack outputs as JSON (progress on stderr). Exit status: 0 done, 1 failed, 2 bad arguments."
)
AWS_EXAMPLE = """example:
  simserver deploy aws --stack-name image-similarity \\
      --image-uri 123456789012.dkr.ecr.eu-west-1.amazonaws.com/image-similarity:v1 \\
      --vpc-id vpc-0abc... --subnets subnet-0aaa...,subnet-0bbb... \\
      --api-key-secret-arn arn:aws:secretsmanager:eu-west-1:123456789012:secret:sim-api-key-AbCdEf \\
      --region eu-west-1 --dry-run"""


class _Formatter(argparse.ArgumentDefaultsHelpFormatter, HelpFormatter):
    """Defaults in the option help, and the example kept as written."""


def _aws_parser(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    from simserver.deploy import aws

    aws.add_arguments(p)
    p.set_defaults(func=aws_command, log_level=logging.INFO, parser=p)
    return p


def add_parsers(sub: argparse._SubParsersAction) -> None:
    deploy = sub.add_parser("deploy", help="deploy the server").add_subparsers(
        dest="deploy_command", metavar="TARGET", required=True
    )
    _aws_parser(
        deploy.add_parser(
            "aws",
            help="create or update the CloudFormation stack (ECS Fargate + ALB + S3)",
            description=AWS_DESCRIPTION,
            epilog=AWS_EXAMPLE,
            formatter_class=_Formatter,
        )
    )
    bento = sub.add_parser("bento", help="the Bento: build and export").add_subparsers(
        dest="bento_command", metavar="COMMAND", required=True
    )
    p = bento.add_parser(
        "export",
        help="bentoml build + a Bento archive + a Docker build context (no Docker needed)",
        description="`bentoml build` (bentofile.yaml), `bentoml export` to "
        "<out>/<name>-<version>.tar.gz, and the Docker build context <out>/<name>-<version>/ with "
        "the encoder models and a Dockerfile completed with curl and the --no-deps packages. Prints "
        "a JSON summary.",
    )
    p.add_argument("--out", type=Path, default=PROJECT_ROOT / "var" / "export", help="output folder")
    p.add_argument("--tag", help="export this already built Bento (name:version) instead of building")
    p.add_argument("--no-archive", action="store_true", help="skip the Bento archive (.tar.gz)")
    p.set_defaults(func=bento_export, log_level=logging.INFO, parser=p)


def aws_command(args: argparse.Namespace, client: Any = None) -> int:
    """``client``: a CloudFormation client to use instead of boto3's (the tests stub one)."""
    from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError, NoRegionError

    from simserver.deploy import aws

    aws.check_arguments(args.parser, args)
    try:
        result = aws.run(args, client)
    except aws.DeployError as e:
        return fail(str(e), FAILED)
    except NoCredentialsError:
        return fail(
            "no AWS credentials found (environment, ~/.aws/credentials, SSO or instance role)", FAILED
        )
    except NoRegionError:
        return fail("no AWS region: pass --region or set AWS_REGION", FAILED)
    except ClientError as e:
        code = e.response.get("Error", {}).get("Code", "error")
        message = e.response.get("Error", {}).get("Message") or str(e)
        return fail(f"AWS refused {e.operation_name}: {code}: {message}", FAILED)
    except BotoCoreError as e:  # endpoint unreachable, bad configuration, ...
        return fail(str(e), FAILED)
    except KeyboardInterrupt:
        return fail("interrupted (CloudFormation goes on with what it started)", 130)
    if isinstance(result, list):  # the dry run's calls
        for line in result:
            print(json.dumps(line), flush=True)
    else:
        print(json.dumps(result, indent=2))
    return 0


def aws_main(argv: list[str] | None = None, client: Any = None) -> int:
    """``simserver deploy aws`` on its own (for callers holding a client, e.g. tests)."""
    parser = _aws_parser(
        argparse.ArgumentParser(
            prog="simserver deploy aws",
            description=AWS_DESCRIPTION,
            epilog=AWS_EXAMPLE,
            formatter_class=_Formatter,
        )
    )
    return aws_command(parser.parse_args(argv), client)


def bento_export(args: argparse.Namespace) -> int:
    from simserver.deploy.bento import ExportError, export

    try:
        result = export(args.out.resolve(), args.tag, not args.no_archive)
    except (ExportError, OSError) as e:
        return fail(str(e), FAILED)
    print(json.dumps(result, indent=2))
    return 0
