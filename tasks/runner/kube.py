"""mpc's one Kubernetes access layer, for the runner and the watcher alike.

One connection setup (``Kube.connect``: a kubeconfig if given or $KUBECONFIG, else
the in-cluster ServiceAccount), one error type for the API's answers
(``client.ApiException``; ``ApiError`` is the one the JSON verbs raise), one
retry policy (``call``). Two ways to make a request over that one connection:

* the official client's typed APIs (``Kube.core``, ``Kube.leases``,
  ``Kube.custom``), which the runner uses, each call retried through ``call``;
* plain JSON verbs (``Kube.get``/``create``/``json_patch``/``merge_patch``/
  ``delete``/``list_pages``/``watch``): request and response are dicts parsed by
  ``json`` with ``preload_content=False``, no generated model objects, so a list
  page or a watch event costs exactly its JSON. The watcher uses these: every
  TaskRun of the cluster passes through its watch, where the official client's
  ``watch.Watch`` costs 1.9x the CPU (docs/performance.md). They do not retry:
  the watcher's work queue retries the whole reconcile, from the newer state its
  watches bring.

Typed calls go through ``call``, the one place transient API failures are retried: 429 (honouring its
Retry-After), 500/502/503/504, a request timeout, a refused, reset or dropped
connection. Each retry waits a capped exponential backoff with full jitter
(``BACKOFF_BASE`` doubling up to ``BACKOFF_CAP`` seconds; a Retry-After is
waited in full, up to ``RETRY_AFTER_CAP``) until ``RETRY_BUDGET`` seconds
have passed, then the last error is raised. Every request carries a timeout
(``REQUEST_TIMEOUT``), so a stalled API server is a retried failure, not a
hung Task. So a flaky API server delays provisioning; it never turns into an
error secret.

Retries include POST, PATCH and DELETE. A delete retried after a lost answer
gets 404 (callers treat 404 as done; only a 404 that names the object, see
``object_missing``: one about the path is retried). A create retried after a lost answer
(connection dropped or timed out after the request was sent, a 5xx from a
proxy) may meet the object the first attempt made: 409. Every creating
caller treats 409 by reading what exists: ``Slots.try_take`` keeps a slot
held by its own build, ``Slots.enqueue`` keeps its place, ``hostkeys.record``
uses the recorded key, ``buildsecret.write`` replaces its own secret, an
Event already posted is fine. The runner's patches are merge patches of
fixed values or test-only JSON patches: repeating them is harmless.
"""
from __future__ import annotations

import functools
import json
import os
import random
import re
import time
from dataclasses import dataclass
from functools import cached_property
from http.client import HTTPException
from typing import Any, Callable, Iterator
from urllib.parse import quote

import urllib3
from kubernetes import client, config

from . import log

RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})
BACKOFF_BASE = 0.2
BACKOFF_CAP = 10.0
RETRY_AFTER_CAP = 30.0
RETRY_BUDGET = 180.0
REQUEST_TIMEOUT = (10.0, 60.0)     # connect, read


def _retry_after(e: client.ApiException) -> float | None:
    value = (e.headers or {}).get("Retry-After") if e.status == 429 else None
    try:
        return min(RETRY_AFTER_CAP, max(0.0, float(value))) if value is not None else None
    except ValueError:
        return None


def object_missing(e: BaseException) -> bool:
    """Whether ``e`` is a 404 that says *the object* does not exist: the API server's Status
    names it (``details.name``). A 404 without that is about the path: an API server that
    has just restarted answers plain "404 page not found" for a custom resource type
    (a TaskRun, a PipelineRun) until it has loaded the type's definition, and that says
    nothing about the object; reading it as "deleted" would release a live build."""
    if not isinstance(e, client.ApiException) or e.status != 404:
        return False
    body = e.body
    if isinstance(body, (str, bytes)):
        try:
            body = json.loads(body)
        except ValueError:
            return False
    details = body.get("details") if isinstance(body, dict) else None
    return isinstance(details, dict) and bool(details.get("name"))


def transient(e: BaseException) -> bool:
    """Whether ``e`` is an API failure worth retrying (a 404 that names no object too)."""
    if isinstance(e, client.ApiException):
        return (e.status in RETRY_STATUSES or e.status == 0     # 0: ApiError's transport failure
                or (e.status == 404 and not object_missing(e)))
    return isinstance(e, (urllib3.exceptions.HTTPError, HTTPException, ConnectionError,
                          TimeoutError))


def backoff(attempt: int) -> float:
    """Full jitter over a capped exponential: uniform(0, min(cap, base * 2**attempt))."""
    return random.uniform(0, min(BACKOFF_CAP, BACKOFF_BASE * 2 ** attempt))


def call(fn, *args, **kwargs):
    """``fn(*args, **kwargs)`` with transient failures retried (see module docstring)."""
    give_up = time.monotonic() + RETRY_BUDGET
    attempt = 0
    while True:
        try:
            return fn(*args, **kwargs)
        except Exception as e:      # noqa: BLE001 - filtered by transient()
            if not transient(e):
                raise
            wait = backoff(attempt)
            if isinstance(e, client.ApiException):
                wait = max(wait, _retry_after(e) or 0.0)
            if time.monotonic() + wait > give_up:
                raise
            attempt += 1
            log.event("transient API error; retrying", level="warning",
                      call=getattr(fn, "__name__", "?"), attempt=attempt,
                      error=_describe(e), wait=round(wait, 2))
            time.sleep(wait)


def _describe(e: BaseException) -> str:
    if isinstance(e, client.ApiException):
        return f"{e.status} {e.reason}"
    return f"{type(e).__name__}: {e}"[:300]


class Retrying:
    """A typed API client whose every method call goes through ``call``."""

    def __init__(self, api):
        self._api = api

    def __getattr__(self, name: str):
        attr = getattr(self._api, name)
        if not callable(attr) or name.startswith("_"):
            return attr
        return functools.partial(call, attr, _request_timeout=REQUEST_TIMEOUT)


JSON_PATCH = "application/json-patch+json"
MERGE_PATCH = "application/merge-patch+json"
JSON = "application/json"


class ApiError(client.ApiException):
    """A non-2xx answer of a JSON verb (or a transport failure, status 0); ``body`` is
    the parsed Status object."""

    def __init__(self, status: int, reason: str, body: Any = None, headers=None):
        super().__init__(status, reason, body=body)
        self.headers = headers          # a 429's Retry-After is honoured by ``call``

    def __str__(self) -> str:
        msg = self.body.get("message") if isinstance(self.body, dict) else None
        return f"{self.status} {self.reason}: {msg or ''}".strip()

    @property
    def conflict(self) -> bool:
        """The object changed under us (a guarded patch of a newer version)."""
        return self.status == 409


def path(group: str, version: str, plural: str, namespace: str | None = None,
         name: str | None = None, sub: str | None = None) -> str:
    p = "/api/" + version if not group else f"/apis/{group}/{version}"
    if namespace:
        p += "/namespaces/" + quote(namespace, safe="")
    p += "/" + plural
    if name:
        p += "/" + quote(name, safe="")
    if sub:
        p += "/" + sub
    return p


def taskruns(namespace: str | None = None, name: str | None = None) -> str:
    return path("tekton.dev", "v1", "taskruns", namespace, name)


def pipelineruns(namespace: str | None = None, name: str | None = None) -> str:
    return path("tekton.dev", "v1", "pipelineruns", namespace, name)


def events(namespace: str) -> str:
    return path("", "v1", "events", namespace)


def configmap(namespace: str, name: str) -> str:
    return path("", "v1", "configmaps", namespace, name)


@dataclass
class Kube:
    """Thread-safe (one urllib3 pool, shared by every worker thread and watch)."""

    api: client.ApiClient
    timeout: float = 30.0           # the JSON verbs' bound; watches have their own

    def __post_init__(self) -> None:
        kw = self.api.rest_client.pool_manager.connection_pool_kw
        kw["maxsize"] = max(kw.get("maxsize") or 1, 16)

    @classmethod
    def connect(cls, kubeconfig: str | None = None) -> "Kube":
        """``kubeconfig`` (else $KUBECONFIG) if set, else the in-cluster ServiceAccount
        (token refreshed by the client), else ~/.kube/config."""
        kubeconfig = kubeconfig or os.environ.get("KUBECONFIG")
        if kubeconfig or not os.environ.get("KUBERNETES_SERVICE_HOST"):
            return cls(config.new_client_from_config(kubeconfig))
        cfg = client.Configuration()
        config.load_incluster_config(client_configuration=cfg)
        return cls(client.ApiClient(cfg))

    @cached_property
    def core(self) -> client.CoreV1Api:
        return Retrying(client.CoreV1Api(self.api))

    @cached_property
    def leases(self) -> client.CoordinationV1Api:
        return Retrying(client.CoordinationV1Api(self.api))

    @cached_property
    def custom(self) -> client.CustomObjectsApi:
        return Retrying(client.CustomObjectsApi(self.api))

    def taskrun(self, namespace: str, name: str) -> dict | None:
        """The TaskRun, or None if there is none (retried like a typed call)."""
        return call(self.get, taskruns(namespace, name))

    def pipelinerun(self, namespace: str, name: str) -> dict | None:
        """The PipelineRun, or None if there is none (retried like a typed call)."""
        return call(self.get, pipelineruns(namespace, name))

    # --- JSON verbs ----------------------------------------------------------------
    def _open(self, method: str, p: str, query: dict | None = None, body: Any = None,
              content_type: str = JSON, timeout: Any = None) -> urllib3.BaseHTTPResponse:
        headers = {"Accept": JSON}
        if body is not None:
            headers["Content-Type"] = content_type
        q = [(k, v) for k, v in (query or {}).items() if v is not None]
        _, url, headers, _, _ = self.api.param_serialize(
            method, p, query_params=q, header_params=headers, auth_settings=["BearerToken"])
        try:
            return self.api.rest_client.pool_manager.request(
                method, url, headers=headers, preload_content=False,
                body=json.dumps(body) if body is not None else None,
                timeout=timeout if timeout is not None else urllib3.Timeout(total=self.timeout),
                retries=False)
        except urllib3.exceptions.HTTPError as e:
            raise ApiError(0, type(e).__name__, {"message": str(e)}) from e

    @staticmethod
    def _error(resp: urllib3.BaseHTTPResponse) -> ApiError:
        raw = resp.read()
        resp.release_conn()
        try:
            body = json.loads(raw)
        except ValueError:
            body = {"message": raw[:500].decode(errors="replace")}
        return ApiError(resp.status, resp.reason or "", body, resp.headers)

    def request(self, method: str, p: str, query: dict | None = None, body: Any = None,
                content_type: str = JSON) -> dict:
        resp = self._open(method, p, query, body, content_type)
        if resp.status >= 400:
            raise self._error(resp)
        try:
            raw = resp.read()
        except urllib3.exceptions.HTTPError as e:
            raise ApiError(0, type(e).__name__, {"message": str(e)}) from e
        finally:
            resp.release_conn()
        return json.loads(raw) if raw else {}

    # --- verbs ------------------------------------------------------------------
    def get(self, p: str) -> dict | None:
        """The object, or None if the API server says it does not exist (``object_missing``)."""
        try:
            return self.request("GET", p)
        except ApiError as e:
            if object_missing(e):
                return None
            raise

    def create(self, p: str, body: dict) -> dict | None:
        """Create; None if it already exists (deterministic names make that 'done')."""
        try:
            return self.request("POST", p, body=body)
        except ApiError as e:
            if e.status == 409 and (e.body or {}).get("reason") == "AlreadyExists":
                return None
            raise

    def json_patch(self, p: str, ops: list[dict]) -> dict:
        """JSON patch. Guard it with a ``replace`` of /metadata/resourceVersion
        (``mpc.glue.objects``): a stale version is then a 409 Conflict."""
        return self.request("PATCH", p, body=ops, content_type=JSON_PATCH)

    def merge_patch(self, p: str, body: dict) -> dict:
        return self.request("PATCH", p, body=body, content_type=MERGE_PATCH)

    def delete(self, p: str, uid: str | None = None) -> bool:
        """Delete (background propagation, optionally only if the uid still matches).

        True if deleted now, False if it was already gone.
        """
        body: dict = {"kind": "DeleteOptions", "apiVersion": "v1",
                      "propagationPolicy": "Background"}
        if uid:
            body["preconditions"] = {"uid": uid}
        try:
            self.request("DELETE", p, body=body)
            return True
        except ApiError as e:
            if object_missing(e) or (e.status == 409 and uid):
                return False
            raise

    def list_pages(self, p: str, query: dict | None = None,
                   page_size: int = 100) -> Iterator[tuple[list[dict], str]]:
        """Yield (items, resourceVersion) page by page; only one page is alive at a time."""
        token = None
        while True:
            q = dict(query or {}, limit=page_size)
            if token:
                q["continue"] = token
            page = self.request("GET", p, q)
            md = page.get("metadata") or {}
            items = page.get("items") or []
            del page
            yield items, md.get("resourceVersion", "")
            token = md.get("continue")
            if not token:
                return

    def watch(self, p: str, query: dict, timeout_seconds: int,
              wanted: Callable[[bytes], bool] | None = None) -> Iterator[dict]:
        """Stream watch events (dicts) until the server closes the stream.

        Raises ApiError for an HTTP error at start (410 included) or a broken
        connection; an ``ERROR`` event is yielded as is for the caller to judge.

        ``wanted(line)``, if given, sees each ADDED/MODIFIED/DELETED event as raw bytes
        first; an event it does not want is not decoded: it is yielded as
        ``{"type": ..., "object": {"metadata": {"resourceVersion": ...}}}``, all a
        watch needs to resume from it.
        """
        q = dict(query, watch="true", allowWatchBookmarks="true",
                 timeoutSeconds=timeout_seconds)
        resp = self._open("GET", p, q, timeout=urllib3.Timeout(
            connect=self.timeout, read=timeout_seconds + 30))
        if resp.status >= 400:
            raise self._error(resp)
        buf = b""
        finished = False
        try:
            for chunk in resp.stream(64 * 1024, decode_content=True):
                *lines, buf = (buf + chunk).split(b"\n")
                for line in lines:
                    if not line.strip():
                        continue
                    skip = wanted is not None and _skippable(line, wanted)
                    yield skip or json.loads(line)
            finished = True
        except (urllib3.exceptions.HTTPError, OSError) as e:
            raise ApiError(0, type(e).__name__, {"message": str(e)}) from e
        finally:
            if not finished:  # abandoned mid-stream: never hand a half-read socket back
                resp.close()
            resp.release_conn()


# A watch event starts with its type (a struct's first field). Where its object's keys
# come (a CRD's are sorted: annotations and labels before resourceVersion) does not
# matter: an event is only left undecoded when the key "resourceVersion" occurs once, so
# it is the metadata's own (the API server always sets it), never a label's or an
# annotation's of the same name (then it is decoded as usual).
_EVENT_HEAD = re.compile(rb'\{"type":"(ADDED|MODIFIED|DELETED)","object":')
_RV_KEY = b'"resourceVersion":"'


def _skippable(line: bytes, wanted: Callable[[bytes], bool]) -> dict | None:
    """The stub of an event ``wanted`` does not want, else None (decode it)."""
    head = _EVENT_HEAD.match(line)
    if head is None or wanted(line) or line.count(_RV_KEY) != 1:
        return None
    start = line.index(_RV_KEY) + len(_RV_KEY)
    rv = line[start:line.index(b'"', start)].decode()
    return {"type": head.group(1).decode(), "object": {"metadata": {"resourceVersion": rv}}}
