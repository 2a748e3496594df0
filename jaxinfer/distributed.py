"""Several processes (hosts) serving one model: `jax.distributed`, the step channel, the watchdog.

Every process loads the checkpoint from its own disk and keeps its devices' shards; the tensor-
parallel mesh spans the devices of all processes (`tensor_parallel.make_mesh`). Process 0 runs the
server, scheduler, allocator and sampling bookkeeping as a single process does, and before each step
sends the step's inputs (the padded numpy batch `runner.empty_batch` describes, compressed) through
the coordination service's key-value store; every other process waits for them there and runs the
same jitted step (`ModelRunner.follow`). Only process 0 reads the sampled tokens. Step n is the key
`jaxinfer/step/<n>`, deleted once step n has run on process 0 (its collectives mean every process
has read it). The key-value store is used rather than a collective broadcast because an idle
server's followers wait there for as long as no request comes, with no collective timing out.

Once loaded, the processes wait for each other (`StepChannel.wait_ready`) before the first step.

A dead process: jax.distributed's recoverability is on, so the coordination service marks it dead
instead of aborting the others (its default). A step whose peer is gone fails at once (gloo: the
connection is closed by the peer); the `Watchdog`, running from `initialize` on, asks the service
every second which processes are alive and reports a lost one even while the server is idle, or
hung (after the heartbeat timeout). Process 0 then fails the engine (503 on /health, the server
exits 1; `cli.serve`). When process 0 dies, the others end at once, the service having lived in
process 0: the step channel's wait fails (exit 1), or jax's own client aborts them first.

Single process (the default) never touches this module beyond `process_count() == 1`.
"""

import logging
import struct
import threading
import time
import zlib

import jax
import numpy as np

logger = logging.getLogger("jaxinfer")

HEARTBEAT_TIMEOUT_S = 10  # a process that sends no heartbeat for this long is dead (a hung host)
READY_TIMEOUT_S = 600  # the slowest process's model load, after process 0's
POLL_MS = 1000  # a follower's wait for the next step, between checks that process 0 is alive
_STEP, _SHUTDOWN = b"S", b"Q"
_PREFIX = "jaxinfer/"


def initialize(coordinator_address: str, num_processes: int, process_id: int) -> None:
    """`jax.distributed.initialize` for one process of `num_processes`, before any other JAX use.
    CPU collectives across processes go through gloo."""
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.config.update("jax_enable_recoverability", True)  # a dead process is reported, not fatal to all
    jax.distributed.initialize(coordinator_address, num_processes=num_processes, process_id=process_id,
                               heartbeat_timeout_seconds=HEARTBEAT_TIMEOUT_S, shutdown_timeout_seconds=10)
    global _watchdog
    _watchdog = Watchdog().start()  # from the start: a process lost while the others load is found too
    logger.info("jax.distributed: process %d of %d (coordinator %s), %d local and %d global %s devices",
                process_id, num_processes, coordinator_address, jax.local_device_count(), jax.device_count(),
                jax.devices()[0].platform)


_watchdog: "Watchdog | None" = None


def watchdog() -> "Watchdog":
    """This process's watchdog, running since `initialize`."""
    return _watchdog


def _client():
    from jax._src import distributed  # the coordination service's client: no public handle in jax 0.12

    return distributed.global_state.client


def agree(name: str, value: str) -> str:
    """Process 0's `value` on every process (a start-up fact: the KV cache's page count, the config)."""
    if jax.process_count() == 1:
        return value
    key = _PREFIX + "agree/" + name
    if jax.process_index() == 0:
        _client().key_value_set(key, value)
        return value
    return _client().blocking_key_value_get(key, 300_000)


def check_same(name: str, value: str) -> None:
    """A ValueError on a process whose `value` differs from process 0's (flags that must match)."""
    leader = agree(name, value)
    if leader != value:
        raise ValueError(f"process {jax.process_index()}: its {name} differs from process 0's; start every "
                         f"process with the same model and engine flags.\n  process 0: {leader}\n  this one: {value}")


class StepChannel:
    """Process 0 sends each step's (bucket shape, numpy leaves); the other processes receive them."""

    def __init__(self):
        self.client = _client()
        self.step = 0

    def wait_ready(self, timeout_s: float = READY_TIMEOUT_S) -> None:
        """Waits until every process has its shards and caches, so that the first step's collectives
        do not time out (gloo gives a peer 30 s to join) while a slower host still loads. Raises
        `ProcessLostError` if one is lost meanwhile (a start-up error, a kill) or does not come."""
        self.client.key_value_set(f"{_PREFIX}ready/{jax.process_index()}", "1")
        deadline = time.monotonic() + timeout_s
        while len(self.client.key_value_dir_get(_PREFIX + "ready/")) < jax.process_count():
            if _watchdog is not None and _watchdog.lost is not None:
                raise _watchdog.lost
            if time.monotonic() > deadline:
                raise ProcessLostError(f"process {jax.process_index()}: not every process of {jax.process_count()} "
                                       f"loaded the model within {timeout_s:.0f} s")
            time.sleep(0.2)

    def send(self, num_tokens: int, num_seqs: int, leaves: list[np.ndarray]) -> None:
        payload = struct.pack("<ii", num_tokens, num_seqs) + b"".join(np.ascontiguousarray(x).tobytes() for x in leaves)
        self.client.key_value_set_bytes(f"{_PREFIX}step/{self.step}", _STEP + zlib.compress(payload, 1))

    def sent(self) -> None:
        """Step `self.step` ran on process 0, so on every process: its key can go."""
        self.client.key_value_delete(f"{_PREFIX}step/{self.step}")
        self.step += 1

    def send_shutdown(self, timeout_s: float = 10.0) -> None:
        """Tells the others to stop, then waits (up to `timeout_s`) until they have disconnected:
        the coordination service lives in process 0, and a process that leaves after it is gone
        aborts at exit."""
        # overwrite: after a failed step its message is still there, unread by a lost process
        self.client.key_value_set_bytes(f"{_PREFIX}step/{self.step}", _SHUTDOWN, allow_overwrite=True)
        everyone = list(range(jax.process_count()))
        waiter = threading.Thread(target=lambda: _wait_for(lambda: set(self.client.get_live_nodes(everyone)) == {0},
                                                            timeout_s), daemon=True)
        waiter.start()
        waiter.join(timeout_s)  # get_live_nodes waits for every live process: bounded here

    def receive(self, watchdog: "Watchdog") -> tuple[int, int, bytes] | None:
        """The next step's (num_tokens, num_seqs, leaf bytes), or None at shutdown. Raises
        `ProcessLostError` when the watchdog has found a process gone."""
        key = f"{_PREFIX}step/{self.step}"
        while True:
            if watchdog.lost is not None:
                raise watchdog.lost
            try:
                message = self.client.blocking_key_value_get_bytes(key, POLL_MS)
                break
            except Exception as e:  # noqa: BLE001 - jaxlib raises its own XlaRuntimeError for a timeout
                if "DEADLINE_EXCEEDED" not in str(e):
                    raise ProcessLostError(f"process {jax.process_index()}: the coordination service (process 0) "
                                           f"is unreachable: {e}") from e
        self.step += 1
        if message[:1] == _SHUTDOWN:
            return None
        payload = zlib.decompress(message[1:])
        num_tokens, num_seqs = struct.unpack_from("<ii", payload)
        return num_tokens, num_seqs, payload[8:]


def _wait_for(condition, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.1)


def fill(leaves: list[np.ndarray], data: bytes) -> None:
    """Writes `data` (the leaves' bytes, in order, as `StepChannel.send` joined them) into `leaves`."""
    offset = 0
    for leaf in leaves:
        leaf[...] = np.frombuffer(data, leaf.dtype, leaf.size, offset).reshape(leaf.shape)
        offset += leaf.nbytes
    if offset != len(data):
        raise ValueError(f"a step message of {len(data)} bytes for leaves of {offset}: processes disagree on shapes")


class ProcessLostError(RuntimeError):
    """A process of the group is no longer alive (or unreachable)."""


class Watchdog:
    """Asks the coordination service every second which processes are alive (a call every live
    process makes, so each runs one); the first time one is missing, logs which and calls
    `on_lost(ProcessLostError)` once. `lost` then holds the error."""

    def __init__(self, interval_s: float = 1.0):
        self.on_lost = None
        self.interval_s = interval_s
        self.lost: ProcessLostError | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="jaxinfer-watchdog", daemon=True)

    def start(self) -> "Watchdog":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def notify(self, on_lost) -> None:
        """Calls `on_lost(error)` when a process is lost, or now if one already was."""
        self.on_lost = on_lost
        if self.lost is not None:
            on_lost(self.lost)

    def wait(self, timeout_s: float) -> ProcessLostError | None:
        """Waits up to `timeout_s` for a lost process to be found (after a step failed: which one?)."""
        self._thread.join(timeout_s)
        return self.lost

    def _run(self) -> None:
        client, everyone = _client(), list(range(jax.process_count()))
        while not self._stop.wait(self.interval_s):
            try:
                alive = set(client.get_live_nodes(everyone))
                missing = [p for p in everyone if p not in alive]
                reason = f"process(es) {', '.join(map(str, missing))} of {len(everyone)} are no longer alive"
            except Exception as e:  # noqa: BLE001 - the service itself (in process 0) is gone
                missing, reason = [0], f"the coordination service (process 0) is unreachable: {e}"
            if missing and not self._stop.is_set():
                self.lost = ProcessLostError(f"jax.distributed: {reason} (seen from process {jax.process_index()})")
                logger.error("%s", self.lost)
                on_lost = self.on_lost
                if on_lost is not None:
                    on_lost(self.lost)
                return
