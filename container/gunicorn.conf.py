"""gunicorn settings for the SageMaker contract (the README's "What happens when" table).

One gevent worker holds the model: concurrency comes from gevent, batching from the engine. The
app is not preloaded, so the model (and CUDA) is initialised in the worker after fork, never here.
On SIGTERM the worker drains: /ping turns 503, new requests get 503, in-flight ones finish, those that
cannot finish in time end with an error their clients receive, then it exits, all within
GRACEFUL_TIMEOUT (SageMaker's 30 s). SIGTERM during the model load exits at once. When the engine dies or stalls, the worker exits with
RESTART_EXIT_CODE and the arbiter forks a fresh one, which loads the model again.
"""

import _socket
import contextlib
import functools
import glob
import os
import sys

from gunicorn.workers.ggevent import GeventWorker

from serve.config import Settings

_settings = Settings.from_env()
# oneDNN (and ideep, torch's wrapper of it) keep one compiled primitive per input shape of each packed
# linear layer, up to 1,024 per cache, for the life of the worker: every prefill's token count and every
# batch size is a new shape, and a primitive for a long prefill holds megabytes, so a serving worker's RSS
# grew 200-260 MB past its warm-up (tests/integration/test_load.py): +12.7% with their default, +15.7%
# with 64, +0.2% with 16, at the same throughput. Set here, in the master, so that the worker's torch
# reads them; the environment still wins.
for _cache in ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "LRU_CACHE_CAPACITY"):
    os.environ.setdefault(_cache, "16")
# On a machine without GPUs the engine's forward is OpenMP work: pin it one thread per core, the engine
# thread (which leads the team) on the first core and its workers on the next ones, as vLLM's CPU backend
# does (unpinned, the scheduler may move them between cores, away from the caches they warmed). Pinned,
# 16 streams served 1.02-1.20x the tokens/s in 5 of 6 alternating pairs, and one int4 stream's time per
# token was a median 1.08x higher unpinned (README, "Benchmarks"). Only the team is pinned: the gevent
# hub and every other thread still run on any core. OMP_PROC_BIND=false turns it off, e.g. for several
# servers sharing one machine's cores. libgomp reads these when torch loads, in the worker.
if not glob.glob("/dev/nvidia[0-9]*"):
    os.environ.setdefault("OMP_PROC_BIND", "close")
    os.environ.setdefault("OMP_PLACES", "cores")
# Any code but 3 and 4: on those (worker boot error, app load error) gunicorn's arbiter halts the whole
# server instead of forking a new worker (gunicorn/arbiter.py, Arbiter.reap_workers). 70 is EX_SOFTWARE.
RESTART_EXIT_CODE = 70
RESTART_GRACE_SECONDS = 10.0  # the hub's restart exit normally takes tens of ms (see _restart_on_hub)


class DrainingGeventWorker(GeventWorker):
    """gunicorn's gevent worker, with SageMaker's shutdown instead of gunicorn's.

    gunicorn's SIGTERM stops accepting at once; SageMaker wants /ping to turn 503 while in-flight
    requests finish. So on SIGTERM this worker keeps accepting (new /invocations get 503), lets the
    in-flight requests finish or, near the deadline, ends them with an error (ModelService.shutdown),
    closes idle keep-alive connections and exits.
    """

    def init_process(self):
        self._clients = set()
        self._busy = 0  # requests being handled right now (a connection between requests is idle)
        self._restarting = False
        self._servers = []
        super().init_process()

    def run(self):
        """gunicorn's gevent run loop (no TLS: SageMaker speaks plain HTTP), keeping hold of its servers so
        that a restart stops accepting the moment it is ready to exit (gunicorn's own loop notices `alive`
        only at its next 1 s tick, and each second more without an acceptor is a second of queued pings)."""

        import gevent
        from gevent.pool import Pool
        from gevent.server import StreamServer

        self._hub = gevent.get_hub()  # the main thread's hub, which the watchdog's thread hands the exit to
        for listener in self.sockets:
            listener.setblocking(1)
            server = StreamServer(listener, handle=functools.partial(self.handle, listener),
                                  spawn=Pool(self.worker_connections))
            server.start()
            self._servers.append(server)
        while self.alive:
            self.notify()
            gevent.sleep(1.0)
        self._stop_accepting()
        self._wait_for_handlers(self.cfg.graceful_timeout, 0.1)  # gunicorn's: the handlers get that long
        for server in self._servers:
            server.stop(timeout=1)
        if self._restarting:
            self._exit_now(RESTART_EXIT_CODE)

    def _stop_accepting(self):
        for server in self._servers:
            server.close()  # this process's copy of the listening socket: the master's stays open

    def _wait_for_handlers(self, seconds, tick):
        """Until every connection handler has returned, or `seconds` have passed (the heartbeat goes on)."""
        import time

        import gevent

        deadline = time.monotonic() + seconds
        while any(s.pool.free_count() != s.pool.size for s in self._servers) and time.monotonic() < deadline:
            self.notify()
            gevent.sleep(tick)

    def load_wsgi(self):
        super().load_wsgi()
        from serve.app import service_of

        service_of(self.wsgi).on_fatal = self._exit_for_restart

    def _exit_for_restart(self, reason):
        """The watchdog's thread, once the engine is dead or stuck and its requests have been failed.

        The exit itself runs on the hub (`_restart_on_hub`): it stops accepting first and lets the
        requests being answered (pings, 503s) finish, so that no client is reset mid-answer; what
        arrives meanwhile waits in the listening socket, which the master keeps open, for the fresh
        worker. Should the hub be blocked, this thread exits anyway after RESTART_GRACE_SECONDS.
        `os._exit`, not `sys.exit`: the engine thread may be stuck in a kernel, and a CUDA context
        in an error state can hang an orderly interpreter shutdown.
        """
        import time

        import gevent

        self.log.error("engine failed (%s): exiting with code %d so that gunicorn starts a fresh worker",
                       reason, RESTART_EXIT_CODE)
        self._hub.loop.run_callback_threadsafe(gevent.spawn, self._restart_on_hub)
        time.sleep(RESTART_GRACE_SECONDS)
        self.log.error("the hub did not finish the restart in %ss: exiting now", RESTART_GRACE_SECONDS)
        self._exit_now(RESTART_EXIT_CODE)

    def _restart_on_hub(self):
        import time

        import gevent

        self._restarting = True
        self.alive = False
        # Stop accepting now, not at the run loop's next tick: from here until the fresh worker listens,
        # new connections (SageMaker's pings) wait in the master's listening socket, so this is kept short.
        self._stop_accepting()
        deadline = time.monotonic() + 2.0
        while self._busy and time.monotonic() < deadline:
            gevent.sleep(0.01)
        self._close_idle_clients()
        self._wait_for_handlers(0.2, 0.01)  # the last responses' final chunks leave the server's greenlets
        self._exit_now(RESTART_EXIT_CODE)

    def _close_idle_clients(self):
        """End the connections left open between requests (keep-alives): their readers see end-of-file."""
        for client in list(self._clients):
            # Shut down the OS socket, not gevent's wrapper (which would cancel the reader with an
            # error): the waiting reader simply sees end-of-file and its greenlet ends.
            raw = getattr(client, "_sock", client)
            with contextlib.suppress(OSError):
                _socket.socket.shutdown(raw, _socket.SHUT_RDWR)  # unpatched

    @staticmethod
    def _exit_now(code):
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        os._exit(code)

    def handle(self, listener, client, addr):
        self._clients.add(client)
        try:
            super().handle(listener, client, addr)
        finally:
            self._clients.discard(client)

    def handle_request(self, listener_name, req, sock, addr):
        from serve.app import closing

        self._busy += 1
        try:
            super().handle_request(listener_name, req, sock, addr)
        finally:
            self._busy -= 1
            close = closing(sock)
        if close:
            # A body cut short by BODY_READ_TIMEOUT (its 408 is written): the rest of it must not be read
            # as a next request (gunicorn would first drain it, as slowly as the client sends it), so
            # the connection ends here. StopIteration is how gunicorn's keep-alive loop ends one.
            raise StopIteration("the request body was not received in time")

    def handle_exit(self, sig, frame):
        import gevent

        gevent.spawn(self._drain_then_exit)  # out of the signal handler: the drain blocks

    def _drain_then_exit(self):
        import time

        import gevent

        from serve.app import service_of
        from serve.service import Status

        service = service_of(self.wsgi)
        start = time.monotonic()
        if service.status is Status.LOADING:
            # Nothing is in flight and the loader thread cannot be interrupted: a fresh worker would
            # load again anyway, so this one leaves now instead of at the master's SIGKILL.
            self.log.info("SIGTERM while the model loads: exiting now")
            self._exit_now(0)
        self.log.info("SIGTERM: draining (%d requests in flight)", service.inflight)
        # Done two seconds before the master's SIGKILL (graceful_timeout after its own SIGTERM).
        deadline = start + max(2.0, _settings.graceful_timeout - 2)
        cut = service.shutdown(deadline, gevent.sleep)
        self.log.info("drained after %.1fs (%d still in flight, %d cut short); exiting",
                      time.monotonic() - start, service.inflight, cut)
        if service.engine is not None and not service.engine.stopped:
            self.log.warning("the engine loop is still in a forward pass: exiting without it")
        self.alive = False
        self._close_idle_clients()  # what is left are idle keep-alives
        gevent.sleep(0.2)  # the last responses' final chunks leave the server's greenlets
        # Not the interpreter's orderly exit: tearing torch down takes seconds (2.5 s measured) that
        # the deadline does not have, and a loop still inside a forward pass could hang it.
        self._exit_now(0)


bind = f"{_settings.host}:{_settings.port}"
workers = 1
worker_class = DrainingGeventWorker
# Connections (greenlets) the worker holds at once; past it, new ones wait in the listen backlog. A
# slow client cannot keep one for ever: its request line and headers must arrive within `keepalive`
# (gunicorn's gevent worker bounds the parse with it) and its body within BODY_READ_TIMEOUT (serve/app.py).
worker_connections = 1000
preload_app = False
# The worker heartbeat is written by the gevent hub, which stays free while the model loads on an OS
# thread, and tokenizing runs on OS threads too (serve/offhub.py); the generous timeout is a margin.
timeout = 120
graceful_timeout = _settings.graceful_timeout
# SageMaker reuses connections; do not close them under its feet. Also the bound on an idle keep-alive
# connection and on a request line and headers that arrive slowly (slowloris): the connection closes.
keepalive = 75
loglevel = _settings.log_level
accesslog = "-"
errorlog = "-"
access_log_format = '%(h)s "%(r)s" %(s)s %(b)s %(M)sms'
proc_name = "sagemaker-llm-serve"
# gunicorn 27's control socket lives at one per-user path: several servers on a host (tests, a dev
# server beside a container) would take it from each other, and nothing here uses it.
control_socket_disable = True

