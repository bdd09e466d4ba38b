"""Nothing answers without the token: every route, every method, the bearer header and the cookie."""

from __future__ import annotations

import re

import pytest
from conftest import TOKEN
from fastapi.routing import APIRoute

from evalfleet.service.app import create_app

OPEN = {"/healthz", "/login"}


def _routes(app_config) -> list[tuple[str, str]]:
    """Every (method, path) the app serves, path parameters filled with a plausible value."""
    app = create_app(app_config)
    routes = []
    for route in app.routes:
        if isinstance(route, APIRoute) and route.path not in OPEN:
            path = re.sub(r"\{doc_id\}", "0", route.path)
            path = re.sub(r"\{[a-z_]+\}", "abc123", path)
            routes.extend((method, path) for method in sorted(route.methods))
    return routes


def test_every_route_needs_the_token(client, app_config):
    routes = _routes(app_config)
    assert len(routes) >= 24 and ("GET", "/metrics") in routes and ("GET", "/openapi.json") in routes and ("POST", "/api/v1/jobs") in routes
    for method, path in routes:
        for headers in ({}, {"Authorization": "Bearer wrong-token-0123456789"}, {"Authorization": TOKEN},
                        {"Authorization": f"Basic {TOKEN}"}):
            response = client.request(method, path, headers=headers)
            assert response.status_code == 401, (method, path, headers, response.text)
        client.cookies.set("evalfleet_session", "wrong-token-0123456789")
        assert client.request(method, path).status_code == 401, (method, path)
        client.cookies.clear()
        with_token = client.request(method, path, headers={"Authorization": f"Bearer {TOKEN}"})
        assert with_token.status_code != 401, (method, path)


def test_api_401_is_one_sentence_and_the_dashboard_shows_the_login_form(client):
    response = client.get("/api/v1/jobs")
    assert response.json() == {"detail": "this needs the service token (Authorization: Bearer TOKEN)"}
    assert response.headers["www-authenticate"] == "Bearer"
    page = client.get("/pool", headers={"Accept": "text/html"})
    assert page.status_code == 401 and 'name="token"' in page.text
    assert client.get("/healthz").json() == {"status": "ok", "scheduler": "external"}
    assert client.get("/static/htmx.min.js").status_code == 200  # public assets, no data


def test_login_sets_an_httponly_samesite_session_cookie(client):
    own = {"Origin": "http://127.0.0.1"}
    refused = client.post("/login", data={"token": "not-the-token-at-all"}, headers=own, follow_redirects=False)
    assert refused.status_code == 401 and "not the service" in refused.text and "set-cookie" not in refused.headers

    response = client.post("/login", data={"token": TOKEN}, headers=own, follow_redirects=False)
    assert response.status_code == 303 and response.headers["location"] == "/"
    cookie = response.headers["set-cookie"]
    assert cookie.startswith("evalfleet_session=") and TOKEN not in cookie
    assert "HttpOnly" in cookie and "SameSite=strict" in cookie and "Path=/" in cookie and "Max-Age=43200" in cookie
    assert "Secure" not in cookie  # plain http, and no proxy said otherwise
    assert client.get("/api/v1/jobs").status_code == 200  # the client kept the cookie
    assert client.get("/", headers={"Accept": "text/html"}).status_code == 200

    out = client.post("/logout", headers=own, follow_redirects=False)
    assert out.status_code == 303 and 'evalfleet_session=""' in out.headers["set-cookie"]
    client.cookies.clear()
    assert client.get("/api/v1/jobs").status_code == 401


@pytest.mark.parametrize("size", [70 * 1024, 1024 * 1024])
def test_bodies_are_bounded(client, size):
    headers = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}
    response = client.post("/api/v1/jobs", content=b" " * size, headers=headers)
    assert response.status_code == 413 and "larger than 64 KiB" in response.json()["detail"]

    def chunks():
        for _ in range(size // 8192 + 1):
            yield b" " * 8192

    streamed = client.post("/api/v1/jobs", content=chunks(), headers=headers)
    assert streamed.status_code == 413
