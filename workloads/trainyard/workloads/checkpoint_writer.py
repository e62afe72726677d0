"""Checkpoint writes out of the training process.

A save's tensors are copied into host buffers (`Arena`: one block of memory per part of
a save, reused from save to save) and the writes run elsewhere:

* `WriterProcess` (Linux): a child forked from the training process on its first save.
  It holds the same model object (so `save_pretrained` writes exactly transformers' or
  PEFT's files) and maps the buffers, which live in memfd memory (`os.memfd_create`:
  not limited by the size of a container's /dev/shm, freed when both processes let go)
  and reach it as file descriptors over a Unix socket. Serializing (safetensors,
  torch.save's pickler) then never holds the training process's GIL, and the writer
  runs under SCHED_IDLE (`background_priority`). It dies with the training process
  (PR_SET_PDEATHSIG), so a killed trainer leaves no writer behind that finishes a
  checkpoint later; it keeps no other descriptor of its parent (an uploader's stdin
  must see its end of file when the trainer dies).
* `WriterThread`: the same writes on a thread of the training process, where fork or
  memfd are missing (not Linux).

Both run the same `run_ops`: each tensor reaches the writer as its own storage over the
buffer (torch.save writes one storage per tensor, as for the trainer's own state dicts;
tied weights are one tensor, as in the model), so the files are byte for byte the ones a
synchronous save writes.
"""

from __future__ import annotations

import contextlib
import ctypes
import io
import itertools
import math
import mmap
import os
import pickle
import signal
import socket
import struct
import sys
import threading
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

ALIGN = 64  # bytes; every tensor starts at a multiple (any dtype's view needs this)
WRITER_NICENESS = 10
PARTIAL_SUFFIX = ".writing"
_PR_SET_PDEATHSIG = 1
# A forked writer needs fork, memfd and descriptor passing (Linux).
WRITER_PROCESS_SUPPORTED = all(
    hasattr(module, name)
    for module, name in [(os, "fork"), (os, "memfd_create"), (socket, "send_fds")]
)


def background_priority(thread: int = 0) -> None:
    """Run the calling process (or the thread with native id `thread`) only on CPU time
    that nothing else wants: Linux's SCHED_IDLE, else WRITER_NICENESS steps nicer.

    Checkpoint writes and uploads are background work. A nice value still takes a share
    of a core that training needs (nice 10 is ~10% beside nice 0 on the same core), and
    each such slice stalls a training step; under SCHED_IDLE they run on a spare core or
    in the gaps, and when no core is spare, saves are coalesced instead (newest wins).
    """
    try:
        os.sched_setscheduler(thread, os.SCHED_IDLE, os.sched_param(0))
    except (AttributeError, OSError):  # not Linux
        with contextlib.suppress(OSError, AttributeError):
            os.setpriority(os.PRIO_PROCESS, thread, WRITER_NICENESS)


class Rotated(Exception):
    """The trainer's rotation removed a checkpoint while it was being written."""


class WriterError(RuntimeError):
    """A write failed in the writer (its traceback is in the message)."""


# ---------------------------------------------------------------------- host buffers


class Arena:
    """One block of host memory a snapshot is copied into: memfd memory shared with the
    writer process (`shared`), or anonymous memory; registered with CUDA as pinned
    memory when `pin` (device → host copies at full speed, without blocking)."""

    _ids = itertools.count(1)

    def __init__(self, nbytes: int, *, shared: bool, pin: bool = False) -> None:
        self.id = next(Arena._ids)
        self.nbytes = max(int(nbytes), 1)
        self.fd: int | None = None
        if shared:
            self.fd = os.memfd_create("trainyard-checkpoint", os.MFD_CLOEXEC)
            os.ftruncate(self.fd, self.nbytes)
            self.map = mmap.mmap(self.fd, self.nbytes)
        else:
            self.map = mmap.mmap(-1, self.nbytes)
        self.bytes = torch.frombuffer(self.map, dtype=torch.uint8)
        self.pinned = False
        if pin:
            with contextlib.suppress(Exception):  # pageable memory still works, slower
                cudart = torch.cuda.cudart()
                self.pinned = (
                    int(cudart.cudaHostRegister(self.bytes.data_ptr(), self.nbytes, 0)) == 0
                )

    def view(self, offset: int, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
        size = math.prod(shape) * dtype.itemsize
        return self.bytes.narrow(0, offset, size).view(dtype).view(shape)

    def release(self) -> None:
        if self.pinned:
            with contextlib.suppress(Exception):
                torch.cuda.cudart().cudaHostUnregister(self.bytes.data_ptr())
            self.pinned = False
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
        # The memory goes with the last tensor over it (views may still be referenced).
        self.bytes = None  # type: ignore[assignment]


@dataclass(frozen=True)
class TensorRef:
    """Where a copied tensor lies: arena, byte offset, dtype name, shape (and whether
    the original required grad: DeepSpeed saves its fp32 partitions as they are)."""

    arena: int
    offset: int
    dtype: str
    shape: tuple[int, ...]
    requires_grad: bool = False


@dataclass
class Snapshot:
    """A structure (state dict, optimizer state) whose tensors were copied into `arena`."""

    value: Any
    arena: Arena
    refs: dict[int, TensorRef]  # id(copy) → where it lies

    def dumps(self) -> bytes:
        """The structure pickled with each tensor as its TensorRef (small: no tensor data)."""
        buffer = io.BytesIO()
        refs = self.refs

        class _Pickler(pickle.Pickler):
            def persistent_id(self, obj):
                if isinstance(obj, torch.Tensor):
                    return refs[id(obj)]
                return None

        _Pickler(buffer, protocol=pickle.HIGHEST_PROTOCOL).dump(self.value)
        return buffer.getvalue()


def _where(tensor: torch.Tensor) -> tuple:
    # state_dict() detaches each entry anew: tied weights are two tensor objects over
    # one storage, so they are known by where their data lies.
    return (
        tensor.device,
        tensor.untyped_storage().data_ptr(),
        tensor.storage_offset(),
        tuple(tensor.shape),
        tensor.stride(),
        tensor.dtype,
    )


def copy_to_host(
    value: Any,
    buffers: dict[str, Arena],
    key: str,
    *,
    shared: bool,
    pin: bool = False,
    deferred: list[tuple[torch.Tensor, torch.Tensor]] | None = None,
) -> Snapshot:
    """A copy of value with every tensor copied into the arena `buffers[key]` (reused
    when big enough, replaced otherwise: a fresh allocation of GBs costs a page fault
    per page, a reused one only the copy); dicts, lists and tuples rebuilt, anything
    else shared (ints, strings). A tensor that appears twice (tied weights) is copied
    once and stays one tensor, so save_pretrained sees the tie.

    With `deferred`, the structure is built now and the (target, source) pairs are
    appended there instead of copied (`copy_tensors` copies them later)."""
    offsets: dict[tuple, int] = {}
    total = 0

    def plan(item: Any) -> None:
        nonlocal total
        if isinstance(item, torch.Tensor):
            where = _where(item)
            if where not in offsets:
                offsets[where] = total
                size = item.numel() * item.element_size()
                total += (size + ALIGN - 1) // ALIGN * ALIGN
        elif isinstance(item, dict):
            for v in item.values():
                plan(v)
        elif isinstance(item, list | tuple):
            for v in item:
                plan(v)

    plan(value)
    arena = buffers.get(key)
    if arena is None or arena.nbytes < total or (pin and not arena.pinned):
        if arena is not None:
            arena.release()
        arena = buffers[key] = Arena(total, shared=shared, pin=pin)
    copies: dict[tuple, torch.Tensor] = {}
    refs: dict[int, TensorRef] = {}
    non_blocking = arena.pinned

    def copy(item: Any) -> Any:
        if isinstance(item, torch.Tensor):
            where = _where(item)
            target = copies.get(where)
            if target is None:
                shape = tuple(item.shape)
                target = arena.view(offsets[where], item.dtype, shape)
                if deferred is None:
                    target.copy_(item.detach(), non_blocking=non_blocking and item.is_cuda)
                else:
                    deferred.append((target, item.detach()))
                copies[where] = target
                refs[id(target)] = TensorRef(
                    arena.id,
                    offsets[where],
                    str(item.dtype).removeprefix("torch."),
                    shape,
                    item.requires_grad,
                )
            return target
        if isinstance(item, dict):
            return type(item)((k, copy(v)) for k, v in item.items())
        if isinstance(item, list | tuple):
            return type(item)(copy(v) for v in item)
        return item

    result = copy(value)
    if deferred is None and non_blocking and torch.cuda.is_available():
        torch.cuda.synchronize()  # the non-blocking copies must land before the step goes on
    return Snapshot(result, arena, refs)


def copy_tensors(pairs: list[tuple[torch.Tensor, torch.Tensor]], ready: Any = None) -> None:
    """Copy each (target, source) pair; on CUDA on a side stream that first waits for
    `ready` (an event recorded on the training stream when the save was taken), and
    return when the copies have landed."""
    devices = {source.device for _, source in pairs if source.is_cuda}
    if not devices:
        for target, source in pairs:
            target.copy_(source)
        return
    # This thread's current device is device 0 whatever the rank's is: the stream goes
    # on the tensors' own device (one per process under torchrun).
    with torch.cuda.device(next(iter(devices))):
        stream = torch.cuda.Stream()
        if ready is not None:
            stream.wait_event(ready)
        with torch.cuda.stream(stream):
            for target, source in pairs:
                target.copy_(source, non_blocking=target.is_pinned())
        stream.synchronize()


# ---------------------------------------------------------------------- the writes


def load_snapshot(data: bytes, maps: dict[int, Any]) -> Any:
    """The structure of Snapshot.dumps, each tensor its own storage over the buffer."""
    tensors: dict[TensorRef, torch.Tensor] = {}

    class _Unpickler(pickle.Unpickler):
        def persistent_load(self, ref: TensorRef) -> torch.Tensor:
            tensor = tensors.get(ref)
            if tensor is None:
                dtype = getattr(torch, ref.dtype)
                count = math.prod(ref.shape)
                if count == 0:
                    tensor = torch.empty(ref.shape, dtype=dtype)
                else:
                    tensor = torch.frombuffer(
                        maps[ref.arena], dtype=dtype, count=count, offset=ref.offset
                    ).view(ref.shape)
                if ref.requires_grad:
                    tensor.requires_grad_(True)
                tensors[ref] = tensor  # tied weights: one tensor, as in the model
            return tensor

    return _Unpickler(io.BytesIO(data)).load()


def staging_dir(directory: Path) -> Path:
    """A fresh hidden sibling to write into; renamed file by file when complete."""
    import shutil

    staging = (
        directory.parent
        / f".{directory.name}{PARTIAL_SUFFIX}-{os.getpid()}-{threading.get_ident()}"
    )
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    return staging


def move_into(staging: Path, directory: Path) -> None:
    """Rename each written file into directory (atomic per file), then drop staging.

    The directory keeps its modification time: the trainer's rotation orders
    checkpoints by it, and an older checkpoint finished late must not look newest."""
    import shutil

    try:
        try:
            times = directory.stat()
        except FileNotFoundError:
            raise Rotated(str(directory)) from None
        for path in sorted(staging.rglob("*")):
            if path.is_file():
                target = directory / path.relative_to(staging)
                if target.parent != directory:  # an adapter saved under its own name
                    target.parent.mkdir(parents=True, exist_ok=True)
                try:
                    os.replace(path, target)
                except FileNotFoundError:
                    raise Rotated(str(directory)) from None
        os.utime(directory, ns=(times.st_atime_ns, times.st_mtime_ns))
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def run_ops(ops: list[tuple], maps: dict[int, Any], model: Any) -> None:
    """Write one checkpoint's deferred files.

    ("attrs", pickled dict): set on the model first (its config as of this save);
    ("pretrained", directory, snapshot): model.save_pretrained(state_dict=...);
    ("safetensors" | "torch", directory, file name, snapshot[, torch.save keywords]):
    safetensors' save_file (metadata format=pt, as transformers writes it) or torch.save."""
    for op in ops:
        kind = op[0]
        if kind == "attrs":
            for name, value in pickle.loads(op[1]).items():
                setattr(model, name, value)
            continue
        directory = Path(op[1])
        staging = staging_dir(directory)
        if kind == "pretrained":
            model.save_pretrained(str(staging), state_dict=load_snapshot(op[2], maps))
        elif kind == "safetensors":
            import safetensors.torch

            safetensors.torch.save_file(
                load_snapshot(op[3], maps), str(staging / op[2]), metadata={"format": "pt"}
            )
        elif kind == "torch":
            torch.save(load_snapshot(op[3], maps), staging / op[2], **(op[4] if op[4:] else {}))
        else:  # pragma: no cover - a programming error
            raise ValueError(f"unknown checkpoint write {kind!r}")
        move_into(staging, directory)


# ---------------------------------------------------------------------- writers


class WriterThread:
    """Runs the writes on the calling (background) thread of the training process."""

    shared = False

    def __init__(self, model: Any) -> None:
        self.model = model
        self.maps: dict[int, Any] = {}

    def write(self, ops: list[tuple], arenas: list[Arena], released: list[int]) -> None:
        for arena_id in released:
            self.maps.pop(arena_id, None)
        for arena in arenas:
            self.maps[arena.id] = arena.map
        try:
            run_ops(ops, self.maps, self.model)
        finally:
            self.maps.clear()

    def close(self) -> None:
        pass


def _send(sock: socket.socket, obj: Any, fds: list[int] = ()) -> None:
    payload = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    header = struct.pack("!QI", len(payload), len(fds))
    if fds:
        socket.send_fds(sock, [header], list(fds))
    else:
        sock.sendall(header)
    sock.sendall(payload)


def _recv_exact(sock: socket.socket, size: int, into: bytearray) -> None:
    while len(into) < size:
        chunk = sock.recv(min(size - len(into), 1 << 20))
        if not chunk:
            raise EOFError
        into += chunk


def _recv(sock: socket.socket) -> tuple[Any, list[int]]:
    data, fds, _, _ = socket.recv_fds(sock, 12, 64)
    if not data:
        raise EOFError
    header = bytearray(data)
    _recv_exact(sock, 12, header)
    size, _count = struct.unpack("!QI", bytes(header))
    payload = bytearray()
    _recv_exact(sock, size, payload)
    return pickle.loads(payload), list(fds)


class WriterProcess:
    """A writer forked from the training process (see the module's docstring).

    `write` sends one checkpoint's ops (and the descriptors of arenas the child has
    not seen) and blocks until the child has written them; it raises WriterError with
    the child's traceback, Rotated, or WriterError when the child died."""

    shared = True

    def __init__(self, model: Any, prepare_child: Callable[[], None] | None = None) -> None:
        self.model = model
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self._known: set[int] = set()
        parent_pid = os.getpid()
        pid = os.fork()
        if pid == 0:  # the child: never returns into the caller's code
            status = 1
            try:
                parent.close()
                _child_main(child, model, parent_pid, prepare_child)
                status = 0
            except BaseException:  # noqa: BLE001 - report and leave without cleanup
                with contextlib.suppress(BaseException):
                    traceback.print_exc()
            finally:
                os._exit(status)
        child.close()
        self.pid = pid
        self.sock = parent

    def write(self, ops: list[tuple], arenas: list[Arena], released: list[int]) -> None:
        new = [a for a in arenas if a.id not in self._known]
        forget = [i for i in released if i in self._known]
        self._known.difference_update(forget)
        message = {
            "ops": ops,
            "arenas": [(a.id, a.nbytes) for a in new],
            "forget": forget,
        }
        try:
            _send(self.sock, message, [a.fd for a in new])
            self._known.update(a.id for a in new)
            answer, _ = _recv(self.sock)
        except (OSError, EOFError) as error:
            raise WriterError(
                f"the checkpoint writer process died: {self._exit_status()}"
            ) from error
        if answer.get("rotated"):
            raise Rotated(answer["rotated"])
        if answer.get("error"):
            raise WriterError(
                f"writing a checkpoint failed in the writer process:\n{answer['error']}"
            )

    def _exit_status(self) -> str:
        import time

        deadline = time.monotonic() + 10  # the socket closes a moment before the exit
        while self.pid and time.monotonic() < deadline:
            try:
                pid, status = os.waitpid(self.pid, os.WNOHANG)
            except ChildProcessError:
                break
            if pid:
                self.pid = 0
                if os.WIFSIGNALED(status):
                    return f"killed by signal {os.WTERMSIG(status)}"
                return f"exit status {os.WEXITSTATUS(status)}"
            time.sleep(0.05)
        return "connection lost"

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()
        if self.pid:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(self.pid, 0)
            self.pid = 0


def _child_main(
    sock: socket.socket, model: Any, parent_pid: int, prepare: Callable[[], None] | None
) -> None:
    import gc

    # Objects inherited from the trainer are never collected here: a collection could
    # free CUDA tensors, which a forked child must not touch.
    gc.freeze()
    with contextlib.suppress(Exception):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent_pid:
        return  # the trainer died before the line above
    # Ctrl-C and SIGTERM to the process group (eviction; the trainer then finishes and
    # uploads the save in flight, train.py) must not kill the write it waits for: the
    # trainer decides, its end of the socket closing ends this process, and its death
    # kills it (above).
    signal.signal(signal.SIGHUP, signal.SIG_DFL)
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, signal.SIG_IGN)
    keep = sock.fileno()
    os.closerange(3, keep)
    os.closerange(keep + 1, max(os.sysconf("SC_OPEN_MAX"), 1 << 16))
    # Python's streams may have been on one of those (a test runner's capture files).
    sys.stdout = open(1, "w", closefd=False)  # noqa: SIM115 - for the process's life
    sys.stderr = open(2, "w", closefd=False)  # noqa: SIM115
    background_priority()
    torch.set_num_threads(1)  # as DataLoader workers do after fork
    if prepare is not None:
        prepare()
    maps: dict[int, mmap.mmap] = {}
    while True:
        try:
            message, fds = _recv(sock)
        except (EOFError, OSError):
            return
        for arena_id in message["forget"]:
            maps.pop(arena_id, None)
        for (arena_id, nbytes), fd in zip(message["arenas"], fds, strict=True):
            maps[arena_id] = mmap.mmap(fd, nbytes)
            os.close(fd)
        try:
            run_ops(message["ops"], maps, model)
            answer: dict[str, Any] = {}
        except Rotated as rotated:
            answer = {"rotated": str(rotated)}
        except BaseException:  # noqa: BLE001 - the trainer raises it
            answer = {"error": traceback.format_exc()}
        _send(sock, answer)
