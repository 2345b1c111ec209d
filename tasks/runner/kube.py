"""Kubernetes access for the runner: in-cluster config in a pod, KUBECONFIG elsewhere.

Every call the runner makes goes through the typed clients here, and this is
the one place transient API failures are retried: 429 (honouring its
Retry-After), 500/502/503/504, a request timeout, a refused, reset or dropped
connection. Each retry waits a capped exponential backoff with full jitter
(``BACKOFF_BASE`` doubling up to ``BACKOFF_CAP`` seconds; a Retry-After is
waited in full, up to ``RETRY_AFTER_CAP``) until ``RETRY_BUDGET`` seconds
have passed, then the last error is raised. Every request carries a timeout
(``REQUEST_TIMEOUT``), so a stalled API server is a retried failure, not a
hung Task. So a flaky API server delays provisioning; it never turns into an
error secret.

Retries include POST, PATCH and DELETE. A delete retried after a lost answer
gets 404 (callers treat 404 as done). A create retried after a lost answer
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
import os
import random
import time
from dataclasses import dataclass
from functools import cached_property
from http.client import HTTPException

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


def transient(e: BaseException) -> bool:
    """Whether ``e`` is an API failure worth retrying."""
    if isinstance(e, client.ApiException):
        return e.status in RETRY_STATUSES
    return isinstance(e, (urllib3.exceptions.HTTPError, HTTPException, ConnectionError,
                          TimeoutError))


def backoff(attempt: int) -> float:
    """Full jitter over a capped exponential: uniform(0, min(cap, base * 2**attempt))."""
    return random.uniform(0, min(BACKOFF_CAP, BACKOFF_BASE * 2 ** attempt))


def call(fn, *args, **kwargs):
    """``fn(*args, **kwargs)`` with transient failures retried (see module docstring)."""
    kwargs.setdefault("_request_timeout", REQUEST_TIMEOUT)
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
        return functools.partial(call, attr)


@dataclass
class Kube:
    api: client.ApiClient

    @classmethod
    def connect(cls) -> "Kube":
        if os.environ.get("KUBERNETES_SERVICE_HOST") and not os.environ.get("KUBECONFIG"):
            config.load_incluster_config()
            return cls(client.ApiClient())
        return cls(config.new_client_from_config(os.environ.get("KUBECONFIG")))

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
        try:
            return self.custom.get_namespaced_custom_object(
                "tekton.dev", "v1", namespace, "taskruns", name)
        except client.ApiException as e:
            if e.status == 404:
                return None
            raise
