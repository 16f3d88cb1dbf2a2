"""The `corral` entry point: hands the command to the user's warm helper, or runs it here.

A fresh Python process that imports grpcio pays ~200 ms before it sends a byte
(interpreter, imports, TLS); this module imports only the standard library and
passes the invocation (argv, cwd, environment, umask and its stdin/stdout/stderr
file descriptors) over a unix socket to a per-user helper (controller.cli.warm)
that has the CLI imported and its gRPC channels open, like OpenSSH's
ControlMaster. The helper runs the command with this process's own descriptors
and sends back the exit code; Ctrl-C here interrupts the command there.

No helper answering: one is started in the background (detached) and this
invocation runs in-process. `CORRAL_NO_HELPER=1` always runs in-process.
The socket lives in a directory of the user's own, mode 0700 (CORRAL_RUNTIME_DIR,
else $XDG_RUNTIME_DIR/corral, else /tmp/corral-UID), which is checked before use.
A helper whose code differs from this one's (the build id: the package files'
sizes and mtimes) answers "stale", exits, and is replaced.
"""

import os
import sys

# The C modules, not socket/signal/struct/json: their Python wrappers cost ~8 ms of a ~30 ms start.
import _signal
import _socket

PACKAGES = ("corral", "controller", "lab", "agent")
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PROTOCOL = 1

# The helper's replies: a single byte, then for DONE a 4-byte exit code.
RUNNING = b"R"  # the helper is running the command
LOCAL = b"L"  # run it here (a command that works on local files or a process-wide setting)
STALE = b"S"  # the helper runs other code: it is going away, start a new one
DONE = b"X"
# The launcher's messages after the request.
INTERRUPT = b"I"

# Read once per process (by grpc's C core, Python itself or at import time): invocations that
# differ in these get helpers of their own (the socket's name carries a hash of them).
PROCESS_ENV = ("HOME", "PYTHONPATH", "PYTHONHOME", "PYTHONIOENCODING", "PYTHONUTF8", "SSL_CERT_FILE", "SSL_CERT_DIR",
               "http_proxy", "https_proxy", "no_proxy", "grpc_proxy", "HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY")  # fmt: skip
PROCESS_ENV_PREFIXES = ("GRPC_", "CORRAL_HELPER")

HEADER_SIZE = 4  # the request's length, big-endian, then the request
EXIT_SIZE = 4  # the exit code after DONE, big-endian, signed


class HelperUnusable(Exception):
    """The runtime directory cannot be trusted; the reason is the message."""


def runtime_dir(env=os.environ) -> str:
    explicit = env.get("CORRAL_RUNTIME_DIR")
    if explicit:
        return explicit
    xdg = env.get("XDG_RUNTIME_DIR")
    if xdg:
        return os.path.join(xdg, "corral")
    return f"/tmp/corral-{os.getuid()}"


def ensure_private_dir(path: str) -> None:
    """Create `path` 0700 if missing; refuse one that is not ours alone (a symlink, another
    owner, group or world access): someone else could then answer in the helper's place."""
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass
    except OSError as exc:
        raise HelperUnusable(f"cannot create {path}: {exc.strerror}") from None
    st = os.lstat(path)
    if not _is_dir(st.st_mode):
        raise HelperUnusable(f"{path} is not a directory")
    if st.st_uid != os.getuid():
        raise HelperUnusable(f"{path} is owned by uid {st.st_uid}, not {os.getuid()}")
    if st.st_mode & 0o077:
        raise HelperUnusable(f"{path} has mode {st.st_mode & 0o777:04o}; it must be 0700")


def _is_dir(mode: int) -> bool:
    return (mode & 0o170000) == 0o040000


def install_key() -> str:
    """Which installation this is (several venvs or checkouts get a helper each): the
    identity of the code's directory and of the interpreter's own path (a venv's symlink)."""
    root, exe = os.stat(ROOT), os.lstat(sys.executable)
    return f"{root.st_ino:x}{exe.st_ino:x}"


def build_id() -> str:
    """Changes whenever the installed code does: count, sizes and mtimes of the packages'
    .py files (about a hundred stat calls) and of the interpreter and its site-packages."""
    count, sizes, mtimes = 0, 0, 0
    todo = [os.path.join(ROOT, p) for p in PACKAGES]
    while todo:
        try:
            entries = os.scandir(todo.pop())
        except OSError:
            continue
        with entries:
            for entry in entries:
                if entry.name.endswith(".py"):
                    st = entry.stat()
                    count += 1
                    sizes += st.st_size
                    mtimes += st.st_mtime_ns
                elif entry.name != "__pycache__" and entry.is_dir(follow_symlinks=False):
                    todo.append(entry.path)
    extra = []
    for path in (sys.executable, os.path.dirname(os.__file__), _site_packages()):
        try:
            extra.append(os.stat(path).st_mtime_ns)
        except (OSError, TypeError):
            extra.append(0)
    tag = os.environ.get("CORRAL_BUILD_TAG", "")  # set by packagers (or tests) to force a new helper
    return f"{PROTOCOL}.{count}.{sizes}.{mtimes}.{'.'.join(map(str, extra))}{'.' + tag if tag else ''}"


def _site_packages() -> str | None:
    return next((p for p in sys.path if p.endswith("site-packages")), None)


def is_process_wide(key: str) -> bool:
    return key in PROCESS_ENV or key.startswith(PROCESS_ENV_PREFIXES)


def process_env(env) -> dict:
    return {k: v for k, v in env.items() if is_process_wide(k)}


def _fnv1a(data: bytes) -> int:
    h = 0x811C9DC5
    for byte in data:
        h = ((h ^ byte) * 0x01000193) & 0xFFFFFFFF
    return h


def socket_path(directory: str, env=os.environ) -> str:
    """One helper per installation and per value of the process-wide variables."""
    wide = "\0".join(f"{k}={v}" for k, v in sorted(process_env(env).items()))
    key = f"{install_key()}-{_fnv1a(wide.encode('utf-8', 'surrogateescape')):08x}"
    return os.path.join(directory, f"helper-{key}.sock")


def helper_disabled(env=os.environ) -> bool:
    return env.get("CORRAL_NO_HELPER", "") not in ("", "0")


def run_in_process() -> None:
    from controller.cli.main import main as cli_main

    cli_main()


def main() -> None:
    if helper_disabled():
        return run_in_process()
    try:
        directory = runtime_dir()
        ensure_private_dir(directory)
    except HelperUnusable as exc:
        sys.stderr.write(f"corral: warning: not using the helper: {exc}\n")
        return run_in_process()
    code = _via_helper(directory)
    if code is None:
        return run_in_process()
    sys.stderr.flush()
    os._exit(code)  # nothing of ours to tear down


def _via_helper(directory: str) -> int | None:
    """The command's exit code from the helper, or None to run it here."""
    path = socket_path(directory)
    build = build_id()
    sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
    try:
        sock.connect(path)
    except OSError:
        sock.close()
        start_helper(directory, path)
        return None
    try:
        try:
            _send_request(sock, build)
            reply = _recv_exactly(sock, 1)
        except OSError:
            return None  # the helper went away before it took the command: nothing ran
        if reply == RUNNING:
            return _wait_done(sock)
        if reply == STALE:
            start_helper(directory, path)
        return None  # LOCAL, STALE or a closed connection: nothing ran there
    finally:
        sock.close()


def encode_request(build: str, argv: list[bytes], cwd: bytes, env: dict[bytes, bytes], umask: int,
                   term: tuple[int, int] | None, pid: int) -> bytes:  # fmt: skip
    """NUL-separated fields (no argument or variable can hold a NUL), length first."""
    fields = [build.encode(), cwd, str(umask).encode(), (f"{term[0]},{term[1]}" if term else "").encode(),
              str(pid).encode(), str(len(argv)).encode(), *argv, *(k + b"=" + v for k, v in env.items())]  # fmt: skip
    body = b"\0".join(fields)
    return len(body).to_bytes(HEADER_SIZE, "big") + body


def _send_request(sock, build: str) -> None:
    umask = os.umask(0o022)
    os.umask(umask)
    term = None
    for fd in (1, 2, 0):  # as rich and shutil look for a terminal's size
        try:
            term = tuple(os.get_terminal_size(fd))
            break
        except OSError:
            continue
    argv = [os.fsencode(a) for a in sys.argv[1:]]
    data = encode_request(build, argv, os.fsencode(os.getcwd()), dict(os.environb), umask, term, os.getpid())
    fds = b"".join(fd.to_bytes(4, sys.byteorder, signed=True) for fd in (0, 1, 2))  # struct int[3]
    sent = sock.sendmsg([data], [(_socket.SOL_SOCKET, _socket.SCM_RIGHTS, fds)])
    if sent < len(data):
        sock.sendall(data[sent:])


def _wait_done(sock) -> int:
    """Relay Ctrl-C to the helper (the command handles it there) until its exit code arrives."""

    def interrupt(signum, frame):
        try:
            sock.send(INTERRUPT)
        except OSError:
            pass

    previous = _signal.signal(_signal.SIGINT, interrupt)
    try:
        reply = _recv_exactly(sock, 1 + EXIT_SIZE)
    except OSError:
        reply = b""
    finally:
        _signal.signal(_signal.SIGINT, previous)
    if len(reply) != 1 + EXIT_SIZE or reply[:1] != DONE:
        sys.stderr.write("corral: error: the corral helper ended while running the command; "
                         "run it again with CORRAL_NO_HELPER=1 to see what happens\n")  # fmt: skip
        return 1
    return int.from_bytes(reply[1:], "big", signed=True)


def _recv_exactly(sock, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            break
        data += chunk
    return data


def start_helper(directory: str, path: str) -> None:
    """Start a helper detached from this process: its own session, no terminal, stdio to
    its log file. Double fork, so nothing is left for this process to reap."""
    log = path[: -len(".sock")] + ".log"
    argv = [sys.executable, "-m", "controller.cli.warm", "--socket", path]
    pid = os.fork()
    if pid:
        os.waitpid(pid, 0)
        return
    try:
        os.setsid()
        if os.fork():
            os._exit(0)
        os.chdir("/")
        null = os.open(os.devnull, os.O_RDONLY)
        out = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        os.dup2(null, 0)
        os.dup2(out, 1)
        os.dup2(out, 2)
        os.closerange(3, 65536)
        _signal.signal(_signal.SIGINT, _signal.SIG_DFL)
        os.execv(sys.executable, argv)
    finally:
        os._exit(127)


if __name__ == "__main__":
    main()
