"""Run as a script (own process, monkey-patched like the gunicorn gevent worker).

Generates on the engine while a greenlet ticks, and prints which engine steps each tick saw.
"""

from gevent import monkey

monkey.patch_all()

import json  # noqa: E402
import sys  # noqa: E402

import gevent  # noqa: E402

from serve.engine.config import EngineConfig  # noqa: E402
from serve.engine.engine import Engine  # noqa: E402
from serve.engine.request import GenerationRequest, SamplingParams  # noqa: E402
from tests.unit.conftest import tiny_llama  # noqa: E402


def main() -> None:
    # Steps of a few ms at least, as a real model's are: a step shorter than the GIL switch interval
    # (5 ms) can pass while the hub waits for the GIL, which says nothing about starvation.
    model = tiny_llama(4096, layers=4, hidden=512)

    class Tok:  # the engine only needs ids here; text is not inspected
        pad_token_id, eos_token_id, all_special_ids = 2, 2, [2]
        backend_tokenizer = None

        def decode(self, ids, skip_special_tokens=False):
            return "".join(chr(0x4E00 + i) for i in ids)

    engine = Engine(model, Tok(), EngineConfig.from_model(model, max_batch_total_tokens=100_000))
    engine.start()
    seen: list[int] = []
    done = False

    def ticker() -> None:
        while not done:
            seen.append(engine.steps)
            gevent.sleep(0.001)

    def generate(i: int) -> int:
        handle = engine.submit(GenerationRequest(list(range(3, 40 + i)), SamplingParams(max_new_tokens=120, ignore_eos=True)))
        return sum(1 for _ in handle)

    tick = gevent.spawn(ticker)
    jobs = [gevent.spawn(generate, i) for i in range(8)]
    gevent.joinall(jobs, timeout=300)
    first, last = seen[0], engine.steps
    done = True
    tick.join(5)
    engine.shutdown()
    json.dump({"seen": seen, "first": first, "last": last, "tokens": [j.value for j in jobs]}, sys.stdout)


if __name__ == "__main__":
    main()
