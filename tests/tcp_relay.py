"""A TCP relay for the S3 tests: `python tests/tcp_relay.py PORT TARGET_PORT [--die-after BYTES]`.

It listens on 127.0.0.1:PORT and forwards every connection to 127.0.0.1:TARGET_PORT (moto's S3 server).
With --die-after it SIGKILLs itself once that many bytes have gone from the clients to the server, in the
middle of whatever is being uploaded: to a client this is exactly a server that died mid-upload (its
connections reset, its port closed). Started again on the same port it is the server back up with every
object it had stored, which moto, keeping objects in memory only, could not be after a restart of its own.
"""
from __future__ import annotations

import argparse
import os
import signal
import socket
import threading


class Upstream:
    """Bytes sent towards the server so far; kills the process past the limit."""

    def __init__(self, limit: int | None):
        self.limit, self.sent, self.lock = limit, 0, threading.Lock()

    def add(self, n: int) -> None:
        with self.lock:
            self.sent += n
            if self.limit is not None and self.sent >= self.limit:
                os.kill(os.getpid(), signal.SIGKILL)


def pump(src: socket.socket, dst: socket.socket, upstream: Upstream | None) -> None:
    try:
        while data := src.recv(65536):
            if upstream:
                upstream.add(len(data))
            dst.sendall(data)
    except OSError:
        pass
    finally:
        for sock in (src, dst):
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


def serve(port: int, target: int, upstream: Upstream) -> None:
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # the same port again right after a kill
    listener.bind(("127.0.0.1", port))
    listener.listen(64)
    while True:
        client, _ = listener.accept()
        try:
            server = socket.create_connection(("127.0.0.1", target))
        except OSError:
            client.close()
            continue
        threading.Thread(target=pump, args=(client, server, upstream), daemon=True).start()
        threading.Thread(target=pump, args=(server, client, None), daemon=True).start()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("port", type=int)
    parser.add_argument("target", type=int)
    parser.add_argument("--die-after", type=int, default=None, help="SIGKILL itself after this many bytes up")
    args = parser.parse_args()
    serve(args.port, args.target, Upstream(args.die_after))


if __name__ == "__main__":
    main()
