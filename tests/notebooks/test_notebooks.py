"""Every notebook, executed top to bottom in local mode: no cell may fail, the saved outputs must be
those of this run (up to ids, timestamps, ports and timings), and nothing it started may survive it.

Notebook 02 builds and pushes the image, so it needs Docker: without an engine (or the means to
start one) it fails with the reason, it is not skipped. Refresh the saved outputs after a change with
`.venv/bin/python -m tests.notebooks.execute --write notebooks/NAME.ipynb`.
"""

from __future__ import annotations

import difflib
import socket
from pathlib import Path

import nbformat
import pytest
from nbclient.exceptions import CellExecutionError

from tests.notebooks.execute import NOTEBOOKS, cell_outputs, execute

pytestmark = pytest.mark.slow
TIMINGS: dict[str, float] = {}


def listening(address: str) -> bool:
    """True when something accepts connections on host:port."""
    host, port = address.rsplit(":", 1)
    with socket.socket() as sock:
        sock.settimeout(2)
        return sock.connect_ex((host, int(port))) == 0


def run_recording(path: Path, tmp_path: Path) -> tuple[nbformat.NotebookNode, list[str]]:
    """Execute the notebook; (executed notebook, every address it opened)."""
    record = tmp_path / "addresses.txt"
    record.touch()
    try:
        nb, seconds = execute(path, {"NOTEBOOK_ADDRESSES_FILE": str(record)})
    finally:
        addresses = record.read_text().split()
    TIMINGS[path.name] = seconds
    print(f"{path.name}: executed in {seconds:.0f} s")
    return nb, addresses


def stale_cells(saved: list[str], fresh: list[str]) -> str:
    """A diff per code cell whose normalised outputs differ."""
    if len(saved) != len(fresh):
        return f"{len(saved)} code cells saved, {len(fresh)} executed"
    diffs = []
    for index, (old, new) in enumerate(zip(saved, fresh)):
        if old != new:
            diff = difflib.unified_diff(old.splitlines(), new.splitlines(), "saved", "executed", lineterm="")
            diffs.append(f"code cell {index}:\n" + "\n".join(diff))
    return "\n\n".join(diffs)


@pytest.mark.timeout(1500)
@pytest.mark.parametrize("name", ["01_quickstart_local.ipynb", "02_deploy_sagemaker.ipynb",
                                  "03_openai_clients.ipynb"])
def test_notebook_runs_and_outputs_are_current(name: str, tmp_path: Path) -> None:
    path = NOTEBOOKS / name
    saved = cell_outputs(nbformat.read(path, as_version=4))
    assert any(saved), f"{name} has no saved outputs: run it once with --write"
    nb, addresses = run_recording(path, tmp_path)
    assert addresses, "local mode started nothing: was NOTEBOOK_MODE=local honoured?"
    assert [a for a in addresses if listening(a)] == [], "the notebook left these addresses listening"
    diff = stale_cells(saved, cell_outputs(nb))
    assert not diff, (f"the saved outputs of {name} are not those of a fresh run; refresh them with "
                      f"`.venv/bin/python -m tests.notebooks.execute --write notebooks/{name}`:\n{diff}")


FAILING = [
    f"import sys\nsys.path.insert(0, {str(NOTEBOOKS)!r})\nimport _local\n"
    "stack = _local.LocalStack()\nstack.start_aws()\nstack.start_registry()",
    "raise RuntimeError('a cell fails half-way')",
    "stack.close()",
]


@pytest.mark.timeout(300)
def test_a_failing_notebook_still_stops_what_it_started(tmp_path: Path) -> None:
    """The last cell never runs; the kernel's exit stops moto, the runtime and the registry process."""
    path = tmp_path / "failing.ipynb"
    nbformat.write(nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(c) for c in FAILING]), path)
    with pytest.raises(CellExecutionError, match="a cell fails half-way"):
        run_recording(path, tmp_path)
    addresses = (tmp_path / "addresses.txt").read_text().split()
    assert len(addresses) == 3  # moto, the local runtime, the registry
    assert [a for a in addresses if listening(a)] == []
