"""Fixtures of the train-layout tests: the loopback S3 server of the cluster tests."""

from cluster.conftest import s3_endpoint, s3_options, s3_url

__all__ = ["s3_endpoint", "s3_options", "s3_url"]
