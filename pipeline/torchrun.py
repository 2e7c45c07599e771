"""torchrun for the learner (`opd train --devices 0,1`, and each node of a multi-node learner), with two
things torch.distributed.run does not do by itself:

- its listeners stay on loopback when its rendezvous is there: torch's TCPStore server (the c10d
  rendezvous store, and the store it shares with the workers) binds every interface whatever host it is
  given, and torch 2.13 has no option for the address, only `master_listen_fd`. When the store's host is
  a loopback address (a one-machine learner, or every node on this machine as in the tests) this
  process makes the listening socket itself, bound to that address, and hands it over;
- its worker processes die with it (PR_SET_PDEATHSIG, as every stage process does with its parent), so a
  torchrun killed with its node never leaves a learner process training on behind it.

    python -m opd.pipeline.torchrun [torchrun options] -m opd.pipeline.torchrun --worker RUN --round R ...

`--worker ARGS`: a learner process (what torchrun starts): `opd.stages.train ARGS` under PDEATHSIG.
"""

from __future__ import annotations

import ipaddress
import runpy
import socket
import sys

_LISTENERS: list[socket.socket] = []  # the sockets handed to TCPStore: kept open for the process's life


def main(argv: list[str]) -> None:
    if argv[:1] == ["--worker"]:
        from opd.pipeline.launchers import die_with_parent

        die_with_parent()
        sys.argv = ["opd.stages.train", *argv[1:]]
        runpy.run_module("opd.stages.train", run_name="__main__", alter_sys=True)
        return
    _stores_on_loopback()
    from torch.distributed.run import main as torchrun

    torchrun(argv)


def loopback(host: str) -> bool:
    """Is `host` this machine's loopback (an address such as 127.0.0.1 or ::1, or localhost)?"""
    if host.strip("[]") == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _listener(host: str, port: int) -> socket.socket:
    """A listening socket on the loopback address `host` (localhost: 127.0.0.1), port `port` (0: free)."""
    addr = "127.0.0.1" if host.strip("[]") == "localhost" else host.strip("[]")
    family = socket.AF_INET6 if ipaddress.ip_address(addr).version == 6 else socket.AF_INET
    try:
        sock = socket.create_server((addr, port), family=family, backlog=128)
    except OSError as e:  # as TCPStore says it: the c10d backend then joins as a client (another agent hosts it)
        raise RuntimeError(f"cannot listen on {addr}:{port}: {e}") from None
    _LISTENERS.append(sock)
    return sock


def _stores_on_loopback() -> None:
    """Make the agent's TCPStore servers listen on their loopback host (see the module docstring): the
    c10d rendezvous backend's store and the dynamic rendezvous's shared store are the two it starts."""
    import torch.distributed as dist
    from torch.distributed.elastic.rendezvous import c10d_rendezvous_backend as backend
    from torch.distributed.elastic.rendezvous.dynamic_rendezvous import DynamicRendezvousHandler

    real = dist.TCPStore

    def store(host_name, port, *args, is_master=False, **kwargs):
        if is_master and kwargs.get("master_listen_fd") is None and loopback(host_name):
            sock = _listener(host_name, port)
            port = sock.getsockname()[1]
            kwargs["master_listen_fd"] = sock.fileno()
        return real(host_name, port, *args, is_master=is_master, **kwargs)

    def shared_store(self, master_addr, master_port):
        return store(host_name=master_addr, port=master_port, is_master=True, multi_tenant=True)

    backend.TCPStore = store
    DynamicRendezvousHandler._create_tcp_store_server = shared_store


if __name__ == "__main__":
    main(sys.argv[1:])
