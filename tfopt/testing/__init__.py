"""Test helpers for tfopt and for people writing their own prunable layers."""

from tfopt.testing.test_case import TestCase

__all__ = ["TestCase", "free_loopback_ports"]


def free_loopback_ports(n):
    """`n` TCP ports free on 127.0.0.1 right now (for multi-worker tests and benchmarks)."""
    import socket

    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()
