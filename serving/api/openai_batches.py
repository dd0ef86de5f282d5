"""OpenAI's Files and Batch APIs on ``sqlinfer serve``: ``/v1/files`` and ``/v1/batches`` (and the same
under ``/serving-endpoints/``, so one OpenAI client with ``base_url=<server>/serving-endpoints``
reaches chat completions and batches alike).

The official OpenAI SDK's ``client.files.create(purpose="batch")``, ``client.batches.create``,
``retrieve``, ``list``, ``cancel`` and ``client.files.content`` work unchanged. Every route needs a
token (the router's dependency); a user sees only their own files and batches (another user's id
is answered as absent), and each line is answered as its owner, who needs CAN_QUERY on the line's
``model``. The jobs run in the background (:mod:`serving.data.batch_runner`).
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, File, Form, Query, Request, UploadFile
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool

from serving.api.guard import max_body_bytes, principal
from serving.control.auth import Principal
from serving.data.batch_jobs import BatchStore
from serving.errors import InvalidParameterValue

PREFIXES = ("/v1", "/serving-endpoints")


class BatchCreate(BaseModel):
    """``POST /v1/batches``."""

    model_config = ConfigDict(extra="forbid")

    input_file_id: str
    endpoint: str = Field(description="/v1/chat/completions, /v1/completions or /v1/embeddings")
    completion_window: str = "24h"
    metadata: dict[str, str] | None = None


def router(prefix: str) -> APIRouter:
    api = APIRouter(prefix=prefix, tags=["batches"], dependencies=[Depends(principal)])

    def store(request: Request) -> BatchStore:
        return request.app.state.batch_store

    @api.post("/files", summary="Upload a JSONL file of batch requests (purpose: batch)")
    async def upload(request: Request, file: UploadFile = File(...), purpose: str = Form(...),
                     who: Principal = Depends(principal)) -> dict[str, Any]:
        if purpose != "batch":
            raise InvalidParameterValue(f"purpose = {purpose!r}: this server keeps files for batches only; send purpose 'batch'")
        content = await file.read(max_body_bytes() + 1)
        if len(content) > max_body_bytes():
            raise InvalidParameterValue(f"the file passes {max_body_bytes()} bytes (SQLINFER_MAX_BODY_BYTES); split it")
        return await run_in_threadpool(store(request).add_file, who.user_name, file.filename or "batch.jsonl", purpose, content)

    @api.get("/files", summary="Your files")
    def list_files(request: Request, who: Principal = Depends(principal)) -> dict[str, Any]:
        return {"object": "list", "data": store(request).files(who.user_name), "has_more": False}

    @api.get("/files/{file_id}", summary="One of your files")
    def get_file(file_id: str, request: Request, who: Principal = Depends(principal)) -> dict[str, Any]:
        return store(request).file(who.user_name, file_id)

    @api.get("/files/{file_id}/content", summary="A file's content (a batch's output or error file)")
    def file_content(file_id: str, request: Request, who: Principal = Depends(principal)) -> Response:
        return Response(store(request).content(who.user_name, file_id), media_type="application/jsonl")

    @api.post("/batches", summary="Create a batch on an uploaded file")
    def create_batch(body: BatchCreate, request: Request, who: Principal = Depends(principal)) -> dict[str, Any]:
        return store(request).create(who.user_name, body.input_file_id, body.endpoint, body.completion_window, body.metadata)

    @api.get("/batches", summary="Your batches, newest first")
    def list_batches(request: Request, limit: int = Query(20, ge=1, le=100), after: str | None = None,
                     who: Principal = Depends(principal)) -> dict[str, Any]:
        data = store(request).jobs(who.user_name, limit + 1, after)
        page = data[:limit]
        return {"object": "list", "data": page, "first_id": page[0]["id"] if page else None,
                "last_id": page[-1]["id"] if page else None, "has_more": len(data) > limit}

    @api.get("/batches/{batch_id}", summary="One of your batches")
    def get_batch(batch_id: str, request: Request, who: Principal = Depends(principal)) -> dict[str, Any]:
        return store(request).job(who.user_name, batch_id)

    @api.post("/batches/{batch_id}/cancel", summary="Cancel a batch: lines not yet sent are not sent")
    def cancel_batch(batch_id: str, request: Request, who: Principal = Depends(principal)) -> dict[str, Any]:
        return store(request).cancel(who.user_name, batch_id)

    return api
