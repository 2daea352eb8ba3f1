"""A free TCP port on this host, for the rendezvous of multi-process tests."""
import socket


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
