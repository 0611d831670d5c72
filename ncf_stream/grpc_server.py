"""The gRPC API: ``ncf_stream.v1.Recommender``, the standard health service, reflection.

A thin servicer over the same :class:`Recommender` the HTTP app calls (grpc
examples, ``health_checking/``). Bad input is INVALID_ARGUMENT, an unknown user
or item NOT_FOUND, and no snapshot yet UNAVAILABLE; the admin methods are
UNIMPLEMENTED without an admin token, UNAUTHENTICATED or PERMISSION_DENIED without
the right one (:mod:`ncf_stream.admin`).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from concurrent import futures
from contextlib import contextmanager
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from ncf_stream.admin import Admin, AdminError, AdminOff, Forbidden, NotAuthenticated
from ncf_stream.api import (
    DEFAULT_K,
    DEFAULT_PAGE,
    MAX_ANONYMOUS_ITEMS,
    MAX_BATCH_USERS,
    MAX_FILTER_ITEMS,
    MAX_SCORE_ITEMS,
    Exclude,
    StatusSource,
    check_id,
    check_k,
    check_page,
    resolve_exclude,
)
from ncf_stream.errors import BadInput
from ncf_stream.metrics import ServingMetrics
from ncf_stream.proto import recommender_pb2 as pb
from ncf_stream.proto import recommender_pb2_grpc as pb_grpc
from ncf_stream.recommend import (
    Filters,
    NotReady,
    Recommendation,
    Serving,
    UnknownItem,
    UnknownUser,
)
from ncf_stream.threads import reader_thread

SERVICE = "ncf_stream.v1.Recommender"


def _response(r: Recommendation) -> pb.RecommendResponse:
    return pb.RecommendResponse(
        user=r.user, model_version=r.model_version, cold_start=r.cold_start,
        anonymous=r.anonymous,
        items=[pb.ScoredItem(item=i, score=s) for i, s in zip(r.items, r.scores, strict=True)])


# A refused admin call's status: the HTTP statuses' counterparts (UNIMPLEMENTED for a
# server without an admin token: the methods are not offered, whatever the id).
ADMIN_CODES: dict[type[AdminError], grpc.StatusCode] = {
    AdminOff: grpc.StatusCode.UNIMPLEMENTED,
    NotAuthenticated: grpc.StatusCode.UNAUTHENTICATED,
    Forbidden: grpc.StatusCode.PERMISSION_DENIED,
}


class Servicer(pb_grpc.RecommenderServicer):
    def __init__(self, recommender: Serving, status: StatusSource,
                 metrics: ServingMetrics, admin: Admin | None = None) -> None:
        self.recommender, self.status, self.metrics = recommender, status, metrics
        self.admin = admin if admin is not None else Admin.off()

    @contextmanager
    def _call(self, endpoint: str, context: grpc.ServicerContext) -> Iterator[None]:
        start, code = time.perf_counter(), grpc.StatusCode.OK
        try:
            yield
        except BadInput as e:
            code = grpc.StatusCode.INVALID_ARGUMENT
            context.abort(code, str(e))
        except (UnknownUser, UnknownItem) as e:
            code = grpc.StatusCode.NOT_FOUND
            context.abort(code, e.args[0])
        except NotReady as e:
            code = grpc.StatusCode.UNAVAILABLE
            context.abort(code, str(e))
        except AdminError as e:
            code = ADMIN_CODES.get(type(e), grpc.StatusCode.INVALID_ARGUMENT)
            context.abort(code, str(e))
        finally:
            self.metrics.observe("grpc", endpoint, code.name, time.perf_counter() - start)

    def _k(self, request: Any) -> int:
        return check_k(request.k if request.HasField("k") else DEFAULT_K, self.recommender.max_k)

    @staticmethod
    def _exclude(request: Any) -> Exclude:
        return resolve_exclude(request.exclude if request.HasField("exclude") else None,
                               request.exclude_seen if request.HasField("exclude_seen")
                               else True)

    @staticmethod
    def _filters(request: Any) -> Filters:
        """A repeated field cannot be absent, so an empty ``include_only`` means none."""
        for name in ("exclude_items", "include_only"):
            if len(getattr(request, name)) > MAX_FILTER_ITEMS:
                raise BadInput(f"'{name}' must hold at most {MAX_FILTER_ITEMS} ids")
        return Filters(tuple(check_id(i, "exclude_items[]") for i in request.exclude_items),
                       tuple(check_id(i, "include_only[]") for i in request.include_only)
                       if len(request.include_only) else None)

    def Recommend(self, request: pb.RecommendRequest,
                  context: grpc.ServicerContext) -> pb.RecommendResponse:
        with self._call("Recommend", context):
            if len(request.items):  # anonymous: a repeated field cannot be absent, so
                if request.user:  # "neither" is an empty user and no items
                    raise BadInput("give exactly one of 'user' and 'items'")
                if len(request.items) > MAX_ANONYMOUS_ITEMS:
                    raise BadInput(f"'items' must hold 1 to {MAX_ANONYMOUS_ITEMS} ids")
                items = [check_id(i, "items[]") for i in request.items]
                return _response(self.recommender.recommend_items(
                    items, self._k(request), self._exclude(request), self._filters(request)))
            if not request.user:
                raise BadInput("give exactly one of 'user' and 'items' (neither was given)")
            user = check_id(request.user, "user")
            return _response(self.recommender.recommend(user, self._k(request),
                                                        self._exclude(request),
                                                        self._filters(request)))
        raise AssertionError("unreachable")  # abort() raises

    def RecommendBatch(self, request: pb.RecommendBatchRequest,
                       context: grpc.ServicerContext) -> pb.RecommendBatchResponse:
        with self._call("RecommendBatch", context):
            if not 1 <= len(request.users) <= MAX_BATCH_USERS:
                raise BadInput(f"'users' must hold 1 to {MAX_BATCH_USERS} ids")
            users = [check_id(u, "users[]") for u in request.users]
            results = self.recommender.recommend_many(users, self._k(request),
                                                      self._exclude(request),
                                                      self._filters(request))
            return pb.RecommendBatchResponse(results=[_response(r) for r in results])
        raise AssertionError("unreachable")

    def Score(self, request: pb.ScoreRequest,
              context: grpc.ServicerContext) -> pb.ScoreResponse:
        with self._call("Score", context):
            if not 1 <= len(request.items) <= MAX_SCORE_ITEMS:
                raise BadInput(f"'items' must hold 1 to {MAX_SCORE_ITEMS} ids")
            user = check_id(request.user, "user")
            items = [check_id(i, "items[]") for i in request.items]
            s = self.recommender.score(user, items)
            return pb.ScoreResponse(user=s.user, model_version=s.model_version, scores=[
                pb.ItemScore(item=i, known=v is not None, score=v or 0.0)
                for i, v in zip(items, s.scores, strict=True)])
        raise AssertionError("unreachable")

    def Similar(self, request: pb.SimilarRequest,
                context: grpc.ServicerContext) -> pb.SimilarResponse:
        with self._call("Similar", context):
            item = check_id(request.item, "item")
            r = self.recommender.similar(item, self._k(request))
            return pb.SimilarResponse(item=r.item, model_version=r.model_version, items=[
                pb.ScoredItem(item=i, score=s) for i, s in zip(r.items, r.scores, strict=True)])
        raise AssertionError("unreachable")

    def Popular(self, request: pb.PopularRequest,
                context: grpc.ServicerContext) -> pb.PopularResponse:
        with self._call("Popular", context):
            p = self.recommender.popular(self._k(request))
            return pb.PopularResponse(
                items=[pb.PopularItem(item=i, count=c) for i, c in zip(p.items, p.counts,
                                                                       strict=True)],
                window_seconds=p.window_s, model_version=p.model_version)
        raise AssertionError("unreachable")

    def UserItems(self, request: pb.UserItemsRequest,
                  context: grpc.ServicerContext) -> pb.UserItemsResponse:
        with self._call("UserItems", context):
            user = check_id(request.user, "user")
            offset, limit = check_page(request.offset if request.HasField("offset") else 0,
                                       request.limit if request.HasField("limit")
                                       else DEFAULT_PAGE)
            r = self.recommender.known_items(user, offset, limit)
            return pb.UserItemsResponse(
                user=r.user, total=r.total, model_version=r.model_version,
                items=[pb.KnownItem(item=i, ts=t) for i, t in zip(r.items, r.ts, strict=True)])
        raise AssertionError("unreachable")

    def _delete(self, kind: str, request: pb.DeleteRequest,
                context: grpc.ServicerContext) -> pb.DeleteResponse:
        metadata = dict(context.invocation_metadata() or ())
        self.admin.authorize(metadata.get("authorization"))
        d = self.admin.delete(kind, check_id(request.id, "id"))
        return pb.DeleteResponse(kind=d.kind, id=d.id, known=d.known, detail=d.detail)

    def DeleteUser(self, request: pb.DeleteRequest,
                   context: grpc.ServicerContext) -> pb.DeleteResponse:
        with self._call("DeleteUser", context):
            return self._delete("user", request, context)
        raise AssertionError("unreachable")

    def DeleteItem(self, request: pb.DeleteRequest,
                   context: grpc.ServicerContext) -> pb.DeleteResponse:
        with self._call("DeleteItem", context):
            return self._delete("item", request, context)
        raise AssertionError("unreachable")

    def Status(self, request: pb.StatusRequest,
               context: grpc.ServicerContext) -> pb.StatusResponse:
        with self._call("Status", context):
            return pb.StatusResponse(**self.status().as_dict())
        raise AssertionError("unreachable")


class GrpcServer:
    """The server with the recommender, health and reflection services on one port."""

    def __init__(self, recommender: Serving, status: StatusSource, metrics: ServingMetrics,
                 host: str = "127.0.0.1", port: int = 50051, workers: int = 8,
                 admin: Admin | None = None) -> None:
        self.server = grpc.server(futures.ThreadPoolExecutor(
            max_workers=workers, thread_name_prefix="ncf-grpc", initializer=reader_thread))
        pb_grpc.add_RecommenderServicer_to_server(
            Servicer(recommender, status, metrics, admin), self.server)
        self.health = health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(
            (pb.DESCRIPTOR.services_by_name["Recommender"].full_name,
             health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
             reflection.SERVICE_NAME), self.server)
        self.port = self.server.add_insecure_port(f"{host}:{port}")
        if self.port == 0:
            raise OSError(f"cannot bind gRPC to {host}:{port}")
        self._set(health_pb2.HealthCheckResponse.NOT_SERVING)

    def _set(self, status: Any) -> None:
        self.health.set("", status)
        self.health.set(SERVICE, status)

    def start(self) -> None:
        self.server.start()

    def ready(self, ready: bool = True) -> None:
        """Report SERVING once a snapshot is served (NOT_SERVING with ``ready`` False: a
        replica over a group of trainers while a rank has none yet)."""
        self._set(health_pb2.HealthCheckResponse.SERVING if ready
                  else health_pb2.HealthCheckResponse.NOT_SERVING)

    def stop(self, grace: float = 5.0) -> None:
        self._set(health_pb2.HealthCheckResponse.NOT_SERVING)
        self.server.stop(grace).wait(grace + 1)

