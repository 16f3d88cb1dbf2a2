"""Working inside a container: `corral ct enter` and `ct exec -it` on a terminal (driven here
through a pseudo-terminal, as a person at a keyboard would), `ct exec -i` streaming its input
as it is read and passing signals on, and `ct file push|pull` of a file of any size."""

from __future__ import annotations

import asyncio
import fcntl
import hashlib
import os
import re
import signal
import struct
import sys
import termios
import time

import grpc
import pytest

from corral.v1 import controller_pb2_grpc, types_pb2

NAME = "inter1"


@pytest.fixture(scope="module")
async def container(lab, corral):
    await corral("ct", "destroy", "--force", NAME, check=False)
    await corral("ct", "create", NAME, "--template", "busybox", "--node", lab.hosts[0].node, "--start")
    yield NAME
    await corral("ct", "destroy", "--force", NAME, check=False)


def _cli(lab, *args: str) -> list[str]:
    return [sys.executable, "-m", "controller.cli.main", "--config", str(lab.cli_config), *args]


def _set_size(fd: int, rows: int, cols: int) -> None:
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))


def _pids() -> list[int]:
    return [int(e) for e in os.listdir("/proc") if e.isdigit()]


def _cmdline(pid: int) -> bytes:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read()
    except OSError:
        return b""


class Terminal:
    """A person at a terminal: `corral` runs with a pseudo-terminal as its controlling
    terminal; we type on the master side and read what the screen would show."""

    def __init__(self, master: int, process: asyncio.subprocess.Process) -> None:
        self.master = master
        self.process = process
        self.screen = b""

    @classmethod
    async def run(cls, argv: list[str], rows: int = 30, cols: int = 100) -> Terminal:
        master, slave = os.openpty()
        _set_size(slave, rows, cols)
        env = {**os.environ, "TERM": "xterm-256color", "CORRAL_NO_HELPER": "1"}
        process = await asyncio.create_subprocess_exec(
            "setsid", "--ctty", *argv, stdin=slave, stdout=slave, stderr=slave, env=env
        )
        os.close(slave)
        os.set_blocking(master, False)
        return cls(master, process)

    def type(self, keys: bytes) -> None:
        os.write(self.master, keys)

    def resize(self, rows: int, cols: int) -> None:
        _set_size(self.master, rows, cols)  # the kernel sends SIGWINCH to corral

    async def expect(self, pattern: bytes, timeout: float = 20) -> re.Match:
        loop = asyncio.get_running_loop()
        deadline = time.monotonic() + timeout
        while not (match := re.search(pattern, self.screen)):
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"{pattern!r} never showed; the screen: {self.screen[-2000:]!r}")
            ready = loop.create_future()
            loop.add_reader(self.master, lambda: ready.done() or ready.set_result(None))
            try:
                await asyncio.wait_for(ready, left)
            except TimeoutError:
                continue
            finally:
                loop.remove_reader(self.master)
            try:
                self.screen += os.read(self.master, 65536)
            except OSError:  # EIO: corral has exited and closed the terminal
                await asyncio.sleep(0.05)
        self.screen = self.screen[match.end() :]
        return match

    async def exit_code(self) -> int:
        async with asyncio.timeout(30):
            return await self.process.wait()

    def close(self) -> None:
        if self.process.returncode is None:
            self.process.kill()
        os.close(self.master)


async def test_enter_gives_a_shell_on_a_terminal_with_resizes_and_keys(lab, container):
    term = await Terminal.run(_cli(lab, "ct", "enter", container), rows=30, cols=100)
    try:
        before = termios.tcgetattr(term.master)
        await term.expect(rb"/ # ")  # the container's prompt
        term.type(b"stty size; echo term=$TERM; tty\r")
        await term.expect(rb"30 100\r\r?\nterm=xterm-256color\r\r?\n/dev/pts/\d+")
        term.resize(50, 132)
        await asyncio.sleep(0.5)
        term.type(b"stty size\r")
        await term.expect(rb"50 132")
        term.type(b"sleep 300; echo not-interrupted\r")
        await asyncio.sleep(0.5)
        term.type(b"\x03")  # ^C: the container's terminal turns it into SIGINT for sleep
        await term.expect(rb"\^C")
        term.type(b"echo $((6 * 7))\r")
        await term.expect(rb"\n42\r")
        assert b"not-interrupted" not in term.screen
        term.type(b"exit 3\r")
        assert await term.exit_code() == 3
        # corral put its terminal back as it found it (raw mode only while the shell ran)
        after = termios.tcgetattr(term.master)
        assert after[3] & (termios.ICANON | termios.ECHO) == before[3] & (termios.ICANON | termios.ECHO)
    finally:
        term.close()


async def test_exec_it_runs_the_command_on_a_terminal_and_returns_its_exit_code(lab, container):
    term = await Terminal.run(_cli(lab, "ct", "exec", "-it", container, "--", "sh", "-c",
                                   "[ -t 0 ] && echo on-a-tty; read line; echo got:$line; exit 5"))  # fmt: skip
    try:
        await term.expect(rb"on-a-tty")
        term.type(b"hello\r")
        await term.expect(rb"got:hello")
        assert await term.exit_code() == 5
    finally:
        term.close()


async def test_exec_t_without_a_terminal_is_refused(corral, container):
    result = await corral("ct", "exec", "-t", container, "--", "true", check=False, stdin=b"")
    assert result.returncode == 2
    assert "not a terminal" in result.stderr


async def test_exec_i_streams_input_as_it_is_read(lab, container):
    """Each line comes back before the next is written: the input is not read to its end first."""
    proc = await asyncio.create_subprocess_exec(
        *_cli(lab, "ct", "exec", "-i", container, "--", "cat"),
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        async with asyncio.timeout(30):
            for line in (b"one\n", b"two\n", b"three\n"):
                proc.stdin.write(line)
                await proc.stdin.drain()
                assert await proc.stdout.readline() == line
            proc.stdin.close()  # end of input: cat ends
            assert await proc.wait() == 0
    finally:
        if proc.returncode is None:
            proc.kill()


async def test_exec_i_passes_signals_to_the_command(lab, container):
    script = 'trap "echo got-term; exit 9" TERM; echo ready; while :; do sleep 0.2; done'
    proc = await asyncio.create_subprocess_exec(
        *_cli(lab, "ct", "exec", "-i", container, "--", "sh", "-c", script),
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        async with asyncio.timeout(30):
            assert await proc.stdout.readline() == b"ready\n"
            proc.send_signal(signal.SIGTERM)
            assert await proc.stdout.readline() == b"got-term\n"
            assert await proc.wait() == 9
    finally:
        if proc.returncode is None:
            proc.kill()


async def test_file_push_and_pull_stream_a_big_file_intact(corral, container, tmp_path):
    data = os.urandom(48 << 20)
    local = tmp_path / "big.bin"
    local.write_bytes(data)
    await corral("ct", "file", "push", container, str(local), "/root/", "--mode", "600")
    listing = (await corral("ct", "exec", container, "--", "ls", "-l", "/root/big.bin")).stdout
    assert listing.startswith("-rw-------") and str(len(data)) in listing
    back = tmp_path / "back.bin"
    await corral("ct", "file", "pull", container, "/root/big.bin", str(back))
    assert hashlib.sha256(back.read_bytes()).digest() == hashlib.sha256(data).digest()
    # standard input and output too
    await corral("ct", "file", "push", container, "-", "/root/note.txt", stdin=b"from stdin\n")
    assert (await corral("ct", "file", "pull", container, "/root/note.txt", "-")).stdout == "from stdin\n"


async def test_file_commands_refuse_bad_paths_and_change_nothing(corral, container, tmp_path):
    missing = await corral("ct", "file", "pull", container, "/no/such/file", str(tmp_path / "x"), check=False)
    assert missing.returncode == 3 and "No such file" in missing.stderr
    assert not list(tmp_path.iterdir())  # no partial file left behind
    relative = await corral("ct", "file", "push", container, "-", "etc/x", check=False, stdin=b"x")
    assert relative.returncode == 2 and "absolute" in relative.stderr
    into_missing_dir = await corral("ct", "file", "push", container, "-", "/no/such/dir/x", check=False, stdin=b"x")
    assert into_missing_dir.returncode != 0
    left = await corral("ct", "exec", container, "--", "sh", "-c", "ls /no 2>&1; ls /root | grep -c corral-push",
                        check=False)  # fmt: skip
    assert "corral-push" not in left.stdout


async def test_the_api_refuses_bad_streams_and_a_caller_leaving_kills_the_command(lab, fleet, container):
    stub = controller_pb2_grpc.ControllerServiceStub(fleet.channel)
    Input = types_pb2.ExecInput

    async def first_error(*messages) -> grpc.aio.AioRpcError:
        call = stub.ExecContainerInteractive(iter(messages), timeout=30)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            async for _ in call:
                pass
        return err.value

    start = Input(start=Input.Start(name=container, argv=["sleep", "4321"]))
    assert (await first_error(Input(stdin=b"x"))).code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (await first_error(start, Input(signal=int(signal.SIGSEGV)))).code() == grpc.StatusCode.INVALID_ARGUMENT
    resize = Input(resize=Input.TerminalSize(rows=10, cols=10))
    assert (await first_error(start, resize)).code() == grpc.StatusCode.INVALID_ARGUMENT
    bad_name = Input(start=Input.Start(name="../x", argv=["true"]))
    assert (await first_error(bad_name)).code() == grpc.StatusCode.INVALID_ARGUMENT

    async def sleepers() -> int:
        """Processes `sleep 4321` (the lab's containers share this machine's /proc)."""
        return sum(1 for pid in _pids() if _cmdline(pid) == b"sleep\x004321\x00")

    async def requests():
        yield start
        await asyncio.sleep(3600)  # the caller keeps the stream open, then goes away

    call = stub.ExecContainerInteractive(requests())
    for _ in range(100):
        if await sleepers():
            break
        await asyncio.sleep(0.1)
    assert await sleepers() == 1
    call.cancel()
    for _ in range(100):
        if not await sleepers():
            break
        await asyncio.sleep(0.1)
    assert await sleepers() == 0  # killed inside the container too
    assert call.cancelled()
