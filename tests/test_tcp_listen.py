"""The agent learns that a post-copy page server listens without connecting to it (it would
serve that connection) and without reading /proc/net/tcp (a walk over every socket of the
machine, 7-8 ms a read here): sock_diag, listening sockets of this namespace only."""

import socket
import subprocess
import sys

from agent.runtime.tcp_listen import listening


def test_a_port_counts_once_something_listens_on_it_and_no_longer_after():
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        port = server.getsockname()[1]
        assert not listening(port)  # bound is not listening
        server.listen()
        assert listening(port)
        with socket.create_connection(("127.0.0.1", port)) as client:
            assert not listening(client.getsockname()[1])  # a connected socket's port is not a listener
    assert not listening(port)
    with socket.socket(socket.AF_INET6) as server6:
        server6.bind(("::1", 0))
        server6.listen()
        assert listening(server6.getsockname()[1])


def test_only_this_network_namespace_counts():
    """A listener in another network namespace (a lab host, a container) is not ours."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        probe = f"import sys; sys.path.insert(0, {sys.path[0]!r}); from agent.runtime.tcp_listen import listening; print(listening({port}))"
        out = subprocess.run(["unshare", "--net", sys.executable, "-c", probe], capture_output=True, text=True, check=True)
        assert out.stdout.strip() == "False"
        assert listening(port)
