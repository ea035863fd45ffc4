"""Where this process can be reached from other machines."""

from __future__ import annotations

import ipaddress
import socket
from datetime import timedelta


def node_address(toward: str | None = None) -> str:
    """This node's address as other machines reach it: the Ray cluster's view of it when Ray is up; else its
    host name's address, unless that is a loopback address (as /etc/hosts often maps the host name) while
    `toward` (the run's Redis host, which every stage reaches) is another machine: then the local address
    of the route there, which is on the network the stages share."""
    import ray

    if ray.is_initialized():
        return ray.util.get_node_ip_address()
    own = socket.gethostbyname(socket.gethostname())
    if toward is None or not ipaddress.ip_address(own).is_loopback:
        return own
    try:
        target = socket.gethostbyname(toward)
        if ipaddress.ip_address(target).is_loopback:
            return own  # everything this run talks to is on this machine
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.connect((target, 9))  # a UDP connect sends nothing: it only picks the route
            return probe.getsockname()[0]
    except OSError:
        return own


def redis_host(client) -> str | None:
    """The host of a redis-py client's server (None for a Unix socket)."""
    return client.connection_pool.connection_kwargs.get("host")


def listening_store(host: str, timeout: timedelta):
    """A torch.distributed TCPStore server that listens on `host` only, at a port the kernel picks.

    TCPStore given a host still listens on every interface; handed a socket we bound ourselves, it keeps
    that one. Binding first also leaves no window between picking a free port and listening on it."""
    import torch.distributed as dist

    family, kind, proto, _, address = socket.getaddrinfo(host, 0, type=socket.SOCK_STREAM)[0]
    listener = socket.socket(family, kind, proto)
    try:
        listener.bind(address)
        listener.listen(128)
        port = listener.getsockname()[1]
    except OSError:
        listener.close()
        raise
    fd = listener.detach()  # the store owns the descriptor from here on
    return dist.TCPStore(host, port, is_master=True, wait_for_workers=False, timeout=timeout, master_listen_fd=fd)
