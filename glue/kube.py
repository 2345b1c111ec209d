"""A thin JSON-over-HTTP layer on top of the official client's connection setup.

The official ``kubernetes`` package is used only for what it is good at:
reading a kubeconfig or the in-cluster ServiceAccount (with token refresh),
TLS and authentication headers. Requests and responses are plain dicts parsed
by ``json`` with ``preload_content=False``: no generated model objects, so a
list page or a watch event costs exactly its JSON and is dropped as soon as
the few fields we need are extracted.
"""
from __future__ import annotations

import json
import os
from typing import Any, Iterator
from urllib.parse import quote

import urllib3
from kubernetes import client as k8s
from kubernetes import config as k8s_config

JSON_PATCH = "application/json-patch+json"
MERGE_PATCH = "application/merge-patch+json"
JSON = "application/json"


class ApiError(Exception):
    """A non-2xx answer (or a transport failure, status 0)."""

    def __init__(self, status: int, reason: str, body: Any = None):
        self.status = status
        self.reason = reason
        self.body = body
        msg = body.get("message") if isinstance(body, dict) else None
        super().__init__(f"{status} {reason}: {msg or ''}".strip())

    @property
    def conflict(self) -> bool:
        """The object changed under us (``Kube.json_patch`` maps a failed guard to 409)."""
        return self.status == 409


def load_api_client(kubeconfig: str | None = None) -> k8s.ApiClient:
    """kubeconfig if given (or $KUBECONFIG), else in-cluster, else ~/.kube/config."""
    if kubeconfig:
        return k8s_config.new_client_from_config(kubeconfig)
    if os.environ.get("KUBERNETES_SERVICE_HOST"):
        cfg = k8s.Configuration()
        k8s_config.load_incluster_config(client_configuration=cfg)
        return k8s.ApiClient(cfg)
    return k8s_config.new_client_from_config()


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


def pipelineruns(namespace: str, name: str | None = None) -> str:
    return path("tekton.dev", "v1", "pipelineruns", namespace, name)


def events(namespace: str) -> str:
    return path("", "v1", "events", namespace)


def configmap(namespace: str, name: str) -> str:
    return path("", "v1", "configmaps", namespace, name)


class Kube:
    """Synchronous, thread-safe (urllib3 pool) access to the API server."""

    def __init__(self, api_client: k8s.ApiClient, timeout: float = 30.0):
        self.api = api_client
        self.timeout = timeout
        # The pool is shared by every worker thread and the watches.
        self.api.rest_client.pool_manager.connection_pool_kw["maxsize"] = max(
            self.api.rest_client.pool_manager.connection_pool_kw.get("maxsize") or 1, 16)

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
        return ApiError(resp.status, resp.reason or "", body)

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
        """The object, or None on 404."""
        try:
            return self.request("GET", p)
        except ApiError as e:
            if e.status == 404:
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
        """JSON patch; a failed leading ``test`` of resourceVersion is reported as 409.

        The API server answers a failed ``test`` op with a bare 422 ("the server
        rejected our request due to an error in our request"), which names
        neither the op nor the field; re-reading tells a stale version apart
        from a really invalid patch.
        """
        try:
            return self.request("PATCH", p, body=ops, content_type=JSON_PATCH)
        except ApiError as e:
            guard = ops[0] if ops and ops[0].get("op") == "test" \
                and ops[0].get("path") == "/metadata/resourceVersion" else None
            if e.status != 422 or guard is None:
                raise
            current = self.get(p)
            if current is not None and \
                    current.get("metadata", {}).get("resourceVersion") == guard.get("value"):
                raise
            raise ApiError(409, "Conflict", {"message": "object changed since it was read"}) from e

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
            if e.status == 404 or (e.status == 409 and uid):
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

    def watch(self, p: str, query: dict, timeout_seconds: int) -> Iterator[dict]:
        """Stream watch events (dicts) until the server closes the stream.

        Raises ApiError for an HTTP error at start (410 included) or a broken
        connection; an ``ERROR`` event is yielded as is for the caller to judge.
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
                buf += chunk
                while True:
                    nl = buf.find(b"\n")
                    if nl < 0:
                        break
                    line, buf = buf[:nl], buf[nl + 1:]
                    if line.strip():
                        yield json.loads(line)
            finished = True
        except (urllib3.exceptions.HTTPError, OSError) as e:
            raise ApiError(0, type(e).__name__, {"message": str(e)}) from e
        finally:
            if not finished:  # abandoned mid-stream: never hand a half-read socket back
                resp.close()
            resp.release_conn()
