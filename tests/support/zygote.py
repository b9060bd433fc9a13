"""Processes of `python script args...` forked from one Python that has already imported torch, transformers,
lightning and the project: each start costs milliseconds instead of the ~7 s of CPU those imports take on 2 cores
(most of the process-level tests' time, with ~30 starts in the suite).

What a test gets is a real process, as `subprocess.Popen` gives it: its own pid and session (so `os.killpg(pid,
sig)` reaches it and its DataLoader workers, as a scheduler's signal does), its own cwd, environment, argv, fd 1
and 2, the script run as `__main__`, and its exit status as Popen reports it (143 after SIGTERM's handler, -9 after
SIGKILL). What differs from a cold start: modules imported by the server are not imported again, so environment
variables read at import time are the server's (it starts with the tests' HF_HUB_OFFLINE=1 and OMP_NUM_THREADS=1,
and a request whose values for those differ is refused). The README's own commands (tests/test_quickstart.py,
tests/test_readme.py) still start cold, as a user does.

The server forks a middle process per request, which forks the run, reports its pid, waits for it and reports its
exit status over the request's socket, so the server never waits and no zombie is left.
"""

from __future__ import annotations

import atexit
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading

from tests.support.paths import REPO

IMPORT_TIME_ENV = {"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}

_SERVER = r"""
import atexit, json, os, runpy, signal, socket, sys, traceback

import torch, transformers, lightning  # noqa: F401  (what every start would import)
import experiment.runner, inference.load  # noqa: F401

def run(request, conn, server):
    os.setsid()
    conn.close(); server.close()
    stdin = os.open(os.devnull, os.O_RDONLY); os.dup2(stdin, 0); os.close(stdin)
    for fd, path in ((1, request["stdout"]), (2, request["stderr"])):
        out = os.open(path, os.O_WRONLY | os.O_APPEND); os.dup2(out, fd); os.close(out)
    os.chdir(request["cwd"])
    os.environ.clear(); os.environ.update(request["env"])
    command = request["argv"]
    flag = command[0] if command[0] in ("-m", "-c") else None
    sys.argv = [command[0] if not flag else "-c" if flag == "-c" else command[1], *command[2 if flag else 1:]]
    if not flag:
        sys.path[0] = os.path.dirname(os.path.abspath(command[0]))
    code = 0
    try:
        if flag == "-m":
            runpy.run_module(command[1], run_name="__main__", alter_sys=True)
        elif flag == "-c":
            exec(compile(command[1], "<string>", "exec"), {"__name__": "__main__"})
        else:
            runpy.run_path(command[0], run_name="__main__")
    except SystemExit as exit:
        code = exit.code if isinstance(exit.code, int) else (0 if exit.code is None else 1)
        if exit.code is not None and not isinstance(exit.code, int):
            print(exit.code, file=sys.stderr)
    except BaseException:
        traceback.print_exc()
        code = 1
    atexit._run_exitfuncs()  # what the interpreter runs at exit (multiprocessing's, the project's worker cleanup)
    sys.stdout.flush(); sys.stderr.flush()
    os._exit(code)

server = socket.socket(socket.AF_UNIX)
server.bind(sys.argv[1]); server.listen(64)
signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # the middle processes: reaped by the kernel
print("ready", flush=True)
while True:
    conn, _ = server.accept()
    request = json.loads(conn.makefile().readline())
    if os.fork() == 0:  # the middle process
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        pid = os.fork()
        if pid == 0:
            run(request, conn, server)
        conn.sendall(f"{pid}\n".encode())
        status = os.waitpid(pid, 0)[1]
        conn.sendall(f"{os.waitstatus_to_exitcode(status)}\n".encode())
        os._exit(0)
    conn.close()
"""

_lock = threading.Lock()
_server: tuple[subprocess.Popen, str] | None = None


def _socket_path() -> str:
    global _server
    with _lock:
        if _server is None or _server[0].poll() is not None:
            path = os.path.join(tempfile.mkdtemp(prefix="zygote-"), "sock")
            env = dict(os.environ, PYTHONPATH=REPO, **IMPORT_TIME_ENV)
            proc = subprocess.Popen(
                [sys.executable, "-c", _SERVER, path], cwd=REPO, env=env, stdout=subprocess.PIPE, text=True
            )
            assert proc.stdout.readline().strip() == "ready", "the process server did not start"
            atexit.register(proc.kill)
            _server = (proc, path)
        return _server[1]


class ForkedProcess:
    """A started command, with the part of `subprocess.Popen`'s interface the tests use: pid, poll(), wait(),
    communicate(), returncode, and stdout (and stderr unless merged) readable as text files."""

    def __init__(self, argv: list[str], cwd: str, env: dict[str, str], merge_stderr: bool) -> None:
        for key, value in IMPORT_TIME_ENV.items():
            if env.get(key) != value:
                raise ValueError(
                    f"the process server imported torch with {key}={value}; this command asks for "
                    f"{env.get(key)!r}: start it with subprocess instead"
                )
        self.args = argv
        self.returncode: int | None = None
        files = tempfile.mkdtemp(prefix="forked-")
        out, err = os.path.join(files, "stdout"), os.path.join(files, "stderr")
        open(out, "w").close()
        open(err, "w").close()
        self.stdout = open(out)
        self.stderr = None if merge_stderr else open(err)
        command = argv[1:] if os.path.basename(argv[0]).startswith("python") or argv[0] == sys.executable else argv
        request = {"argv": command, "cwd": cwd, "env": env, "stdout": out, "stderr": out if merge_stderr else err}
        self._conn = socket.socket(socket.AF_UNIX)
        self._conn.connect(_socket_path())
        self._conn.sendall((json.dumps(request) + "\n").encode())
        self._received = b""
        self.pid = int(self._line(timeout=60))

    def _line(self, timeout: float | None) -> str | None:
        """The server's next line, waiting up to `timeout` s (0: only what has arrived); None if none came."""
        self._conn.settimeout(timeout)
        try:
            while b"\n" not in self._received:
                chunk = self._conn.recv(64)
                if not chunk:
                    raise RuntimeError(f"the process server ended while running {self.args}")
                self._received += chunk
        except (TimeoutError, BlockingIOError):
            return None
        line, self._received = self._received.split(b"\n", 1)
        return line.decode()

    def poll(self) -> int | None:
        if self.returncode is None:
            self._finish(self._line(timeout=0))
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        if self.returncode is None:
            self._finish(self._line(timeout))
            if self.returncode is None:
                raise subprocess.TimeoutExpired(self.args, timeout)
        return self.returncode

    def communicate(self, timeout: float | None = None) -> tuple[str, str | None]:
        self.wait(timeout)
        return self.stdout.read(), None if self.stderr is None else self.stderr.read()

    def _finish(self, line: str | None) -> None:
        if line is not None:
            self.returncode = int(line)
            self._conn.close()


def start(argv: list[str], cwd: str, env: dict[str, str], merge_stderr: bool = True) -> ForkedProcess:
    """`argv` (`[python, script, *args]`, `[python, -m, module, *args]` or `[python, -c, code, *args]`) started as a
    process of its own."""
    return ForkedProcess(argv, cwd, env, merge_stderr)


def run(argv: list[str], cwd: str, env: dict[str, str], timeout: float | None = None) -> subprocess.CompletedProcess:
    """`subprocess.run(argv, capture_output=True, text=True)`, forked from the server."""
    proc = start(argv, cwd, env, merge_stderr=False)
    try:
        out, err = proc.communicate(timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)
        raise
    return subprocess.CompletedProcess(argv, proc.returncode, out, err)
