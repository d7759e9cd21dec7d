"""Run as a script (own process, monkey-patched like the gunicorn gevent worker).

Greenlets hand blocking work to the off-hub pool while another greenlet ticks; prints what came back,
on which threads the work ran, and how many ticks happened meanwhile (none: the hub froze).
"""

from gevent import monkey

monkey.patch_all()

import json  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import gevent  # noqa: E402

from serve.engine.osthread import original  # noqa: E402
from serve.offhub import OffHub  # noqa: E402
from serve.protocol import errors  # noqa: E402
from tests.unit.hub_ticks import Ticks  # noqa: E402

os_sleep = original("time", "sleep")
get_ident = original("_thread", "get_ident")


def busy(seconds: float) -> int:
    os_sleep(seconds)  # blocks its OS thread, as a tokenizer does
    return get_ident()


def refuse() -> None:
    raise errors.validation("Input validation error: `inputs` must have less than 10 tokens", "inputs")


def main() -> None:
    pool = OffHub(2)
    with Ticks() as ticks:
        started = time.monotonic()
        jobs = [gevent.spawn(pool.run, busy, 0.5) for _ in range(4)]
        threads = [job.get(timeout=30) for job in jobs]
        seconds = time.monotonic() - started
        try:
            pool.run(refuse)
            error = None
        except errors.ApiError as exc:
            error = {"status": exc.status, "type": exc.error_type, "message": exc.message, "param": exc.param}
    json.dump({"seconds": seconds, "ticks": ticks.count, "threads": threads, "hub_thread": get_ident(), "error": error},
              sys.stdout)


if __name__ == "__main__":
    main()
