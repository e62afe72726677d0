"""A Kubernetes API server for tests: kmock's emulation over real HTTP, with its gaps filled.

kmock 0.8 (`kmock.KubernetesScaffold`) gives us the HTTP server on 127.0.0.1, the
request parsing (`/apis/<group>/<version>/namespaces/<ns>/<plural>/<name>/<sub>`), API
discovery (`/api`, `/apis`, `/apis/<group>/<version>`), Kubernetes-style error bodies
and a log of every request. Its stateful `KubernetesEmulator` keeps objects as plain
merged dicts, which is not enough for an operator, so the object store below replaces
it. The gaps it fills (what a real API server does and kmock 0.8 does not):

1. `metadata.resourceVersion`: one increasing counter over all objects; returned on
   every write and on lists (`metadata.resourceVersion` of the list).
2. `metadata.uid`, `metadata.creationTimestamp`, `metadata.generation` (1 on create,
   +1 whenever anything outside metadata and status changes).
3. `metadata.namespace` defaulted from the URL; a body naming another namespace is 400.
4. `metadata.generateName`.
5. Label selectors (`=`, `==`, `!=`, `in`, `notin`, exists, `!key`) and the field
   selectors `metadata.name` / `metadata.namespace` on list and watch.
6. Watches that resume from `?resourceVersion=` (replaying the event log), end after
   `?timeoutSeconds=`, and answer 410 Gone when the version was compacted away.
7. The status subresource: `PATCH …/status` changes only `status`; a `PATCH` of the
   main resource ignores `status` (for resources declared with a status subresource).
8. JSON merge patches (RFC 7386, `null` deletes) and JSON patches (RFC 6902); kmock
   merges dicts but also treats strategic-merge as a plain merge, as we do.
9. Optimistic concurrency: a write carrying `metadata.resourceVersion` that is not the
   stored one gets 409 Conflict; a create of an existing name gets 409 AlreadyExists.
10. Deletion: finalizers hold an object with `deletionTimestamp` until they are removed;
    owner-reference garbage collection deletes dependents (recursively) unless
    `propagationPolicy=Orphan`.
11. `PUT` (replace) with the same checks as `PATCH`.
12. Discovery of the core group says `groupVersion: v1` (kmock says `/v1`).
13. The Namespace resource's own URLs (`/api/v1/namespaces[/NAME]`), which kmock's path
    parser reads as a namespace prefix without a resource and fails on.

Fault injection for tests (`server.faults`): answer the next N matching requests with a
status (409, 429 with Retry-After, 503, 500…), end open watches with 410 Gone, refuse
the next N watch requests with 410, or make watch streams go silent for a while (events
are dropped on the floor for that connection, as a dead TCP stream would do). Every
request is counted per verb and path (`server.count(...)`).
"""

from __future__ import annotations

import asyncio
import copy
import datetime
import json
import re
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass, field
from typing import Any

import aiohttp.web
import jsonpatch
import kmock

Key = tuple[str, str | None, str]  # (resource id "group/version/plural", namespace, name)

# The resources the Trainyard operator and kopf touch: (group/version/plural, kind, namespaced, status subresource)
DEFAULT_RESOURCES: tuple[tuple[str, str, bool, bool], ...] = (
    ("v1/namespaces", "Namespace", False, True),
    ("v1/pods", "Pod", True, True),
    ("v1/services", "Service", True, True),
    ("v1/configmaps", "ConfigMap", True, False),
    ("v1/events", "Event", True, False),
    ("v1/secrets", "Secret", True, False),
    ("batch/v1/jobs", "Job", True, True),
    ("apps/v1/deployments", "Deployment", True, True),
    ("events.k8s.io/v1/events", "Event", True, False),
    ("coordination.k8s.io/v1/leases", "Lease", True, False),
    ("apiextensions.k8s.io/v1/customresourcedefinitions", "CustomResourceDefinition", False, True),
    ("trainyard.dev/v1alpha1/trainingruns", "TrainingRun", True, True),
)
EVENT_LOG_LIMIT = 100_000  # events kept for watch resumption; older versions answer 410 Gone


def resource_id(resource: kmock.resource) -> str:
    group = resource.group or ""
    return (
        f"{group}/{resource.version}/{resource.plural}"
        if group
        else f"{resource.version}/{resource.plural}"
    )


@dataclass
class Fault:
    """Answer the next `times` requests matching verb/path with `status`."""

    verb: str | None  # get, list, watch, create, patch, update, delete; None = any
    path: re.Pattern[str]
    status: int
    times: int
    retry_after: float | None = None
    served: int = 0


@dataclass
class Faults:
    """What the tests break on purpose."""

    rules: list[Fault] = field(default_factory=list)
    watch_gone: dict[str, int] = field(
        default_factory=dict
    )  # resource id -> next N watches get 410
    silent_until: float = 0.0  # loop time until which open watch streams deliver nothing
    dropped: int = 0  # events a silent stream swallowed

    def fail(
        self,
        verb: str | None,
        path: str,
        status: int,
        times: int = 1,
        retry_after: float | None = None,
    ) -> Fault:
        """Answer the next `times` requests of `verb` whose path matches the regex `path`."""
        fault = Fault(verb, re.compile(path), status, times, retry_after)
        self.rules.append(fault)
        return fault

    def take(self, verb: str, path: str) -> Fault | None:
        for fault in self.rules:
            if (
                fault.served < fault.times
                and fault.verb in (None, verb)
                and fault.path.search(path)
            ):
                fault.served += 1
                return fault
        return None


@dataclass
class RequestRecord:
    verb: str
    path: str
    status: int
    at: float = 0.0  # event-loop time the request arrived
    name: str | None = None  # the object's name (from the body for creates)
    agent: str = ""  # the client's User-Agent (tells two operator replicas apart)


class SelectorError(ValueError):
    pass


_SET_RE = re.compile(r"^\s*([^\s!=]+)\s+(in|notin)\s+\(([^)]*)\)\s*$")


def split_selector(text: str) -> list[str]:
    """Split on commas that are not inside `in (a,b)` parentheses."""
    parts, depth, current = [], 0, ""
    for char in text:
        if char == "(":
            depth += 1
        elif char == ")":
            depth -= 1
        if char == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += char
    if current.strip():
        parts.append(current)
    return [p.strip() for p in parts if p.strip()]


def match_labels(selector: str | None, labels: dict[str, str]) -> bool:
    """Whether `labels` satisfy a label selector in the API server's text syntax."""
    for term in split_selector(selector or ""):
        if m := _SET_RE.match(term):
            key, op, values = m.group(1), m.group(2), {v.strip() for v in m.group(3).split(",")}
            ok = (
                key in labels and labels[key] in values
                if op == "in"
                else labels.get(key) not in values
            )
        elif "!=" in term:
            key, value = (s.strip() for s in term.split("!=", 1))
            ok = labels.get(key) != value
        elif "==" in term or "=" in term:
            key, value = (s.strip() for s in re.split("==|=", term, maxsplit=1))
            ok = labels.get(key) == value
        elif term.startswith("!"):
            ok = term[1:].strip() not in labels
        elif re.fullmatch(r"[\w./-]+", term):
            ok = term in labels
        else:
            raise SelectorError(f"unable to parse requirement: {term!r}")
        if not ok:
            return False
    return True


def match_fields(selector: str | None, obj: dict[str, Any]) -> bool:
    meta = obj.get("metadata", {})
    known = {"metadata.name": meta.get("name"), "metadata.namespace": meta.get("namespace")}
    for term in split_selector(selector or ""):
        negate = "!=" in term
        key, value = (s.strip() for s in re.split("!=|==|=", term, maxsplit=1))
        if key not in known:
            raise SelectorError(f"field label not supported: {key}")
        if (known[key] == value) == negate:
            return False
    return True


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = copy.deepcopy(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


def now_rfc3339() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class ApiError(Exception):
    def __init__(self, code: int, reason: str, message: str, retry_after: float | None = None):
        super().__init__(message)
        self.code, self.reason, self.message, self.retry_after = code, reason, message, retry_after


class TrainyardApiServer(kmock.KubernetesScaffold):
    """kmock's Kubernetes scaffold plus an object store that behaves like an API server."""

    def __init__(self, **kwargs: Any):
        super().__init__(**kwargs)
        self.store: dict[Key, dict[str, Any]] = {}
        self.kinds: dict[str, tuple[str, bool, bool]] = {}
        self.events: dict[
            str, list[tuple[int, dict[str, Any]]]
        ] = {}  # resource id -> [(rv, event)]
        self.watchers: dict[str, set[asyncio.Queue[dict[str, Any] | None]]] = {}
        self.faults = Faults()
        self.records: list[RequestRecord] = []
        self.revision = 0
        self.compacted_revision = 0
        for rid, kind, namespaced, has_status in DEFAULT_RESOURCES:
            self.declare(rid, kind, namespaced=namespaced, status=has_status)

    # -- declaration, inspection --------------------------------------------------------

    def declare(self, rid: str, kind: str, *, namespaced: bool = True, status: bool = True) -> None:
        self.resources[rid] = kmock.ResourceInfo(
            kind=kind,
            singular=kind.lower(),
            namespaced=namespaced,
            subresources={"status"} if status else set(),
            verbs={"get", "list", "watch", "create", "update", "patch", "delete"},
        )
        self.kinds[rid] = (kind, namespaced, status)
        self.events.setdefault(rid, [])
        self.watchers.setdefault(rid, set())

    def objects(
        self, rid: str, namespace: str | None = None, selector: str | None = None
    ) -> list[dict[str, Any]]:
        """Live objects of a resource (deep copies), optionally by namespace and label selector."""
        return [
            copy.deepcopy(obj)
            for (r, ns, _), obj in sorted(self.store.items(), key=lambda kv: kv[0][2])
            if r == rid
            and (namespace is None or ns == namespace)
            and match_labels(selector, obj.get("metadata", {}).get("labels") or {})
        ]

    def get(self, rid: str, namespace: str | None, name: str) -> dict[str, Any] | None:
        obj = self.store.get((rid, namespace, name))
        return copy.deepcopy(obj) if obj is not None else None

    def count(self, verb: str | None = None, path: str | None = None, *, since: int = 0) -> int:
        """Requests served since record index `since`, by verb and a regex on the path."""
        pattern = re.compile(path) if path else None
        return sum(
            1
            for r in self.records[since:]
            if (verb is None or r.verb == verb) and (pattern is None or pattern.search(r.path))
        )

    def writes(self, *, since: int = 0, path: str | None = None) -> list[RequestRecord]:
        pattern = re.compile(path) if path else None
        return [
            r
            for r in self.records[since:]
            if r.verb in ("create", "patch", "update", "delete")
            and (pattern is None or pattern.search(r.path))
        ]

    # -- direct state changes, as controllers of a cluster make them (tests play kubelet) --

    async def put_object(self, rid: str, body: dict[str, Any]) -> dict[str, Any]:
        """Create an object as another controller would (no HTTP round-trip, no counting)."""
        meta = body.setdefault("metadata", {})
        return self._create(rid, meta.get("namespace"), copy.deepcopy(body))

    async def patch_object(
        self,
        rid: str,
        namespace: str | None,
        name: str,
        patch: dict[str, Any],
        *,
        status: bool = False,
    ) -> dict[str, Any]:
        return self._patch(
            rid, namespace, name, patch, "merge", subresource="status" if status else None
        )

    async def delete_object(self, rid: str, namespace: str | None, name: str) -> None:
        self._delete(rid, namespace, name, propagation="Background")

    def expire_watches(self, rid: str | None = None) -> None:
        """End open watch streams with 410 Gone and forget older versions (a compaction)."""
        self.compacted_revision = self.revision
        for r, queues in self.watchers.items():
            if rid is None or r == rid:
                for queue in list(queues):
                    queue.put_nowait(
                        {
                            "type": "ERROR",
                            "object": self._status_body(410, "Expired", "too old resource version"),
                        }
                    )
                    queue.put_nowait(None)

    async def _serve_version(self, request: kmock.Request) -> Any:
        # kmock names the core group's version "/v1"; the API server says "v1".
        payload = await super()._serve_version(request)
        payload["groupVersion"] = payload["groupVersion"].lstrip("/")
        return payload

    async def __call__(self, raw_request: aiohttp.web.BaseRequest) -> aiohttp.web.StreamResponse:
        # kmock's path parser reads `/api/v1/namespaces[/NAME]` as a namespace prefix with no
        # resource and fails; parse the Namespace resource's own paths here.
        match = re.fullmatch(
            r"/api/v1/namespaces(?:/([^/]+))?(?:/(status|finalize))?/?", raw_request.path
        )
        if match is None:
            return await super().__call__(raw_request)
        body = await raw_request.read()
        try:
            data = json.loads(body) if body else None
        except ValueError:
            data = None
        method = raw_request.method.upper()
        name = match.group(1)
        action = (
            kmock.action.WATCH
            if method == "GET" and raw_request.query.get("watch") == "true"
            else kmock.action.FETCH
            if method == "GET" and name
            else kmock.action.LIST
            if method == "GET"
            else kmock.action.CREATE
            if method == "POST"
            else kmock.action.UPDATE
            if method == "PATCH"
            else kmock.action.DELETE
            if method == "DELETE"
            else None
        )
        request = kmock.Request(
            id=len(self._requests),
            raw_request=raw_request,
            url=raw_request.url,
            method=method,
            params=dict(raw_request.query),
            headers=dict(raw_request.headers),
            data=data,
            body=body,
            text=body.decode(errors="replace"),
            action=action,
            resource=kmock.resource("", "v1", "namespaces"),
            namespace=None,
            name=name,
            subresource=match.group(2),
        )
        self._requests.append(request)
        return await self._handle(request)

    # -- HTTP ----------------------------------------------------------------------------

    async def _handle(self, request: kmock.Request) -> aiohttp.web.StreamResponse:
        verb = self._verb(request)
        path = request.url.path
        name = request.name or (
            request.data.get("metadata", {}).get("name") if isinstance(request.data, dict) else None
        )
        record = RequestRecord(
            verb,
            path,
            200,
            asyncio.get_running_loop().time(),
            name,
            request.headers.get("User-Agent", ""),
        )
        self.records.append(record)
        rid = (
            resource_id(request.resource)
            if request.resource is not None and request.resource.plural
            else None
        )
        try:
            if fault := self.faults.take(verb, path):
                raise ApiError(
                    fault.status,
                    _REASONS.get(fault.status, "InjectedFault"),
                    f"injected fault {fault.status}",
                    fault.retry_after,
                )
            if rid is None or rid not in self.kinds:
                response = await super()._handle(request)
            elif verb == "watch":
                return await self._serve_watch(request, rid, record)
            else:
                response = aiohttp.web.json_response(
                    self._serve(request, rid, verb), status=201 if verb == "create" else 200
                )
        except ApiError as error:
            record.status = error.code
            headers = (
                {"Retry-After": str(int(error.retry_after))}
                if error.retry_after is not None
                else None
            )
            return aiohttp.web.json_response(
                self._status_body(error.code, error.reason, error.message),
                status=error.code,
                headers=headers,
            )
        record.status = response.status
        return response

    @staticmethod
    def _verb(request: kmock.Request) -> str:
        if request.method.value == "PUT" and request.name:
            return "update"
        action = request.action.value.lower() if request.action is not None else ""
        verbs = {
            "list": "list",
            "watch": "watch",
            "fetch": "get",
            "create": "create",
            "update": "patch",
            "delete": "delete",
        }
        return verbs.get(action, request.method.value.lower())

    @staticmethod
    def _status_body(code: int, reason: str, message: str) -> dict[str, Any]:
        return {
            "apiVersion": "v1",
            "kind": "Status",
            "metadata": {},
            "status": "Failure",
            "code": code,
            "reason": reason,
            "message": message,
        }

    def _serve(self, request: kmock.Request, rid: str, verb: str) -> dict[str, Any]:
        ns, name, sub = request.namespace, request.name, request.subresource
        if sub not in (None, "status"):
            raise ApiError(404, "NotFound", f"subresource {sub} is not served")
        if verb == "get":
            return self._require(rid, ns, name)
        if verb == "list":
            return self._list(rid, ns, request.params)
        if verb == "create":
            if not isinstance(request.data, dict):
                raise ApiError(400, "BadRequest", "the body must be a JSON object")
            return self._create(rid, ns, request.data)
        if verb == "patch":
            ctype = request.headers.get("Content-Type", "application/merge-patch+json")
            kind = "json" if "json-patch" in ctype else "merge"
            return self._patch(rid, ns, name, request.data, kind, subresource=sub)
        if verb == "update":
            return self._replace(rid, ns, name, request.data, subresource=sub)
        if verb == "delete":
            body = request.data if isinstance(request.data, dict) else {}
            policy = (
                request.params.get("propagationPolicy")
                or body.get("propagationPolicy")
                or "Background"
            )
            return self._delete(rid, ns, name, propagation=policy)
        raise ApiError(405, "MethodNotAllowed", f"{verb} is not supported")

    # -- the store -----------------------------------------------------------------------

    def _next_rv(self) -> int:
        self.revision += 1
        return self.revision

    def _emit(self, rid: str, kind: str, obj: dict[str, Any]) -> None:
        rv = int(obj["metadata"]["resourceVersion"])
        event = {"type": kind, "object": copy.deepcopy(obj)}
        log = self.events[rid]
        log.append((rv, event))
        if len(log) > EVENT_LOG_LIMIT:
            dropped = log[: len(log) - EVENT_LOG_LIMIT]
            del log[: len(dropped)]
            self.compacted_revision = max(self.compacted_revision, dropped[-1][0])
        for queue in self.watchers[rid]:
            queue.put_nowait(event)

    def _require(self, rid: str, ns: str | None, name: str | None) -> dict[str, Any]:
        obj = self.store.get((rid, ns, name or ""))
        if obj is None:
            raise ApiError(404, "NotFound", f'{rid.rsplit("/", 1)[-1]} "{name}" not found')
        return obj

    def _list(self, rid: str, ns: str | None, params: dict[str, str]) -> dict[str, Any]:
        try:
            items = [
                obj
                for (r, n, _), obj in self.store.items()
                if r == rid
                and (ns is None or n == ns)
                and match_labels(params.get("labelSelector"), obj["metadata"].get("labels") or {})
                and match_fields(params.get("fieldSelector"), obj)
            ]
        except SelectorError as error:
            raise ApiError(400, "BadRequest", str(error)) from None
        kind = self.kinds[rid][0]
        return {
            "apiVersion": "v1",
            "kind": f"{kind}List",
            "metadata": {"resourceVersion": str(self.revision)},
            "items": items,
        }

    def _create(self, rid: str, ns: str | None, body: dict[str, Any]) -> dict[str, Any]:
        kind, namespaced, _ = self.kinds[rid]
        obj = copy.deepcopy(body)
        meta = obj.setdefault("metadata", {})
        if namespaced:
            if meta.get("namespace") not in (None, ns) and ns is not None:
                raise ApiError(
                    400,
                    "BadRequest",
                    "the namespace of the object does not match the namespace of the request",
                )
            meta["namespace"] = ns or meta.get("namespace") or "default"
        else:
            meta.pop("namespace", None)
        if not meta.get("name") and meta.get("generateName"):
            meta["name"] = meta["generateName"] + uuid.uuid4().hex[:5]
        if not meta.get("name"):
            raise ApiError(422, "Invalid", "metadata.name: Required value")
        key = (rid, meta.get("namespace"), meta["name"])
        if key in self.store:
            raise ApiError(
                409, "AlreadyExists", f'{rid.rsplit("/", 1)[-1]} "{meta["name"]}" already exists'
            )
        meta.pop("resourceVersion", None)
        meta.pop("deletionTimestamp", None)
        meta["uid"] = str(uuid.uuid4())
        meta["creationTimestamp"] = now_rfc3339()
        meta["generation"] = 1
        meta["resourceVersion"] = str(self._next_rv())
        obj.setdefault("kind", kind)
        self.store[key] = obj
        self._emit(rid, "ADDED", obj)
        return obj

    def _check_version(self, current: dict[str, Any], new_meta: dict[str, Any] | None) -> None:
        wanted = (new_meta or {}).get("resourceVersion")
        if wanted and wanted != current["metadata"]["resourceVersion"]:
            raise ApiError(
                409,
                "Conflict",
                "the object has been modified; please apply your changes to the latest version and try again",
            )

    def _commit(
        self,
        rid: str,
        key: Key,
        current: dict[str, Any],
        new: dict[str, Any],
        subresource: str | None,
    ) -> dict[str, Any]:
        _, _, has_status = self.kinds[rid]
        if has_status and subresource == "status":
            new = {**copy.deepcopy(current), "status": new.get("status")}
            if new["status"] is None:
                new.pop("status")
        elif has_status:
            new = {k: v for k, v in new.items() if k != "status"}
            if "status" in current:
                new["status"] = copy.deepcopy(current["status"])
        meta, old_meta = new.setdefault("metadata", {}), current["metadata"]
        for immutable in ("uid", "creationTimestamp", "name", "namespace"):
            if immutable in old_meta:
                meta[immutable] = old_meta[immutable]
            else:
                meta.pop(immutable, None)
        if "deletionTimestamp" in old_meta:
            meta["deletionTimestamp"] = old_meta["deletionTimestamp"]
        spec_changed = {k: v for k, v in new.items() if k not in ("metadata", "status")} != {
            k: v for k, v in current.items() if k not in ("metadata", "status")
        }
        meta["generation"] = old_meta.get("generation", 1) + (1 if spec_changed else 0)
        if {**new, "metadata": {**meta, "resourceVersion": old_meta["resourceVersion"]}} == current:
            return current  # a no-op write does not bump the version (as the API server does)
        meta["resourceVersion"] = str(self._next_rv())
        if meta.get("deletionTimestamp") and not meta.get("finalizers"):
            del self.store[key]
            self._emit(rid, "DELETED", new)
            self._collect_dependents(meta["uid"])
            return new
        self.store[key] = new
        self._emit(rid, "MODIFIED", new)
        return new

    def _patch(
        self,
        rid: str,
        ns: str | None,
        name: str | None,
        patch: Any,
        kind: str,
        *,
        subresource: str | None,
    ) -> dict[str, Any]:
        key = (rid, ns, name or "")
        current = self._require(rid, ns, name)
        if kind == "json":
            try:
                new = jsonpatch.apply_patch(copy.deepcopy(current), patch)
            except (jsonpatch.JsonPatchException, jsonpatch.JsonPointerException) as error:
                raise ApiError(422, "Invalid", f"json patch failed: {error}") from None
            self._check_version(
                current,
                new.get("metadata")
                if new["metadata"].get("resourceVersion") != current["metadata"]["resourceVersion"]
                else None,
            )
        else:
            if not isinstance(patch, dict):
                raise ApiError(400, "BadRequest", "a merge patch must be a JSON object")
            self._check_version(current, patch.get("metadata"))
            new = merge_patch(current, patch)
            new["metadata"]["resourceVersion"] = current["metadata"]["resourceVersion"]
        return self._commit(rid, key, current, new, subresource)

    def _replace(
        self, rid: str, ns: str | None, name: str | None, body: Any, *, subresource: str | None
    ) -> dict[str, Any]:
        key = (rid, ns, name or "")
        current = self._require(rid, ns, name)
        if not isinstance(body, dict):
            raise ApiError(400, "BadRequest", "the body must be a JSON object")
        self._check_version(current, body.get("metadata"))
        new = copy.deepcopy(body)
        new.setdefault("metadata", {})["resourceVersion"] = current["metadata"]["resourceVersion"]
        return self._commit(rid, key, current, new, subresource)

    def _delete(
        self, rid: str, ns: str | None, name: str | None, *, propagation: str
    ) -> dict[str, Any]:
        key = (rid, ns, name or "")
        current = self._require(rid, ns, name)
        meta = current["metadata"]
        if meta.get("finalizers"):
            if not meta.get("deletionTimestamp"):
                new = copy.deepcopy(current)
                new["metadata"]["deletionTimestamp"] = now_rfc3339()
                new["metadata"]["resourceVersion"] = str(self._next_rv())
                self.store[key] = new
                self._emit(rid, "MODIFIED", new)
                return new
            return current
        del self.store[key]
        gone = copy.deepcopy(current)
        gone["metadata"]["resourceVersion"] = str(self._next_rv())
        self._emit(rid, "DELETED", gone)
        if propagation != "Orphan":
            self._collect_dependents(meta["uid"])
        return gone

    def _collect_dependents(self, owner_uid: str) -> None:
        """Owner-reference garbage collection: delete whatever the deleted object owned."""
        for (rid, ns, name), obj in list(self.store.items()):
            refs = obj["metadata"].get("ownerReferences") or []
            if any(ref.get("uid") == owner_uid for ref in refs) and (rid, ns, name) in self.store:
                self._delete(rid, ns, name, propagation="Background")

    # -- watching ------------------------------------------------------------------------

    async def _serve_watch(
        self, request: kmock.Request, rid: str, record: RequestRecord
    ) -> aiohttp.web.StreamResponse:
        ns, params = request.namespace, request.params
        if self.faults.watch_gone.get(rid, 0) > 0:
            self.faults.watch_gone[rid] -= 1
            since = None
            gone = True
        else:
            since = (
                int(params["resourceVersion"])
                if params.get("resourceVersion", "").isdigit()
                else None
            )
            gone = since is not None and since < self.compacted_revision
        response = aiohttp.web.StreamResponse(
            status=200, headers={"Content-Type": "application/json"}
        )
        assert request._raw_request is not None
        await response.prepare(request._raw_request)
        if gone:
            record.status = 410
            await self._write_event(
                response,
                {
                    "type": "ERROR",
                    "object": self._status_body(410, "Expired", "too old resource version"),
                },
            )
            await response.write_eof()
            return response

        def wanted(event: dict[str, Any]) -> bool:
            obj = event["object"]
            return (
                (ns is None or obj["metadata"].get("namespace") == ns)
                and match_labels(params.get("labelSelector"), obj["metadata"].get("labels") or {})
                and match_fields(params.get("fieldSelector"), obj)
            )

        queue: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()
        self.watchers[rid].add(queue)
        try:
            if since is None:  # a watch without a version starts with the current objects
                backlog = [
                    {"type": "ADDED", "object": obj} for obj in self._list(rid, ns, {})["items"]
                ]
            else:
                backlog = [event for rv, event in self.events[rid] if rv > since]
            for event in backlog:
                if wanted(event):
                    await self._write_event(response, event)
            timeout = float(params["timeoutSeconds"]) if params.get("timeoutSeconds") else None
            loop = asyncio.get_running_loop()
            deadline = loop.time() + timeout if timeout else None
            while True:
                wait = None if deadline is None else max(0.0, deadline - loop.time())
                try:
                    event = await asyncio.wait_for(queue.get(), wait)
                except TimeoutError:
                    break
                if event is None:
                    break
                if loop.time() < self.faults.silent_until:
                    self.faults.dropped += 1
                    continue  # a dead stream: the event never reaches this client
                if event["type"] == "ERROR" or wanted(event):
                    await self._write_event(response, event)
        except (ConnectionResetError, asyncio.CancelledError):
            pass
        finally:
            self.watchers[rid].discard(queue)
        with suppress(ConnectionResetError):
            await response.write_eof()
        return response

    @staticmethod
    async def _write_event(response: aiohttp.web.StreamResponse, event: dict[str, Any]) -> None:
        await response.write(json.dumps(event).encode() + b"\n")


_REASONS = {
    400: "BadRequest",
    404: "NotFound",
    409: "Conflict",
    410: "Gone",
    422: "Invalid",
    429: "TooManyRequests",
    500: "InternalError",
    503: "ServiceUnavailable",
    504: "Timeout",
}


@asynccontextmanager
async def running_api_server() -> AsyncIterator[TrainyardApiServer]:
    """The emulated API server listening on 127.0.0.1 (random port) until the block ends."""
    async with TrainyardApiServer() as server, kmock.Server(server):
        yield server
