"""Deploy, predict, stream and delete with the SageMaker Python SDK v2 (`sagemaker<3`), as a user writes
it: `sagemaker.model.Model` with the image URI, model data, environment and role, then its `Predictor`.

Run by tests/deploy/test_sdk_v2.py in .venv-sdk2 (AWS_ENDPOINT_URL* point at moto and the local
runtime); prints what it got back as JSON after `RESULT` for the test to check.
"""

import json
import os

import sagemaker
from sagemaker.deserializers import JSONDeserializer
from sagemaker.model import Model
from sagemaker.predictor import Predictor
from sagemaker.serializers import JSONSerializer

IMAGE_URI, MODEL_DATA, ROLE = os.environ["IMAGE_URI"], os.environ["MODEL_DATA"], os.environ["SAGEMAKER_ROLE"]
NAME = os.environ["ENDPOINT_NAME"]

session = sagemaker.Session()
model = Model(
    image_uri=IMAGE_URI,
    model_data=MODEL_DATA,  # s3://.../model.tar.gz, unpacked by SageMaker into /opt/ml/model
    env={"OAI_ENABLED": "true", "MAX_TOTAL_TOKENS": "2048"},
    role=ROLE,
    name=NAME,
    predictor_cls=Predictor,
    sagemaker_session=session,
)
predictor = model.deploy(initial_instance_count=1, instance_type="ml.g4dn.xlarge", endpoint_name=NAME,
                         serializer=JSONSerializer(), deserializer=JSONDeserializer())
described = session.sagemaker_client.describe_model(ModelName=NAME)  # what SageMaker recorded

chat = {"messages": [{"role": "user", "content": "What is the capital of France? Answer with the city name."}],
        "max_tokens": 12, "temperature": 0}
reply = predictor.predict(chat)
stream = b"".join(predictor.predict_stream({**chat, "stream": True}))  # PayloadPart bytes, in order

predictor.delete_model()
predictor.delete_endpoint()  # the endpoint and its endpoint config

print("\nRESULT", json.dumps({"container": described["PrimaryContainer"],
                              "execution_role_arn": described["ExecutionRoleArn"],
                              "reply": reply, "stream": stream.decode()}))
