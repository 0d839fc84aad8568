"""The dashboard's data endpoints: who is looking, the funnel, the curves and the
adapters, each as admin sees it and as a tenant does."""

from __future__ import annotations

import re

from tests.proxy.test_app import ALICE, BOB, ROOT

API = "/v1/dashboard"


def test_the_key_says_who_is_looking(dash):
    client, _ = dash
    assert client.get(f"{API}/me").status_code == 401
    assert client.get(f"{API}/me", headers={"Authorization": "Bearer nope"}).status_code == 401
    alice = client.get(f"{API}/me", headers=ALICE).json()
    assert (alice["admin"], alice["tenant"], alice["keys"]) == (False, "alice", True)
    assert client.get(f"{API}/me", headers=ROOT).json()["admin"] is True


def test_the_funnel_is_the_stores_for_admin_and_the_tenants_own_for_a_tenant(dash):
    client, store = dash
    stages = {s["key"]: s for s in client.get(f"{API}/funnel", headers=ROOT).json()["stages"]}
    counts = store.judgments.counts()
    assert stages["recorded"]["count"] == counts["recorded"] == 3
    assert stages["judged"]["count"] == counts["judged"] == 1
    assert stages["judged"]["scores"] == {"+1": 0, "0": 0, "-1": 1}
    assert stages["judged"]["with_hints"] == 1
    mine = client.get(f"{API}/funnel", headers=BOB).json()
    assert mine["tenant"] == "bob"
    assert {s["key"]: s["count"] for s in mine["stages"]}["recorded"] == 1
    assert {s["key"]: s["count"] for s in mine["stages"]}["judged"] == 0


def points(chart_svg: str) -> list[tuple[str, str]]:
    return re.findall(r'class="point"[^>]*data-series="([^"]*)" data-label="([^"]*)"', chart_svg)


def test_curves_have_a_point_per_version_and_a_tenant_sees_only_its_users_adapters(dash):
    client, _ = dash
    every = client.get(f"{API}/curves", headers=ROOT).json()
    loss = next(c for c in every["charts"] if c["key"] == "loss")["svg"]
    assert points(loss) == [("toy", "toy@000001"), ("toy", "toy@000003"),  # line by line
                            ("toy~alice:al", "toy~alice:al@000002"),
                            ("toy~bob", "toy~bob@000004")]
    assert [v["name"] for v in every["versions"]] == ["toy@000001", "toy~alice:al@000002",
                                                      "toy@000003", "toy~bob@000004"]
    assert {p["policy"]: p["kind"] for p in every["policies"]} == {
        "toy": "shared", "toy~alice:al": "personal", "toy~bob": "personal"}
    alices = client.get(f"{API}/curves", headers=ALICE).json()
    names = [v["name"] for v in alices["versions"]]
    assert names == ["toy@000001", "toy~alice:al@000002", "toy@000003"]
    assert "toy~bob" not in str(alices)  # not even the name of bob's adapter


def test_the_adapters_page_offers_rollback_to_admin_only(dash):
    client, _ = dash
    admin = client.get(f"{API}/adapters", headers=ROOT).json()
    assert admin["can_rollback"] is True
    rows = {a["name"]: a for a in admin["data"]}
    assert rows["toy@000001"]["can_serve_again"] and not rows["toy@000003"]["can_serve_again"]
    assert rows["toy@000003"]["status"] == "current"
    assert admin["replicas"] == [{"url": "http://vllm", "up": True}]
    tenant = client.get(f"{API}/adapters", headers=BOB).json()
    assert tenant["can_rollback"] is False
    assert [a["name"] for a in tenant["data"]] == ["toy~bob@000004", "toy@000003",
                                                   "toy@000001"]
    # The endpoint itself refuses a tenant's rollback, whatever the page shows.
    assert client.post("/v1/adapters/rollback", json={"version": 1},
                       headers=BOB).status_code == 403


def test_a_benchmarks_scores_are_a_curve_beside_the_base_models(dash):
    client, store = dash
    for adapter, score in (("toy@base", 0.25), ("toy@000001", 0.5), ("toy@000003", 0.75)):
        store.curves.record_score("toy", adapter, "learning", score)
    curves = client.get(f"{API}/curves", headers=ROOT).json()
    chart = next(c for c in curves["charts"] if c["key"] == "score:learning")
    assert points(chart["svg"]) == [("toy", "toy@000001"), ("toy", "toy@000003")]
    assert "base model" in chart["svg"]
    rows = {v["name"]: v for v in curves["versions"]}
    assert rows["toy@000001"]["stats"]["loss"] == 1.0
