"""A loopback TCP relay between the sidecar and the emulator that can hold answers back.

It plays a slow or hostile egress path: the request reaches "AWS" (the emulator answers at
once), but the answer on the first `hold` connections is delivered `delay` seconds late, or
never if the sidecar gives up first. Everything else passes straight through.
"""

from __future__ import annotations

import contextlib
import socket
import threading


class SlowRelay:
    def __init__(self, upstream_port: int, delay: float, hold: int = 1) -> None:
        self.upstream_port = upstream_port
        self.delay = delay
        self.hold = hold
        self.connections = 0
        self.request_forwarded = threading.Event()  # bytes of a held connection reached AWS
        self.answer_held = threading.Event()  # a held answer arrived from AWS
        self._closing = threading.Event()
        self._lock = threading.Lock()
        self._sockets: list[socket.socket] = []
        self._listener = socket.create_server(("127.0.0.1", 0))
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._listener.getsockname()[1]}"

    def close(self) -> None:
        self._closing.set()
        with contextlib.suppress(OSError):
            self._listener.close()
        with self._lock:
            for sock in self._sockets:
                with contextlib.suppress(OSError):
                    sock.close()

    def _accept(self) -> None:
        while not self._closing.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.upstream_port))
            with self._lock:
                index = self.connections
                self.connections += 1
                self._sockets += [client, upstream]
            held = index < self.hold
            threading.Thread(
                target=self._pump, args=(client, upstream, False, held), daemon=True
            ).start()
            threading.Thread(
                target=self._pump, args=(upstream, client, held, held), daemon=True
            ).start()

    def _pump(self, src: socket.socket, dst: socket.socket, hold: bool, watched: bool) -> None:
        first = True
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                if watched and not hold:
                    self.request_forwarded.set()
                if hold and first:
                    self.answer_held.set()
                    if self._closing.wait(self.delay):
                        return
                first = False
                dst.sendall(data)
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                dst.shutdown(socket.SHUT_WR)


class Gate:
    """A loopback address in front of a server whose egress path can fail three ways:
    "pass" (relay both ways), "blackhole" (accept the connection, read the request, never
    answer) and "refuse" (nothing listens: connections are refused). Switching mode closes
    the connections it holds, as a path that comes back or goes away would."""

    def __init__(self, upstream_port: int, port: int) -> None:
        self.upstream_port = upstream_port
        self.port = port
        self.mode = "pass"
        self.accepted = {"pass": 0, "blackhole": 0}
        self._lock = threading.Lock()
        self._sockets: list[socket.socket] = []
        self._listener: socket.socket | None = None
        self._listen()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def set(self, mode: str) -> None:
        assert mode in ("pass", "blackhole", "refuse"), mode
        with self._lock:
            self.mode = mode
            held, self._sockets = self._sockets, []
            listener = self._listener if mode == "refuse" else None
            if listener is not None:
                self._listener = None
        for sock in held:
            with contextlib.suppress(OSError):
                sock.close()
        if listener is not None:
            # shutdown wakes the accept() blocked in the other thread (close alone does not,
            # and a listener left in it would go on taking connections).
            with contextlib.suppress(OSError):
                listener.shutdown(socket.SHUT_RDWR)
            with contextlib.suppress(OSError):
                listener.close()
        if mode != "refuse" and self._listener is None:
            self._listen()

    def close(self) -> None:
        self.set("refuse")

    def _listen(self) -> None:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(16)
        with self._lock:
            self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            with self._lock:
                mode = self.mode
                if mode == "refuse":  # taken in the instant before the listener closed
                    client.close()
                    return
                if mode in self.accepted:
                    self.accepted[mode] += 1
                self._sockets.append(client)
            if mode == "blackhole":
                threading.Thread(target=self._swallow, args=(client,), daemon=True).start()
                continue
            try:
                upstream = socket.create_connection(("127.0.0.1", self.upstream_port))
            except OSError:
                client.close()
                continue
            with self._lock:
                self._sockets.append(upstream)
            for src, dst in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(src, dst), daemon=True).start()

    @staticmethod
    def _swallow(sock: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while sock.recv(65536):
                pass

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                dst.shutdown(socket.SHUT_WR)
