"""The dashboard's page: static files from the package, served without a key (they hold
no data), with a Content-Security-Policy that allows nothing from elsewhere."""

from __future__ import annotations

from nextstate.proxy.dashboard.page import FILES, load


def test_the_page_is_served_without_a_key_and_its_data_with_one(dash):
    client, _ = dash
    moved = client.get("/ui", follow_redirects=False)
    assert moved.status_code == 308 and moved.headers["location"] == "/ui/"
    page = client.get("/ui/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert '<script src="app.js"' in page.text
    policy = page.headers["content-security-policy"]
    assert "script-src 'self'" in policy and "frame-ancestors 'none'" in policy
    assert client.get("/ui/app.js").headers["content-type"].startswith("text/javascript")
    assert client.get("/v1/dashboard/funnel").status_code == 401


def test_an_unknown_file_is_a_404_in_openai_shape(dash):
    client, _ = dash
    answer = client.get("/ui/secrets.txt")
    assert answer.status_code == 404 and answer.json()["error"]["message"]


def test_every_file_is_in_the_package():
    assert set(load()) == set(FILES) and all(load().values())
