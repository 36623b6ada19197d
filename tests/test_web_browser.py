"""End to end: the chat page in headless Chromium (Debian's package, driven by Playwright) against a real server
(waitress on 127.0.0.1) with a scripted tiny model that answers "éhi!" under greedy decoding.

Needs `pip install -e .[browser]` (Playwright's Python package; its own browser downloads are not used) and
/usr/bin/chromium (`apt-get install chromium`); skips with the reason otherwise. Set NANOCHAT_JAX_SCREENSHOTS=DIR
to keep screenshots of the page (desktop and phone sizes).
"""

import os
import re
import shutil
import time

import pytest

from nanochat_jax.web import BackgroundServer, create_app, get_pool, warm_up
from test_web import GREEDY, REPLY_TEXT, engines, models, tok  # noqa: F401 (fixtures)

sync_api = pytest.importorskip("playwright.sync_api", reason="Playwright is not installed: pip install -e .[browser]")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no chromium on PATH: apt-get install chromium")

# As root and on a machine without internet: no sandbox, and no background calls home.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage"]


@pytest.fixture(scope="module")
def server(tok, models):  # noqa: F811
    app = create_app(engines(tok, models["reply"]), defaults=GREEDY)
    warm_up(app)  # as chat_web does: the first reply must not wait for compiles (~10 s on a busy 2-core box)
    with BackgroundServer(app, threads=16) as srv:
        srv.app = app
        yield srv


def slowed(engine_list, delay_s=0.005):
    """Engines whose serving batches pause delay_s per emitted token after each decode chunk, so a 4000-token
    reply lasts ~20 s and Stop surely lands mid-stream (unslowed, the tiny model finishes before the click)."""
    for engine in engine_list:
        def open_batch(*args, _orig=engine.open_batch, **kwargs):
            batch = _orig(*args, **kwargs)

            def step(chunk, _step=batch.step):
                emitted = _step(chunk)
                time.sleep(delay_s * max(map(len, emitted), default=1))
                return emitted
            batch.step = step
            return batch
        engine.open_batch = open_batch
    return engine_list


@pytest.fixture(scope="module")
def loop_server(tok, models):  # noqa: F811
    app = create_app(slowed(engines(tok, models["loop"])), defaults=GREEDY, max_context=8192)
    with BackgroundServer(app, threads=16) as srv:
        srv.app = app
        yield srv


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield b
        b.close()


def screenshot(page, name):
    folder = os.environ.get("NANOCHAT_JAX_SCREENSHOTS")
    if folder:
        os.makedirs(folder, exist_ok=True)
        page.screenshot(path=os.path.join(folder, f"{name}.png"), full_page=True)


def test_chat_page_streams_edits_regenerates_and_runs_commands(server, browser):
    expect = sync_api.expect
    page = browser.new_page(viewport={"width": 1100, "height": 800})
    errors = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(server.url + "/")
    expect(page.locator("#status")).to_have_class("status ok")  # /health answered
    expect(page.locator("#settings")).to_have_text("temperature 0 · top-k off · max 8 tokens")  # server defaults
    box = page.locator("#input")

    # Commands are handled by the page: greedy sampling and no top-k, so the reply is known.
    for command in ("/temperature 0", "/topk 0", "/topk 999", "/help"):
        box.fill(command)
        box.press("Enter")
    notices = page.locator(".msg.notice .bubble")
    expect(notices).to_have_count(4)
    expect(notices.nth(0)).to_have_text("temperature set to 0")
    expect(notices.nth(2)).to_contain_text("top-k must be an integer from 0 to 200")
    expect(notices.nth(3)).to_contain_text("/temperature [t]")
    expect(page.locator("#settings")).to_contain_text("temperature 0 · top-k off")

    # Shift+Enter is a newline, Enter sends; the reply streams in piece by piece ("é" is one piece of 2 tokens).
    box.fill("hello")
    box.press("Shift+Enter")
    box.type("there")
    assert box.input_value() == "hello\nthere" and page.locator(".msg.user").count() == 0
    box.press("Enter")
    expect(page.locator(".msg.user .bubble")).to_have_text("hello\nthere")
    reply = page.locator(".msg.assistant")
    expect(reply.locator(".bubble")).to_have_text(REPLY_TEXT)
    expect(reply).to_have_attribute("data-pieces", "4")
    expect(page.locator("#send")).to_have_text("Send")  # back from "Stop"
    screenshot(page, "desktop")

    # Regenerate replaces the reply; editing the user message rewrites the chat from there (notices included).
    reply.get_by_role("button", name="Regenerate").click()
    expect(page.locator(".msg.assistant")).to_have_count(1)
    expect(page.locator(".msg.assistant .bubble")).to_have_text(REPLY_TEXT)
    expect(page.locator("#send")).to_have_text("Send")
    user_msg = page.locator(".msg.user")
    user_msg.hover()
    user_msg.get_by_role("button", name="Edit").click()
    editor = page.locator(".editor textarea")
    expect(editor).to_have_value("hello\nthere")
    editor.fill("hey")
    editor.press("Enter")
    expect(page.locator(".msg.user .bubble")).to_have_text(["hey"])
    expect(page.locator(".msg.assistant .bubble")).to_have_text([REPLY_TEXT])
    expect(page.locator("#send")).to_have_text("Send")
    stats = get_pool(server.app).stats()
    assert stats["requests_served"] == 3 and stats["busy_workers"] == 0  # send, regenerate, edit

    # Settings survive a reload; New chat empties the page.
    page.reload()
    expect(page.locator("#settings")).to_contain_text("temperature 0 · top-k off")
    box.fill("hi")
    box.press("Enter")
    expect(page.locator(".msg.assistant .bubble")).to_have_text(REPLY_TEXT)
    page.locator("#new-chat").click()
    expect(page.locator(".msg")).to_have_count(0)
    expect(page.locator("#empty")).to_be_visible()

    # On a phone-sized screen: a chat, then an error from the server shown with the reply (a message over the
    # 8,000-character limit, one unbroken word); nothing overflows sideways and the composer stays on screen.
    page.set_viewport_size({"width": 375, "height": 700})
    box.fill("hi")
    box.press("Enter")
    expect(page.locator(".msg.assistant .bubble")).to_have_text(REPLY_TEXT)
    box.fill("x" * 8001)
    box.press("Enter")
    expect(page.locator(".msg.assistant .error")).to_contain_text("the limit is 8000")
    assert page.evaluate("document.documentElement.scrollWidth") <= 375
    composer = page.locator(".composer").bounding_box()
    assert composer["y"] + composer["height"] <= 700 + 1
    screenshot(page, "phone")
    assert not errors, errors
    page.close()


def test_stop_button_ends_the_reply_and_frees_the_worker(loop_server, browser):
    """The LOOP model never stops by itself: Stop aborts the fetch, and the server notices and frees the worker."""
    expect = sync_api.expect
    page = browser.new_page()
    page.goto(loop_server.url + "/")
    box = page.locator("#input")
    for command in ("/temperature 0", "/topk 0", "/maxtokens 4000"):
        box.fill(command)
        box.press("Enter")
    expect(page.locator("#settings")).to_contain_text("max 4000 tokens")
    box.fill("hello")
    box.press("Enter")
    reply = page.locator(".msg.assistant")
    expect(reply).to_have_attribute("data-pieces", re.compile(r"^([3-9]|\d\d+)$"))  # streaming
    expect(page.locator("#send")).to_have_text("Stop")
    page.locator("#send").click()
    expect(reply.locator(".meta")).to_have_text("(stopped)")
    expect(page.locator("#send")).to_have_text("Send")
    assert reply.locator(".bubble").text_content().startswith("hihih")
    pool = get_pool(loop_server.app)
    deadline = time.time() + 20
    while pool.stats()["busy_workers"] and time.time() < deadline:
        time.sleep(0.05)
    stats = pool.stats()
    assert stats["busy_workers"] == 0 and stats["requests_cancelled"] == 1
    assert stats["tokens_generated"] < 4000  # cut short, not run to max_tokens
    page.close()
