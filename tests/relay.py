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
