"""The Celery side of `python -m bench.compare`: one app factory, two tasks.

The worker is started as

    python -m celery -A bench.celery_app worker --pool prefork --concurrency 4 -Q QUEUE ...

and reads its configuration from the environment (BENCH_CELERY_*), which bench.compare sets;
bench.compare itself builds its client apps with `make_app`.

* `bench.noop` returns a small dict (the single-step workload);
* `bench.echo` returns its input, so `chain(echo.s(x), echo.s(), echo.s())` passes it along
  (the 3-step chain workload).

Without a result backend nobody can tell the client that a task is done, so when
`counter_key` is set each task, as its last act, stores its finish time under its task id
(HSET `<counter_key>:done`) and increments `<counter_key>` (INCR); the bench polls the counter.
"""

from __future__ import annotations

import os
import time
from typing import Any

import redis
from celery import Celery, Task  # type: ignore[import-untyped]

QUEUE_TYPES = ("classic", "quorum")


def make_app(
    *,
    broker_url: str,
    queue: str,
    queue_type: str = "classic",
    result_backend: str | None = None,
    redis_url: str = "redis://127.0.0.1:6379/0",
    counter_key: str | None = None,
    key_prefix: str = "",
) -> Celery:
    """A Celery app publishing to and consuming from `queue` on `broker_url`.

    queue_type "quorum" declares the queue as a quorum queue: publishes are confirmed and the
    worker (worker_detect_quorum_queues, on by default since 5.5) switches to per-consumer
    QoS, since quorum queues do not support global QoS.
    """
    if queue_type not in QUEUE_TYPES:
        raise ValueError(f"queue_type must be one of {QUEUE_TYPES}, not {queue_type!r}")
    app = Celery("bench", broker=broker_url, set_as_current=False)
    conf: dict[str, Any] = {
        "task_default_queue": queue,
        "task_default_exchange": queue,
        # topic, not direct: Celery's native delayed delivery (set up by the worker for quorum
        # queues) binds the queue to its delay exchanges and warns about direct exchanges.
        "task_default_exchange_type": "topic",
        "task_default_routing_key": queue,
        "task_default_queue_type": queue_type,
        "task_acks_late": True,
        "worker_prefetch_multiplier": 1,
        "worker_detect_quorum_queues": True,
        "task_serializer": "json",
        "result_serializer": "json",
        "accept_content": ["json"],
        "broker_connection_retry_on_startup": True,
        "worker_hijack_root_logger": False,
        "worker_redirect_stdouts": False,
    }
    if queue_type == "quorum":
        # Quorum queues: confirmed publishes; global QoS is turned off by the worker itself.
        conf["broker_transport_options"] = {"confirm_publish": True}
    if result_backend:
        conf["result_backend"] = result_backend
        conf["task_ignore_result"] = False
        conf["result_expires"] = 600
        conf["result_backend_transport_options"] = {"global_keyprefix": key_prefix}
    else:
        conf["task_ignore_result"] = True
    app.conf.update(conf)
    _register_tasks(app, redis_url, counter_key)
    return app


def _register_tasks(app: Celery, redis_url: str, counter_key: str | None) -> None:
    client = redis.Redis.from_url(redis_url) if counter_key else None

    def mark_done(task_id: str | None) -> None:
        if client is None or counter_key is None:
            return
        pipe = client.pipeline(transaction=False)
        pipe.hset(f"{counter_key}:done", task_id or "?", repr(time.time()))
        pipe.incr(counter_key)
        pipe.execute()

    def noop(self: Task) -> dict[str, Any]:
        result = {"ok": True, "n": 1}
        mark_done(self.request.id)
        return result

    def echo(self: Task, value: Any = None) -> Any:
        mark_done(self.request.id)
        return value

    # shared=False: with several apps in one process (bench.compare makes one per
    # configuration) a shared task would be registered on every app from the first one.
    app.task(name="bench.noop", bind=True, shared=False)(noop)
    app.task(name="bench.echo", bind=True, shared=False)(echo)


def _from_env() -> Celery:
    env = os.environ
    return make_app(
        broker_url=env.get("BENCH_CELERY_BROKER", "amqp://guest:guest@127.0.0.1:5672//"),
        queue=env.get("BENCH_CELERY_QUEUE", "bench.celery"),
        queue_type=env.get("BENCH_CELERY_QUEUE_TYPE", "classic"),
        result_backend=env.get("BENCH_CELERY_BACKEND") or None,
        redis_url=env.get("BENCH_CELERY_REDIS", "redis://127.0.0.1:6379/0"),
        counter_key=env.get("BENCH_CELERY_COUNTER") or None,
        key_prefix=env.get("BENCH_CELERY_KEY_PREFIX", ""),
    )


app = _from_env()
