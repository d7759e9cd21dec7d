"""Turn AWS failures into messages that say what is wrong and what to do about it."""

from __future__ import annotations

import botocore.exceptions as bce

CREDENTIALS_HELP = (
    "set AWS_PROFILE (after `aws configure` or `aws sso login`), or AWS_ACCESS_KEY_ID and "
    "AWS_SECRET_ACCESS_KEY (plus AWS_SESSION_TOKEN for temporary credentials)"
)
ROLE_HELP = (
    "create one with only what this endpoint needs (`python -m deploy role --name NAME --model-data S3_URI`, "
    "then `deploy` uses it), or pass --role with the name or ARN of an IAM role whose trust policy allows "
    "sagemaker.amazonaws.com to assume it; you must be allowed iam:PassRole on it"
)


class DeployError(Exception):
    """A failure the user can act on; the CLI prints its message and exits with status 2."""


def _code_and_message(exc: bce.ClientError) -> tuple[str, str]:
    error = exc.response.get("Error", {})
    return str(error.get("Code", "")), str(error.get("Message", ""))


def _explain_client_error(exc: bce.ClientError, what: str) -> DeployError | None:
    code, message = _code_and_message(exc)
    lowered = message.lower()
    if code in {"UnrecognizedClientException", "InvalidClientTokenId", "ExpiredToken",
                "ExpiredTokenException", "InvalidSignatureException", "SignatureDoesNotMatch"}:
        return DeployError(f"{what}: AWS rejected the credentials ({code}: {message}); {CREDENTIALS_HELP}")
    if code == "ResourceLimitExceeded":
        return DeployError(
            f"{what}: the account cannot run this instance type here ({message}). Ask for more in "
            "Service Quotas (service 'Amazon SageMaker', quota '<instance type> for endpoint usage') "
            "or choose another --instance-type"
        )
    if "instancetype" in lowered.replace(" ", "") or "instance type" in lowered:
        return DeployError(f"{what}: this instance type is not available ({message}); choose another --instance-type")
    if "role" in lowered and (code == "ValidationException" or "passrole" in lowered):
        return DeployError(f"{what}: SageMaker cannot use the execution role ({message}); {ROLE_HELP}")
    if code in {"AccessDenied", "AccessDeniedException"}:
        return DeployError(f"{what}: access denied ({message}); the caller needs permission for this call")
    return None


def explain(exc: Exception, what: str) -> DeployError | None:
    """A DeployError for a failure we can explain, or None to let the original error surface.

    `what` names the step that failed ("create endpoint smollm2"), so the message says where.
    """
    if isinstance(exc, DeployError):
        return exc
    if isinstance(exc, (bce.NoCredentialsError, bce.PartialCredentialsError)):
        return DeployError(f"{what}: no AWS credentials found; {CREDENTIALS_HELP}")
    if isinstance(exc, (bce.TokenRetrievalError, bce.SSOTokenLoadError, bce.UnauthorizedSSOTokenError)):
        return DeployError(f"{what}: the SSO session has expired or was never started; run `aws sso login`")
    if isinstance(exc, bce.ProfileNotFound):
        return DeployError(f"{what}: {exc}; check AWS_PROFILE / --profile against ~/.aws/config")
    if isinstance(exc, bce.NoRegionError):
        return DeployError(f"{what}: no AWS region set; pass --region or set AWS_REGION")
    if isinstance(exc, bce.EndpointConnectionError):
        return DeployError(
            f"{what}: cannot reach {exc.kwargs.get('endpoint_url', 'the AWS endpoint')}; check --region "
            "(is SageMaker offered there?) and the network"
        )
    if isinstance(exc, bce.ClientError):
        return _explain_client_error(exc, what)
    return None
