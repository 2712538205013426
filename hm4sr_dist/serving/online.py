"""Online top-K on Ray Serve (issue 23): an HTTP JSON API over `Scorer.recommend`.

One Serve deployment, `OnlineRecommender`; each replica loads the export once
(`load_export` + `Scorer.from_export`, on `device`) and answers

    POST /recommend   {"history": [[item, unix_time], ...], "k": 10, "exclude_history": false}
                      -> 200 {"items": ["<raw id>", ...], "scores": [<eq. 19 score>, ...]}
                      best first, the scorer's order and ties (`hm4sr_dist.serving.scorer`);
                      raw item IDs may be sent as strings or ints, they come back as the
                      strings of the export's items.parquet. `history` and `k` are required,
                      `exclude_history` defaults to false; any other field is refused.
    GET  /healthz     -> 200 {"status": "ok", "items": n, "identity": run identity, ...}
                      (503 with "status": "failing" after repeated internal scoring failures)
    GET  /stats       -> this replica's counters: requests, refused requests, batches and the
                      histogram of batch sizes (how many requests each Scorer call served)

A request the scorer would refuse is answered 400 with {"error": "<field> = <value>: <problem>",
"field": "<field>"} (the value as JSON, shortened): malformed JSON, a body that is not an object,
an unknown, missing or ill-typed field, an unknown item, an empty history, a time that is not
whole unix seconds or is earlier than the one before it, k <= 0, k > the catalogue (or, with
exclude_history, > the items left after removing the history). Every request is validated on
its own, BEFORE it joins a batch, so a bad request never fails the requests batched with it; an
unexpected error of a batch is retried one request at a time, so it fails only the request that
causes it (500 with {"error": ...}). The replica keeps serving after either.

Batching: `@serve.batch` collects up to `max_batch_size` requests (waiting at most
`batch_wait_timeout_s` for them) into one list; requests without `exclude_history` are scored in
ONE `Scorer.recommend` call with the largest k of the batch, each answer the first k of its row
(the scorer's order is a total order, so the top k is the prefix of the top K >= k); requests
with `exclude_history` are scored in one call per distinct k (the candidate check is per k). The
scorer runs in a worker thread of the replica, so the event loop keeps accepting requests (and
forming the next batch) while a batch is scored. `max_ongoing_requests` defaults to twice
`max_batch_size`: Serve's default (5) would cap every batch at 5.

Health: Serve calls `check_health` every `health_check_period_s`; it fails after 3 batches in a
row failed for a reason other than the request (a broken device, non-finite model outputs), and
Serve then replaces the replica.

Starting it:
- `serve run hm4sr_dist.serving.online:app export_dir=/path [num_replicas=2 num_gpus=1 ...]`
  (the application builder `app(args)`; `ServeOptions` lists every argument; the same `args` go
  under `applications[].args` of a Serve config file or a RayService's serveConfigV2,
  cluster/kuberay-rayservice.yaml);
- from Python: `start(export_dir, port=8000, host="127.0.0.1", ...)` -> the base URL;
- `hm4sr-serve EXPORT [--port 8000] [--host 127.0.0.1] [--replicas 1] [--num-gpus 0] ...`
  (blocks until Ctrl-C, then shuts Serve down).
"""

# No `from __future__ import annotations`: FastAPI reads the routes' annotations (Request) at
# runtime, from functions that `serve.ingress` serializes by value.
import argparse
import asyncio
import json
import logging
import sys
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import FastAPI
from ray import serve
from ray.serve import Application
from starlette.requests import Request
from starlette.responses import JSONResponse

from hm4sr_dist.serving.export import ExportError, load_export, read_export_manifest
from hm4sr_dist.serving.scorer import DEFAULT_ITEM_CHUNK, Scorer, ScoringError

logger = logging.getLogger("ray.serve")

DEPLOYMENT_NAME = "OnlineRecommender"
FIELDS = ("history", "k", "exclude_history")
REQUIRED = ("history", "k")
DEFAULT_MAX_BATCH = 32
DEFAULT_BATCH_WAIT_S = 0.005
DEFAULT_MAX_HISTORY = 10_000
FAILURES_BEFORE_UNHEALTHY = 3
SHOWN_CHARS = 120                       # a value in an error message is cut after this many chars
USAGE = '{"history": [[item, unix_time], ...], "k": int, "exclude_history": bool (optional)}'


# -- requests -----------------------------------------------------------------------------------

class _Missing:
    def __repr__(self) -> str:
        return "(missing)"


MISSING = _Missing()


def show(value: Any) -> str:
    """A value as the client sent it (JSON), cut to SHOWN_CHARS."""
    if value is MISSING:
        return "(missing)"
    try:
        text = json.dumps(value, ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= SHOWN_CHARS else text[:SHOWN_CHARS - 3] + "..."


class RequestError(ValueError):
    """A request refused with a 4xx: names the field, the value sent and the problem."""

    def __init__(self, field: str, value: Any, problem: str, status: int = 400):
        self.field, self.value, self.problem, self.status = field, value, problem, status
        super().__init__(f"{field} = {show(value)}: {problem}")

    def body(self) -> dict:
        return {"error": str(self), "field": self.field}


@dataclass(frozen=True)
class Query:
    """One validated request."""

    history: list
    k: int
    exclude_history: bool


def _reject_constant(name: str):
    raise ValueError(f"{name} is not JSON")


def parse_request(body: bytes | str, scorer: Scorer, max_history: int = DEFAULT_MAX_HISTORY) -> Query:
    """Parse and validate one POST /recommend body, as the scorer would check it (so scoring it
    cannot fail for the request's sake); raises RequestError naming the field."""
    try:
        data = json.loads(body, parse_constant=_reject_constant)
    except (ValueError, RecursionError) as exc:         # JSONDecodeError and UnicodeDecodeError
        text = body.decode("utf-8", "replace") if isinstance(body, bytes) else body
        raise RequestError("body", text, f"not valid JSON ({exc}); expected {USAGE}") from None
    if not isinstance(data, dict):
        raise RequestError("body", data, f"expected a JSON object {USAGE}")
    unknown = sorted(set(data) - set(FIELDS))
    if unknown:
        raise RequestError(unknown[0], data[unknown[0]], f"unknown field; the fields are {', '.join(FIELDS)}")
    for name in REQUIRED:
        if name not in data:
            raise RequestError(name, MISSING, f"missing field; expected {USAGE}")
    k, exclude, history = data["k"], data.get("exclude_history", False), data["history"]
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise RequestError("k", k, "expected an int >= 1")
    if k > scorer.n_items:
        raise RequestError("k", k, f"more than the {scorer.n_items} items of the catalogue")
    if not isinstance(exclude, bool):
        raise RequestError("exclude_history", exclude, "expected true or false")
    if isinstance(history, list) and len(history) > max_history:
        raise RequestError("history", f"<{len(history)} pairs>", f"longer than the {max_history} pairs this "
                           f"server accepts (the model reads the last {scorer.max_len})")
    try:
        [(items, _)] = scorer.dense_histories([history])
    except ScoringError as exc:
        field = "history" + exc.field[len("histories[0]"):] if exc.field.startswith("histories[0]") \
            else exc.field
        raise RequestError(field, exc.value, exc.problem) from None
    if exclude:
        seen = len(np.unique(items))
        if k > scorer.n_items - seen:
            raise RequestError("k", k, f"more than the {scorer.n_items - seen} candidate items with "
                               f"exclude_history ({scorer.n_items} items less the {seen} distinct "
                               "items of the history)")
    return Query(history, k, exclude)


# -- scoring ------------------------------------------------------------------------------------

Answer = tuple[list[str], list[float]]


def score_queries(scorer: Scorer, queries: Sequence[Query]) -> list[Answer | Exception]:
    """Answers to validated queries, in order; an Exception in place of an answer that failed.

    Queries without exclude_history: one `recommend` call with the largest k, each row cut to its
    own k. With exclude_history: one call per k. A call that raises is retried query by query, so
    an error fails only the queries that cause it."""
    out: list[Answer | Exception | None] = [None] * len(queries)
    groups: dict[tuple[bool, int], list[int]] = {}
    for i, q in enumerate(queries):
        groups.setdefault((True, q.k) if q.exclude_history else (False, 0), []).append(i)
    for (exclude, _), members in groups.items():
        k = max(queries[i].k for i in members)
        try:
            answers = scorer.recommend([queries[i].history for i in members], k, exclude_history=exclude)
        except Exception as exc:          # noqa: BLE001 - the error stays with the query that causes it
            if len(members) == 1:
                out[members[0]] = exc
                continue
            logger.warning("a batch of %d requests failed (%r); scoring them one by one", len(members), exc)
            for i in members:
                out[i] = score_queries(scorer, [queries[i]])[0]
            continue
        for i, (items, scores) in zip(members, answers):
            out[i] = (items[:queries[i].k], scores[:queries[i].k])
    return out                            # type: ignore[return-value]


# -- the deployment -----------------------------------------------------------------------------

# defined before the class: `serve.ingress` serializes the routes when the class is decorated
def _replica_id() -> str | None:
    try:
        return serve.get_replica_context().replica_id.unique_id
    except Exception:                    # noqa: BLE001 - outside a replica
        return None


api = FastAPI(title="hm4sr online top-K", docs_url=None, redoc_url=None, openapi_url=None)


@serve.deployment(name=DEPLOYMENT_NAME, max_ongoing_requests=2 * DEFAULT_MAX_BATCH)
@serve.ingress(api)
class OnlineRecommender:
    """One replica: the export's scorer, loaded once, behind the JSON API of the module docstring."""

    def __init__(self, export_dir: str, device: str = "cpu", max_batch_size: int = DEFAULT_MAX_BATCH,
                 batch_wait_timeout_s: float = DEFAULT_BATCH_WAIT_S, max_history: int = DEFAULT_MAX_HISTORY,
                 item_chunk_size: int = DEFAULT_ITEM_CHUNK, verify: bool = True):
        export = load_export(export_dir, device=device, verify=verify)
        self.scorer = Scorer.from_export(export, device=device, item_chunk_size=item_chunk_size)
        self.identity = export.identity
        self.export_dir = str(export_dir)
        self.max_history = int(max_history)
        self._score_batch.set_max_batch_size(int(max_batch_size))
        self._score_batch.set_batch_wait_timeout_s(float(batch_wait_timeout_s))
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hm4sr-scorer")
        self.requests = self.refused = self.failed = self.batches = 0
        self.batch_sizes: Counter[int] = Counter()
        self.failing_batches = 0            # batches in a row that failed for the server's sake
        logger.info("hm4sr online: export %s (run %s), %d items, device %s, batches of <= %d",
                    export_dir, self.identity, self.scorer.n_items, device, max_batch_size)

    # -- routes -------------------------------------------------------------------------------
    @api.post("/recommend")
    async def recommend(self, request: Request) -> JSONResponse:
        self.requests += 1
        try:
            query = parse_request(await request.body(), self.scorer, self.max_history)
        except RequestError as exc:
            self.refused += 1
            return JSONResponse(exc.body(), status_code=exc.status)
        answer = await self._score_batch(query)
        if isinstance(answer, ScoringError):         # validated already: should not happen
            self.refused += 1
            return JSONResponse({"error": str(answer), "field": answer.field}, status_code=400)
        if isinstance(answer, Exception):
            self.failed += 1
            return JSONResponse({"error": f"scoring failed: {type(answer).__name__}: {answer}"},
                                status_code=500)
        items, scores = answer
        return JSONResponse({"items": items, "scores": scores})

    @api.get("/healthz")
    async def healthz(self) -> JSONResponse:
        healthy = self.failing_batches < FAILURES_BEFORE_UNHEALTHY
        body = {"status": "ok" if healthy else "failing", "items": self.scorer.n_items,
                "identity": self.identity, "max_len": self.scorer.max_len, "device": str(self.scorer.device),
                "replica": _replica_id()}
        return JSONResponse(body, status_code=200 if healthy else 503)

    @api.get("/stats")
    async def stats(self) -> JSONResponse:
        return JSONResponse(self.counters())

    # -- batching -----------------------------------------------------------------------------
    @serve.batch(max_batch_size=DEFAULT_MAX_BATCH, batch_wait_timeout_s=DEFAULT_BATCH_WAIT_S)
    async def _score_batch(self, queries: list[Query]) -> list[Answer | Exception]:
        self.batches += 1
        self.batch_sizes[len(queries)] += 1
        loop = asyncio.get_running_loop()
        answers = await loop.run_in_executor(self._executor, score_queries, self.scorer, queries)
        failed = [a for a in answers if isinstance(a, Exception) and not isinstance(a, ScoringError)]
        self.failing_batches = self.failing_batches + 1 if failed and len(failed) == len(answers) else 0
        if failed:
            logger.error("hm4sr online: %d of %d requests of a batch failed: %r", len(failed), len(answers),
                         failed[0])
        return answers

    # -- Serve hooks and helpers ----------------------------------------------------------------
    def check_health(self) -> None:
        """Serve's periodic health check: raising marks the replica unhealthy (it is replaced)."""
        if self.failing_batches >= FAILURES_BEFORE_UNHEALTHY:
            raise RuntimeError(f"the last {self.failing_batches} batches failed while scoring (see the "
                               "replica's log)")

    def counters(self) -> dict:
        return {"requests": self.requests, "refused": self.refused, "failed": self.failed,
                "batches": self.batches, "largest_batch": max(self.batch_sizes, default=0),
                "batch_sizes": {str(k): v for k, v in sorted(self.batch_sizes.items())},
                "replica": _replica_id()}

    def __del__(self):
        executor = getattr(self, "_executor", None)
        if executor is not None:
            executor.shutdown(wait=False)


# -- building and starting the application ----------------------------------------------------

_TRUE, _FALSE = {"1", "true", "yes", "on"}, {"0", "false", "no", "off"}


@dataclass
class ServeOptions:
    """The application's arguments (`serve run ... key=value`, a config file's `args`).

    export_dir: the hm4sr-export folder (required); num_replicas; num_cpus / num_gpus: each
    replica's Ray resources (fractions allowed); device: where a replica scores ("cuda" when
    num_gpus > 0, else "cpu"); max_batch_size / batch_wait_timeout_s: `@serve.batch`;
    max_ongoing_requests: per replica (default 2 x max_batch_size); max_history: longest history
    accepted; item_chunk_size: the scorer's; verify: check the export's sha256 when loading.
    """

    export_dir: str
    num_replicas: int = 1
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    device: str = ""
    max_batch_size: int = DEFAULT_MAX_BATCH
    batch_wait_timeout_s: float = DEFAULT_BATCH_WAIT_S
    max_ongoing_requests: int = 0
    max_history: int = DEFAULT_MAX_HISTORY
    item_chunk_size: int = DEFAULT_ITEM_CHUNK
    verify: bool = True

    @classmethod
    def from_args(cls, args: dict | None) -> "ServeOptions":
        """From a dict of strings (serve run) or typed values (YAML); ValueError names the key."""
        args = dict(args or {})
        known = {f.name: f for f in fields(cls)}
        unknown = sorted(set(args) - set(known))
        if unknown:
            raise ValueError(f"hm4sr online: unknown argument(s) {unknown}; known: {sorted(known)}")
        if not args.get("export_dir"):
            raise ValueError("hm4sr online: export_dir is required (the hm4sr-export folder), e.g. "
                             "serve run hm4sr_dist.serving.online:app export_dir=/mnt/shared/exports/run")
        typed = {}
        for name, value in args.items():
            kind = type(known[name].default) if name != "export_dir" else str
            typed[name] = _convert(name, value, kind)
        return cls(**typed).check()

    def check(self) -> "ServeOptions":
        problems = [(n, v) for n, v, ok in (
            ("num_replicas", self.num_replicas, self.num_replicas >= 1),
            ("num_cpus", self.num_cpus, self.num_cpus >= 0), ("num_gpus", self.num_gpus, self.num_gpus >= 0),
            ("max_batch_size", self.max_batch_size, self.max_batch_size >= 1),
            ("batch_wait_timeout_s", self.batch_wait_timeout_s, self.batch_wait_timeout_s >= 0),
            ("max_ongoing_requests", self.max_ongoing_requests, self.max_ongoing_requests >= 0),
            ("max_history", self.max_history, self.max_history >= 1),
            ("item_chunk_size", self.item_chunk_size, self.item_chunk_size >= 0)) if not ok]
        if problems:
            raise ValueError(f"hm4sr online: {problems[0][0]} = {problems[0][1]!r} is out of range")
        return self

    @property
    def resolved_device(self) -> str:
        return self.device or ("cuda" if self.num_gpus > 0 else "cpu")


def _convert(name: str, value: Any, kind: type) -> Any:
    try:
        if kind is bool:
            if isinstance(value, bool):
                return value
            if str(value).strip().lower() in _TRUE | _FALSE:
                return str(value).strip().lower() in _TRUE
            raise ValueError
        if kind is int and (isinstance(value, bool) or (isinstance(value, float) and not value.is_integer())):
            raise ValueError
        return kind(value) if kind is not int else int(float(value) if isinstance(value, float) else value)
    except (TypeError, ValueError):
        raise ValueError(f"hm4sr online: {name} = {value!r} is not a {kind.__name__}") from None


def build(options: ServeOptions) -> Application:
    """The bound application of `options`."""
    deployment = OnlineRecommender.options(
        num_replicas=options.num_replicas,
        max_ongoing_requests=options.max_ongoing_requests or 2 * options.max_batch_size,
        ray_actor_options={"num_cpus": options.num_cpus, "num_gpus": options.num_gpus})
    return deployment.bind(options.export_dir, device=options.resolved_device,
                           max_batch_size=options.max_batch_size,
                           batch_wait_timeout_s=options.batch_wait_timeout_s, max_history=options.max_history,
                           item_chunk_size=options.item_chunk_size, verify=options.verify)


def app(args: dict) -> Application:
    """Application builder: `serve run hm4sr_dist.serving.online:app export_dir=/path [key=value ...]`."""
    return build(ServeOptions.from_args(args))


def start(export_dir: str | Path, port: int = 8000, host: str = "127.0.0.1", *, name: str = "hm4sr",
          route_prefix: str = "/", blocking: bool = False, **options: Any) -> str:
    """Serve an export over HTTP at http://host:port<route_prefix>; returns that URL.

    Connects to (or starts) Ray as `serve.start` does; the export is checked before Ray starts
    (ExportError). HTTP options apply when this call starts Serve; a Serve already running keeps
    its own host and port. `options`: the `ServeOptions` fields. blocking=True: runs until
    Ctrl-C (KeyboardInterrupt is raised to the caller)."""
    read_export_manifest(export_dir)
    opts = ServeOptions(export_dir=str(Path(export_dir).resolve()), **options).check()
    serve.start(http_options={"host": host, "port": int(port)})
    serve.run(build(opts), name=name, route_prefix=route_prefix, blocking=blocking)
    return f"http://{host}:{int(port)}{route_prefix.rstrip('/')}"


# -- command line -------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hm4sr-serve",
        description="Serve an hm4sr-export folder on Ray Serve: POST /recommend {history, k, "
                    "exclude_history} -> {items, scores}, GET /healthz, GET /stats. Runs until Ctrl-C.")
    parser.add_argument("export", help="the export folder (hm4sr-export --out)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--replicas", type=int, default=1, help="replicas of the deployment")
    parser.add_argument("--num-cpus", type=float, default=1.0, help="CPUs per replica")
    parser.add_argument("--num-gpus", type=float, default=0.0, help="GPUs per replica (scores on cuda when > 0)")
    parser.add_argument("--max-batch-size", type=int, default=DEFAULT_MAX_BATCH)
    parser.add_argument("--batch-wait-ms", type=float, default=DEFAULT_BATCH_WAIT_S * 1000)
    parser.add_argument("--route-prefix", default="/")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        manifest = read_export_manifest(args.export)
        options = {"num_replicas": args.replicas, "num_cpus": args.num_cpus, "num_gpus": args.num_gpus,
                   "max_batch_size": args.max_batch_size, "batch_wait_timeout_s": args.batch_wait_ms / 1000}
        ServeOptions(export_dir=args.export, **options).check()
    except (ExportError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"serving {args.export} (run {manifest['identity']}, {manifest['n_items']} items) at "
          f"http://{args.host}:{args.port}{args.route_prefix.rstrip('/')}/recommend; Ctrl-C stops")
    try:
        start(args.export, port=args.port, host=args.host, route_prefix=args.route_prefix, blocking=True,
              **options)
    except KeyboardInterrupt:
        pass
    finally:
        serve.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
