"""Deployment: the CloudFormation stack on AWS (:mod:`~simserver.deploy.aws`, ``simserver deploy aws``)
and the Bento export with its Docker build context (:mod:`~simserver.deploy.bento`, ``simserver bento
export``). See deploy/aws/README.md."""
