"""`POST /v1/feedback` and `GET /v1/feedback`: thin routes over serve/services/feedback.py.

A 200 means the feedback is committed (written in a thread, in its own
transaction, after the request log holds the completion it refers to). A reference feedback
is then graded by the deployment's graders (serve/services/grading.py), after the answer.
"""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from agentloop.serve import protocol
from agentloop.serve.errors import RequestTooLarge
from agentloop.serve.http.auth import caller_of
from agentloop.serve.services.feedback import MAX_BODY_BYTES, list_page, parse_list_query, public, record_feedback

router = APIRouter()


@router.post("/v1/feedback")
async def create_feedback(request: Request):
    gw = request.app.state.gw
    raw = await request.body()
    if len(raw) > MAX_BODY_BYTES:
        raise RequestTooLarge(f"The request body is larger than {MAX_BODY_BYTES} bytes.")
    body = protocol.parse_body(raw)
    flush = gw.writer.flush if gw.writer is not None else None
    row, created = await asyncio.to_thread(record_feedback, gw.store, caller_of(request), body,
                                           idempotency_key=request.headers.get("idempotency-key"), flush=flush)
    if created and row["type"] == "reference" and gw.grading is not None:
        # Committed already (the 200 says so); its grades follow, off the response path.
        gw.spawn(asyncio.to_thread(gw.grading.grade_reference_feedback, row))
    return JSONResponse(public(row))


@router.get("/v1/feedback")
async def list_feedback(request: Request):
    gw = request.app.state.gw
    query = parse_list_query(request.query_params)
    return JSONResponse(await asyncio.to_thread(list_page, gw.store, caller_of(request), query))
