"""A job's state (in Redis) and artifacts (on the shared data dir), and the plain functions that
plan, roll out and finalize it. Celery tasks in `spider.workers` are thin wrappers around these."""
