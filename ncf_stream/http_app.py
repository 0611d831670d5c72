# mypy: disable-error-code="valid-type,attr-defined"
# (the request models are built per app, so their names are variables to mypy)
"""The HTTP API (FastAPI): thin handlers over the recommender; every client error is a 4xx.

Errors always have the shape ``{"error": <kind>, "detail": <sentence>}``:
400 bad value, 404 unknown user or item, 413 body too large, 422 malformed request,
503 before the first snapshot. The OpenAPI document at ``/openapi.json``
describes every response, so schemathesis can hold the server to it.
"""

# No ``from __future__ import annotations``: the request models carry the
# configured maximum k, so they are built per app, and FastAPI must see the
# handlers' annotations as objects rather than names to look up in globals.

import time
from typing import Annotated, Any

from fastapi import FastAPI, Header, Query, Request, params
from fastapi import Path as PathParam
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from fastapi.routing import APIRoute
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictBool,
    StrictStr,
    create_model,
    model_validator,
)
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ncf_stream.admin import Admin, AdminError
from ncf_stream.api import (
    DEFAULT_K,
    DEFAULT_PAGE,
    MAX_ANONYMOUS_ITEMS,
    MAX_BATCH_USERS,
    MAX_BODY_BYTES,
    MAX_FILTER_ITEMS,
    MAX_OFFSET,
    MAX_PAGE,
    MAX_SCORE_ITEMS,
    Exclude,
    StatusSource,
    resolve_exclude,
)
from ncf_stream.errors import BadInput
from ncf_stream.evaluator import Evaluator
from ncf_stream.events import MAX_ID_BYTES
from ncf_stream.metrics import ServingMetrics
from ncf_stream.recommend import (
    Filters,
    NotReady,
    Recommendation,
    Serving,
    UnknownItem,
    UnknownUser,
)
from ncf_stream.status_page import PAGE, History


# An id as in the event contract: a string or an integer (meaning its decimal
# string). Up to 256 characters here; one longer than 256 UTF-8 bytes can never
# have been stored, so it is simply unknown.
def _whole(value: object) -> object:
    """JSON Schema counts 42.0 as an integer, so a whole float is one; a boolean is not."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError("must be an integer")
    return value


# Integer ids within JSON's exact range (2**53); larger ones travel as strings.
# Bounds first, then the validator: so the schema says minimum/maximum.
SAFE_INT = 2**53 - 1
Id = (Annotated[StrictStr, Field(min_length=1, max_length=MAX_ID_BYTES)]
      | Annotated[int, Field(ge=-SAFE_INT, le=SAFE_INT), BeforeValidator(_whole)])


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid")


class _UserOrItems(_Request):
    """Exactly one of ``user`` and ``items``: the schema says so (``oneOf``), and so does
    validation, with a 422 naming both."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={
        "oneOf": [{"required": ["user"]}, {"required": ["items"]}]})

    @model_validator(mode="after")
    def _one_of(self) -> "_UserOrItems":
        if (getattr(self, "user", None) is None) == (getattr(self, "items", None) is None):
            raise ValueError("give exactly one of 'user' and 'items'")
        return self


def request_models(max_k: int) -> tuple[Any, Any, Any, Any]:
    """The request bodies, with the configured maximum k in their schema."""
    k = Annotated[int, Field(ge=1, le=max_k, description=f"how many items, 1 to {max_k}"),
                  BeforeValidator(_whole)]
    seen = Annotated[StrictBool, Field(description="drop items the user has touched; "
                                                   "`exclude` overrides it")]
    exclude = Annotated[Exclude | None, Field(
        description="what to leave out: `seen` (every item the user touched), `trained` "
                    "(those but the user's current hold-out: for evaluating through the API), "
                    "`none`; default: `seen`, or `none` with `exclude_seen` false")]
    excluded = Annotated[list[Id] | None, Field(
        max_length=MAX_FILTER_ITEMS,
        description="items never to recommend; unknown ids are ignored")]
    only = Annotated[list[Id] | None, Field(
        min_length=1, max_length=MAX_FILTER_ITEMS,
        description="rank these items only, each scored by the full model; unknown ids "
                    "are ignored; default: the whole catalogue")]
    recommend = create_model(
        "RecommendRequest", __base__=_UserOrItems,
        # Not nullable, default absent: present means given, as the schema's oneOf says.
        user=(Id, Field(None, description="user id; an unknown user gets popular "
                                          "items. Exactly one of user and items")),
        items=(list[Id], Field(
            None, min_length=1, max_length=MAX_ANONYMOUS_ITEMS,
            description="instead of a user: items someone interacted with, oldest first (a "
                        "session); the answer is ranked for a row fitted to them and never "
                        "stored. Unknown ids are ignored; with none known, popular items")),
        k=(k, DEFAULT_K), exclude_seen=(seen, True), exclude=(exclude, None),
        exclude_items=(excluded, None), include_only=(only, None))
    batch = create_model(
        "BatchRecommendRequest", __base__=_Request,
        users=(list[Id], Field(min_length=1, max_length=MAX_BATCH_USERS)),
        k=(k, DEFAULT_K), exclude_seen=(seen, True), exclude=(exclude, None),
        exclude_items=(excluded, None), include_only=(only, None))
    score = create_model(
        "ScoreRequest", __base__=_Request,
        user=(Id, ...), items=(list[Id], Field(min_length=1, max_length=MAX_SCORE_ITEMS)))
    similar = create_model(
        "SimilarRequest", __base__=_Request,
        item=(Id, Field(description="item id; an unknown one is a 404")), k=(k, DEFAULT_K))
    return recommend, batch, score, similar


class ScoredItem(BaseModel):
    item: str
    score: float


class RecommendResponse(BaseModel):
    user: str = Field(description="the user asked about; empty for an anonymous request")
    items: list[ScoredItem]
    model_version: int
    cold_start: bool
    anonymous: bool = Field(False, description="ranked for the request's items, not a user")


class BatchRecommendResponse(BaseModel):
    results: list[RecommendResponse]


class SimilarResponse(BaseModel):
    item: str
    items: list[ScoredItem] = Field(description="most similar first; score: the similarity, "
                                                "-1 to 1")
    model_version: int


class ScoreResponse(BaseModel):
    user: str
    scores: list[float | None] = Field(description="null: the item is unknown to the model")
    model_version: int


class PopularItem(BaseModel):
    item: str
    count: int = Field(description="interaction events with the item in the window")


class PopularResponse(BaseModel):
    items: list[PopularItem]
    window_seconds: float = Field(description="the window, in seconds of event time")
    model_version: int


class KnownItem(BaseModel):
    item: str
    ts: float = Field(description="the user's last event with the item (seconds since the "
                                  "epoch, whole seconds)")


class KnownItemsResponse(BaseModel):
    user: str
    items: list[KnownItem] = Field(description="newest first")
    total: int = Field(description="the user's items in all pages")
    offset: int
    model_version: int


class RankStatusResponse(BaseModel):
    rank: int
    model_version: int = Field(description="0: no snapshot of this rank loaded yet")
    snapshot_events: int
    snapshot_age_seconds: float


class StatusResponse(BaseModel):
    events_consumed: int
    events_rejected: int
    events_trained: int
    consumer_lag: int
    users: int
    items: int
    interactions: int
    model_version: int
    snapshot_events: int
    snapshot_age_seconds: float
    ingest: str
    ingest_reason: str
    role: str = Field(description="trainer, or replica (ncf-stream serve-replica)")
    ranks: list[RankStatusResponse] = Field(
        default_factory=list, description="a replica over a group of trainers: each rank's "
                                          "snapshot, by rank; empty otherwise")


class EvalResponse(BaseModel):
    latest: dict[str, Any] | None
    history: list[dict[str, Any]]


class HistoryResponse(BaseModel):
    samples: list[dict[str, Any]]


class ErrorResponse(BaseModel):
    error: str
    detail: str


ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse} for code in (400, 404, 413, 422, 503)}
# The admin endpoints: 404 while admin_token is unset, 401 without a bearer token, 403
# with another one.
ADMIN_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse} for code in (401, 403, 404, 422)}


class DeleteResponse(BaseModel):
    kind: str  # "user" or "item"
    id: str
    known: bool  # whether the served snapshot knows it; an unknown id is a no-op
    status: str = "accepted"  # enqueued to the engine's loop: in the next snapshot
    detail: str


def error(status: int, kind: str, detail: str) -> JSONResponse:
    return JSONResponse({"error": kind, "detail": detail}, status_code=status)


class BodyLimit:
    """413 for bodies over ``limit`` bytes, declared or streamed, before they are parsed."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length", b"")
        too_large = declared.isdigit() and int(declared) > self.limit
        # Read the body here (it is small by contract), so a chunked body that never
        # declared its size is refused before any handler runs.
        chunks: list[bytes] = []
        size, more = 0, not too_large
        while more:
            message = await receive()
            if message["type"] != "http.request":
                break
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            more = message.get("more_body", False)
            too_large = size > self.limit
            more = more and not too_large
        if too_large:
            response = error(413, "body_too_large", f"request body over {self.limit} bytes")
            await response(scope, receive, send)
            return
        body: list[Message] = [{"type": "http.request", "body": b"".join(chunks),
                                "more_body": False}]

        async def replay() -> Message:
            return body.pop() if body else await receive()

        await self.app(scope, replay, send)


def _is_json(content_type: bytes) -> bool:
    media = content_type.split(b";", 1)[0].strip().lower()
    return media == b"application/json" or (media.startswith(b"application/")
                                             and media.endswith(b"+json"))


class JsonBodies:
    """Read the bodies of the JSON routes as JSON whatever their Content-Type says.

    FastAPI parses a body as JSON only when it is declared ``application/json`` (or
    ``+json``); otherwise the model gets raw bytes and the request a 422. But
    ``curl -d`` (the demo's hint) declares ``application/x-www-form-urlencoded``,
    and other quick clients send ``text/plain`` or nothing. These routes take
    nothing but JSON, so the header says nothing the body does not: this relabels
    it before FastAPI looks. A middleware because FastAPI's own switch
    (``strict_content_type=False``) covers only a missing header; the OpenAPI
    document is untouched, still declaring ``application/json``. A body that is
    not JSON still gets the usual 422. (FastAPI is strict by default against
    cross-site "simple" POSTs; these routes read, no cookie authorizes anything,
    and another origin cannot read the answer, so there is nothing to guard.)
    """

    def __init__(self, app: ASGIApp, routes: frozenset[tuple[str, str]]) -> None:
        self.app, self.routes = app, routes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and (scope["method"], scope["path"]) in self.routes:
            declared = [v for k, v in scope["headers"] if k == b"content-type"]
            if not (len(declared) == 1 and _is_json(declared[0])):
                headers = [(k, v) for k, v in scope["headers"] if k != b"content-type"]
                scope = {**scope, "headers": [*headers, (b"content-type", b"application/json")]}
        await self.app(scope, receive, send)


class Timed:
    """Request duration by endpoint, as a plain ASGI middleware (BaseHTTPMiddleware
    costs a task group and a stream copy per request)."""

    def __init__(self, app: ASGIApp, metrics: ServingMetrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        code = "500"

        async def send_and_note(message: Message) -> None:
            nonlocal code
            if message["type"] == "http.response.start":
                code = str(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_and_note)
        finally:
            route = scope.get("route")
            endpoint = getattr(route, "path", "unmatched")
            self.metrics.observe("http", endpoint, code, time.perf_counter() - start)


def _recommendation(r: Recommendation) -> RecommendResponse:
    return RecommendResponse(
        user=r.user, items=[ScoredItem(item=i, score=s) for i, s in zip(r.items, r.scores,
                                                                       strict=True)],
        model_version=r.model_version, cold_start=r.cold_start, anonymous=r.anonymous)


def _filters(req: Any) -> Filters:
    return Filters(tuple(str(i) for i in req.exclude_items or ()),
                   None if req.include_only is None else tuple(str(i) for i in req.include_only))


def create_app(
    recommender: Serving,
    status: StatusSource,
    registry: CollectorRegistry,
    metrics: ServingMetrics,
    evaluator: Evaluator | None = None,
    history: History | None = None,
    max_body_bytes: int = MAX_BODY_BYTES,
    admin: Admin | None = None,
    replica: bool = False,
) -> FastAPI:
    """The app over ``recommender``. ``replica``: a serving replica's (ncf_stream.replica),
    which has no trainer: evaluation, history and the status page answer 404
    ``not_served`` saying where to ask instead."""
    app = FastAPI(title="ncf-stream", version="1",
                  description="Online NeuMF recommendations from a Kafka stream.")
    max_k = recommender.max_k
    RecommendRequest, BatchRecommendRequest, ScoreRequest, SimilarRequest = request_models(max_k)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        kinds = {404: "not_found", 405: "method_not_allowed", 413: "body_too_large"}
        return error(exc.status_code, kinds.get(exc.status_code, "http_error"), str(exc.detail))

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        if first.get("type") == "json_invalid":  # loc is ("body", offset): say what it means
            return error(422, "invalid_request", f"body is not JSON: "
                         f"{first.get('ctx', {}).get('error', 'invalid')} at character "
                         f"{first['loc'][-1]}")
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        return error(422, "invalid_request", f"{where or 'body'}: {first.get('msg', 'invalid')}")

    @app.exception_handler(BadInput)
    async def _bad(_: Request, exc: BadInput) -> JSONResponse:
        return error(400, "bad_value", str(exc))

    @app.exception_handler(UnknownUser)
    async def _unknown(_: Request, exc: UnknownUser) -> JSONResponse:
        return error(404, "unknown_user", exc.args[0])

    @app.exception_handler(UnknownItem)
    async def _unknown_item(_: Request, exc: UnknownItem) -> JSONResponse:
        return error(404, "unknown_item", exc.args[0])

    @app.exception_handler(AdminError)
    async def _admin(_: Request, exc: AdminError) -> JSONResponse:
        response = error(exc.status, exc.kind, str(exc))
        if exc.status == 401:
            response.headers["WWW-Authenticate"] = 'Bearer realm="ncf-stream admin"'
        return response

    @app.exception_handler(NotReady)
    async def _not_ready(_: Request, exc: NotReady) -> JSONResponse:
        return error(503, "not_ready", str(exc))

    # Handlers are ``async def``: the work is a few milliseconds of numpy, torch and
    # FAISS, and running it on the event loop saves two thread hand-offs, each of
    # which waits for the GIL while the trainer holds it.

    @app.post("/v1/recommend", response_model=RecommendResponse, responses=ERRORS)
    async def recommend(req: RecommendRequest) -> RecommendResponse:
        """Top k for a user, or for a list of items (an anonymous request)."""
        exclude = resolve_exclude(req.exclude, req.exclude_seen)
        if req.items is not None:
            return _recommendation(recommender.recommend_items(
                [str(i) for i in req.items], req.k, exclude, _filters(req)))
        return _recommendation(recommender.recommend(str(req.user), req.k, exclude,
                                                     _filters(req)))

    @app.post("/v1/recommend/batch", response_model=BatchRecommendResponse, responses=ERRORS)
    async def recommend_batch(req: BatchRecommendRequest
                        ) -> BatchRecommendResponse:
        users = [str(u) for u in req.users]
        results = recommender.recommend_many(
            users, req.k, resolve_exclude(req.exclude, req.exclude_seen), _filters(req))
        return BatchRecommendResponse(results=[_recommendation(r) for r in results])

    @app.post("/v1/score", response_model=ScoreResponse, responses=ERRORS)
    async def score(req: ScoreRequest) -> ScoreResponse:
        s = recommender.score(str(req.user), [str(i) for i in req.items])
        return ScoreResponse(user=s.user, scores=s.scores, model_version=s.model_version)

    # Not async: the first request on each index computes its similarity space (an
    # (items, d) product, tens of ms at 200k items); on the event loop that would stall
    # every other request meanwhile, in a worker thread (numpy releases the GIL) it does not.
    @app.post("/v1/similar", response_model=SimilarResponse, responses=ERRORS)
    def similar(req: SimilarRequest) -> SimilarResponse:
        """The items the model scores most alike to the given one across its users."""
        r = recommender.similar(str(req.item), req.k)
        return SimilarResponse(item=r.item, model_version=r.model_version, items=[
            ScoredItem(item=i, score=s) for i, s in zip(r.items, r.scores, strict=True)])

    @app.get("/v1/popular", response_model=PopularResponse, responses=ERRORS)
    async def popular(k: Annotated[int, Query(ge=1, le=max_k, description=(
            f"how many items, 1 to {max_k}"))] = DEFAULT_K) -> PopularResponse:
        """The items with the most interaction events over the recent window."""
        p = recommender.popular(k)
        return PopularResponse(
            items=[PopularItem(item=i, count=c) for i, c in zip(p.items, p.counts, strict=True)],
            window_seconds=p.window_s, model_version=p.model_version)

    @app.get("/v1/users/{user}/items", response_model=KnownItemsResponse, responses=ERRORS)
    async def known_items(
        user: Annotated[str, PathParam(min_length=1, max_length=MAX_ID_BYTES)],
        offset: Annotated[int, Query(ge=0, le=MAX_OFFSET)] = 0,
        limit: Annotated[int, Query(ge=1, le=MAX_PAGE)] = DEFAULT_PAGE,
    ) -> KnownItemsResponse:
        """The user's items, newest first, a page at a time; 404 for an unknown user."""
        r = recommender.known_items(user, offset, limit)
        return KnownItemsResponse(
            user=r.user, items=[KnownItem(item=i, ts=t) for i, t in zip(r.items, r.ts,
                                                                         strict=True)],
            total=r.total, offset=offset, model_version=r.model_version)

    gate = admin if admin is not None else Admin.off()

    def delete(kind: str, external_id: str, authorization: str | None) -> DeleteResponse:
        gate.authorize(authorization)
        d = gate.delete(kind, external_id)
        return DeleteResponse(kind=d.kind, id=d.id, known=d.known, detail=d.detail)

    @app.delete("/v1/admin/users/{user}", status_code=202, response_model=DeleteResponse,
                responses=ADMIN_ERRORS)
    async def delete_user(
        user: Annotated[str, PathParam(min_length=1, max_length=MAX_ID_BYTES)],
        authorization: Annotated[str | None, Header(description="Bearer <admin token>")] = None,
    ) -> DeleteResponse:
        """Forget a user: its interactions, row, history and id leave the next snapshot and
        the next checkpoint. Needs the admin token; 404 while none is configured."""
        return delete("user", user, authorization)

    @app.delete("/v1/admin/items/{item}", status_code=202, response_model=DeleteResponse,
                responses=ADMIN_ERRORS)
    async def delete_item(
        item: Annotated[str, PathParam(min_length=1, max_length=MAX_ID_BYTES)],
        authorization: Annotated[str | None, Header(description="Bearer <admin token>")] = None,
    ) -> DeleteResponse:
        """Forget an item: its interactions, rows, place in histories and popularity, and
        id leave the next snapshot and the next checkpoint. Needs the admin token."""
        return delete("item", item, authorization)

    @app.get("/v1/status", response_model=StatusResponse)
    async def get_status() -> StatusResponse:
        return StatusResponse(**status().as_dict())

    def not_served(what: str) -> JSONResponse:
        return error(404, "not_served", f"this is a serving replica (ncf-stream "
                     f"serve-replica): {what} live with the trainer (ncf-stream serve); "
                     "ask it")

    trainer_only: dict[int | str, dict[str, Any]] = {404: {"model": ErrorResponse}}

    @app.get("/v1/eval", response_model=EvalResponse, responses=trainer_only)
    async def get_eval() -> Any:
        if replica:
            return not_served("evaluation reports")
        history = [r.as_dict() for r in evaluator.history] if evaluator else []
        return EvalResponse(latest=history[-1] if history else None, history=history)

    @app.post("/v1/eval", status_code=202, response_model=EvalResponse, responses=trainer_only)
    async def request_eval() -> Any:
        """Ask for an evaluation now; the report appears in GET /v1/eval when done."""
        if evaluator is not None:
            evaluator.request()
        return await get_eval()

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        # Alive either way (200): a degraded ingest still serves the last snapshot.
        st = status()
        if st.ingest == "ok":
            return {"status": "ok"}
        return {"status": "degraded", "reason": st.ingest_reason}

    @app.get("/readyz", responses={503: {"model": ErrorResponse}})
    async def readyz() -> Any:
        snap = recommender.ready()
        if snap is None:
            return error(503, "not_ready", "no model snapshot is published yet")
        return {"status": "ready", "model_version": snap.version}

    @app.get("/metrics", include_in_schema=False)
    async def prometheus() -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/history", response_model=HistoryResponse, responses=trainer_only)
    async def get_history() -> Any:
        """Figures sampled every few seconds: what the status page at / draws."""
        if replica:
            return not_served("the status page's figures")
        return HistoryResponse(samples=history.as_list() if history is not None else [])

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page() -> Any:
        return not_served("the status page and its figures") if replica else PAGE

    json_routes = frozenset((method, route.path) for route in app.routes
                            if isinstance(route, APIRoute) and route.body_field is not None
                            and not isinstance(route.body_field.field_info, params.Form)
                            for method in route.methods or ())
    app.add_middleware(JsonBodies, routes=json_routes)
    app.add_middleware(BodyLimit, limit=max_body_bytes)
    app.add_middleware(Timed, metrics=metrics)
    return app
