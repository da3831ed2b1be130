"""The route table is the one list of routes: the aiohttp router and ``/openapi.json`` are
both made from it, so a route served but not documented (or documented but not served)
fails here."""

from __future__ import annotations

from collections import Counter
from typing import Any

from aiohttp import web

from budgeter.api.app import create_app
from budgeter.api.openapi import document_of, openapi_document
from budgeter.api.routes import ROUTES, Doc, Route
from budgeter.settings import Settings

Operations = set[tuple[str, str]]


def served(app: web.Application) -> Operations:
    """(method, path) of every route of the app's router (HEAD comes with each GET)."""
    return {
        (route.method.lower(), route.resource.canonical)
        for route in app.router.routes()
        if route.method != "HEAD" and route.resource is not None
    }


def documented(document: dict[str, Any]) -> Operations:
    return {(method, path) for path, ops in document["paths"].items() for method in ops}


def test_the_router_and_the_openapi_document_list_the_same_operations() -> None:
    app = create_app(Settings())
    assert served(app) == documented(openapi_document())
    assert served(app) == {(route.method.lower(), route.openapi_path) for route in ROUTES}


def test_every_get_answers_head_and_nothing_else_does() -> None:
    app = create_app(Settings())
    heads = {r.resource.canonical for r in app.router.routes() if r.method == "HEAD" and r.resource}
    assert heads == {route.openapi_path for route in ROUTES if route.method == "GET"}


def test_the_table_lists_each_operation_once() -> None:
    counts = Counter((route.method, route.openapi_path) for route in ROUTES)
    assert [op for op, n in counts.items() if n > 1] == []


def test_a_route_outside_the_table_is_caught_either_way() -> None:
    async def extra(_request: web.Request) -> web.Response:
        return web.json_response({})

    app = create_app(Settings())
    app.router.add_get("/v1/undocumented", extra)
    assert served(app) - documented(openapi_document()) == {("get", "/v1/undocumented")}

    only_documented = Route("GET", "/v1/unserved", extra, Doc("unserved", "batches", "tenant"))
    document = document_of((*ROUTES, only_documented))
    assert documented(document) - served(create_app(Settings())) == {("get", "/v1/unserved")}


def test_path_parameters_come_from_the_path() -> None:
    by_path = {(r.method, r.openapi_path): r for r in ROUTES}
    revoke = by_path[("DELETE", "/admin/tenants/{tenant}/keys/{key_id}")]
    assert revoke.path == "/admin/tenants/{tenant:[^/]+}/keys/{key_id}"
    assert revoke.path_params == ("tenant", "key_id")
    operation = openapi_document()["paths"][revoke.openapi_path]["delete"]
    assert [p["name"] for p in operation["parameters"]] == ["tenant", "key_id"]


def test_the_headers_passed_upstream_are_documented() -> None:
    paths = openapi_document()["paths"]
    for path in ("/v1/messages", "/v1/messages/count_tokens", "/v1/messages/batches"):
        headers = {p["name"] for p in paths[path]["post"]["parameters"] if p["in"] == "header"}
        assert {"anthropic-beta", "anthropic-version"} <= headers, path
    batch = {p["name"] for p in paths["/v1/messages/batches"]["post"]["parameters"]}
    assert {"budgeter-priority", "budgeter-deadline-seconds"} <= batch
