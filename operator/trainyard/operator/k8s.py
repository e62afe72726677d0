"""The only module that talks to the Kubernetes API, through `kubernetes_asyncio`.

kubernetes_asyncio (the maintained async port of the official client) owns the
connection: kubeconfig and in-cluster credentials, TLS, token refresh, proxies. What it
lacks is what an operator needs on top, kept here: idempotent writes, retries,
a raw-dict watch and informers. Every write is idempotent: creating a child that exists
is fine (409 AlreadyExists), deleting one that is gone is fine (404), and the status is
patched only when it changed, with the resourceVersion the plan was computed from (409
Conflict means the object moved on meanwhile; the caller reconciles again). Throttling
and transient server errors (429, 5xx, dropped connections) are retried with backoff,
honouring Retry-After. Objects stay plain dicts: the generated models would cost a
parse per watch event and drop fields the reconcile reads.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import aiohttp
from kubernetes_asyncio import client as kube_client
from kubernetes_asyncio import config as kube_config
from kubernetes_asyncio.config.config_exception import ConfigException

from trainyard.api.base import API_VERSION
from trainyard.operator.plan import ChildRef, Plan

logger = logging.getLogger("trainyard.operator.k8s")

# kind → (URL prefix, plural): the children the operator makes, the owners, kopf's peerings.
RESOURCES: dict[str, tuple[str, str]] = {
    "ConfigMap": ("/api/v1", "configmaps"),
    "Service": ("/api/v1", "services"),
    "Pod": ("/api/v1", "pods"),
    "Job": ("/apis/batch/v1", "jobs"),
    "Deployment": ("/apis/apps/v1", "deployments"),
    "Event": ("/api/v1", "events"),  # a PromotionGate's decision, announced
    "TrainingRun": (f"/apis/{API_VERSION}", "trainingruns"),
    "PromotionGate": (f"/apis/{API_VERSION}", "promotiongates"),
    "TrainingPipeline": (f"/apis/{API_VERSION}", "trainingpipelines"),
    "InferenceServer": (f"/apis/{API_VERSION}", "inferenceservers"),
    # kopf serves its peering in whichever of its two groups exists (kopf.dev, zalando.org).
    "KopfPeering": ("/apis/kopf.dev/v1", "kopfpeerings"),
    "ClusterKopfPeering": ("/apis/kopf.dev/v1", "clusterkopfpeerings"),
    "ZalandoKopfPeering": ("/apis/zalando.org/v1", "kopfpeerings"),
    "ZalandoClusterKopfPeering": ("/apis/zalando.org/v1", "clusterkopfpeerings"),
}
RETRIED_STATUSES = frozenset({429, 500, 502, 503, 504})


class ApiError(Exception):
    """A Kubernetes API answer that is neither success nor an idempotent no-op."""

    def __init__(self, verb: str, path: str, status: int, reason: str, message: str):
        super().__init__(f"{verb} {path}: {status} {reason}: {message}")
        self.verb, self.path, self.status, self.reason, self.message = (
            verb,
            path,
            status,
            reason,
            message,
        )


class Conflict(ApiError):
    """The object changed since it was read (optimistic concurrency)."""


@dataclass(frozen=True)
class ApiSettings:
    """Timeouts and the retry schedule of one client."""

    request_timeout: float = 30.0
    connect_timeout: float = 5.0
    backoffs: tuple[float, ...] = (0.1, 0.2, 0.5, 1.0, 2.0, 4.0)
    max_retry_after: float = 10.0
    pool_size: int = 64


def collection_path(kind: str, namespace: str | None) -> str:
    """The collection URL; namespace None for all namespaces (or a cluster-scoped kind)."""
    prefix, plural = RESOURCES[kind]
    return f"{prefix}/namespaces/{namespace}/{plural}" if namespace else f"{prefix}/{plural}"


def object_path(kind: str, namespace: str | None, name: str) -> str:
    return f"{collection_path(kind, namespace)}/{name}"


async def load_configuration(server: str | None = None) -> kube_client.Configuration:
    """Credentials as kubectl finds them: `server` without credentials (development and
    tests), else the pod's service account, else the kubeconfig (KUBECONFIG, ~/.kube/config)."""
    configuration = kube_client.Configuration()
    if server:
        configuration.host = server.rstrip("/")
        configuration.verify_ssl = not server.startswith("http://")
        return configuration
    try:
        kube_config.load_incluster_config(client_configuration=configuration)
    except ConfigException:
        await kube_config.load_kube_config(client_configuration=configuration)
    return configuration


class KubeClient:
    """The operator's requests and watches, on a kubernetes_asyncio `ApiClient`."""

    def __init__(
        self,
        configuration: kube_client.Configuration,
        settings: ApiSettings | None = None,
        on_api_error: Callable[[str, int], None] | None = None,
    ):
        self.configuration = configuration
        self.configuration.connection_pool_maxsize = (settings or ApiSettings()).pool_size
        self.settings = settings or ApiSettings()
        self.on_api_error = on_api_error
        self.user_agent: str | None = None
        self._api: kube_client.ApiClient | None = None
        self._timeout = aiohttp.ClientTimeout(
            total=self.settings.request_timeout, connect=self.settings.connect_timeout
        )

    @property
    def server(self) -> str:
        return str(self.configuration.host).rstrip("/")

    async def __aenter__(self) -> KubeClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def _client(self) -> kube_client.ApiClient:
        if self._api is None:
            self._api = kube_client.ApiClient(self.configuration)
            if self.user_agent:
                self._api.user_agent = self.user_agent
        return self._api

    async def close(self) -> None:
        if self._api is not None:
            await self._api.close()
            self._api = None

    async def open(
        self,
        method: str,
        path: str,
        *,
        json: Any = None,
        params: dict[str, str] | None = None,
        content_type: str = "application/json",
        timeout: aiohttp.ClientTimeout | None = None,
    ) -> aiohttp.ClientResponse:
        """One raw request through the client's session, credentials and TLS; the caller
        reads and releases the response (watches stream it).

        The REST layer of kubernetes_asyncio directly, with its own auth (token refresh
        included): `ApiClient.call_api` would walk every body through
        `sanitize_for_serialization`, which costs more than the request for plain dicts.
        """
        api = self._client()
        headers = {
            **api.default_headers,
            "Content-Type": content_type,
            "Accept": "application/json",
        }
        await api.update_params_for_auth(headers, None, ["BearerToken"])
        return await api.rest_client.request(
            method,
            self.server + path,
            query_params=params or None,
            headers=headers,
            body=json,
            _preload_content=False,
            _request_timeout=timeout or self._timeout,
        )

    async def request(
        self,
        verb: str,
        method: str,
        path: str,
        *,
        json: Any = None,
        params: dict[str, str] | None = None,
        content_type: str = "application/json",
        accept: Iterable[int] = (),
    ) -> tuple[int, dict[str, Any]]:
        """One API call with retries; returns (status, body) for success or an accepted status."""
        delays = list(self.settings.backoffs)
        while True:
            try:
                response = await self.open(
                    method, path, json=json, params=params, content_type=content_type
                )
                async with response:
                    status = response.status
                    body = (
                        await response.json(content_type=None)
                        if response.content_length != 0
                        else {}
                    )
                    retry_after = response.headers.get("Retry-After")
            except (TimeoutError, aiohttp.ClientConnectionError) as error:
                if not delays:
                    raise ApiError(verb, path, 0, type(error).__name__, str(error)) from error
                self._count_error(verb, 0)
                await asyncio.sleep(delays.pop(0))
                continue
            body = body if isinstance(body, dict) else {}
            if status < 300 or status in accept:
                return status, body
            self._count_error(verb, status)
            if status in RETRIED_STATUSES and delays:
                delay = delays.pop(0)
                if retry_after and retry_after.isdigit():
                    delay = max(delay, min(float(retry_after), self.settings.max_retry_after))
                logger.debug("%s %s: %s, retrying in %.1fs", verb, path, status, delay)
                await asyncio.sleep(delay)
                continue
            error_class = Conflict if status == 409 else ApiError
            raise error_class(verb, path, status, body.get("reason", ""), body.get("message", ""))

    def _count_error(self, verb: str, status: int) -> None:
        if self.on_api_error is not None:
            self.on_api_error(verb, status)

    async def create(self, manifest: dict[str, Any], namespace: str) -> bool:
        """Create unless it exists; True when this call created it."""
        status, _ = await self.request(
            "create",
            "POST",
            collection_path(manifest["kind"], namespace),
            json=manifest,
            accept=(409,),
        )
        return status != 409

    async def replace(self, manifest: dict[str, Any], namespace: str) -> bool:
        """Replace a child whole (PUT, unconditional: the operator renders all of it); False
        when it is gone (the next reconcile creates it)."""
        meta = manifest["metadata"]
        status, _ = await self.request(
            "update",
            "PUT",
            object_path(manifest["kind"], namespace, meta["name"]),
            json=manifest,
            accept=(404,),
        )
        return status != 404

    async def delete(self, ref: ChildRef, namespace: str) -> bool:
        """Delete (dependents in the background) unless gone; True when this call deleted it."""
        status, _ = await self.request(
            "delete",
            "DELETE",
            object_path(ref.kind, namespace, ref.name),
            json={"kind": "DeleteOptions", "apiVersion": "v1", "propagationPolicy": "Background"},
            accept=(404,),
        )
        return status != 404

    async def patch_status(
        self,
        kind: str,
        namespace: str,
        name: str,
        status: dict[str, Any],
        resource_version: str | None,
    ) -> dict[str, Any]:
        """Merge-patch the status subresource; Conflict when the object moved past `resource_version`."""
        body: dict[str, Any] = {"status": status}
        if resource_version:
            body["metadata"] = {"resourceVersion": resource_version}
        _, result = await self.request(
            "patch",
            "PATCH",
            object_path(kind, namespace, name) + "/status",
            json=body,
            content_type="application/merge-patch+json",
        )
        return result

    async def list(
        self, kind: str, namespace: str, label_selector: str | None = None
    ) -> list[dict[str, Any]]:
        params = {"labelSelector": label_selector} if label_selector else None
        _, body = await self.request("list", "GET", collection_path(kind, namespace), params=params)
        kind_items = body.get("items") or []
        for item in kind_items:  # lists leave kind/apiVersion out of their items
            item.setdefault("kind", kind)
        return kind_items

    async def get(self, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        status, body = await self.request(
            "get", "GET", object_path(kind, namespace, name), accept=(404,)
        )
        return None if status == 404 else body


@dataclass(frozen=True)
class Applied:
    """What one plan did."""

    status: dict[str, Any] | None
    resource_version: str | None
    deleted: int
    created: int
    updated: int = 0


async def apply_plan(
    client: KubeClient,
    plan: Plan,
    *,
    kind: str,
    namespace: str,
    name: str,
    resource_version: str | None,
) -> Applied:
    """Carry out a plan: status first, then deletes, then creates, then updates (see plan.py)."""
    new_body = None
    if plan.status_patch is not None:
        new_body = await client.patch_status(
            kind, namespace, name, plan.status_patch, resource_version
        )
    deleted = sum(await asyncio.gather(*(client.delete(ref, namespace) for ref in plan.deletes)))
    # The Job goes last: its pods mount the ConfigMap and resolve each other through the Service.
    first = [m for m in plan.creates if m.get("kind") != "Job"]
    last = [m for m in plan.creates if m.get("kind") == "Job"]
    created = 0
    for batch in (first, last):
        created += sum(await asyncio.gather(*(client.create(m, namespace) for m in batch)))
    updated = sum(await asyncio.gather(*(client.replace(m, namespace) for m in plan.updates)))
    return Applied(
        new_body.get("status") if new_body else None,
        (new_body or {}).get("metadata", {}).get("resourceVersion"),
        deleted,
        created,
        updated,
    )


class Informer:
    """A label-selected LIST + WATCH of one kind, kept in memory by (namespace, label value).

    The operator's view of the children it made (what client-go calls an informer). It
    lists once, then watches from the list's resourceVersion; a watch that ends is
    re-opened from the last version seen, one answered 410 Gone (history compacted) makes
    it list again, and a watch silent for `client_timeout` is considered dead and
    re-opened. `transform` trims each object to what the reconcile reads; `on_change(kind,
    entry, added)` hears every change (added: first seen).
    """

    def __init__(
        self,
        client: KubeClient,
        kind: str,
        namespace: str | None,
        label: str | None,
        transform: Callable[[str, dict[str, Any]], dict[str, Any]],
        *,
        server_timeout: float = 300.0,
        client_timeout: float = 330.0,
        backoff: float = 0.5,
        absent_relist: float = 30.0,
        on_change: Callable[[str, dict[str, Any], bool], None] | None = None,
        on_restart: Callable[[], None] | None = None,
        on_synced: Callable[[], None] | None = None,
    ):
        self.client, self.kind, self.namespace, self.label, self.transform = (
            client,
            kind,
            namespace,
            label,
            transform,
        )
        self.server_timeout, self.client_timeout, self.backoff = (
            server_timeout,
            client_timeout,
            backoff,
        )
        self.absent_relist = absent_relist  # how often a kind not served is listed again
        self.on_change, self.on_restart, self.on_synced = on_change, on_restart, on_synced
        self.synced = asyncio.Event()
        self._by_key: dict[tuple[str, str], dict[str, dict[str, Any]]] = {}
        self._version: str | None = None

    def get(self, namespace: str, label_value: str) -> list[dict[str, Any]]:
        """Objects whose label (or, without a label, whose name) is `label_value`."""
        return list(self._by_key.get((namespace, label_value), {}).values())

    def all(self) -> list[dict[str, Any]]:
        return [obj for objects in list(self._by_key.values()) for obj in objects.values()]

    def _key_value(self, meta: dict[str, Any]) -> str | None:
        return (meta.get("labels") or {}).get(self.label) if self.label else meta.get("name")

    def _put(self, obj: dict[str, Any]) -> None:
        meta = obj.get("metadata") or {}
        value = self._key_value(meta)
        if value is not None:
            entry = self.transform(self.kind, obj)
            objects = self._by_key.setdefault((meta.get("namespace", ""), value), {})
            added = meta["name"] not in objects
            objects[meta["name"]] = entry
            if self.on_change is not None:
                self.on_change(self.kind, entry, added)

    def _drop(self, obj: dict[str, Any]) -> None:
        meta = obj.get("metadata") or {}
        key = (meta.get("namespace", ""), self._key_value(meta))
        objects = self._by_key.get(key)  # type: ignore[arg-type]
        if objects is not None:
            objects.pop(meta.get("name"), None)
            if not objects:
                del self._by_key[key]  # type: ignore[arg-type]
        if self.on_change is not None:
            self.on_change(self.kind, self.transform(self.kind, obj), False)

    async def run(self) -> None:
        """List and watch until cancelled."""
        while True:
            try:
                if self._version is None and not await self._list():
                    # Not served here (an optional CRD): nothing to watch; look again later.
                    await asyncio.sleep(self.absent_relist)
                    continue
                await self._watch()
            except asyncio.CancelledError:
                raise
            except Exception as error:  # a watch must outlive anything one stream does
                log = (
                    logger.info
                    if isinstance(error, ApiError | aiohttp.ClientError | TimeoutError | ValueError)
                    else logger.exception
                )
                log(
                    "watch of %s in %s interrupted (%s); re-watching",
                    self.kind,
                    self.namespace or "all namespaces",
                    error,
                )
                await asyncio.sleep(self.backoff)
            if self.on_restart is not None:
                self.on_restart()

    async def _list(self) -> bool:
        """List into the cache; False when the kind is not served (an empty, synced cache)."""
        params = {"labelSelector": self.label} if self.label else None
        status, body = await self.client.request(
            "list", "GET", collection_path(self.kind, self.namespace), params=params, accept=(404,)
        )
        if status == 404:
            self._by_key.clear()
            self._set_synced()
            return False
        before = {
            (ns, name): obj
            for (ns, _), objects in self._by_key.items()
            for name, obj in objects.items()
        }
        self._by_key.clear()
        for item in body.get("items") or []:
            item.setdefault("kind", self.kind)
            before.pop(
                ((item.get("metadata") or {}).get("namespace", ""), item["metadata"]["name"]), None
            )
            self._put(item)
        if self.on_change is not None:  # deleted while nobody watched: their owners look again
            for gone in before.values():
                self.on_change(self.kind, gone, False)
        self._version = (body.get("metadata") or {}).get("resourceVersion")
        self._set_synced()
        return True

    def _set_synced(self) -> None:
        self.synced.set()
        if self.on_synced is not None:
            self.on_synced()

    async def _watch(self) -> None:
        params = {
            "watch": "true",
            "resourceVersion": self._version or "",
            "timeoutSeconds": str(int(self.server_timeout)),
            "allowWatchBookmarks": "true",
        }
        if self.label:
            params["labelSelector"] = self.label
        url = collection_path(self.kind, self.namespace)
        # sock_read: no byte for this long means the stream is dead, not just quiet
        timeout = aiohttp.ClientTimeout(
            total=None, sock_read=self.client_timeout, connect=self.client.settings.connect_timeout
        )
        async with await self.client.open("GET", url, params=params, timeout=timeout) as response:
            if response.status == 410:
                self._version = None
                return
            if response.status >= 300:
                raise ApiError(
                    "watch", url, response.status, response.reason or "", await response.text()
                )
            async for line in response.content:
                if not line.strip():
                    continue
                event = json.loads(line)
                obj = event.get("object") or {}
                kind = event.get("type")
                if kind == "ERROR":
                    if obj.get("code") == 410:
                        self._version = None  # compacted: list again
                    return
                self._version = (obj.get("metadata") or {}).get("resourceVersion") or self._version
                if kind in ("ADDED", "MODIFIED"):
                    obj.setdefault("kind", self.kind)
                    self._put(obj)
                elif kind == "DELETED":
                    self._drop(obj)
