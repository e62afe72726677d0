"""Adversarial programs against the sandbox: each must end within its limits, fail, and
leave the trainer (this process) and the machine untouched.

Strict isolation needs root with CAP_SYS_ADMIN; where the tests do not have it they are
skipped with the reason. Every escape test also runs its program under isolation
`rlimits` (no jail) to show that the program really escapes there, so a sandbox that
stopped isolating would fail the test instead of passing by accident.
"""

from __future__ import annotations

import os
import socket
import stat
import tempfile
import threading
import time
from pathlib import Path

import pytest

from trainyard.workloads.rewards.sandbox import (
    Sandbox,
    SandboxLimits,
    SandboxUnavailable,
    require_isolation,
    sandbox_python,
)

try:
    require_isolation("strict")
    STRICT_PROBLEM = None
except SandboxUnavailable as error:
    STRICT_PROBLEM = str(error)

strict_only = pytest.mark.skipif(STRICT_PROBLEM is not None, reason=STRICT_PROBLEM or "")

LIMITS = SandboxLimits(timeout_seconds=3, cpu_seconds=5, memory_mb=256, output_limit_bytes=4096)
SANDBOX_UID_FLOOR = 1_500_000_000


def run_python(code: str, isolation: str = "strict", limits: SandboxLimits = LIMITS):
    python = sandbox_python() if isolation == "strict" else os.sys.executable
    with Sandbox(limits, isolation) as box:
        box.write("main.py", code)
        started = time.monotonic()
        result = box.run([python, "main.py"])
        directory, uid = box.directory, box.uid
    return result, time.monotonic() - started, directory, uid


def live_processes(uid: int | range, grace_seconds: float = 2.0) -> list[int]:
    """Processes of `uid` (or a range of uids) that are still alive after a short grace (SIGKILLed processes
    take a moment to exit; zombies waiting for init to reap them are dead)."""
    deadline = time.monotonic() + grace_seconds
    while True:
        found = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                status = (entry / "status").read_text()
            except OSError:
                continue
            fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
            owner = int(fields["Uid"].split()[0])
            if (owner in uid if isinstance(uid, range) else owner == uid) and not fields[
                "State"
            ].strip().startswith("Z"):
                found.append(int(entry.name))
        if not found or time.monotonic() > deadline:
            return found
        time.sleep(0.05)


@strict_only
def test_well_behaved_program_runs_as_its_own_user():
    result, _, directory, uid = run_python(
        "import os; print(os.getuid(), os.getcwd(), os.environ.get('AWS_SECRET_ACCESS_KEY'))"
    )
    assert result.passed, result.stderr
    assert result.stdout.split() == [str(uid), str(directory), "None"]
    assert uid >= SANDBOX_UID_FLOOR
    assert not directory.exists(), "the sandbox directory is removed afterwards"


@strict_only
def test_infinite_loop_is_killed_at_the_timeout():
    result, seconds, _, uid = run_python("while True:\n    pass")
    assert result.timed_out and not result.passed
    assert seconds < LIMITS.timeout_seconds + 2
    assert live_processes(uid) == []


@strict_only
def test_cpu_limit_stops_a_busy_program_before_the_timeout():
    limits = SandboxLimits(timeout_seconds=30, cpu_seconds=1)
    result, seconds, _, _ = run_python("while True:\n    pass", limits=limits)
    assert not result.passed and not result.timed_out
    assert result.returncode in (-9, -24), "SIGXCPU at the soft limit, SIGKILL at the hard one"
    assert seconds < 5


@strict_only
def test_fork_bomb_is_contained_and_cleaned_up():
    bomb = (
        "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n"
    )
    result, seconds, _, uid = run_python(bomb)
    assert not result.passed
    assert seconds < LIMITS.timeout_seconds + 3
    assert live_processes(uid) == [], "every process of the bomb is gone"
    # The trainer can still start processes.
    assert os.system("true") == 0


@strict_only
def test_escaped_daemon_is_killed_after_the_run():
    daemon = (
        "import os, sys, time\n"
        "pid = os.fork()\n"
        "if pid == 0:\n"
        "    os.setsid()\n"
        "    if os.fork() == 0:\n"
        "        time.sleep(300)\n"
        "    os._exit(0)\n"
        "os.waitpid(pid, 0)\n"
        "print('left a daemon behind')\n"
    )
    result, _, _, uid = run_python(daemon)
    assert result.passed, "the program itself exits 0"
    assert live_processes(uid) == [], (
        "its double-forked, setsid daemon does not survive the sandbox"
    )


@strict_only
def test_huge_output_is_capped_and_stopped():
    result, seconds, _, _ = run_python("while True:\n    print('x' * 10000)")
    assert result.output_exceeded and not result.passed
    assert len(result.stdout) == LIMITS.output_limit_bytes
    assert seconds < 2, "stopped at the cap, not at the timeout"


@strict_only
@pytest.mark.parametrize(
    "code",
    [
        pytest.param("x = bytearray(8 * 1024**3)", id="one-big-allocation"),
        pytest.param("chunks = []\nwhile True:\n    chunks.append(bytearray(10**7))", id="growing"),
    ],
)
def test_memory_hog_fails_inside_the_limit(code):
    result, seconds, _, _ = run_python(code)
    assert not result.passed and not result.timed_out
    assert "MemoryError" in result.stderr
    assert seconds < LIMITS.timeout_seconds


@strict_only
def test_file_size_limit():
    limits = SandboxLimits(timeout_seconds=5, file_size_mb=1)
    result, _, _, _ = run_python("open('big', 'wb').write(b'x' * 4 * 1024**2)", limits=limits)
    assert not result.passed
    assert result.returncode == -25 or "File too large" in result.stderr  # SIGXFSZ or EFBIG


@pytest.fixture
def listening_server():
    """A TCP server of the trainer on 127.0.0.1 that records who connects."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    server.settimeout(0.2)
    accepted: list[tuple] = []
    stop = threading.Event()

    def serve():
        while not stop.is_set():
            try:
                connection, address = server.accept()
            except TimeoutError:
                continue
            accepted.append(address)
            connection.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield server.getsockname()[1], accepted
    stop.set()
    thread.join()
    server.close()


@strict_only
def test_network_is_unreachable(listening_server):
    port, accepted = listening_server
    code = f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=2)\nprint('connected')"

    escaped, _, _, _ = run_python(code, isolation="rlimits")
    assert escaped.passed and "connected" in escaped.stdout, "without the jail it connects"
    time.sleep(0.3)
    assert len(accepted) == 1

    result, _, _, _ = run_python(code)
    assert not result.passed
    assert "connected" not in result.stdout
    assert "Network is unreachable" in result.stderr or "Connection refused" in result.stderr
    time.sleep(0.3)
    assert len(accepted) == 1, "the sandboxed program never reached the server"


@pytest.fixture
def outside_targets(tmp_path):
    """Places outside the sandbox: the test's own tmp dir (root only) and a world-writable
    directory (any user may write it, so only the read-only mounts stop the program)."""
    world_writable = Path(tempfile.mkdtemp(prefix="trainyard-outside-"))
    world_writable.chmod(0o777)
    targets = [
        tmp_path / "escaped.txt",
        world_writable / "escaped.txt",
        Path("/dev/shm") / "trainyard-escaped",
    ]
    yield targets
    for target in targets:
        target.unlink(missing_ok=True)
    world_writable.rmdir()


WRITE_EVERYWHERE = """
import sys
for target in sys.argv[1:]:
    try:
        with open(target, "w") as handle:
            handle.write("escaped")
        print("wrote", target)
    except OSError as error:
        print("refused", target, error.strerror)
"""


@strict_only
def test_writes_outside_the_sandbox_directory_do_not_land(outside_targets):
    python = sandbox_python()
    with Sandbox(LIMITS, "rlimits") as box:
        box.write("main.py", WRITE_EVERYWHERE)
        escaped = box.run([os.sys.executable, "main.py", *map(str, outside_targets)])
    assert all(target.exists() for target in outside_targets), "without the jail every write lands"
    for target in outside_targets:
        target.unlink()

    with Sandbox(LIMITS, "strict") as box:
        box.write("main.py", WRITE_EVERYWHERE + "\nopen('inside.txt', 'w').write('ok')\n")
        result = box.run([python, "main.py", *map(str, outside_targets)])
        inside = (box.directory / "inside.txt").read_text()
    assert escaped.passed and result.passed, result.stderr
    assert result.stdout.count("refused") == len(outside_targets), result.stdout
    assert not any(target.exists() for target in outside_targets)
    assert inside == "ok", "the sandbox's own directory stays writable"


@strict_only
def test_sandbox_cannot_signal_the_trainer():
    result, _, _, _ = run_python(f"import os, signal\nos.kill({os.getpid()}, signal.SIGTERM)")
    assert not result.passed
    assert "PermissionError" in result.stderr


@strict_only
def test_setuid_binaries_do_not_raise_privileges():
    # su is setuid root; on nosuid mounts it runs without privileges and must fail.
    su = "/bin/su" if Path("/bin/su").exists() else None
    if su is None or not Path(su).stat().st_mode & stat.S_ISUID:
        pytest.skip("no setuid su on this machine")
    with Sandbox(LIMITS, "strict") as box:
        result = box.run([su, "-c", "id -u", "root"])
    assert not result.passed
    assert result.stdout.strip() != "0"


def test_rlimits_isolation_still_enforces_timeout_and_output_cap():
    result, seconds, _, uid = run_python("while True:\n    pass", isolation="rlimits")
    assert result.timed_out and seconds < LIMITS.timeout_seconds + 2 and uid is None
    result, _, _, _ = run_python("while True:\n    print('y' * 1000)", isolation="rlimits")
    assert result.output_exceeded


def test_missing_program_is_a_failed_run_not_an_exception():
    with Sandbox(LIMITS, "rlimits") as box:
        result = box.run(["/nonexistent/compiler", "x.c"])
    assert not result.passed and "could not start" in result.stderr


@strict_only
def test_no_sandbox_process_outlives_the_tests():
    # Runs last in this module (pytest keeps file order): nothing any test started survives.
    ours = range(SANDBOX_UID_FLOOR + os.getpid() * 64, SANDBOX_UID_FLOOR + os.getpid() * 64 + 64)
    assert live_processes(ours) == []
