"""Every Python example of the README's `clients` section runs, against the local runtime + real server."""

from __future__ import annotations

import os
import re

import pytest

from tests.server import ROOT

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240, func_only=True)]


def client_examples() -> list[str]:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme.split("<!-- section:clients -->")[1].split("<!-- /section:clients -->")[0]
    return re.findall(r"```python\n(.*?)```", section, flags=re.S)


def test_readme_has_an_example_per_client():
    text = "\n".join(client_examples())
    for client in ("boto3", "openai", "ChatOpenAI", "SagemakerEndpoint", "OpenAILike", "litellm", "sagemaker.core"):
        assert client in text


@pytest.mark.parametrize("index", range(len(client_examples())))
def test_readme_client_example_runs(index, oai_runtime, openai_server, aws_env, capsys):
    from sagemaker.core.utils.utils import SageMakerClient

    code = (client_examples()[index].replace("http://127.0.0.1:8081", oai_runtime.url)
            .replace("http://127.0.0.1:8080", openai_server.url).replace('"my-llm"', '"oai"')
            .replace("/endpoints/my-llm/", "/endpoints/oai/").replace("sagemaker_chat/my-llm", "sagemaker_chat/oai"))
    saved = dict(os.environ)
    SageMakerClient.reset()
    try:
        exec(compile(code, f"README clients example {index}", "exec"), {"__name__": "__readme__"})
    finally:
        os.environ.clear()
        os.environ.update(saved)
        SageMakerClient.reset()
    assert capsys.readouterr().out.strip()
