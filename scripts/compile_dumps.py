"""Where the deviceless compile checks (gpu_compile_check.py, mgpu_compile_check.py) put what the
compilers dump, and what they clean up at exit."""

import atexit
import glob
import os
import shutil
import tempfile
import time


def dump_dir(prefix: str) -> str:
    """A fresh directory for the dumps (XLA's HLO and PTX, Mosaic GPU's PTX and ptxas reports: 90-470
    MB a run). They are read for the tables, then removed at exit; KEEP_COMPILE_DUMPS=1 keeps them
    to look at. Also removes at exit the cubin directories jaxlib leaves (`remove_mosaic_leftovers`)."""
    path = tempfile.mkdtemp(prefix=prefix)
    if not os.environ.get("KEEP_COMPILE_DUMPS"):
        atexit.register(shutil.rmtree, path, ignore_errors=True)
    atexit.register(remove_mosaic_leftovers, time.time())
    return path


def remove_mosaic_leftovers(started: float, settled_s: float = 2.0):
    """jaxlib's Mosaic GPU compiler puts each kernel's cubin in a /tmp/mosaic-gpu-XXXXXX directory
    of its own and never removes it (its TemporaryDirectory has no destructor: a run of the compile
    checks left a hundred or so). Removes those made since `started`, once their kernel.bin was last
    written `settled_s` ago: the compiler reads it back as soon as ptxas exits, and a newer one may
    belong to a compile check running beside this one (as in .ci/run). Waits at most `settled_s`."""
    made = {}
    for path in glob.glob("/tmp/mosaic-gpu-*"):
        try:
            if os.stat(path).st_mtime >= started - 1:
                made[path] = os.stat(os.path.join(path, "kernel.bin")).st_mtime
        except OSError:  # no kernel.bin (yet), or gone
            pass
    if made:
        time.sleep(max(0.0, min(settled_s, max(made.values()) + settled_s - time.time())))
    for path in made:
        shutil.rmtree(path, ignore_errors=True)
