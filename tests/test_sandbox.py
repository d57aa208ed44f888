"""The sandbox against hostile code: every run fails cleanly, in time, and the test process is unharmed.

Root-only tests check the privilege drop and the fallbacks (no namespaces / no Landlock, as in a
container without CAP_SYS_ADMIN); the non-root test runs the sandbox as ``nobody`` with the system
interpreter, so that even a failure of the isolation could only hurt that helper process.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import textwrap
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

import egspo.sandbox as sandbox
from egspo.sandbox import MAX_PROCESSES, run_python

IS_ROOT = os.geteuid() == 0
TIMEOUT = 1.5
# Deadline plus the launcher's stop, the drain and interpreter start-up on a loaded 2-core machine.
SLACK = 2.5


def _sandbox_uid_processes() -> list[int]:
    """Pids of live (non-zombie) processes that run under one of the sandbox's dedicated uids."""
    base = sandbox._UidLease._base
    if not isinstance(base, int):
        return []
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            fields = dict(line.split(":", 1) for line in Path(f"/proc/{entry}/status").read_text().splitlines()
                          if ":" in line)
        except OSError:
            continue
        uid = int(fields["Uid"].split()[0])
        if base <= uid < base + sandbox._UID_SLOTS and not fields["State"].strip().startswith("Z"):
            pids.append(int(entry))
    return pids


@pytest.fixture(params=["full", "no-namespaces", "no-namespaces-no-landlock"])
def mode(request, monkeypatch):
    """The default isolation, and (root only) the fallbacks a container without CAP_SYS_ADMIN gets."""
    if request.param != "full" and not IS_ROOT:
        pytest.skip("the fallback modes are forced through root-only paths")
    monkeypatch.setattr(sandbox, "_USE_NAMESPACES", request.param == "full")
    monkeypatch.setattr(sandbox, "_USE_LANDLOCK", request.param != "no-namespaces-no-landlock")
    return request.param


def test_normal_run_has_clean_environment_and_temporary_cwd(monkeypatch):
    monkeypatch.setenv("EGSPO_TEST_SECRET", "hunter2")
    code = textwrap.dedent("""
        import json, os, sys
        print(json.dumps({"env": dict(os.environ), "cwd": os.getcwd(), "argv0": sys.argv[0]}))
        sys.stderr.write("to stderr")
    """)
    result = run_python(code, timeout_s=5)
    assert result.ok and result.returncode == 0 and result.reason is None, result
    seen = json.loads(result.stdout)
    assert "EGSPO_TEST_SECRET" not in seen["env"] and "hunter2" not in result.stdout
    assert set(seen["env"]) <= {"PATH", "HOME", "TMPDIR", "LANG", "LC_ALL", "OMP_NUM_THREADS",
                                "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "LD_LIBRARY_PATH"}
    assert seen["env"]["HOME"] == seen["cwd"] == seen["env"]["TMPDIR"]
    assert result.stderr == "to stderr"
    assert not os.path.exists(seen["cwd"])  # the working directory is gone
    assert {"session", "rlimits", "env", "tmpdir"} <= set(result.isolation)
    if IS_ROOT:
        assert "uid" in result.isolation


def test_failures_are_results_never_exceptions():
    syntax = run_python("def (:")
    assert not syntax.ok and syntax.returncode == 1 and "SyntaxError" in syntax.stderr
    unencodable = run_python("print('\ud800')")  # a lone surrogate cannot even be written to disk
    assert not unencodable.ok and unencodable.returncode is None and unencodable.reason.startswith("sandbox error")
    with pytest.raises(ValueError):
        run_python("pass", timeout_s=0)


def test_infinite_loop_times_out(mode):
    result = run_python("while True:\n    pass", timeout_s=TIMEOUT)
    assert result.timed_out and not result.ok and result.reason.startswith("timeout")
    assert result.elapsed < TIMEOUT + SLACK


def test_sleeping_background_child_is_killed_with_its_group(mode):
    # A child that leaves the process group (setsid) and outlives its parent.
    code = textwrap.dedent("""
        import os, time
        if os.fork() == 0:
            os.setsid()
            time.sleep(60)
        print("parent done")
    """)
    result = run_python(code, timeout_s=TIMEOUT)
    assert result.stdout == "parent done\n" and result.elapsed < TIMEOUT + SLACK
    if IS_ROOT:
        assert _sandbox_uid_processes() == []


def test_fork_bomb_is_contained(mode):
    result = run_python("import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass",
                        timeout_s=TIMEOUT)
    assert not result.ok and result.timed_out and result.elapsed < TIMEOUT + SLACK
    if IS_ROOT:
        assert _sandbox_uid_processes() == []  # every descendant is gone


@pytest.mark.skipif(not IS_ROOT, reason="as root RLIMIT_NPROC needs the privilege drop to be enforced")
def test_process_limit_is_enforced_as_root(mode):
    code = textwrap.dedent("""
        import os, time
        n = 0
        try:
            while True:
                if os.fork() == 0:
                    time.sleep(60)
                    os._exit(0)
                n += 1
        except OSError:
            print(n)
    """)
    result = run_python(code, timeout_s=5)
    assert result.ok, result
    assert 0 < int(result.stdout) < MAX_PROCESSES
    assert _sandbox_uid_processes() == []


def test_huge_allocation_fails_fast(mode):
    result = run_python("x = bytearray(10 * 1024**3)\nprint(len(x))", timeout_s=5, memory_mb=512)
    assert not result.ok and "MemoryError" in result.stderr and result.elapsed < 4


def test_huge_output_is_capped(mode):
    result = run_python("import sys\nwhile True:\n    sys.stdout.write('x' * 10**6)", timeout_s=5,
                        max_output_bytes=10_000)
    assert result.truncated and not result.ok and len(result.stdout) == 10_000
    assert result.elapsed < 4  # killed at the cap, not at the deadline


def test_cannot_write_outside_the_working_directory(mode, tmp_path):
    target = tmp_path / "pwned.txt"
    result = run_python(f"open({str(target)!r}, 'w').write('pwned')", timeout_s=5)
    assert not result.ok and not target.exists()
    # World-writable places are closed too when the filesystem is read-only or Landlock is on.
    probe = Path("/tmp") / f"egspo-sandbox-probe-{os.getpid()}"
    result = run_python(f"open({str(probe)!r}, 'w').write('pwned')", timeout_s=5)
    try:
        if {"readonly-fs", "landlock-fs"} & set(result.isolation):
            assert not result.ok and not probe.exists()
    finally:
        probe.unlink(missing_ok=True)


def test_cannot_read_secrets_of_the_trainer(mode, monkeypatch):
    monkeypatch.setenv("EGSPO_TEST_SECRET", "hunter2")
    code = textwrap.dedent(f"""
        import os
        print(os.environ.get("EGSPO_TEST_SECRET"))
        try:
            print(open("/proc/{os.getpid()}/environ", "rb").read())
        except OSError as exc:
            print("no access", exc.errno)
    """)
    result = run_python(code, timeout_s=5)
    assert "hunter2" not in result.stdout and result.stdout.startswith("None\n")
    if IS_ROOT:
        assert "no access" in result.stdout


@pytest.mark.parametrize("attack", [
    "os.kill(os.getppid(), signal.SIGKILL)",
    "os.killpg(0, signal.SIGKILL)",
    "os.kill({trainer}, signal.SIGKILL)",
    "os.killpg(os.getpgid({trainer}), signal.SIGKILL)",
    # kill(-1) as a non-root uid reaches only that uid's processes (a dropped uid, or this helper's
    # own user in the non-root test); the guard keeps it from ever running as root outside a PID
    # namespace, whatever happened to the isolation.
    "(os.getuid() != 0 or os.getpid() == 1) and os.kill(-1, signal.SIGKILL)",
])
def test_cannot_kill_the_trainer(mode, attack):
    code = ("import os, signal\ntry:\n    " + attack.format(trainer=os.getpid())
            + "\nexcept OSError as exc:\n    print(exc)")
    result = run_python(code, timeout_s=5)
    assert result.elapsed < 5  # and we are still here to check it
    assert threading.main_thread().is_alive()


@pytest.mark.skipif(not IS_ROOT, reason="one uid per concurrent run is the root path")
def test_concurrent_runs_get_distinct_uids():
    barrier_code = "import os, time\ntime.sleep(0.5)\nprint(os.getuid())"
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda _: run_python(barrier_code, timeout_s=5), range(4)))
    assert all(r.ok for r in results)
    assert len({r.stdout for r in results}) == 4


_NON_ROOT_HELPER = r"""
import importlib.util, json, os, sys, time
spec = importlib.util.spec_from_file_location("egspo_sandbox", sys.argv[1])
sandbox = importlib.util.module_from_spec(spec)
sys.modules["egspo_sandbox"] = sandbox
spec.loader.exec_module(sandbox)
target, secret_env = sys.argv[2], {"EGSPO_TEST_SECRET": "hunter2"}
os.environ.update(secret_env)
cases = {
    "write": f"open({target!r}, 'w').write('pwned')",
    "secret": "import os; print(os.environ.get('EGSPO_TEST_SECRET'))",
    "loop": "while True: pass",
    "fork": "import os\nwhile True:\n    try: os.fork()\n    except OSError: pass",
    "kill_parent": "import os; os.kill(os.getppid(), 9)",
    "kill_trainer": f"import os; os.kill({os.getpid()}, 9)",
}
out = {}
for name, code in cases.items():
    r = sandbox.run_python(code, timeout_s=1.5)
    out[name] = {"ok": r.ok, "stdout": r.stdout, "elapsed": r.elapsed, "isolation": list(r.isolation)}
out["written"] = os.path.exists(target)
print(json.dumps(out))
"""


@pytest.fixture
def world_dir():
    """A directory ``nobody`` can reach: pytest's tmp_path (and a clone of this repository, e.g. under
    /root) may sit below directories only their owner can enter."""
    path = Path(tempfile.mkdtemp(prefix="egspo-nobody-"))
    try:
        path.chmod(0o755)
        blocked = [str(d) for d in path.parents if not d.stat().st_mode & 0o001]
        if blocked:
            pytest.skip(f"the temporary directory's ancestors {blocked} are not traversable by nobody")
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.mark.skipif(not IS_ROOT or not os.path.exists("/usr/bin/python3"),
                    reason="needs root to become nobody, and a system python3 nobody can run")
def test_non_root_mode_as_nobody(world_dir):
    # nobody runs a world-readable copy of sandbox.py (standard library only): the checkout may be
    # unreadable to it, and the launcher re-runs the file it was loaded from.
    script = world_dir / "sandbox.py"
    shutil.copyfile(sandbox.__file__, script)
    script.chmod(0o644)
    nobody_dir = world_dir / "nobody"
    nobody_dir.mkdir()
    os.chown(nobody_dir, 65534, 65534)
    target = nobody_dir / "pwned.txt"
    proc = subprocess.run(
        ["/usr/bin/python3", "-I", "-c", _NON_ROOT_HELPER, str(script), str(target)],
        capture_output=True, text=True, timeout=40, user=65534, group=65534, extra_groups=[], cwd="/",
        env={"PATH": "/usr/bin:/bin"},
    )
    # The helper (the "trainer" here) survived every attack: it printed its report.
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    layers = set(out["write"]["isolation"])
    assert "uid" not in layers  # nothing to drop
    assert out["secret"]["stdout"] == "None\n"
    assert not out["loop"]["ok"] and out["loop"]["elapsed"] < TIMEOUT + SLACK
    assert not out["fork"]["ok"] and out["fork"]["elapsed"] < TIMEOUT + SLACK
    if {"readonly-fs", "landlock-fs"} & layers:
        assert not out["write"]["ok"] and not out["written"]
    if {"pidns", "landlock-signal"} & layers:
        assert out["kill_trainer"]["stdout"] == ""
