"""Run as a script (own process, monkey-patched like the gunicorn gevent worker).

Watches one end of socket pairs with departure.Client and prints how many cancels each case saw.
"""

from gevent import monkey

monkey.patch_all()

import json  # noqa: E402
import socket  # noqa: E402

import gevent  # noqa: E402

from serve.handlers import departure  # noqa: E402


class Handle:
    def __init__(self) -> None:
        self.cancels = 0

    def cancel(self) -> None:
        self.cancels += 1


def watched(peer_action) -> tuple[int, departure.Client]:
    ours, theirs = socket.socketpair()
    client = departure.Client.of({"gunicorn.socket": ours})
    handle = Handle()
    client.track(handle)
    gevent.sleep(0.05)  # the watcher waits on the socket
    peer_action(theirs)
    gevent.sleep(departure.PIPELINED_POLL * 2 + 0.2)
    cancels = handle.cancels
    client.close()
    ours.close()
    theirs.close()
    return cancels, client


def main() -> None:
    result = {}
    result["open"], client = watched(lambda s: None)
    result["watcher_dead"] = client._watcher is None
    result["pipelined"], _ = watched(lambda s: s.sendall(b"GET /ping HTTP/1.1\r\n\r\n"))
    result["closed"], _ = watched(lambda s: s.close())

    def pipelined_then_closed(s: socket.socket) -> None:
        s.sendall(b"POST")
        s.close()

    result["pipelined_then_closed"], _ = watched(pipelined_then_closed)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
