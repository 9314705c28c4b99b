"""GPU workers on several machines: `queue.backend: celery` (docs/distributed.md)."""
