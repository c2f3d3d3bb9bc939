"""Decoding in feeder processes: the CPU-heavy part of feeding a model, past the GIL.

One process spends at most about one core on feeding whatever its thread
count (most of a decode holds the GIL: see docs/throughput.md), so on a
machine with more cores than that, `FeederPool` runs the decode, resize and
normalisation of fetched bytes in `processes` processes of their own, each
with its own GIL. The fetching stays in the calling process, so the SSRF
guard, the deadlines, the byte caps and the per-host limits are exactly those
of `enrichment.media.fetch`; a fetcher's handler thread hands the bytes to an
idle feeder and waits for the answer, as it would wait for its own decode.

- The processes start once and serve every batch after. Each is a fresh
  interpreter (`python -m enrichment.media.feeders`), spawned, not forked: no
  copy of the caller's threads, sockets or CUDA state. Not `multiprocessing`'s
  spawn: that runs the caller's main script again in every child (a benchmark
  or a script without a `__main__` guard would import torch there, or start
  feeders of its own) and pickles the process object to it; a feeder imports
  this module alone (numpy and Pillow), about 0.2 s, and reads its settings as
  one JSON argument.
- The bytes go to a feeder raw on its socket (`multiprocessing.connection`'s
  length-prefixed frames), and the answer comes back as one JSON object
  (empty, or an error's reason and message): nothing is pickled.
- The pixels do not travel on the pipe: each feeder normalises straight into
  its own slot of one shared-memory block, and the caller copies the slot out
  (one memcpy of the input, 0.6 MB at 224 px) before the feeder takes the
  next image.
- A decode error in a feeder is that record's `ImageError`, with the reason
  the in-thread decode gives. A feeder that dies (killed, out of memory)
  fails only the image it was decoding, as `decode_error`, and is started
  again.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
from dataclasses import dataclass
from multiprocessing import resource_tracker
from multiprocessing.connection import Connection
from multiprocessing.shared_memory import SharedMemory
from pathlib import Path

import numpy as np

from enrichment.media.decode import DEFAULT_MAX_PIXELS, ImageError, Preprocessing, decode

__all__ = ["FeederPool"]

WAIT_SECONDS = 0.2  # how often a thread waiting for an idle feeder looks for a closed pool
STOP_SECONDS = 2.0  # how long a feeder gets to leave on its own at close


# The directory that holds this `enrichment`, first on the feeders' path: they run this code.
CODE_ROOT = str(Path(__file__).resolve().parents[2])


@dataclass
class _Feeder:
    process: subprocess.Popen[bytes]
    connection: Connection


class FeederPool:
    """`processes` decoding processes for one model's preprocessing; a context manager.

    `decode` is called from the fetcher's handler threads, each blocking until a
    feeder is idle, so at most `processes` images decode at once (in place of
    `DecodeSlots` in this process).
    """

    def __init__(
        self,
        processes: int,
        preprocessing: Preprocessing,
        max_pixels: int = DEFAULT_MAX_PIXELS,
    ) -> None:
        size = preprocessing.input_size
        self.processes = processes
        self.preprocessing = preprocessing
        self.max_pixels = max_pixels
        self.shape = (3, size, size)
        self._slot_bytes = 3 * size * size * np.dtype(np.float32).itemsize
        self._memory = SharedMemory(create=True, size=processes * self._slot_bytes)
        self._lock = threading.Lock()
        self._closed = False
        self._idle: queue.Queue[int] = queue.Queue()
        self._feeders = [self._start(index) for index in range(processes)]
        for index in range(processes):
            self._idle.put(index)

    def __enter__(self) -> FeederPool:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def decode(self, data: bytes) -> np.ndarray:
        """Bytes to the model's (3, size, size) float32 input, or the ImageError they raise."""
        index = self._take()
        try:
            return self._decode_on(index, data)
        finally:
            self._idle.put(index)

    def close(self) -> None:
        """Stop the feeders and free the shared memory; decodes not yet begun fail."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            feeders = list(self._feeders)
        for feeder in feeders:
            feeder.connection.close()  # the feeder reads end-of-file and leaves
        for feeder in feeders:
            _stop(feeder.process)
        with contextlib.suppress(BufferError):  # a copy abandoned mid-way (an interrupt)
            self._memory.close()
        self._memory.unlink()

    def pids(self) -> list[int]:
        """The feeders' process ids, in slot order (for tests and benchmarks)."""
        with self._lock:
            return [feeder.process.pid for feeder in self._feeders]

    def _take(self) -> int:
        while True:
            if self._closed:
                raise ImageError("decode_error", "the decoding processes closed before its turn")
            try:
                return self._idle.get(timeout=WAIT_SECONDS)
            except queue.Empty:
                continue

    def _decode_on(self, index: int, data: bytes) -> np.ndarray:
        feeder = self._feeders[index]
        if feeder.process.poll() is not None:  # died while idle: this image is not to blame
            feeder = self._restart(index)
        try:
            try:
                feeder.connection.send_bytes(data)
            except BrokenPipeError:  # it died before taking this image: start it again first
                feeder = self._restart(index)
                feeder.connection.send_bytes(data)
            answer = json.loads(feeder.connection.recv_bytes())
        except (EOFError, OSError, ValueError):
            self._restart(index)
            raise ImageError(
                "decode_error",
                "the decoding process died on this image (killed, or out of memory); "
                "it was started again",
            ) from None
        if answer:
            raise ImageError(answer["reason"], answer["message"])
        start = index * self._slot_bytes
        slot = np.frombuffer(self._memory.buf, np.float32, self._slot_bytes // 4, start)
        return slot.reshape(self.shape).copy()

    def _restart(self, index: int) -> _Feeder:
        """Replace a dead feeder (the caller holds its slot); a closed pool starts none."""
        with self._lock:
            old = self._feeders[index]
            old.connection.close()
            _stop(old.process)
            if self._closed:
                raise ImageError("decode_error", "the decoding processes closed meanwhile")
            self._feeders[index] = feeder = self._start(index)
            return feeder

    def _start(self, index: int) -> _Feeder:
        ours, theirs = socket.socketpair()
        preprocessing = self.preprocessing
        settings = {
            "socket": theirs.fileno(),
            "memory": self._memory.name,
            "offset": index * self._slot_bytes,
            "input_size": preprocessing.input_size,
            "mean": list(preprocessing.mean),
            "std": list(preprocessing.std),
            "max_pixels": self.max_pixels,
        }
        path = os.environ.get("PYTHONPATH")
        environment = {
            **os.environ,
            "PYTHONPATH": CODE_ROOT + (os.pathsep + path if path else ""),
            "OMP_NUM_THREADS": "1",  # one image at a time: no thread pools of its own
        }
        process = subprocess.Popen(
            [sys.executable, "-m", "enrichment.media.feeders", json.dumps(settings)],
            stdin=subprocess.DEVNULL,
            pass_fds=(theirs.fileno(),),
            env=environment,
        )
        theirs.close()  # so that this end reads end-of-file when the feeder dies
        return _Feeder(process, Connection(ours.detach()))


def _stop(process: subprocess.Popen[bytes]) -> None:
    """Wait for a feeder whose socket is closed to leave; kill one that does not."""
    try:
        process.wait(STOP_SECONDS)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def serve(settings: dict) -> None:
    """A feeder's life: decode each body it is sent into its slot, until its socket closes."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is its parent's to handle
    connection = Connection(settings["socket"])
    size = settings["input_size"]
    preprocessing = Preprocessing(size, tuple(settings["mean"]), tuple(settings["std"]))
    max_pixels = settings["max_pixels"]
    memory = SharedMemory(name=settings["memory"])
    # Attaching registered the block with this process's own resource tracker, which
    # would unlink it as this process ends: it is the pool's to unlink.
    resource_tracker.unregister(memory._name, "shared_memory")  # type: ignore[attr-defined]
    out = np.frombuffer(memory.buf, np.float32, 3 * size * size, settings["offset"])
    out = out.reshape(3, size, size)
    try:
        while True:
            try:
                data = connection.recv_bytes()
            except (EOFError, OSError):
                return
            try:
                decode(data, preprocessing, max_pixels, out=out)
                answer = b"{}"
            except ImageError as error:
                answer = json.dumps({"reason": error.reason, "message": error.message}).encode()
            except Exception as error:  # anything else is still this image's error
                message = f"{type(error).__name__}: {error}"[:500]
                answer = json.dumps({"reason": "decode_error", "message": message}).encode()
            connection.send_bytes(answer)
    finally:
        del out
        memory.close()


if __name__ == "__main__":
    serve(json.loads(sys.argv[1]))
