"""``wanfast serve``: an HTTP service for text-to-video jobs.

A web process (FastAPI on uvicorn, ``app``) takes requests and keeps jobs in SQLite (``jobs``); a pool of
worker processes (``pool``, ``worker``: one per GPU or per group of GPUs) owns the devices and the models
and runs the jobs. The restart rule for interrupted jobs is in the docstring of ``wanfast.server.jobs``
and in docs/server.md.
"""
