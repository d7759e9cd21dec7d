"""Deploy, invoke, stream and delete with the SageMaker Python SDK v3 (`pip install sagemaker`), as a user
writes it: `sagemaker.serve.ModelBuilder` with the image URI, its environment and model data on S3.

Run by tests/deploy/test_sdk_v3.py in .venv-sdk3 (AWS_ENDPOINT_URL* point at moto and the local
runtime); prints what it got back as one JSON line for the test to check.
"""

import json
import os

from sagemaker.serve import ModelBuilder

IMAGE_URI, MODEL_DATA, ROLE = os.environ["IMAGE_URI"], os.environ["MODEL_DATA"], os.environ["SAGEMAKER_ROLE"]
NAME = os.environ["ENDPOINT_NAME"]

# The image serves whatever SageMaker copies to /opt/ml/model: here the files under an S3 prefix
# (a ModelDataSource; a plain "s3://.../model.tar.gz" string works for a tarball).
builder = ModelBuilder(
    image_uri=IMAGE_URI,
    s3_model_data_url={"S3DataSource": {"S3Uri": MODEL_DATA, "S3DataType": "S3Prefix", "CompressionType": "None"}},
    env_vars={"OAI_ENABLED": "true", "MAX_TOTAL_TOKENS": "2048"},
    role_arn=ROLE,
    instance_type="ml.g4dn.xlarge",
)
model = builder.build(model_name=NAME)
described = builder.sagemaker_session.sagemaker_client.describe_model(ModelName=NAME)  # what SageMaker recorded
endpoint = builder.deploy(endpoint_name=NAME, initial_instance_count=1)

chat = {"messages": [{"role": "user", "content": "What is the capital of France? Answer with the city name."}],
        "max_tokens": 12, "temperature": 0}
answer = endpoint.invoke(body=json.dumps(chat), content_type="application/json", accept="application/json")
reply = json.loads(answer.body.read())

# Streaming: the SDK's own Endpoint.invoke_with_response_stream cannot read the event stream in this
# release (sagemaker-core 2.27.0 raises AttributeError: 'EventStream' object has no attribute 'get'),
# so the stream goes through the runtime client of the SDK's session (boto3's), as the SDK does inside.
stream_body = json.dumps({**chat, "stream": True})
try:
    endpoint.invoke_with_response_stream(body=stream_body, content_type="application/json")
    sdk_stream_error = None
except AttributeError as exc:
    sdk_stream_error = f"AttributeError: {exc}"
runtime = builder.sagemaker_session.sagemaker_runtime_client
stream = runtime.invoke_endpoint_with_response_stream(EndpointName=NAME, Body=stream_body,
                                                      ContentType="application/json")
events = b"".join(event["PayloadPart"]["Bytes"] for event in stream["Body"] if "PayloadPart" in event)

endpoint.delete()
endpoint.wait_for_delete(poll=1)
model.delete()

print("\nRESULT", json.dumps({"container": described["PrimaryContainer"], "execution_role_arn": described["ExecutionRoleArn"],
                  "variant": answer.invoked_production_variant, "reply": reply, "stream": events.decode(),
                  "sdk_stream_error": sdk_stream_error}))
