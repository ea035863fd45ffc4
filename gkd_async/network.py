"""Where this process can be reached from other machines."""

from __future__ import annotations

import socket


def node_address() -> str:
    """This node's address as the Ray cluster knows it (other nodes reach it there), else its host name's."""
    import ray

    return ray.util.get_node_ip_address() if ray.is_initialized() else socket.gethostbyname(socket.gethostname())
