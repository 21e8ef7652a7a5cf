"""What a batch run adds to the metrics (service/metrics.py): its size, model time by depth, each pass's depth
and reason, each escalation, and each image's depth run (both passes) and complexity."""

from __future__ import annotations

from collections import Counter

from service import metrics
from service.batch_answers import BatchRun


def record_batch(run: BatchRun) -> None:
    routing, backend = run.routing, run.backend
    metrics.BATCH_SIZE.observe(len(run.images))
    if (mem := backend.device_memory_bytes()) is not None:
        metrics.DEVICE_MEMORY.labels(str(backend.device)).set(mem)
    for seconds in (run.model_s, run.second_model_s):
        for d, s in seconds.items():
            metrics.INFERENCE.labels(str(d)).observe(s)
    for (d, reason), count in Counter(zip(routing.first, routing.first_reasons, strict=True)).items():
        metrics.DEPTH_CHOSEN.labels(str(d), reason, "first").inc(count)
    escalated = routing.escalated
    for (d, reason), count in Counter((routing.second[i], routing.second_reasons[i]) for i in escalated).items():
        metrics.DEPTH_CHOSEN.labels(str(d), reason, "second").inc(count)
    for (a, b), count in Counter((routing.first[i], routing.second[i]) for i in escalated).items():
        metrics.ESCALATIONS.labels(str(a), str(b)).inc(count)
    for d, e, c in zip(routing.first, routing.second, run.complexities, strict=True):
        metrics.IMAGE_DEPTH.observe(d + e)
        metrics.COMPLEXITY.observe(c)
