"""The dashboard in a real browser, over a stack that learned for real
(agents -> proxy -> vLLM; proxy -> store -> ``nextstate learn`` -> vLLM; browser -> proxy).

Two tenants talk to the toy model through a proxy with client keys and an admin key;
``nextstate learn`` runs as its own process (as ``nextstate up`` runs it) with
``--metrics-port`` and ``--track wandb --track mlflow --track tensorboard``, judges the
turns with the rules judge, and trains and publishes versions of the shared adapter and
of one user's personal adapter. Then headless Chromium (Debian's, driven by Playwright)
opens the dashboard as admin and as each tenant. Every page is saved as a screenshot in
the directory the session's report prints (``NEXTSTATE_ARTIFACTS``, else pytest's
temporary directory). The same run's learner metrics and tracked runs are read back.

One module-scoped stack (~2 minutes: traffic, four training steps on the CPU).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import signal
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from bench.gui_session import gui_session
from nextstate.core.lora import AdapterStatus
from nextstate.core.store import Store
from nextstate.core.vllm_server import free_port, spawn, stop_group
from nextstate.experiment.converse import converse
from nextstate.proxy.settings import ProxySettings
from tests.conftest import MODEL_NAME, ProxyServer
from tests.learner.test_tracking import wandb_history

pytestmark = pytest.mark.integration
ROOT, ALICE, BOB = "root-key", "alice-key", "bob-key"
ALICE_USER = "alice:al"  # her turns' user: X-NextState-User "al" within tenant alice
# Each session's first turn is corrected (a -1 with a hint): alice's 10 turns with a
# signal give her user an adapter of her own; bob's 8 (9 with his last) train the
# shared one.
PERSONAL_AFTER = 10
CHROMIUM = Path(os.environ.get("NEXTSTATE_CHROMIUM", "/usr/bin/chromium"))
# Headless, and quiet on a closed network (no background fetches, no updates, no QUIC).
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update",
                 "--disable-sync"]


@dataclass
class Stack:
    proxy: ProxyServer
    store: Store
    track_dir: Path
    metrics: str  # the learner's /metrics, scraped while it ran
    steps: list[dict]  # the learner's steps, as it last reported them

    def shared(self) -> list[dict]:
        return [v for v in self.store.adapters.versions(MODEL_NAME)
                if v["status"] in (AdapterStatus.CURRENT, AdapterStatus.PREVIOUS,
                                   AdapterStatus.UNLOADED)]


def _published(store: Store) -> int:
    return sum(1 for v in store.adapters.versions() if v["status"] != AdapterStatus.STAGED)


@pytest.fixture(scope="module")
def stack(vllm, toy_model, tmp_path_factory) -> Iterator[Stack]:
    home = tmp_path_factory.mktemp("dashboard-stack")
    settings = ProxySettings(
        backends=(vllm.url,), store_url=f"sqlite:///{home / 'store.db'}",
        spool_dir=home / "spool", policy=MODEL_NAME, adapter_poll_seconds=0.1,
        client_keys=(("alice", ALICE), ("bob", BOB)), admin_key=ROOT)
    proxy = ProxyServer(settings, free_port()).start()
    store = Store(settings.store_url)
    learner = None
    try:
        converse(proxy.base_url, 10, 0, user="al", api_key=ALICE)
        converse(proxy.base_url, 8, 20, api_key=BOB)
        proxy.turns(36)
        port = free_port()
        env = {**os.environ, "NEXTSTATE_HOME": str(home), "WANDB_MODE": "offline",
               "WANDB_SILENT": "true"}
        env.pop("MLFLOW_TRACKING_URI", None)
        learner = spawn([sys.executable, "-m", "nextstate.cli", "learn", "--backend", vllm.url,
                         "--model", MODEL_NAME, "--model-dir", str(toy_model),
                         "--store", settings.store_url, "--batch-turns", "4",
                         "--personal-after", str(PERSONAL_AFTER), "--metrics-port", str(port),
                         "--track", "wandb", "--track", "mlflow", "--track", "tensorboard",
                         "--track-dir", str(home / "runs")], home / "learner.log", env=env)
        deadline = time.monotonic() + 600
        while True:  # two shared steps and two of alice's, then an idle round
            status = store.status.read() or {}
            if _published(store) >= 4 and status.get("state") == "idle":
                break
            assert learner.poll() is None, (home / "learner.log").read_text()[-3000:]
            assert time.monotonic() < deadline, (home / "learner.log").read_text()[-3000:]
            time.sleep(1)
        # A session each served by the new versions (too few turns for another step):
        # their judged traffic is each version's served reward.
        converse(proxy.base_url, 1, 10, user="al", api_key=ALICE)
        converse(proxy.base_url, 1, 28, api_key=BOB)
        proxy.turns(40)
        while (status := store.status.read() or {}).get("counts", {}).get("judged") != 40 \
                or status.get("state") != "idle":
            assert time.monotonic() < deadline, (home / "learner.log").read_text()[-3000:]
            time.sleep(1)
        metrics = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
        learner.send_signal(signal.SIGINT)  # as Ctrl-C: it closes its trackers' runs
        learner.wait(timeout=120)
        yield Stack(proxy, store, home / "runs", metrics, list(status.get("steps") or []))
    finally:
        if learner is not None:
            stop_group(learner)
        store.close()
        proxy.stop()


@pytest.fixture(scope="module")
def screenshots(request, tmp_path_factory) -> Path:
    given = os.environ.get("NEXTSTATE_ARTIFACTS")
    folder = (Path(given) if given else tmp_path_factory.getbasetemp()) / "dashboard"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    with capture.global_and_fixture_disabled() if capture else contextlib.nullcontext():
        print(f"\ndashboard screenshots: {folder}")
    return folder


@pytest.fixture(scope="module")
def browser():
    if not CHROMIUM.exists():
        if os.environ.get("NEXTSTATE_REQUIRE_INTEGRATION"):
            pytest.fail(f"Chromium is not installed at {CHROMIUM} (apt-get install chromium)")
        pytest.skip(f"Chromium is not installed at {CHROMIUM} (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM),
                                              args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


@pytest.fixture
def open_as(browser, stack):
    """A fresh browser context (its own sessionStorage) signed in with a key."""
    contexts = []

    def open_page(key: str, view: str = "/funnel"):
        context = browser.new_context(viewport={"width": 1280, "height": 900})
        contexts.append(context)
        page = context.new_page()
        errors: list[str] = []
        page.on("pageerror", lambda error: errors.append(str(error)))
        page.errors = errors
        page.goto(f"{stack.proxy.url}/ui/#{view}?key={key}")
        settled(page)
        assert "key=" not in page.url  # the key left the address bar at once
        return page

    yield open_page
    for context in contexts:
        with contextlib.suppress(Exception):
            context.close()


def settled(page) -> None:
    """Wait until the page has drawn the view its address names."""
    page.wait_for_function("() => document.getElementById('main').dataset.view === "
                           "location.hash")


def go(page, view: str) -> None:
    page.evaluate("view => { location.hash = view; }", view)
    settled(page)


def test_the_adapters_page_shows_which_replica_has_each_version(stack, vllm, open_as,
                                                               screenshots):
    """(First: the tests after it unload every adapter from the shared vLLM.)"""
    loaded = {m["id"] for m in httpx.get(f"{vllm.url}/v1/models", timeout=10).json()["data"]}
    page = open_as(ROOT, "/adapters")
    rows = stack.store.adapters.versions()
    assert page.locator("tr[data-adapter]").count() == len(rows) == 4
    for row in rows:
        shown = page.locator(f"tr[data-adapter='{row['name']}']")
        assert shown.get_attribute("data-status") == row["status"]
        replicas = shown.locator("td.replicas").inner_text()
        assert (vllm.url in replicas) == (row["name"] in loaded), row["name"]
    assert {r["name"] for r in rows if r["status"] == AdapterStatus.CURRENT} <= loaded
    page.screenshot(path=screenshots / "adapters.png", full_page=True)
    assert page.errors == []


def test_the_funnel_counts_are_the_stores(stack, open_as, screenshots):
    page = open_as(ROOT)
    shown = {stage: int(page.get_attribute(f"[data-stage='{stage}']", "data-count"))
             for stage in ("recorded", "main", "judgeable", "judged", "signal", "trained")}
    counts = stack.store.judgments.counts()
    assert shown["recorded"] == counts["recorded"] == 40
    assert shown["judged"] == counts["judged"]
    assert shown["trained"] == stack.store.judgments.trained_count() == 16
    expected = {s["key"]: s["count"] for s in stack.store.funnel.read(
        method="combined", batch_turns=4)["stages"]}
    assert shown == expected
    scores = {s: int(page.get_attribute(f"[data-score='{s}']", "data-count"))
              for s in ("+1", "0", "-1")}
    assert scores == stack.store.judgments.reward_stats()["scores"]
    lanes = stack.store.judgments.lanes("combined", PERSONAL_AFTER)
    assert lanes == {None: 1, ALICE_USER: 3}  # 4 ready, but neither adapter has a batch
    assert int(page.get_attribute("#progress", "data-ready")) == 3
    assert int(page.get_attribute("#lanes [data-lane='shared']", "data-ready")) == 1
    assert int(page.get_attribute(f"#lanes [data-lane='{ALICE_USER}']", "data-ready")) == 3
    assert page.get_attribute("#progress", "data-batch") == "4"
    page.screenshot(path=screenshots / "funnel.png", full_page=True)
    assert page.errors == []


def points(page, chart: str) -> dict[str, list[str]]:
    """The versions a chart has a point for, line by line."""
    found: dict[str, list[str]] = {}
    for point in page.locator(f"figure[data-chart='{chart}'] circle.point").all():
        found.setdefault(point.get_attribute("data-series"), []).append(
            point.get_attribute("data-label"))
    return found


def test_the_curves_have_one_point_per_version(stack, open_as, screenshots):
    page = open_as(ROOT, "/curves")
    shared = [v["name"] for v in stack.shared()]
    personal = [v["name"] for v in stack.store.adapters.versions(f"{MODEL_NAME}~{ALICE_USER}")]
    assert len(shared) == 2 and len(personal) == 2
    for chart in ("loss", "kl", "clip_fraction", "tokens_per_second"):
        assert points(page, chart) == {MODEL_NAME: shared,
                                       f"{MODEL_NAME}~{ALICE_USER}": personal}, chart
    # The last session of each tenant was served, and judged, with the newest versions.
    assert points(page, "reward") == {MODEL_NAME: shared[-1:],
                                      f"{MODEL_NAME}~{ALICE_USER}": personal[-1:]}
    page.screenshot(path=screenshots / "curves.png", full_page=True)
    assert page.errors == []


def test_a_session_page_shows_its_next_state_and_judgment(stack, open_as, screenshots):
    page = open_as(ROOT, "/sessions")
    assert page.locator("#sessions tr[data-session]").count() == 20
    page.screenshot(path=screenshots / "sessions.png", full_page=True)
    page.fill("#search", "What is 3 plus 6?")
    page.press("#search", "Enter")
    settled(page)
    assert page.locator("#sessions tr[data-session]").count() == 1
    session_id = page.get_attribute("#sessions tr[data-session]", "data-session")
    first = next(t for t in stack.store.turns.iterate(session_id=session_id)
                 if t["turn_index"] == 0)
    judgment = stack.store.judgments.get(first["turn_id"])
    page.click(f"#sessions tr[data-session='{session_id}'] a")
    settled(page)
    card = page.locator(f"article.turn[data-turn='{first['turn_id']}']")
    assert card.locator(".next-state").inner_text().strip().endswith(
        first["next_state"][-1]["content"])
    assert card.locator(".judgment").get_attribute("data-score") == str(judgment["score"])
    hints = card.locator(".judgment .hints li").all_inner_texts()
    assert hints == judgment["hints"] and hints
    assert f"served by {first['served_model']}" in card.locator(".meta").inner_text()
    card.locator("button.show-tokens").click()
    rows = card.locator("table.tokens tr[data-token]")
    rows.first.wait_for()
    assert rows.count() == len(first["completion_token_ids"])
    assert card.locator("table.tokens th").all_inner_texts()[-1].startswith("teacher")
    page.screenshot(path=screenshots / "session.png", full_page=True)
    assert page.errors == []


def test_a_tenant_sees_only_its_own_sessions(stack, open_as, screenshots):
    mine = {t["session_id"] for t in stack.store.turns.iterate(tenant="bob")}
    alices = sorted({t["session_id"] for t in stack.store.turns.iterate(tenant="alice")})
    page = open_as(BOB, "/sessions")
    shown = set(page.locator("#sessions tr[data-session]").evaluate_all(
        "rows => rows.map(r => r.dataset.session)"))
    assert shown == mine and len(mine) == 9
    assert page.inner_text("#who") == "tenant bob"
    page.screenshot(path=screenshots / "sessions-tenant.png", full_page=True)
    go(page, "/sessions?q=What%20is%203%20plus%206%3F")  # alice's question: not found
    assert page.locator("#sessions tr[data-session]").count() == 0
    go(page, f"/sessions/{alices[0]}")
    assert "No session" in page.inner_text("#error")
    assert page.locator("article.turn").count() == 0


def test_rollback_works_for_admin_and_is_absent_for_a_tenant(stack, open_as, screenshots):
    tenant = open_as(ALICE, "/adapters")
    assert tenant.locator("tr[data-adapter]").count() >= 2
    assert tenant.locator("button.rollback").count() == 0
    tenant.screenshot(path=screenshots / "adapters-tenant.png", full_page=True)

    first, newest = stack.shared()
    page = open_as(ROOT, "/adapters")
    assert page.get_attribute(f"tr[data-adapter='{newest['name']}']", "data-status") == \
        AdapterStatus.CURRENT
    button = page.locator(f"button.rollback[data-version='{first['version']}']")
    page.once("dialog", lambda dialog: dialog.dismiss())  # "no": nothing changes
    button.click()
    page.wait_for_timeout(500)
    assert stack.store.adapters.current(MODEL_NAME)["name"] == newest["name"]
    messages: list[str] = []
    page.once("dialog", lambda dialog: (messages.append(dialog.message), dialog.accept()))
    page.locator(f"button.rollback[data-version='{first['version']}']").click()
    page.wait_for_selector(f"tr[data-adapter='{first['name']}'][data-status='current']")
    assert first["name"] in messages[0]
    assert "is current again" in page.inner_text("#notice")
    assert stack.store.adapters.current(MODEL_NAME)["name"] == first["name"]
    # The proxy serves the policy with it (bob has no adapter of his own).
    time.sleep(0.5)
    answer = httpx.post(f"{stack.proxy.base_url}/chat/completions", timeout=120,
                        headers={"Authorization": f"Bearer {BOB}"},
                        json={"model": MODEL_NAME, "max_tokens": 4,
                              "messages": [{"role": "user", "content": "after the rollback"}]})
    assert answer.status_code == 200
    turn_id = answer.headers["x-nextstate-turn-id"]
    [served] = [t for t in stack.proxy.turns(41) if t["turn_id"] == turn_id]
    assert served["served_model"] == first["name"]
    page.screenshot(path=screenshots / "adapters-rollback.png", full_page=True)
    assert page.errors == []


def _samples(text: str) -> dict[tuple[str, tuple], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_the_learner_metrics_and_every_tracked_run_saw_each_step(stack, monkeypatch):
    published = [s for s in stack.steps if s["outcome"] == "published"]
    assert len(published) == 4
    found = _samples(stack.metrics)
    assert found[("nextstate_learner_publishes_total", (("lane", "shared"),))] == 2
    assert found[("nextstate_learner_publishes_total", (("lane", "personal"),))] == 2
    assert found[("nextstate_learner_turns", (("state", "trained"),))] == 16
    names = [s["name"] for s in published]

    rows, config = wandb_history(stack.track_dir)
    assert [r.get("version_name") for r in rows if "version_name" in r] == names
    assert len(rows) == len(stack.steps) and config["batch_turns"] == 4

    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # (MLflow 3 asks, to read it)
    client = MlflowClient(tracking_uri=(stack.track_dir / "mlruns").as_uri())
    [run] = client.search_runs([client.get_experiment_by_name("nextstate").experiment_id])
    losses = client.get_metric_history(run.info.run_id, "step/loss")
    assert [m.step for m in losses] == list(range(1, len(stack.steps) + 1))
    assert [v for k, v in sorted(run.data.tags.items()) if k.startswith("version.")] == names

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    [logs] = (stack.track_dir / "tensorboard").iterdir()
    events = EventAccumulator(str(logs))
    events.Reload()
    assert len(events.Scalars("step/kl")) == len(stack.steps)
    assert [e.tensor_proto.string_val[0].decode()
            for e in events.Tensors("version/text_summary")] == names


def test_a_gui_session_shows_its_screenshots_to_its_tenant(browser, vllm, start_proxy,
                                                           screenshots):
    """Screens kept once by hash are shown as pictures, fetched with the viewer's key;
    the next state's screen too."""
    proxy = start_proxy(vllm.url, client_keys=(("alice", ALICE), ("bob", BOB)),
                        admin_key=ROOT)
    shots, records = gui_session(3, session_id="gui", tenant="bob")
    store = proxy.store()
    try:
        store.turns.write(records)
    finally:
        store.close()
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    try:
        page = context.new_page()
        errors: list[str] = []
        page.on("pageerror", lambda error: errors.append(str(error)))
        page.goto(f"{proxy.url}/ui/#/sessions/gui?key={BOB}")
        settled(page)
        card = page.locator(f"article.turn[data-turn='{records[0].turn_id}']")
        asked, after = card.locator(".msg img.screen"), card.locator(".next-state img.screen")
        after.wait_for()
        page.wait_for_function("() => [...document.querySelectorAll('img.screen')].every("
                               "i => i.complete && i.naturalWidth > 0)")
        assert asked.first.get_attribute("data-image") == hashlib.sha256(shots[0]).hexdigest()
        assert after.get_attribute("data-image") == hashlib.sha256(shots[1]).hexdigest()
        assert after.evaluate("i => [i.naturalWidth, i.naturalHeight]") == [640, 400]
        page.screenshot(path=screenshots / "session-gui.png", full_page=True)
        assert errors == []
    finally:
        context.close()
