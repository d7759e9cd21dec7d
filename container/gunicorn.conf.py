"""gunicorn settings for the SageMaker contract (SPEC section 6).

One gevent worker holds the model: concurrency comes from gevent, batching from the engine. The
app is not preloaded, so the model (and CUDA) is initialised in the worker after fork, never here.
On SIGTERM the worker drains: /ping turns 503, new requests get 503, in-flight ones finish, then it
exits, all within SageMaker's 30 s.
"""

from serve.config import Settings

_settings = Settings.from_env()

bind = f"{_settings.host}:{_settings.port}"
workers = 1
worker_class = "gevent"
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


def post_worker_init(worker):
    """Replace gunicorn's SIGTERM (stop accepting at once) with a drain that keeps /ping answering."""
    import signal

    import gevent

    from serve.app import runtime_of

    runtime = runtime_of(worker.wsgi)

    def drain_then_exit() -> None:
        runtime.drain()
        worker.log.info("SIGTERM: draining (%d requests in flight)", runtime.inflight)
        deadline = _settings.graceful_timeout - 2
        waited = 0.0
        # A short poll is fine here: it only runs once, during shutdown.
        while runtime.inflight > 0 and waited < deadline:
            gevent.sleep(0.1)
            waited += 0.1
        worker.log.info("drained after %.1fs (%d still in flight); exiting", waited, runtime.inflight)
        runtime.shutdown()
        worker.alive = False

    def on_sigterm(signum, frame):
        gevent.spawn(drain_then_exit)

    signal.signal(signal.SIGTERM, on_sigterm)
