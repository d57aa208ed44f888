"""Isolated execution of generated Python code (the code tasks run their tests through it).

``run_python(code)`` runs ``code`` as a script in a separate ``python -I`` process and returns a
:class:`SandboxResult`; it never hangs past ``timeout_s`` plus a short grace and turns everything that
happens to the code (crash, timeout, resource limit, sandbox failure) into a failed result.

How a run is isolated (each layer is tried; the ones that took effect are listed in
``SandboxResult.isolation``; docs/sandbox.md says what each one stops):

- always: a new session / process group killed as a whole (SIGKILL) at the deadline or when the
  output cap is hit; rlimits on address space, CPU time, file size, open files, processes and core
  dumps; a fresh temporary working directory (removed afterwards); an empty environment (HOME and
  TMPDIR point at the working directory); no stdin; stdout/stderr read through pipes with a cap.
- as root: the code runs under a dedicated unprivileged uid/gid, one per concurrent run (so
  RLIMIT_NPROC is enforced and not shared), cannot signal root processes, and the filesystem
  permissions keep it out of the trainer's files. Namespaces: network (no interfaces up), PID (the
  code cannot see the trainer; every descendant dies with it) and mount (the whole filesystem is
  read-only except a size-capped tmpfs working directory and a private /dev/shm; the home directory
  is hidden).
- not root: the same namespaces inside an unprivileged user namespace, when the kernel allows one.
- both: Landlock (Linux >= 5.13, when enabled) restricts writes to the working directory, denies TCP
  (ABI >= 4) and signals to processes outside the sandbox (ABI >= 6); no_new_privs blocks setuid
  binaries.

The setup that must happen between fork and exec (namespaces, mounts, privilege drop) is done by this
same file run as a script (the *launcher*) in a fresh single-threaded interpreter, never in a
``preexec_fn``: that is not safe in a multi-threaded trainer, and ``run_python`` is called from threads.
"""

from __future__ import annotations

import ctypes
import fcntl
import json
import logging
import os
import pwd
import re
import resource
import select
import selectors
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from typing import IO, Any, cast

logger = logging.getLogger(__name__)

# Limits that are not per-call arguments (no caller needs to vary them).
MAX_PROCESSES = 32  # RLIMIT_NPROC: processes + threads of the sandbox uid
MAX_FILE_BYTES = 16 * 1024 * 1024  # RLIMIT_FSIZE: largest file the code may write
MAX_OPEN_FILES = 256  # RLIMIT_NOFILE
WORKDIR_BYTES = 64 * 1024 * 1024  # size of the tmpfs working directory (and of the private /dev/shm)
KILL_GRACE_S = 1.0  # after SIGKILL, how long we wait for the process and its pipes

# Dedicated uids for the privilege drop: one per concurrent run, claimed with flock so that several
# trainer processes on one host (one per GPU) never share one (RLIMIT_NPROC counts per uid).
_UID_SLOTS = 256
_UID_BASES = (0x7F000000, 60000)  # the second fits containers whose uid map stops at 65536
_LOCK_DIRS = ("/run/egspo-sandbox", os.path.join(tempfile.gettempdir(), "egspo-sandbox-locks"))

# Test hooks: the fallback paths (no namespaces, no Landlock) are exercised by the tests on a host
# where everything works.
_USE_NAMESPACES = True
_USE_LANDLOCK = True

_CHILD_PATH = "/usr/local/bin:/usr/bin:/bin"
_FALLBACK_INTERPRETERS = ("/usr/local/bin/python3", "/usr/bin/python3")


@dataclass(frozen=True)
class SandboxResult:
    """What happened to one run. ``ok`` means exit status 0, within every limit."""

    ok: bool
    returncode: int | None  # negative: killed by that signal; None: the code never started
    timed_out: bool
    stdout: str
    stderr: str
    truncated: bool  # an output stream hit max_output_bytes (the run was then killed)
    elapsed: float  # seconds, wall clock
    reason: str | None  # why ok is False, in words
    isolation: tuple[str, ...] = ()  # the isolation layers that took effect


def run_python(
    code: str,
    *,
    timeout_s: float = 5.0,
    memory_mb: int = 512,
    max_output_bytes: int = 64_000,
    cpu_s: int | None = None,
) -> SandboxResult:
    """Run ``code`` as a Python script in the sandbox; see the module docstring for the isolation.

    ``cpu_s`` defaults to the wall timeout rounded up plus one second. Raises ``ValueError`` for
    invalid arguments only (a caller bug); whatever the code does comes back as a result.
    """
    if timeout_s <= 0 or memory_mb <= 0 or max_output_bytes <= 0 or (cpu_s is not None and cpu_s <= 0):
        raise ValueError("run_python: timeout_s, memory_mb, max_output_bytes and cpu_s must be positive")
    start = time.monotonic()
    try:
        return _run(code, timeout_s, memory_mb, max_output_bytes, cpu_s, start)
    except Exception as exc:  # the sandbox itself failed: report, never raise into the trainer
        logger.warning("sandbox failure: %r", exc)
        return SandboxResult(
            ok=False, returncode=None, timed_out=False, stdout="", stderr="", truncated=False,
            elapsed=time.monotonic() - start, reason=f"sandbox error: {exc!r}",
        )


# ----------------------------------------------------------------------------------------------
# Parent side


def _run(code: str, timeout_s: float, memory_mb: int, max_output_bytes: int, cpu_s: int | None,
         start: float) -> SandboxResult:
    deadline = start + timeout_s
    lease = _UidLease.acquire(deadline) if os.geteuid() == 0 else None
    try:
        base = tempfile.mkdtemp(prefix="egspo-sandbox-")
        try:
            # 0711: a dropped uid may traverse to its working directory but not list the base.
            os.chmod(base, 0o711)
            work = os.path.join(base, "work")
            os.mkdir(work, 0o700)
            with open(os.path.join(base, "main.py"), "w", encoding="utf-8") as f:
                f.write(code)
            spec = _launch_spec(base, work, memory_mb, cpu_s or int(timeout_s + 0.999) + 1, lease)
            return _supervise(spec, base, deadline, max_output_bytes, start, lease)
        finally:
            shutil.rmtree(base, onerror=_force_remove)
    finally:
        if lease is not None:
            lease.release()


def _launch_spec(base: str, work: str, memory_mb: int, cpu_s: int, lease: _UidLease | None) -> dict[str, Any]:
    prefixes = {sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix,
                os.path.dirname(os.path.realpath(sys.executable))}
    return {
        "base": base,
        "work": work,
        "interpreters": [sys.executable, *_FALLBACK_INTERPRETERS],
        "expose": sorted(os.path.realpath(p) for p in prefixes | {base}),
        "home": os.path.realpath(os.path.expanduser("~")),
        "uid": lease.uid if lease else None,
        "gid": lease.gid if lease else None,
        "memory_bytes": memory_mb * 1024 * 1024,
        "cpu_s": cpu_s,
        "namespaces": _USE_NAMESPACES,
        "landlock": _USE_LANDLOCK,
        "env": {
            "PATH": _CHILD_PATH, "HOME": work, "TMPDIR": work, "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8",
            # Thread pools of numerical libraries would blow the address-space and process limits.
            "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
            # Some interpreters (HPC modules) cannot start without it; it carries no secret.
            **({"LD_LIBRARY_PATH": os.environ["LD_LIBRARY_PATH"]} if "LD_LIBRARY_PATH" in os.environ else {}),
        },
    }


def _supervise(spec: dict[str, Any], base: str, deadline: float, cap: int, start: float,
               lease: _UidLease | None) -> SandboxResult:
    status_r, status_w = os.pipe()
    spec["status_fd"] = status_w
    launcher_env = {"PATH": _CHILD_PATH, "LANG": "C.UTF-8"}
    if "LD_LIBRARY_PATH" in spec["env"]:
        launcher_env["LD_LIBRARY_PATH"] = spec["env"]["LD_LIBRARY_PATH"]
    try:
        proc = subprocess.Popen(
            [sys.executable, "-I", "-S", os.path.abspath(__file__), json.dumps(spec)],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            pass_fds=(status_w,), start_new_session=True, env=launcher_env, cwd=base,
        )
    finally:
        os.close(status_w)
    stdout, stderr = cast(IO[bytes], proc.stdout), cast(IO[bytes], proc.stderr)  # both PIPE, so both set
    streams = {"stdout": stdout.fileno(), "stderr": stderr.fileno(), "status": status_r}
    data = {name: bytearray() for name in streams}
    timed_out = truncated = False
    sel = selectors.DefaultSelector()
    for name, fd in streams.items():
        os.set_blocking(fd, False)
        sel.register(fd, selectors.EVENT_READ, name)
    # A pidfd wakes the select when the launcher exits; it stays unreaped until proc.wait below, so
    # its pid cannot be reused by another process while we may still signal it.
    pidfd = _pidfd_open(proc.pid)
    if pidfd is not None:
        sel.register(pidfd, selectors.EVENT_READ, "exit")
    try:
        # Phase 1: until the launcher exits (the code and its supervisor are done), the deadline
        # passes or an output stream overflows.
        exited = False
        while not exited:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                timed_out = True
                break
            for key, _ in sel.select(remaining if pidfd is not None else min(remaining, 0.05)):
                if key.data == "exit":
                    exited = True
                elif not _read_into(key, sel, data, cap):
                    truncated = True
            if truncated:
                break
            exited = exited or (pidfd is None and proc.poll() is not None)
        # Phase 2: ask the launcher to kill the code (it reaps and cleans up), SIGKILL everything
        # if it does not answer, then drain the pipes for a bounded time: a process that escaped
        # (possible only when not root and without a PID namespace) could hold them open forever.
        if not exited:
            _kill_quietly(proc.pid, group=False, sig=STOP_SIGNAL)
        try:
            proc.wait(timeout=KILL_GRACE_S)
        except subprocess.TimeoutExpired:
            logger.warning("sandbox launcher %d did not stop within %.1fs; killing it", proc.pid, KILL_GRACE_S)
            _kill_quietly(proc.pid, group=True)
            child = _status(data["status"])["child"]
            if child:
                _kill_quietly(child, group=True)
            if lease is not None:
                _sweep_uid(lease.uid, lease.gid)
            proc.wait()
        drain_until = time.monotonic() + KILL_GRACE_S
        while {key.data for key in sel.get_map().values()} - {"exit"}:
            remaining = drain_until - time.monotonic()
            if remaining <= 0:
                break
            for key, _ in sel.select(min(remaining, 0.05)):
                if key.data != "exit" and not _read_into(key, sel, data, cap):
                    truncated = True
    finally:
        sel.close()
        for own_fd in (status_r, pidfd):
            if own_fd is not None:
                os.close(own_fd)
        stdout.close()
        stderr.close()
    status = _status(data["status"])
    returncode: int | None = proc.returncode
    if status["error"] is not None:
        returncode = None  # the launcher failed before the code started
    elif status["wait_status"] is not None:
        returncode = os.waitstatus_to_exitcode(status["wait_status"])
    reason = _reason(timed_out, truncated, status["error"], returncode, deadline - start, cap)
    _warn_once_about(status)
    return SandboxResult(
        ok=reason is None, returncode=returncode, timed_out=timed_out,
        stdout=bytes(data["stdout"][:cap]).decode("utf-8", "replace"),
        stderr=bytes(data["stderr"][:cap]).decode("utf-8", "replace"),
        truncated=truncated, elapsed=time.monotonic() - start, reason=reason, isolation=status["layers"],
    )


def _read_into(key: selectors.SelectorKey, sel: selectors.BaseSelector, data: dict[str, bytearray],
               cap: int) -> bool:
    """Read what is available on one pipe; False when an output stream went over the cap."""
    try:
        chunk = os.read(key.fd, 65536)
    except BlockingIOError:
        return True
    if not chunk:
        sel.unregister(key.fd)
        return True
    buf = data[key.data]
    if key.data == "status":  # written only by the (trusted) launcher, before exec and after wait
        buf += chunk
        return True
    buf += chunk[: cap + 1 - len(buf)]  # never hold more than the cap, however long we drain
    return len(buf) <= cap


def _status(raw: bytes | bytearray) -> dict[str, Any]:
    """The launcher's status lines: layers (just before exec), wait_status (after), or error."""
    status: dict[str, Any] = {"layers": (), "wait_status": None, "error": None, "interpreter": None,
                              "child": None}
    for line in bytes(raw).decode("utf-8", "replace").splitlines():
        try:
            msg = json.loads(line)
        except ValueError:
            continue
        status.update({k: v for k, v in msg.items() if k in status})
    status["layers"] = tuple(status["layers"])
    return status


def _reason(timed_out: bool, truncated: bool, error: str | None, returncode: int | None, timeout_s: float,
            cap: int) -> str | None:
    if timed_out:
        return f"timeout after {timeout_s:.1f}s"
    if truncated:
        return f"output limit exceeded ({cap} bytes)"
    if error is not None:
        return f"sandbox error: {error}"
    if returncode is None:
        return "sandbox error: no exit status"
    if returncode < 0:
        sig = -returncode
        name = signal.Signals(sig).name if sig in signal.Signals._value2member_map_ else str(sig)
        hints: dict[int, str] = {signal.SIGXCPU: " (cpu time limit)", signal.SIGXFSZ: " (file size limit)"}
        hint = hints.get(sig, "")
        return f"killed by signal {name}{hint}"
    if returncode > 0:
        return f"exit status {returncode}"
    return None


def _pidfd_open(pid: int) -> int | None:
    try:
        return os.pidfd_open(pid)
    except (AttributeError, OSError):  # old kernel or platform: fall back to polling
        return None


def _sweep_uid(uid: int, gid: int) -> None:
    """Kill every process of a sandbox uid (needs root: done by the launcher in sweep mode)."""
    try:
        subprocess.run(
            [sys.executable, "-I", "-S", os.path.abspath(__file__), json.dumps({"sweep_uid": uid, "gid": gid})],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            env={"PATH": _CHILD_PATH}, timeout=KILL_GRACE_S * 5, check=False,
        )
    except (OSError, subprocess.SubprocessError) as exc:
        logger.warning("could not sweep the processes of sandbox uid %d: %r", uid, exc)


def _force_remove(func: Any, path: str, exc_info: Any) -> None:
    """rmtree helper: the code may leave directories without permissions (matters when not root)."""
    try:
        os.chmod(os.path.dirname(path), 0o700)
        if os.path.isdir(path) and not os.path.islink(path):
            os.chmod(path, 0o700)
            shutil.rmtree(path, ignore_errors=True)
        else:
            os.unlink(path)
    except OSError:
        pass


_warned: set[str] = set()
_warn_lock = threading.Lock()


def _warn_once_about(status: dict[str, Any]) -> None:
    layers = status["layers"]
    if not layers:
        return
    missing = []
    if os.geteuid() == 0 and "uid" not in layers:
        missing.append("privilege drop (the code runs as root: RLIMIT_NPROC is not enforced)")
    if "pidns" not in layers and "uid" not in layers and "landlock-signal" not in layers:
        missing.append("signal isolation (the code can signal the trainer's processes)")
    if "readonly-fs" not in layers and "landlock-fs" not in layers and "uid" not in layers:
        missing.append("write protection (the code can write wherever the trainer can)")
    if "netns" not in layers:
        missing.append("network namespace (" + ("TCP blocked by Landlock" if "landlock-net" in layers
                                                else "the network is reachable") + ")")
    messages = []
    if missing:
        messages.append("sandbox runs without: " + "; ".join(missing) + ". See docs/sandbox.md.")
    if status["interpreter"] not in (None, sys.executable):
        messages.append(f"sandbox runs {status['interpreter']}: the dropped uid cannot run {sys.executable}")
    with _warn_lock:
        for message in messages:
            if message not in _warned:
                _warned.add(message)
                logger.warning(message)


class _UidLease:
    """A dedicated uid/gid for one run, held with flock until released."""

    _in_process: set[int] = set()  # used only when no trustworthy lock directory exists
    _lock = threading.Lock()
    _base: int | None | bool = False  # False: not computed yet; None: no usable range

    def __init__(self, uid: int, fd: int | None) -> None:
        self.uid = self.gid = uid
        self._fd = fd

    @classmethod
    def acquire(cls, deadline: float) -> _UidLease | None:
        base = cls._uid_base()
        if base is None:
            return None
        lock_dir = _lock_dir()
        while True:
            for slot in range(_UID_SLOTS):
                uid = base + slot
                if lock_dir is None:
                    with cls._lock:
                        if uid not in cls._in_process:
                            cls._in_process.add(uid)
                            return cls(uid, None)
                    continue
                fd = os.open(os.path.join(lock_dir, str(uid)), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    os.close(fd)
                    continue
                return cls(uid, fd)
            if time.monotonic() > deadline:
                raise TimeoutError("no free sandbox uid")
            time.sleep(0.01)

    def release(self) -> None:
        if self._fd is None:
            with self._lock:
                self._in_process.discard(self.uid)
        else:
            os.close(self._fd)  # closing drops the flock

    @classmethod
    def _uid_base(cls) -> int | None:
        with cls._lock:
            if cls._base is False:
                cls._base = next((b for b in _UID_BASES if _usable_id_range(b, _UID_SLOTS)), None)
                if cls._base is None:
                    logger.warning("no free uid range for the sandbox privilege drop; code will run as root")
            return cls._base


def _usable_id_range(base: int, count: int) -> bool:
    """The ids are mapped in this user namespace (containers) and none belongs to a real user."""
    for map_file in ("/proc/self/uid_map", "/proc/self/gid_map"):
        try:
            with open(map_file) as f:
                ranges = [tuple(int(x) for x in line.split()) for line in f if line.strip()]
        except OSError:
            ranges = [(0, 0, 2**32 - 1)]
        if not any(inside <= base and base + count <= inside + length for inside, _, length in ranges):
            return False
    for uid in range(base, base + count):
        try:
            pwd.getpwuid(uid)
            return False
        except KeyError:
            pass
    return True


def _lock_dir() -> str | None:
    """A root-owned directory nobody else can write (else a sandbox could plant lock files)."""
    for path in _LOCK_DIRS:
        try:
            os.makedirs(path, mode=0o700, exist_ok=True)
            st = os.lstat(path)
        except OSError:
            continue
        if stat.S_ISDIR(st.st_mode) and st.st_uid == 0 and not st.st_mode & 0o022:
            return path
    return None


# ----------------------------------------------------------------------------------------------
# Launcher side: this file run as ``python -I -S sandbox.py SPEC_JSON`` (single-threaded, as the
# trainer's user). Everything below uses only the standard library.

CLONE_NEWNS, CLONE_NEWUSER, CLONE_NEWPID, CLONE_NEWNET = 0x00020000, 0x10000000, 0x20000000, 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REMOUNT = 1, 2, 4, 8, 32
MS_NOATIME, MS_NODIRATIME, MS_BIND, MS_REC, MS_PRIVATE = 1024, 2048, 4096, 16384, 1 << 18
MS_RELATIME, MS_STRICTATIME = 1 << 21, 1 << 24
PR_SET_PDEATHSIG, PR_SET_DUMPABLE, PR_SET_CHILD_SUBREAPER, PR_SET_NO_NEW_PRIVS = 1, 4, 36, 38
STOP_SIGNAL = signal.SIGUSR1  # parent -> launcher: kill the code, clean up, exit
_SYS_LANDLOCK = (444, 445, 446)  # create_ruleset, add_rule, restrict_self (same on every arch)


class _Libc:
    def __init__(self) -> None:
        self.lib = ctypes.CDLL(None, use_errno=True)

    def _check(self, rc: int, what: str) -> int:
        if rc < 0:
            err = ctypes.get_errno()
            raise OSError(err, f"{what}: {os.strerror(err)}")
        return rc

    def unshare(self, flags: int) -> None:
        self._check(self.lib.unshare(ctypes.c_int(flags)), "unshare")

    def mount(self, source: str | None, target: str, fstype: str | None, flags: int, data: str | None = None) -> None:
        def enc(s: str | None) -> bytes | None:
            return None if s is None else s.encode()

        rc = self.lib.mount(enc(source), enc(target), enc(fstype), ctypes.c_ulong(flags), enc(data))
        self._check(rc, f"mount {target}")

    def prctl(self, option: int, arg: int) -> None:
        zero = ctypes.c_ulong(0)
        self._check(self.lib.prctl(ctypes.c_int(option), ctypes.c_ulong(arg), zero, zero, zero), "prctl")

    def syscall(self, number: int, *args: Any) -> int:
        return self._check(self.lib.syscall(ctypes.c_long(number), *args), f"syscall {number}")


def _launch(spec: dict[str, Any]) -> None:
    status_fd = spec["status_fd"]

    def report(**msg: Any) -> None:
        os.write(status_fd, (json.dumps(msg) + "\n").encode())  # one line < PIPE_BUF: atomic

    child = 0

    def stop(signum: int, frame: Any) -> None:
        # The parent's deadline or output cap: kill the code now; the cleanup below reaps it.
        if child:
            _kill_quietly(child, group=True)
            _kill_quietly(child, group=False)  # in case it had not made its own group yet
        else:
            os._exit(1)

    try:
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        os.umask(0o022)  # directories we create for the exposed interpreter must be traversable
        libc = _Libc()
        # Orphaned descendants come back to us (not to the host's init, which may never reap them:
        # zombies would count against the sandbox uid's RLIMIT_NPROC in later runs).
        libc.prctl(PR_SET_CHILD_SUBREAPER, 1)
        signal.signal(STOP_SIGNAL, stop)
        layers = ["session", "rlimits", "env", "tmpdir"]
        namespaces = _enter_namespaces(libc) if spec["namespaces"] else set()
        layers += sorted(namespaces)
        shm = None
        if "mountns" in namespaces:
            shm = _setup_mounts(libc, spec, layers)
        else:
            _install_code(spec, spec["work"])
        interpreter, uid = _choose_interpreter(spec)
        alive_r, alive_w = os.pipe()  # non-inheritable: gone at exec
        # Not dumpable (after the uid_map and /proc/self/fd uses above, which need it): a same-uid
        # sandbox (not root) cannot then open our status pipe through /proc/PID/fd.
        libc.prctl(PR_SET_DUMPABLE, 0)
        pid = os.fork()
        if pid == 0:
            try:
                signal.signal(STOP_SIGNAL, signal.SIG_DFL)
                os.close(alive_w)
                _exec_child(libc, spec, interpreter, uid, namespaces, layers, shm, alive_r, report)
            except BaseException as exc:  # noqa: BLE001 - anything here means the code never ran
                report(error=f"{type(exc).__name__}: {exc}")
            os._exit(127)
        child = pid
        report(child=pid)
        os.close(alive_r)
        _, wait_status = os.waitpid(pid, 0)
        report(wait_status=wait_status)
        _clean_up(spec, uid, pid, namespaces)
    except BaseException as exc:  # noqa: BLE001
        report(error=f"{type(exc).__name__}: {exc}")
        os._exit(1)
    os._exit(0)


def _clean_up(spec: dict[str, Any], uid: int | None, child: int, namespaces: set[str]) -> None:
    """Kill what the code left behind and reap it, within a bounded time."""
    if "pidns" not in namespaces:  # else the kernel killed and reaped the namespace with its init
        _kill_quietly(child, group=True)
        if uid is not None:
            _sweep(uid, spec["gid"])  # descendants that left the process group
    until = time.monotonic() + KILL_GRACE_S / 2
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            if time.monotonic() > until:
                return  # something we could not kill (not root, no PID namespace): give up
            time.sleep(0.005)


def _kill_quietly(pid: int, group: bool, sig: int = signal.SIGKILL) -> None:
    try:
        (os.killpg if group else os.kill)(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _enter_namespaces(libc: _Libc) -> set[str]:
    """Network, mount and PID namespaces; through a user namespace when not root. Best effort."""
    names = {CLONE_NEWNET: "netns", CLONE_NEWNS: "mountns", CLONE_NEWPID: "pidns"}
    if os.geteuid() != 0:
        uid, gid = os.getuid(), os.getgid()
        try:
            libc.unshare(CLONE_NEWUSER | CLONE_NEWNET | CLONE_NEWNS | CLONE_NEWPID)
        except OSError:
            return set()  # unprivileged user namespaces are disabled here
        for path, text in (("/proc/self/setgroups", "deny"), ("/proc/self/uid_map", f"{uid} {uid} 1"),
                           ("/proc/self/gid_map", f"{gid} {gid} 1")):
            with open(path, "w") as f:
                f.write(text)
        return {"userns", *names.values()}
    try:
        libc.unshare(CLONE_NEWNET | CLONE_NEWNS | CLONE_NEWPID)
        return set(names.values())
    except OSError:
        pass
    entered = set()
    for flag, name in names.items():
        try:
            libc.unshare(flag)
            entered.add(name)
        except OSError:
            pass
    return entered


def _install_code(spec: dict[str, Any], work: str) -> None:
    with open(os.path.join(spec["base"], "main.py"), "rb") as f:
        code = f.read()
    path = os.path.join(work, "main.py")
    with open(path, "wb") as f:
        f.write(code)
    if spec["uid"] is not None:
        os.chown(work, spec["uid"], spec["gid"])
        os.chown(path, spec["uid"], spec["gid"])


def _setup_mounts(libc: _Libc, spec: dict[str, Any], layers: list[str]) -> str | None:
    """Read-only filesystem except a tmpfs working directory and /dev/shm; the home dir hidden.

    Everything happens in our private mount namespace: the host's mounts are untouched. Returns the
    private /dev/shm path when one was mounted.
    """
    libc.mount(None, "/", None, MS_REC | MS_PRIVATE)
    work, uid, gid = spec["work"], spec["uid"], spec["gid"]
    # Hide the home directory and, for a dropped uid, every directory it could not traverse on the
    # way to the interpreter (pyenv under a 0700 /root); the interpreter's directories (and our
    # base directory) are then bound back at their usual paths.
    hide = {spec["home"]} if spec["home"] != "/" else set()
    if uid is not None:
        hide |= {d for p in spec["expose"] for d in _ancestors(p) if not os.stat(d).st_mode & 0o001}
    # Never hide what an exposed directory contains: binding it back would reveal it again.
    hide = {h for h in hide if os.path.isdir(h) and not any(_under(h, p) or p == h for p in spec["expose"])}
    hide = {h for h in hide if not any(_under(h, other) for other in hide)}
    exposed = [p for p in spec["expose"] if any(_under(p, h) for h in hide)]
    exposed = [p for p in exposed if not any(_under(p, other) for other in exposed)]
    keep = [(p, os.open(p, os.O_PATH | os.O_DIRECTORY)) for p in exposed]
    for h in sorted(hide):
        libc.mount("tmpfs", h, "tmpfs", MS_NOSUID | MS_NODEV, "size=1m,mode=0755")
    for path, fd in keep:
        os.makedirs(path, exist_ok=True)
        libc.mount(f"/proc/self/fd/{fd}", path, None, MS_BIND | MS_REC)
        os.close(fd)
    if hide:
        layers.append("hidden-home")
    owner = f",uid={uid},gid={gid}" if uid is not None else ""
    try:
        libc.mount("tmpfs", work, "tmpfs", MS_NOSUID | MS_NODEV,
                   f"size={WORKDIR_BYTES},nr_inodes=4096,mode=0700{owner}")
        layers.append("tmpfs-workdir")
    except OSError:
        pass
    _install_code(spec, work)
    shm = None
    if os.path.isdir("/dev/shm"):
        try:
            libc.mount("tmpfs", "/dev/shm", "tmpfs", MS_NOSUID | MS_NODEV, f"size={WORKDIR_BYTES},mode=1777")
            shm = "/dev/shm"
        except OSError:
            pass
    if _remount_readonly(libc, keep_writable={work, shm}):
        layers.append("readonly-fs")
    return shm


def _remount_readonly(libc: _Libc, keep_writable: set[str | None]) -> bool:
    """Bind-remount every mount read-only (keeping its other flags); True if / was."""
    with open("/proc/self/mountinfo") as f:
        points = [_unescape(line.split()[4]) for line in f]
    root_ok = False
    for point in dict.fromkeys(points):
        if point in keep_writable:
            continue
        try:
            st = os.statvfs(point)
            flags = MS_REMOUNT | MS_BIND | MS_RDONLY | (st.f_flag & (MS_NOSUID | MS_NODEV | MS_NOEXEC))
            if st.f_flag & os.ST_NOATIME:
                flags |= MS_NOATIME
            elif st.f_flag & os.ST_RELATIME:
                flags |= MS_RELATIME
            else:
                flags |= MS_STRICTATIME
            if st.f_flag & os.ST_NODIRATIME:
                flags |= MS_NODIRATIME
            libc.mount(None, point, None, flags)
            root_ok = root_ok or point == "/"
        except OSError:
            continue  # an overmounted or inaccessible mount point: nothing reachable to protect
    return root_ok


def _choose_interpreter(spec: dict[str, Any]) -> tuple[str, int | None]:
    """The trainer's interpreter if the dropped uid can run it, else a system one, else no drop."""
    uid = spec["uid"]
    candidates = [p for p in spec["interpreters"] if os.path.exists(p)]
    if uid is None:
        return candidates[0], None
    for path in candidates:
        real = os.path.realpath(path)
        prefix = os.path.dirname(os.path.dirname(real))
        dirs = set(_ancestors(real)) | set(_ancestors(os.path.join(prefix, "lib", "x")))
        readable = os.stat(real).st_mode & 0o005 == 0o005
        if readable and all(os.stat(d).st_mode & 0o001 for d in dirs if os.path.exists(d)):
            return path, uid
    return candidates[0], None


def _exec_child(libc: _Libc, spec: dict[str, Any], interpreter: str, uid: int | None, namespaces: set[str],
                layers: list[str], shm: str | None, alive_r: int, report: Any) -> None:
    if {"pidns", "mountns"} <= namespaces:
        try:  # a /proc that shows only the sandbox's processes
            libc.mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
            layers.append("private-proc")
        except OSError:
            pass
    os.setpgid(0, 0)  # the code's own process group, killed as a whole by the launcher
    os.chdir(spec["work"])
    os.umask(0o077)
    mem = spec["memory_bytes"]
    nproc = MAX_PROCESSES
    if uid is None and "userns" not in namespaces and os.geteuid() != 0:
        nproc += _tasks_of_uid(os.getuid())  # NPROC counts all the user's tasks, the trainer's too
    for limit, value in ((resource.RLIMIT_AS, (mem, mem)), (resource.RLIMIT_CPU, (spec["cpu_s"], spec["cpu_s"] + 1)),
                         (resource.RLIMIT_FSIZE, (MAX_FILE_BYTES, MAX_FILE_BYTES)),
                         (resource.RLIMIT_NOFILE, (MAX_OPEN_FILES, MAX_OPEN_FILES)),
                         (resource.RLIMIT_NPROC, (nproc, nproc)), (resource.RLIMIT_CORE, (0, 0))):
        resource.setrlimit(limit, value)
    if uid is not None:
        os.setgroups([])
        os.setresgid(spec["gid"], spec["gid"], spec["gid"])
        os.setresuid(uid, uid, uid)
        layers.append("uid")
    # Die with the launcher; the check after it closes the race with a launcher killed just before.
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if select.select([alive_r], [], [], 0)[0]:
        os._exit(137)
    libc.prctl(PR_SET_NO_NEW_PRIVS, 1)
    layers.append("no-new-privs")
    if spec["landlock"]:
        layers += _landlock(libc, spec["work"], shm)
    report(layers=layers, interpreter=interpreter)
    os.close(spec["status_fd"])  # the code must not be able to forge our status lines
    os.execve(interpreter, [interpreter, "-I", "main.py"], spec["env"])


def _landlock(libc: _Libc, work: str, shm: str | None) -> list[str]:
    """Writes only below ``work`` (and the private /dev/shm), no TCP, no signals outside the sandbox."""
    create, add_rule, restrict = _SYS_LANDLOCK
    try:
        abi = libc.syscall(create, None, ctypes.c_size_t(0), ctypes.c_uint32(1))  # 1: get the ABI version
    except OSError:
        return []  # not compiled in or not enabled
    write_file, truncate = 1 << 1, (1 << 14 if abi >= 3 else 0)
    handled_fs = sum(1 << b for b in (1, 4, 5, 6, 7, 8, 9, 10, 11, 12)) | (1 << 13 if abi >= 2 else 0) | truncate

    class RulesetAttr(ctypes.Structure):
        _fields_ = [("fs", ctypes.c_uint64), ("net", ctypes.c_uint64), ("scoped", ctypes.c_uint64)]

    class PathBeneath(ctypes.Structure):
        _pack_ = 1
        _fields_ = [("allowed", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]

    attr = RulesetAttr(handled_fs, 0b11 if abi >= 4 else 0, 0b11 if abi >= 6 else 0)  # TCP bind+connect; scopes
    size = 8 if abi < 4 else 16 if abi < 6 else 24
    ruleset = libc.syscall(create, ctypes.byref(attr), ctypes.c_size_t(size), ctypes.c_uint32(0))
    try:
        for path, allowed in ((work, handled_fs), (shm, handled_fs), ("/dev/null", write_file | truncate)):
            if path is None or not os.path.exists(path):
                continue
            fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
            try:
                rule = PathBeneath(allowed, fd)
                libc.syscall(add_rule, ctypes.c_int(ruleset), ctypes.c_int(1), ctypes.byref(rule), ctypes.c_uint32(0))
            finally:
                os.close(fd)
        libc.syscall(restrict, ctypes.c_int(ruleset), ctypes.c_uint32(0))
    finally:
        os.close(ruleset)
    return ["landlock-fs"] + (["landlock-net"] if abi >= 4 else []) + (["landlock-signal"] if abi >= 6 else [])


def _tasks_of_uid(uid: int) -> int:
    count = 0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/status") as f:
                fields = dict(line.split(":", 1) for line in f if ":" in line)
            if int(fields["Uid"].split()[0]) == uid:
                count += int(fields["Threads"])
        except (OSError, KeyError, ValueError):
            continue
    return count


def _sweep(uid: int, gid: int) -> None:
    """As root: become ``uid`` in a forked child and ``kill(-1)`` (every process of that uid)."""
    pid = os.fork()
    if pid == 0:
        try:
            os.setgroups([])
            os.setresgid(gid, gid, gid)
            os.setresuid(uid, uid, uid)
            # One pass suffices (a process with SIGKILL pending cannot complete a fork); two more
            # cost nothing. kill(-1) spares the caller and fails with ESRCH when nothing is left.
            for _ in range(3):
                os.kill(-1, signal.SIGKILL)
                time.sleep(0.002)
        except ProcessLookupError:
            pass
        except BaseException:  # noqa: BLE001
            os._exit(1)
        os._exit(0)
    os.waitpid(pid, 0)


def _ancestors(path: str) -> list[str]:
    """``/a/b/c`` -> ``["/a", "/a/b"]`` (proper ancestors, excluding /)."""
    parts = path.strip("/").split("/")[:-1]
    return ["/" + "/".join(parts[: i + 1]) for i in range(len(parts))]


def _under(path: str, directory: str) -> bool:
    return path.startswith(directory.rstrip("/") + "/")


def _unescape(field: str) -> str:
    """mountinfo escapes space, tab, newline and backslash as octal: ``\\040``."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


if __name__ == "__main__":
    _request = json.loads(sys.argv[1])
    if "sweep_uid" in _request:
        _sweep(_request["sweep_uid"], _request["gid"])
    else:
        _launch(_request)
