"""Deploy the container to SageMaker: ECR push, model upload, endpoint lifecycle, autoscaling.

Run `python -m deploy --help`; the README's deploy section is the guided sequence.
"""
