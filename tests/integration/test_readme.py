"""The README's API examples are run, as written, against a real server, and must print what it shows.

Each ```bash block with a curl command in the `api` section is followed by the output it printed
when the README was written (greedy decoding, so the text is reproducible); ids and timestamps differ
from run to run and are compared by type only.
"""

from __future__ import annotations

import json
import math
import re
import subprocess
from pathlib import Path

import pytest

from tests.server import ROOT

pytestmark = pytest.mark.slow
VOLATILE = {"id", "created"}


def api_examples() -> list[tuple[str, str, str]]:
    """(command, output kind, shown output) for every curl example of the README's api section."""
    text = Path(ROOT / "README.md").read_text(encoding="utf-8")
    section = text[text.index("<!-- section:api -->"): text.index("<!-- /section:api -->")]
    pairs = re.findall(r"```bash\n(.*?)```\s*```(json|text)\n(.*?)```", section, re.S)
    return [(cmd, kind, out) for cmd, kind, out in pairs if "curl" in cmd]


def normalise(value):
    """Replace run-specific values (ids, timestamps) by their type name."""
    if isinstance(value, dict):
        return {k: type(v).__name__ if k in VOLATILE else normalise(v) for k, v in value.items()}
    if isinstance(value, list):
        return [normalise(v) for v in value]
    return value


def parse(kind: str, output: str):
    if kind == "json":
        return normalise(json.loads(output))
    events = [line[5:].strip() for line in output.splitlines() if line.startswith("data:")]
    return [e if e == "[DONE]" else normalise(json.loads(e)) for e in events]


def test_readme_has_the_examples():
    kinds = [kind for _, kind, _ in api_examples()]
    assert len(kinds) >= 5 and "text" in kinds  # chat, generate, a stream, structured output, a tool call


@pytest.mark.parametrize("index", range(len(api_examples())))
def test_readme_example_prints_what_the_readme_shows(auto_server, index):
    cmd, kind, shown = api_examples()[index]
    run = subprocess.run(["bash", "-c", cmd.replace("http://localhost:8080", auto_server.url)],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert same(parse(kind, run.stdout), parse(kind, shown))


def same(got, shown) -> bool:
    """Equal, except that floats (logprobs) may differ in the last digits with the batch's shape."""
    if isinstance(got, float) and isinstance(shown, float):
        return math.isclose(got, shown, abs_tol=1e-2)
    if isinstance(got, dict) and isinstance(shown, dict):
        return got.keys() == shown.keys() and all(same(got[k], shown[k]) for k in got)
    if isinstance(got, list) and isinstance(shown, list):
        return len(got) == len(shown) and all(same(a, b) for a, b in zip(got, shown, strict=True))
    return got == shown
