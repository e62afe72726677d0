"""Running untrusted programs (model completions) so that they cannot escape.

Isolation `strict` (the default; needs root with CAP_SYS_ADMIN, which a trainer pod under
the restricted Pod Security Standard never has: there, `service` sends the programs to the
sandbox server, `sandbox_server.py`, which applies this same isolation in a pod of its own)
gives every program, between fork and exec:

- a new network namespace: no interfaces but a down loopback, so every connect fails,
  including to services of the trainer on 127.0.0.1;
- a new mount namespace in which every mount is remounted read-only and nosuid, except
  a bind mount of the sandbox's own fresh directory; a new IPC namespace;
- a fresh unprivileged uid/gid (one per sandbox, no supplementary groups), so the
  program cannot signal or ptrace the trainer, read its 0700 files, or undo the mounts;
  the uid also makes RLIMIT_NPROC a per-sandbox fork-bomb limit and lets the cleanup
  kill every process the program left behind, even ones that escaped its session;
- rlimits: CPU seconds, address space, file size, processes, open files, no core dumps;
- an environment of its own (the trainer's, with its credentials, is never passed), with
  HOME a fresh directory beside the working one, so caches never land among its files.

The parent enforces a wall-clock timeout and an output cap, killing the process group
and then every process of the sandbox uid. Isolation `rlimits` keeps the limits,
timeout, output cap, fresh directory and process-group kill but no namespaces or uid
switch: it is not a jail, only for trusted code or machines where strict is impossible.

The namespaces are made per program run in the calling process, and once per process
in pool workers (`isolate_worker`), whose sandboxes inherit them; uid, limits and
directory stay per program.

Programs that must run under strict isolation need an interpreter the sandbox uid may
execute (world-executable path): `sandbox_python()` finds one.

Not covered: a program may read world-readable files of the image (/etc, /usr, data with
o+r) and see /proc; there is no seccomp filter; disk use in its own directory is bounded
per file (RLIMIT_FSIZE) and by the timeout, not in total.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import itertools
import os
import resource
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Literal

Isolation = Literal["strict", "rlimits", "service"]

_CLONE_NEWNS = 0x00020000
_CLONE_NEWIPC = 0x08000000
_CLONE_NEWNET = 0x40000000
_MS_RDONLY, _MS_NOSUID, _MS_NODEV, _MS_NOEXEC = 1, 2, 4, 8
_MS_REMOUNT, _MS_BIND, _MS_REC, _MS_PRIVATE = 32, 4096, 16384, 1 << 18
_MS_NOATIME, _MS_NODIRATIME, _MS_RELATIME, _MS_STRICTATIME = 1024, 2048, 1 << 21, 1 << 24
_MOUNT_OPTION_FLAGS = {
    "nosuid": _MS_NOSUID,
    "nodev": _MS_NODEV,
    "noexec": _MS_NOEXEC,
    "noatime": _MS_NOATIME,
    "nodiratime": _MS_NODIRATIME,
    "relatime": _MS_RELATIME,
    "strictatime": _MS_STRICTATIME,
}

# Sandbox uids: far above any uid in /etc/passwd or a subuid range, one per live sandbox
# (pid of the launching process times the slots a process may run at once, plus a slot).
# A pod with its own user namespace (hostUsers: false) maps only uids 0-65535, so the
# sandbox service's pod narrows the range with TRAINYARD_SANDBOX_UIDS=FIRST-LAST.
_UID_BASE = 1_500_000_000
_UID_SLOTS = 64
UIDS_ENV = "TRAINYARD_SANDBOX_UIDS"


def _uid_range() -> tuple[int, int]:
    """(first uid, how many) sandboxes may use."""
    text = os.environ.get(UIDS_ENV)
    if not text:
        return _UID_BASE, 2**31 - 1 - _UID_BASE
    first, _, last = text.partition("-")
    try:
        low, high = int(first), int(last)
    except ValueError:
        raise SandboxUnavailable(
            f"{UIDS_ENV}={text!r}: expected FIRST-LAST, e.g. 10000-65535"
        ) from None
    if not 0 < low <= high - _UID_SLOTS:
        raise SandboxUnavailable(
            f"{UIDS_ENV}={text!r}: need 0 < FIRST and room for {_UID_SLOTS} uids"
        )
    return low, high - low + 1


def _sandbox_uid(slot: int) -> int:
    low, count = _uid_range()
    return low + (os.getpid() * _UID_SLOTS + slot) % count


_slots = itertools.count()
_slots_lock = threading.Lock()

_SANDBOX_PATH = "/usr/local/bin:/usr/bin:/bin"


class SandboxUnavailable(RuntimeError):
    """The requested isolation cannot be set up on this machine."""


@dataclass(frozen=True)
class SandboxLimits:
    """Limits of one program run."""

    timeout_seconds: float = 10.0
    cpu_seconds: int = 10
    memory_mb: int = 1024
    file_size_mb: int = 16
    max_processes: int = 64
    max_open_files: int = 64
    output_limit_bytes: int = 65536


@dataclass(frozen=True)
class SandboxResult:
    """What one program run did."""

    returncode: int | None
    """Exit status; negative for a signal; None when killed by the parent."""
    stdout: str
    stderr: str
    seconds: float
    timed_out: bool = False
    output_exceeded: bool = False

    @property
    def passed(self) -> bool:
        return self.returncode == 0 and not self.timed_out and not self.output_exceeded


@cache
def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)


def _check(result: int, what: str) -> None:
    if result != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"{what}: {os.strerror(errno)}")


def _mount(source: str | None, target: str, fstype: str | None, flags: int) -> None:
    _check(
        _libc().mount(
            source.encode() if source else None,
            target.encode(),
            fstype.encode() if fstype else None,
            ctypes.c_ulong(flags),
            None,
        ),
        f"mount {target}",
    )


def _unescape_mount_path(path: str) -> str:
    # /proc/self/mountinfo writes space, tab, newline and backslash as octal escapes.
    for escaped, char in (("\\040", " "), ("\\011", "\t"), ("\\012", "\n"), ("\\134", "\\")):
        path = path.replace(escaped, char)
    return path


def _mounts() -> list[tuple[str, int]]:
    """(mount point, per-mount flags to keep) of this process's mount namespace."""
    mounts = []
    with open("/proc/self/mountinfo") as info:
        for line in info:
            fields = line.split()
            flags = 0
            for option in fields[5].split(","):
                flags |= _MOUNT_OPTION_FLAGS.get(option, 0)
            mounts.append((_unescape_mount_path(fields[4]), flags))
    return mounts


def _set_limits(limits: SandboxLimits) -> None:
    mib = 1024 * 1024
    resource.setrlimit(resource.RLIMIT_CPU, (limits.cpu_seconds, limits.cpu_seconds + 1))
    resource.setrlimit(resource.RLIMIT_AS, (limits.memory_mb * mib, limits.memory_mb * mib))
    resource.setrlimit(
        resource.RLIMIT_FSIZE, (limits.file_size_mb * mib, limits.file_size_mb * mib)
    )
    resource.setrlimit(resource.RLIMIT_NPROC, (limits.max_processes, limits.max_processes))
    resource.setrlimit(resource.RLIMIT_NOFILE, (limits.max_open_files, limits.max_open_files))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def _isolate_namespaces(writable: str) -> None:
    """New network, IPC and mount namespaces; every mount read-only and nosuid except a
    bind mount of `writable`."""
    _check(_libc().unshare(_CLONE_NEWNS | _CLONE_NEWNET | _CLONE_NEWIPC), "unshare")
    # Private first, so nothing below propagates back into the trainer's namespace.
    _mount(None, "/", None, _MS_REC | _MS_PRIVATE)
    _mount(writable, writable, None, _MS_BIND)
    for mount_point, keep in _mounts():
        if mount_point == writable:
            continue
        _mount(None, mount_point, None, _MS_REMOUNT | _MS_BIND | _MS_RDONLY | _MS_NOSUID | keep)


def _drop_privileges(directory: str, uid: int, limits: SandboxLimits) -> None:
    _set_limits(limits)
    os.setgroups([])
    os.setgid(uid)
    os.setuid(uid)
    os.chdir(directory)


def _enter_strict(writable: str, directory: str, uid: int, limits: SandboxLimits) -> None:
    """Runs in the child between fork and exec (see the module docstring)."""
    _isolate_namespaces(writable)
    _drop_privileges(directory, uid, limits)


# Set in a pool worker that isolated itself once (`isolate_worker`): its sandboxes live
# under this directory and inherit the namespaces instead of creating their own per run.
_worker_root: str | None = None


def isolate_worker(root: str) -> None:
    """Move this process (a dedicated pool worker) into its own network, IPC and mount
    namespaces, with everything read-only but `root`, where its sandboxes are created.

    Creating namespaces costs tens of milliseconds (the kernel waits for RCU grace
    periods, longer on a busy machine) and is serialized across CPUs, so doing it per
    stage would eat the pool's parallelism. The jail of each program is unchanged: it
    still runs under its own uid with its limits, cannot reach a network (there is none
    in the worker's namespace, and it may not configure one), and can write only its
    own 0700 directory. Never call this in the trainer process itself.
    """
    global _worker_root
    _isolate_namespaces(root)
    _worker_root = root


def sandbox_root() -> str:
    """A directory for the sandboxes of isolated pool workers: root-owned, 0711 (each
    sandbox uid may reach its own 0700 directory but list nothing)."""
    root = tempfile.mkdtemp(prefix="trainyard-sandboxes-")
    os.chmod(root, 0o711)
    return root


def _enter_rlimits(directory: str, limits: SandboxLimits) -> None:
    _set_limits(limits)
    os.chdir(directory)


def _kill_uid(uid: int) -> None:
    """SIGKILL every process of `uid`: a helper becomes that uid and sends kill(-1), which
    reaches exactly the processes it may signal, i.e. the sandbox's, wherever they are."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        try:
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
            for _ in range(1000):
                try:
                    os.kill(-1, signal.SIGKILL)
                except ProcessLookupError:
                    os._exit(0)
        finally:
            os._exit(1)
    os.waitpid(pid, 0)


def _kill_group(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)


def _executable_by_others(path: str) -> bool:
    real = Path(os.path.realpath(path))
    try:
        if not real.stat().st_mode & 0o001:
            return False
        return all(parent.stat().st_mode & 0o001 for parent in real.parents)
    except OSError:
        return False


@cache
def sandbox_python(preferred: str | None = None) -> str:
    """An interpreter a sandbox uid may execute: `preferred`, then this interpreter, then
    python3 on the sandbox PATH (a pyenv or venv under /root is not reachable for it)."""
    if preferred:
        if _executable_by_others(preferred):
            return preferred
        raise SandboxUnavailable(
            f"pythonExecutable {preferred!r} is not executable by other users (the file and "
            "every directory on its path need o+x), so a sandbox uid cannot run it"
        )
    candidates = [sys.executable]
    candidates += [shutil.which(name, path=_SANDBOX_PATH) or "" for name in ("python3", "python")]
    for candidate in candidates:
        if candidate and _executable_by_others(candidate):
            return candidate
    raise SandboxUnavailable(
        f"no Python interpreter that a sandbox uid may execute: {sys.executable} is not "
        f"world-executable and there is no python3 on {_SANDBOX_PATH}; set pythonExecutable"
    )


def check_stage_program(program: str, path: str | None = None) -> None:
    """Refuse a stage whose program (first word of its command) the sandbox cannot find
    on `path` (the stage's env.PATH, which is also where the program is looked up when
    it runs; the sandbox PATH when the stage sets none); programs under a placeholder
    ({dir}/prog, {python}) are made or chosen later."""
    if "{" in program:
        return
    path = path or _SANDBOX_PATH
    found = program if os.sep in program else shutil.which(program, path=path)
    if not found or not os.path.isfile(found) or not os.access(found, os.X_OK):
        raise ValueError(
            f"program {program!r} not found"
            + ("" if os.sep in program else f" on the sandbox PATH {path}")
            + "; install it in the image that runs the sandbox or give its absolute path"
        )


class Sandbox:
    """A fresh directory (and, under strict isolation, a fresh uid) for one untrusted
    program; its stages run one after another and see each other's files.

    >>> with Sandbox(isolation="rlimits") as box:
    ...     _ = box.write("hello.sh", "echo hello from $PWD")
    ...     box.run(["/bin/sh", "hello.sh"]).stdout.startswith("hello from /")
    True
    """

    def __init__(self, limits: SandboxLimits | None = None, isolation: Isolation = "strict"):
        self.limits = limits or SandboxLimits()
        self.isolation = isolation
        self.root: Path | None = None
        self.directory: Path | None = None
        self.home: Path | None = None
        self.uid: int | None = None

    def __enter__(self) -> Sandbox:
        if self.isolation == "strict":
            if _worker_root is None:  # an isolated worker was checked by its parent
                require_isolation("strict")
            with _slots_lock:
                slot = next(_slots) % _UID_SLOTS
            self.uid = _sandbox_uid(slot)
        # root/work is the stages' working directory ({dir}), root/home their HOME: tools
        # that write caches or config under HOME (opam, dune, pip) do not litter the
        # directory the tests may list. Under strict isolation root is the writable mount.
        self.root = Path(tempfile.mkdtemp(prefix="trainyard-sandbox-", dir=_worker_root))
        self.directory = self.root / "work"
        self.home = self.root / "home"
        for path in (self.directory, self.home):
            path.mkdir(mode=0o700)
        if self.uid is not None:
            for path in (self.root, self.directory, self.home):
                os.chown(path, self.uid, self.uid)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.uid is not None:
            _kill_uid(self.uid)
        if self.root is not None:
            shutil.rmtree(self.root, ignore_errors=True)

    def write(self, name: str, text: str) -> Path:
        """Write a file into the sandbox directory, owned by the sandbox uid."""
        assert self.directory is not None, "use Sandbox as a context manager"
        path = self.directory / name
        if path.parent != self.directory:
            raise ValueError(f"{name!r} is not a plain file name")
        path.write_text(text)
        if self.uid is not None:
            os.chown(path, self.uid, self.uid)
        return path

    def run(
        self,
        command: list[str],
        timeout_seconds: float | None = None,
        env: dict[str, str] | None = None,
    ) -> SandboxResult:
        """Run `command` in the sandbox directory; never raises for what the program does."""
        assert self.directory is not None, "use Sandbox as a context manager"
        directory, limits, uid = str(self.directory), self.limits, self.uid
        root = str(self.root)
        if uid is not None and _worker_root is not None:
            preexec = lambda: _drop_privileges(directory, uid, limits)  # noqa: E731
        elif uid is not None:
            preexec = lambda: _enter_strict(root, directory, uid, limits)  # noqa: E731
        else:
            preexec = lambda: _enter_rlimits(directory, limits)  # noqa: E731
        environment = {
            "PATH": _SANDBOX_PATH,
            "HOME": str(self.home),
            "TMPDIR": directory,
            "LANG": "C.UTF-8",
            "PYTHONDONTWRITEBYTECODE": "1",
            "PYTHONUNBUFFERED": "1",
            **(env or {}),
        }
        started = time.monotonic()
        try:
            process = subprocess.Popen(
                command,
                cwd=directory,
                env=environment,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                start_new_session=True,
                preexec_fn=preexec,
            )
        except OSError as error:
            # The program is missing or not executable (e.g. the binary a failed compile
            # did not produce): the stage fails, like a program that exits non-zero.
            return SandboxResult(None, "", f"could not start {command[0]!r}: {error}", 0.0)
        except subprocess.SubprocessError as error:
            # The jail itself could not be entered: never score that as the completion's
            # failure, or a broken sandbox would silently train on zero rewards.
            raise SandboxUnavailable(f"could not enter the sandbox: {error}") from error
        try:
            return self._collect(process, started, timeout_seconds or limits.timeout_seconds)
        finally:
            _kill_group(process.pid)
            if uid is not None:
                _kill_uid(uid)
            process.wait()
            for stream in (process.stdout, process.stderr):
                if stream is not None:
                    stream.close()

    def _collect(self, process: subprocess.Popen, started: float, timeout: float) -> SandboxResult:
        """Read both pipes up to the output cap until the program exits, times out or
        writes too much; the caller kills whatever is left."""
        cap = self.limits.output_limit_bytes
        output = {"stdout": bytearray(), "stderr": bytearray()}
        deadline = started + timeout
        timed_out = exceeded = False
        with selectors.DefaultSelector() as selector:
            selector.register(process.stdout, selectors.EVENT_READ, "stdout")
            selector.register(process.stderr, selectors.EVENT_READ, "stderr")
            while selector.get_map() and not exceeded:
                # Once the program has exited, only take what is already in the pipes: a
                # descendant left running may hold them open.
                exited = process.poll() is not None
                remaining = deadline - time.monotonic()
                if remaining <= 0 and not exited:
                    timed_out = True
                    break
                events = selector.select(timeout=0 if exited else min(remaining, 0.05))
                if exited and not events:
                    break
                for key, _ in events:
                    chunk = os.read(key.fd, 65536)
                    if not chunk:
                        selector.unregister(key.fileobj)
                        continue
                    buffer = output[key.data]
                    buffer += chunk[: cap - len(buffer)]
                    exceeded = exceeded or len(buffer) >= cap
        returncode = None
        if not (timed_out or exceeded):
            try:
                returncode = process.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                timed_out = True
        return SandboxResult(
            returncode=returncode,
            stdout=output["stdout"].decode(errors="replace"),
            stderr=output["stderr"].decode(errors="replace"),
            seconds=time.monotonic() - started,
            timed_out=timed_out,
            output_exceeded=exceeded,
        )


@cache
def _probe_strict() -> str | None:
    """None when strict isolation works here, else why not (checked once per process)."""
    if os.geteuid() != 0:
        return f"the trainer runs as uid {os.geteuid()}, not root"
    directory = tempfile.mkdtemp(prefix="trainyard-probe-")
    probe_uid = _uid_range()[0]
    os.chown(directory, probe_uid, probe_uid)
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        os.close(read_end)
        try:
            _enter_strict(directory, directory, probe_uid, SandboxLimits())
            os._exit(0)
        except BaseException as error:  # noqa: BLE001 - any failure is the answer
            os.write(write_end, f"{type(error).__name__}: {error}".encode())
            os._exit(1)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as reader:
        message = reader.read().decode(errors="replace")
    _, status = os.waitpid(pid, 0)
    shutil.rmtree(directory, ignore_errors=True)
    if os.waitstatus_to_exitcode(status) != 0:
        return message or f"the probe exited with status {status}"
    return None


def require_isolation(isolation: Isolation) -> None:
    """Raise `SandboxUnavailable`, saying what to change, when `isolation` cannot be had."""
    if isolation != "strict":  # rlimits needs nothing; service asks the service
        return
    problem = _probe_strict()
    if problem:
        raise SandboxUnavailable(
            f"strict sandbox isolation is unavailable: {problem}. It needs root with "
            "CAP_SYS_ADMIN in the trainer container (network and mount namespaces, a "
            "switch to an unprivileged uid), which the restricted Pod Security Standard "
            "never grants. Set isolation: service to have the sandbox service (trainyard "
            "sandbox) jail the programs in pods of its own, or isolation: rlimits to run "
            "them with limits and a timeout but without network or filesystem isolation."
        )
