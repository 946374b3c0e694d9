"""Videos stored in a PostgreSQL job store, so that every web process, on any host, serves every video
with no shared file system.

A video is kept as rows of ``video_chunks`` (``CHUNK_BYTES`` of ``bytea`` each, in order) under one row of
``videos`` (its size and chunk count). Chunks, not one ``bytea`` value: PostgreSQL caps a value at 1 GB and
reads it whole, while a chunk is read by its own query, so a web process streams a video holding one chunk
in memory, whatever its size. The rows are written inside the transaction that marks the job succeeded
(``JobStore.finish``): a job has its whole video or none.

Size limit: ``max_video_bytes`` of the store (``--max-video-mb``, default 256 MiB; a 1280x720 5 s H.264
video of the models is a few MB). A larger video fails its job with the reason; the database itself would
take far more (chunks of 1 MiB, no per-value limit reached).

On SQLite the videos stay files of the results folder, served as files (with HTTP range requests).

Input images (TI2V / I2V requests) take the same way in: the web process keeps the file it stored by
content hash in ``inputs`` too, and a worker on another host writes it back to its own data folder
(``local_inputs``) before it runs the job.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

log = logging.getLogger("wanfast.server.videos")

CHUNK_BYTES = 1 << 20  # one row of video_chunks
MAX_VIDEO_BYTES = 256 << 20  # default cap per video (--max-video-mb)


def too_large(size: int, cap: int) -> str:
    return (
        f"the video is {size} bytes, above this job store's limit of {cap} bytes per video "
        "(--max-video-mb); ask for fewer frames or a smaller size"
    )


def put(con, job_id: str, path: Path) -> None:
    """Store the file ``path`` as the video of ``job_id`` (inside the caller's transaction)."""
    con.execute("DELETE FROM video_chunks WHERE job_id = ?", (job_id,))  # a row left by nothing: no harm
    con.execute("DELETE FROM videos WHERE job_id = ?", (job_id,))
    n = size = 0
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK_BYTES):
            con.execute("INSERT INTO video_chunks (job_id, n, data) VALUES (?, ?, ?)", (job_id, n, chunk))
            n, size = n + 1, size + len(chunk)
    con.execute("INSERT INTO videos (job_id, size, chunks) VALUES (?, ?, ?)", (job_id, size, n))


def size(store, job_id: str) -> int | None:
    """The stored video's size in bytes (None: none stored)."""
    row = store.db.con().execute("SELECT size FROM videos WHERE job_id = ?", (job_id,)).fetchone()
    return None if row is None else int(row[0])


def chunks(store, job_id: str) -> Iterator[bytes]:
    """The stored video, one ``CHUNK_BYTES`` row per query (never all of it in memory), in order. Each is
    read on the connection of the thread that asks for it (a web server iterates a body from a thread
    pool)."""
    db = store.db
    row = db.con().execute("SELECT chunks FROM videos WHERE job_id = ?", (job_id,)).fetchone()
    for n in range(row[0] if row is not None else 0):
        chunk = db.con().execute("SELECT data FROM video_chunks WHERE job_id = ? AND n = ?", (job_id, n))
        yield bytes(chunk.fetchone()[0])


def put_input(store, path: Path, data: bytes) -> None:
    """PostgreSQL: keep an input image, stored at ``path`` (named by its sha256), for workers on other
    hosts. Nothing on SQLite (one host: the workers read the file)."""
    if not store.videos_in_db:
        return
    store.db.con().execute(
        "INSERT INTO inputs (digest, data) VALUES (?, ?) ON CONFLICT (digest) DO NOTHING", (path.stem, data)
    )


def local_inputs(store, job, inputs_dir: Path):
    """The job with its image (if any) as a file of this host's ``inputs_dir``, fetched from a PostgreSQL
    store when missing there. A fetch that fails leaves the job as it was: it then fails on the missing
    file, with that reason, as for an image deleted under it."""
    request = job.request
    if "image" not in request or not store.videos_in_db:
        return job
    path = inputs_dir / Path(request["image"]).name
    if not path.exists():
        from wanfast.server.storedb import STORE_ERRORS

        try:
            row = store.db.con().execute("SELECT data FROM inputs WHERE digest = ?", (path.stem,)).fetchone()
        except STORE_ERRORS as e:
            log.warning("image %s not fetched: %s", path.stem, e)
            return job
        if row is None:
            return job
        inputs_dir.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_bytes(bytes(row[0]))
        tmp.replace(path)
    return replace(job, request={**request, "image": str(path)})


def response(store, job_id: str, results_dir: Path):
    """The HTTP response with the video of a succeeded job: a file on SQLite, streamed rows on PostgreSQL;
    410 when it is gone."""
    from fastapi import HTTPException
    from fastapi.responses import FileResponse, StreamingResponse

    name = f"{job_id}.mp4"
    if not store.videos_in_db:
        path = results_dir / name
        if path.is_file():
            return FileResponse(
                path, media_type="video/mp4", filename=name, content_disposition_type="inline"
            )
    else:
        length = size(store, job_id)
        if length is not None:
            headers = {"Content-Length": str(length), "Content-Disposition": f'inline; filename="{name}"'}
            return StreamingResponse(chunks(store, job_id), media_type="video/mp4", headers=headers)
    raise HTTPException(410, f"the video of job {job_id} has been removed from the server")
