"""moto's S3 taught `ExpectedBucketOwner`, which moto 5.2 accepts and ignores.

S3 answers 403 AccessDenied to any bucket or object call whose `x-amz-expected-bucket-owner` header
names another account than the bucket's owner; moto serves buckets of several accounts (one per
access key issued by its STS), so a test can make a bucket in another account and check that the
deploy code refuses it.
"""

from __future__ import annotations

from typing import Any

from moto.s3.exceptions import MissingBucket
from moto.s3.responses import S3Response

HEADER = "x-amz-expected-bucket-owner"
DENIED = ('<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>AccessDenied</Code>'
          "<Message>Access Denied</Message></Error>")


def _owner_mismatch(response: S3Response, request: Any, full_url: str) -> bool:
    expected = request.headers.get(HEADER)
    bucket_name = response.parse_bucket_name_from_url(request, full_url)
    if not expected or not bucket_name:
        return False
    try:
        bucket = response.backend.get_bucket(bucket_name)
    except MissingBucket:
        return False  # the call itself answers NoSuchBucket
    return bucket.account_id != expected


def _checked(original):
    def handler(self: S3Response, request: Any, full_url: str, headers: Any):
        self.setup_class(request)
        if _owner_mismatch(self, request, full_url):
            # HEAD answers carry no body: botocore reads the code from the status alone ("403").
            return 403, {"content-type": "application/xml"}, b"" if request.method == "HEAD" else DENIED.encode()
        return original(self, request, full_url, headers)

    handler.expected_bucket_owner = True
    return handler


def install() -> None:
    """Check ExpectedBucketOwner on every bucket and object call (idempotent)."""
    for name in ("bucket_response", "key_response"):
        original = getattr(S3Response, name)
        if not getattr(original, "expected_bucket_owner", False):
            setattr(S3Response, name, _checked(original))
