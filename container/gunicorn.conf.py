"""gunicorn settings for the SageMaker contract (SPEC section 6).

One gevent worker holds the model: concurrency comes from gevent, batching from the engine. The
app is not preloaded, so the model (and CUDA) is initialised in the worker after fork, never here.
On SIGTERM the worker drains: /ping turns 503, new requests get 503, in-flight ones finish, then it
exits, all within SageMaker's 30 s.
"""

import _socket
import contextlib

from gunicorn.workers.ggevent import GeventWorker

from serve.config import Settings

_settings = Settings.from_env()


class DrainingGeventWorker(GeventWorker):
    """gunicorn's gevent worker, with SageMaker's shutdown instead of gunicorn's.

    gunicorn's SIGTERM stops accepting at once; SageMaker wants /ping to turn 503 while in-flight
    requests finish. So on SIGTERM this worker keeps accepting (new /invocations get 503), waits
    until nothing is in flight, then closes idle keep-alive connections (else they would hold the
    worker until the master's SIGKILL) and lets gunicorn's normal exit run.
    """

    def init_process(self):
        self._clients = set()
        super().init_process()

    def handle(self, listener, client, addr):
        self._clients.add(client)
        try:
            super().handle(listener, client, addr)
        finally:
            self._clients.discard(client)

    def handle_exit(self, sig, frame):
        import gevent

        gevent.spawn(self._drain_then_exit)  # out of the signal handler: the drain blocks

    def _drain_then_exit(self):
        import time

        import gevent

        from serve.app import runtime_of

        runtime = runtime_of(self.wsgi)
        runtime.drain()
        self.log.info("SIGTERM: draining (%d requests in flight)", runtime.inflight)
        start = time.monotonic()
        deadline = start + max(1, _settings.graceful_timeout - 2)
        while runtime.inflight > 0 and time.monotonic() < deadline:
            gevent.sleep(0.1)  # a short poll, once, during shutdown
        self.log.info("drained after %.1fs (%d still in flight); exiting", time.monotonic() - start, runtime.inflight)
        runtime.shutdown()
        self.alive = False
        for client in list(self._clients):  # nothing is in flight: these are idle keep-alives
            # Shut down the OS socket, not gevent's wrapper (which would cancel the reader with an
            # error): the waiting reader simply sees end-of-file and its greenlet ends.
            raw = getattr(client, "_sock", client)
            with contextlib.suppress(OSError):
                _socket.socket.shutdown(raw, _socket.SHUT_RDWR)  # unpatched


bind = f"{_settings.host}:{_settings.port}"
workers = 1
worker_class = DrainingGeventWorker
worker_connections = 1000
preload_app = False
# The worker heartbeat is written by the gevent hub, which stays free while the model loads on an OS
# thread; a generous timeout still covers a hub stalled by a long tokenization.
timeout = 120
graceful_timeout = _settings.graceful_timeout
keepalive = 75  # SageMaker reuses connections; do not close them under its feet
loglevel = _settings.log_level
accesslog = "-"
errorlog = "-"
access_log_format = '%(h)s "%(r)s" %(s)s %(b)s %(M)sms'
proc_name = "sagemaker-llm-serve"
# gunicorn 27's control socket lives at one per-user path: several servers on a host (tests, a dev
# server beside a container) would take it from each other, and nothing here uses it.
control_socket_disable = True

