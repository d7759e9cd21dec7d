"""Run as a script (own process, monkey-patched like the gunicorn gevent worker).

A greenlet waits for a slow grammar compile while another greenlet ticks; prints how long the wait
took and how many ticks happened meanwhile (none would mean the wait froze the hub).
"""

from gevent import monkey

monkey.patch_all()

import json  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import gevent  # noqa: E402

from serve.engine.grammar import GrammarLimits  # noqa: E402
from serve.engine.grammar_pool import GrammarCompiler  # noqa: E402
from tests.unit.grammar_helpers import SLOW, byte_tokenizer  # noqa: E402
from tests.unit.hub_ticks import Ticks  # noqa: E402


def main() -> None:
    compiler = GrammarCompiler(byte_tokenizer(), GrammarLimits(compile_timeout=120), workers=1)
    with Ticks() as ticks:
        started = time.monotonic()
        grammar = gevent.spawn(compiler.compile, SLOW).get(timeout=120)
        seconds = time.monotonic() - started
    compiler.close()
    json.dump({"compiled": grammar is not None, "seconds": seconds, "ticks": ticks.count}, sys.stdout)


if __name__ == "__main__":
    main()
