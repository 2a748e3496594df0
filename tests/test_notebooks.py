"""The notebooks run top to bottom without an error (each cell's own asserts included) and show what
they claim: the quickstart's greedy answer, the paged cache's prefix hits and preemptions, the
quantization table."""

import importlib.util
import pathlib

import nbclient
import nbformat
import pytest

NOTEBOOKS = pathlib.Path(__file__).parent.parent / "notebooks"


def text_output(nb: nbformat.NotebookNode) -> str:
    return "\n".join(out.get("text", "") for cell in nb.cells if cell.cell_type == "code"
                     for out in cell.outputs if out.output_type == "stream")


def images(nb: nbformat.NotebookNode) -> int:
    return sum("image/png" in out.get("data", {}) for cell in nb.cells if cell.cell_type == "code"
               for out in cell.outputs)


@pytest.fixture(autouse=True)
def _agg_backend(monkeypatch):  # the kernel inherits the environment
    monkeypatch.setenv("MPLBACKEND", "Agg")


def execute(name: str) -> nbformat.NotebookNode:
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                            resources={"metadata": {"path": str(NOTEBOOKS)}}).execute()
    return nb


def test_committed_notebooks_are_what_build_py_writes():
    """notebooks/build.py is the source: each committed .ipynb has its cells (type and text, in
    order), its metadata, and no outputs. Cell ids are random per build and not compared."""
    spec = importlib.util.spec_from_file_location("notebooks_build", NOTEBOOKS / "build.py")
    build = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build)
    assert sorted(build.NOTEBOOKS) == sorted(path.name for path in NOTEBOOKS.glob("*.ipynb"))
    for name, cells in build.NOTEBOOKS.items():
        want, got = build.build(cells), nbformat.read(NOTEBOOKS / name, as_version=4)
        assert [(c.cell_type, c.source) for c in got.cells] == [(c.cell_type, c.source) for c in want.cells], (
            f"{name} differs from notebooks/build.py: run `python notebooks/build.py`")
        assert got.metadata == want.metadata, name
        assert not any(c.get("outputs") for c in got.cells), f"{name} is committed with outputs"


def test_quickstart_answers_paris_greedily():
    out = text_output(execute("01_quickstart.ipynb"))
    assert "'The capital of France is' -> " in out
    assert "Paris" in out.split("'The capital of France is' -> ")[1].splitlines()[0]
    assert "finish_reason: length" in out  # the streamed request ran to max_tokens


def test_paged_kv_cache_shows_prefix_hits_and_preemptions():
    nb = execute("02_paged_kv_cache.ipynb")  # the notebook asserts hits > 0, shared pages, preemptions > 0
    out = text_output(nb)
    last = out.strip().splitlines()[-1]  # "prefix-cache hits: N tokens; preemptions: M"
    hits, preemptions = (int(part.split(": ")[1].split()[0]) for part in last.split("; "))
    assert hits > 0 and preemptions > 0
    assert images(nb) == 1


def test_quantization_table_and_chart():
    nb = execute("03_quantization.ipynb")
    out = text_output(nb)
    rows = [line for line in out.splitlines() if line.startswith("| ") and not line.startswith("| format")]
    assert [row.split(" | ")[0] for row in rows] == ["| none", "| int8", "| native"]
    assert images(nb) == 1
