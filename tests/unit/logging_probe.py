"""Run as a script (own process, monkey-patched like the gunicorn gevent worker).

The "serve" logger is written from real OS threads (model loader, engine loop, watchdog) and from
greenlets on the hub at once; prints how many records each writer got out, within a deadline.
"""

from gevent import monkey

monkey.patch_all()

import io  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import gevent  # noqa: E402

from serve.app import configure_logging  # noqa: E402
from serve.engine.osthread import original, start_os_thread  # noqa: E402

RECORDS = 2000


def main() -> None:
    configure_logging("INFO")
    log = logging.getLogger("serve")
    log.handlers[0].setStream(io.StringIO())  # the records themselves are not the point
    os_sleep = original("time", "sleep")
    done = {f"thread{i}": 0 for i in range(3)}

    def writer(name: str) -> None:
        for i in range(RECORDS):
            log.info("%s record %d", name, i)
            done[name] += 1

    for name in list(done):
        start_os_thread(writer, name)
    greenlets = [gevent.spawn(writer, f"greenlet{i}") for i in range(2)]
    done.update({f"greenlet{i}": 0 for i in range(2)})
    deadline = time.monotonic() + 20
    while any(n < RECORDS for n in done.values()) and time.monotonic() < deadline:
        gevent.sleep(0.01)
        os_sleep(0.001)
    json.dump(done, sys.stdout)
    sys.stdout.flush()
    if any(n < RECORDS for n in done.values()):
        import os
        os._exit(3)  # a writer is stuck for good: do not wait for it
    gevent.joinall(greenlets, timeout=5)


if __name__ == "__main__":
    main()
