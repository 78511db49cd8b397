"""The ports a server owns, claimed before anything slow happens, and one-line reasons when it cannot.

`digits serve` takes ~30 s to import TensorFlow and load a model; `digits web` and `digits monitor`
start other programs. Each first binds (or tries) the ports it will listen on, so a taken port ends
the command at once with one line instead of a traceback after the slow part. A reserved socket is
bound but not listening: connections are refused until the server is ready, as before.
"""

from __future__ import annotations

import errno
import socket
from dataclasses import dataclass


class PortError(OSError):
    """A port cannot be had; `str()` is one line naming the address, what it was for and what to do."""


@dataclass(frozen=True)
class Port:
    """Where one listener of a server goes."""

    host: str
    port: int  # 0: any free port
    what: str  # e.g. "REST", "gRPC", "Prometheus"
    option: str  # the command-line option that sets it, for the hint
    zero_picks_any: bool = True  # whether the option takes 0 for "any free port"

    @property
    def address(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def reserve(wanted: Port) -> socket.socket:
    """A TCP socket bound to the address, not listening yet (the caller listens, or hands it on).

    Bound without SO_REUSEADDR, so that no other socket can bind the port while this one holds it
    (on Linux two sockets that both set it may share a port as long as neither listens, and aiohttp,
    gRPC and Prometheus all set it). Only if that fails is it bound with SO_REUSEADDR, as servers
    bind: then the port is held by old connections in TIME_WAIT (a server restarted a moment ago) or
    by a socket nobody listens on, and is usable; one another process listens on is refused either way.
    """
    try:
        infos = socket.getaddrinfo(wanted.host, wanted.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as error:
        raise PortError(f"cannot listen on {wanted.address} ({wanted.what}): unknown host {wanted.host!r} "
                        f"({error.strerror})") from None
    family, kind, proto, _, address = infos[0]
    for reuse in (False, True):
        sock = socket.socket(family, kind, proto)
        try:
            if reuse:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(address)
            return sock
        except OSError as error:
            sock.close()
            if reuse or error.errno != errno.EADDRINUSE:
                raise PortError(_reason(wanted, error)) from None
    raise AssertionError("unreachable")


def reserve_all(wanted: list[Port]) -> list[socket.socket]:
    """Every port or none: on the first one that cannot be had, the others are released and it raises."""
    _refuse_duplicates(wanted)
    sockets: list[socket.socket] = []
    try:
        for port in wanted:
            sockets.append(reserve(port))
    except PortError:
        for sock in sockets:
            sock.close()
        raise
    return sockets


def check_free(wanted: list[Port]) -> None:
    """For programs this process starts but does not listen for (Prometheus, Alertmanager): each port
    is bound and released at once. Another process may still take one before the program binds it;
    that program's own error then says so."""
    for sock in reserve_all(wanted):
        sock.close()


def bound_port(sock: socket.socket) -> int:
    return sock.getsockname()[1]


def _refuse_duplicates(wanted: list[Port]) -> None:
    seen: dict[tuple[str, int], Port] = {}
    for port in wanted:
        if port.port == 0:
            continue
        other = seen.setdefault((port.host, port.port), port)
        if other is not port:
            raise PortError(f"{other.option} and {port.option} are both {port.port}: {other.what} and {port.what} "
                            "need ports of their own")


def _reason(wanted: Port, error: OSError) -> str:
    hint = f"pick another with {wanted.option}" + (" (0: any free port)" if wanted.zero_picks_any else "")
    if error.errno == errno.EADDRINUSE:
        return f"{wanted.address} ({wanted.what}) is already in use: stop what listens there, or {hint}"
    if error.errno == errno.EACCES:
        return f"no permission to listen on {wanted.address} ({wanted.what}): ports below 1024 need root; {hint}"
    if error.errno == errno.EADDRNOTAVAIL:
        return f"cannot listen on {wanted.address} ({wanted.what}): {wanted.host} is not an address of this machine"
    return f"cannot listen on {wanted.address} ({wanted.what}): {error.strerror or error}"
