"""Start ``python -m lightning_memopt...`` (and the tests' scripts) in milliseconds instead of 12 seconds.

Most of a test's short ``memopt`` run is its import of torch, transformers and Lightning (about 12 s of CPU
per process on the 2-core CI machine; the suite starts over a hundred such processes, DDP ranks included). A
*zygote* process imports them once; every run is then forked from it, a fresh process with those modules
already loaded, which runs the real command line (``runpy``, as ``python -m`` does) with the caller's
arguments, environment, working folder and standard streams.

The tests start runs through a small client script that stands in for the Python interpreter:
``zygote_python()`` returns its path. The client hands its arguments, environment and stdio to the zygote over
a Unix socket and exits as the run does (its status, or the signal that killed it); signals sent to the
client reach the run, and a run whose client dies is killed. Inside a run ``sys.executable`` is the client
too, so Lightning's DDP launcher starts the other ranks the same way. Anything that is not
``-m lightning_memopt...`` or a script in ``tests/`` (and every run when the zygote is not up) is handed to the real interpreter with
``exec``, unchanged.

The zygote holds no threads and runs no torch code, so forking it is safe. It lives as long as the test
session (``atexit``).
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

PRELOAD = ("torch", "transformers", "lightning.pytorch", "lightning_memopt", "lightning_memopt.cli")
ROUTED_MODULES = "lightning_memopt"  # run through the zygote: ``-m lightning_memopt...``, and scripts of the tests
TESTS = str(Path(__file__).resolve().parents[1])

CLIENT = """#!{python} -S
import sys
sys.path.insert(0, {helpers!r})
import zygote
zygote.client({python!r}, {socket!r})
"""

_started: dict[str, str] = {}


# -- messages: a 4-byte length, then JSON ----------------------------------------------------------------------


def _send(connection: socket.socket, message: dict, fds: list[int] | None = None) -> None:
    data = json.dumps(message).encode()
    payload = struct.pack("!I", len(data)) + data
    if fds:
        socket.send_fds(connection, [payload], fds)
    else:
        connection.sendall(payload)


def _receive(connection: socket.socket, with_fds: int = 0) -> tuple[dict | None, list[int]]:
    if with_fds:
        data, fds, _flags, _address = socket.recv_fds(connection, 1 << 20, with_fds)
    else:
        data, fds = connection.recv(4), []
    if len(data) < 4:
        return None, fds
    size = struct.unpack("!I", data[:4])[0]
    body = data[4:]
    while len(body) < size:
        chunk = connection.recv(size - len(body))
        if not chunk:
            return None, fds
        body += chunk
    return json.loads(body), fds


# -- the test side --------------------------------------------------------------------------------------------


def zygote_python(env: dict[str, str]) -> str:
    """The interpreter to start ``-m lightning_memopt...`` runs and the tests' scripts with: the zygote's client, the zygote started
    on first use with ``env`` (the environment every run shares: thread counts, offline hubs, ``PYTHONPATH``).
    Falls back to ``sys.executable`` when ``MEMOPT_TEST_ZYGOTE=0``."""
    if os.environ.get("MEMOPT_TEST_ZYGOTE", "1") == "0":
        return sys.executable
    if not _started:
        folder = Path(tempfile.mkdtemp(prefix="memopt-zygote-"))
        path = str(folder / "socket")
        server = subprocess.Popen([sys.executable, __file__, "serve", path], env=env, stdin=subprocess.DEVNULL)
        client = folder / "python"
        client.write_text(CLIENT.format(python=sys.executable, helpers=str(Path(__file__).parent), socket=path))
        client.chmod(0o755)
        atexit.register(server.terminate)
        deadline = time.monotonic() + 120
        while not os.path.exists(path):
            if server.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("the test zygote did not start (see its output above)")
            time.sleep(0.1)
        _started["client"] = str(client)
    return _started["client"]


# -- the client: stands in for ``python`` ---------------------------------------------------------------------


def client(python: str, socket_path: str) -> None:
    argv = sys.argv[1:]
    if len(argv) >= 2 and argv[0] == "-m" and argv[1].startswith(ROUTED_MODULES):
        request = {"module": argv[1], "argv": argv[2:]}
    elif argv and argv[0].endswith(".py") and os.path.abspath(argv[0]).startswith(TESTS + os.sep):
        request = {"script": os.path.abspath(argv[0]), "argv": argv[1:]}
    else:
        os.execv(python, [python, *argv])
    connection = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        connection.connect(socket_path)
    except OSError:
        os.execv(python, [python, *argv])
    request.update(env=dict(os.environ), cwd=os.getcwd())
    _send(connection, request, [0, 1, 2])

    def forward(signum: int, _frame: object) -> None:
        _send(connection, {"signal": signum})

    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1):
        signal.signal(signum, forward)
    reply, _ = _receive(connection)
    if reply is None:
        sys.exit(1)
    if reply.get("signal"):
        signal.signal(reply["signal"], signal.SIG_DFL)
        os.kill(os.getpid(), reply["signal"])
    sys.exit(reply.get("code", 1))


# -- the zygote ----------------------------------------------------------------------------------------------


def serve(socket_path: str) -> None:
    import importlib

    for module in PRELOAD:
        importlib.import_module(module)
    sys.executable = str(Path(socket_path).parent / "python")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(socket_path + ".tmp")
    os.rename(socket_path + ".tmp", socket_path)  # the tests wait for this name: bound means ready
    listener.listen(64)
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # handlers are reaped by the kernel
    while True:
        connection, _ = listener.accept()
        if os.fork() == 0:
            listener.close()
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            _handle(connection)
        connection.close()


def _handle(connection: socket.socket) -> None:
    """In a child of the zygote: fork the run, relay signals to it, report how it ended, exit."""
    request, fds = _receive(connection, with_fds=3)
    worker = os.fork()
    if worker == 0:
        connection.close()
        _run(request, fds)
    for fd in fds:
        os.close(fd)

    def relay() -> None:
        while True:
            message, _ = _receive(connection)
            if message is None:  # the client died: so does its run
                _kill(worker, signal.SIGKILL)
                return
            _kill(worker, message["signal"])

    threading.Thread(target=relay, daemon=True).start()
    _, status = os.waitpid(worker, 0)
    reply = {"signal": os.WTERMSIG(status)} if os.WIFSIGNALED(status) else {"code": os.WEXITSTATUS(status)}
    try:
        _send(connection, reply)
    finally:
        os._exit(0)


def _kill(pid: int, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signum)


def _run(request: dict, fds: list[int]) -> None:
    """In the forked run: become ``python -m MODULE ARGV`` (or ``python SCRIPT ARGV``) in the caller's folder,
    environment and streams."""
    import atexit as run_atexit
    import runpy

    for target, fd in enumerate(fds):
        os.dup2(fd, target)
        os.close(fd)
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    script = request.get("script")
    sys.path.insert(0, os.path.dirname(script) if script else request["cwd"])
    sys.argv = [script or request["module"], *request["argv"]]
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1):
        signal.signal(signum, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    code = 0
    try:
        if script:
            runpy.run_path(script, run_name="__main__")
        else:
            runpy.run_module(request["module"], run_name="__main__", alter_sys=True)
    except SystemExit as exit_:
        if isinstance(exit_.code, str):
            print(exit_.code, file=sys.stderr)
            code = 1
        else:
            code = exit_.code or 0
    except BaseException:
        import traceback

        traceback.print_exc()
        code = 1
    try:
        run_atexit._run_exitfuncs()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


if __name__ == "__main__" and len(sys.argv) == 3 and sys.argv[1] == "serve":
    serve(sys.argv[2])
