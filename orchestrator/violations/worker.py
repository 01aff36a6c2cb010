"""The violations consumer as a plain faust worker, for deployments that run faust apps:

    faust -A orchestrator.violations.worker worker -l warn --without-web

Same configuration (`ORCH_*`), same app id, tables and behaviour as `orchestrator violations`;
RabbitMQ is connected on first use.
"""

from __future__ import annotations

import asyncio

from orchestrator import kafka, store
from orchestrator.config import load_settings
from orchestrator.violations.service import ViolationsConsumer

settings = load_settings()
consumer = ViolationsConsumer(settings, store.connect(settings), None)
app = consumer.build_app(asyncio.run(kafka.ensure_topics(settings)))
