"""Cache of converted (quantized) weights, written with orbax-checkpoint.

The first load of a (checkpoint, formats) pair saves the model's parameters after conversion;
later loads restore them directly. An entry is a directory named by a hash of its key: the source's
identity (path, and size and mtime of each of its files), the formats and the dtype. It holds the
orbax checkpoint and, written last, `manifest.json` with the key and a digest of every array.
An entry with no manifest, another key, arrays orbax cannot read or a digest that does not match
is deleted and rebuilt, never trusted. An entry is written whole in a directory of its own writer
and renamed into place: processes that convert the same weights at once (servers started together,
the processes of one multi-host model on one machine) each write their own, the first rename wins
and the others drop theirs.
"""

import hashlib
import json
import logging
import os
import shutil
import time

import jax
import numpy as np
import orbax.checkpoint as ocp

logger = logging.getLogger("jaxinfer")

CACHE_VERSION = 1


def default_cache_dir() -> str:
    return os.environ.get("JAXINFER_CACHE_DIR") or os.path.expanduser("~/.cache/jaxinfer/weights")


def source_identity(path: str) -> dict:
    """Path, size and mtime of a GGUF file or of each file of a checkpoint directory."""
    path = os.path.realpath(path)
    files = [path] if os.path.isfile(path) else sorted(
        os.path.join(path, f) for f in os.listdir(path) if f.endswith((".safetensors", ".json")))
    return {"path": path, "files": [[os.path.basename(f), os.stat(f).st_size, os.stat(f).st_mtime_ns] for f in files]}


def tree_digest(tree) -> str:
    """blake2b of every array's bytes, in pytree order, with its path, shape and dtype."""
    h = hashlib.blake2b(digest_size=20)
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        array = np.ascontiguousarray(np.asarray(leaf))
        h.update(f"{jax.tree_util.keystr(path)}:{array.shape}:{array.dtype}".encode())
        h.update(array.view(np.uint8).reshape(-1).data)
    return h.hexdigest()


class WeightCache:
    def __init__(self, root: str, source_path: str, **fields):
        self.key = {"version": CACHE_VERSION, "source": source_identity(source_path), **fields}
        name = os.path.basename(os.path.normpath(source_path))
        digest = hashlib.sha256(json.dumps(self.key, sort_keys=True).encode()).hexdigest()[:16]
        self.dir = os.path.join(os.path.abspath(os.path.expanduser(root)), f"{name}-{digest}")
        self.manifest_path = os.path.join(self.dir, "manifest.json")
        self.arrays_dir = os.path.join(self.dir, "arrays")

    def load(self, abstract: dict) -> dict | None:
        """The cached parameters shaped like `abstract` (a pure dict of shape/dtype structs), or None."""
        if not os.path.isdir(self.dir):
            return None
        start = time.perf_counter()
        try:
            with open(self.manifest_path) as f:
                manifest = json.load(f)
            if manifest["key"] != json.loads(json.dumps(self.key)):
                raise ValueError("the key does not match")
            target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), abstract)
            with ocp.StandardCheckpointer() as checkpointer:
                params = checkpointer.restore(self.arrays_dir, target)
            if tree_digest(params) != manifest["digest"]:
                raise ValueError("the arrays' digest does not match the manifest")
        except Exception as e:  # missing manifest, unreadable or corrupted arrays: rebuild
            logger.warning("weight cache %s is unusable (%s: %s); rebuilding it", self.dir, type(e).__name__, e)
            shutil.rmtree(self.dir, ignore_errors=True)
            return None
        logger.debug("weights read from the cache %s in %.1f s", self.dir, time.perf_counter() - start)
        return params

    def save(self, params: dict) -> None:
        start = time.perf_counter()
        partial = f"{self.dir}.partial-{os.getpid()}-{time.monotonic_ns()}"  # this writer's own
        try:
            os.makedirs(partial)
            with ocp.StandardCheckpointer() as checkpointer:
                checkpointer.save(os.path.join(partial, "arrays"), params)
                checkpointer.wait_until_finished()
            with open(os.path.join(partial, "manifest.json"), "w") as f:
                json.dump({"key": self.key, "digest": tree_digest(params)}, f, indent=1)
            shutil.rmtree(self.dir, ignore_errors=True)  # an unusable entry that `load` did not remove
            try:
                os.rename(partial, self.dir)
            except OSError:  # another process's complete entry got there first: keep it
                if not os.path.isfile(self.manifest_path):
                    raise
                shutil.rmtree(partial, ignore_errors=True)
                logger.debug("weight cache %s was written by another process meanwhile", self.dir)
                return
        except Exception as e:  # a cache that cannot be written (disk full, read-only) is not fatal
            logger.warning("could not write the weight cache %s: %s", self.dir, e)
            shutil.rmtree(partial, ignore_errors=True)
            return
        logger.debug("converted weights cached in %s (%.1f s)", self.dir, time.perf_counter() - start)
