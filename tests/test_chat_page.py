"""The server's chat page used as a person does, in headless Chromium: type, press Enter, see
the reply and its statistics drawn on the screen."""
import contextlib
import io
import re

import pytest

from browser import Browser, chromium

pytestmark = pytest.mark.skipif(chromium() is None, reason="no Chromium (apt-get install chromium)")

LAST_STATS = "(() => { const s = document.querySelectorAll('#log .stats'); " \
             "return s.length === %d && s[%d].textContent; })()"
STATS = re.compile(r"TTFT \d+ ms, (\d+) of (\d+) prompt tokens reused, (\d+) generated, KV (\d+) cells")


def _pixels(png: bytes, rect):
    from matplotlib import image

    x, y, w, h = (round(v) for v in rect)
    return image.imread(io.BytesIO(png), format="png")[y:y + h, x:x + w, :3]


@contextlib.contextmanager
def _page(tmp_path, model_name: str, *server_args: str):
    """The chat page of a server started with server_args, open and ready to type into."""
    from test_server import Server

    server = Server(tmp_path / "home", *server_args)
    browser = None
    try:
        browser = Browser(tmp_path / "profile")
        browser.open(server.url + "/")
        browser.wait_for(f"document.getElementById('model').textContent.includes('{model_name}')")
        browser.js("document.getElementById('msg').focus()")
        yield browser
    finally:
        if browser is not None:
            browser.close()
        server.stop()


def test_the_chat_page_shows_each_reply_and_its_statistics(tmp_path):
    with _page(tmp_path, "SmolLM2") as browser:
        browser.type("Name one colour of the sea.")
        first = STATS.fullmatch(browser.wait_for(LAST_STATS % (1, 0)))
        assert first and int(first[1]) == 0 and int(first[3]) > 0 and int(first[4]) > 0
        reply = browser.js("document.querySelector('#log .bot').textContent")
        assert reply.strip()
        shot = browser.screenshot()
        (tmp_path / "chat-page.png").write_bytes(shot)
        # on the screen: the reply's box holds dark text, and with the reply hidden it is blank
        rect = browser.js("(() => { const r = document.querySelector('#log .bot').getBoundingClientRect(); "
                          "return [r.x, r.y, r.width, r.height]; })()")
        assert rect[2] > 0 and rect[3] > 0
        browser.js("document.querySelector('#log .bot').style.visibility = 'hidden'")
        hidden = browser.screenshot()
        browser.js("document.querySelector('#log .bot').style.visibility = ''")
        assert _pixels(shot, rect).min() < 0.5 and _pixels(hidden, rect).min() > 0.95

        # the next turn reuses the conversation's KV: the page resends it, the server finds it
        browser.type("And another one?")
        second = STATS.fullmatch(browser.wait_for(LAST_STATS % (2, 1)))
        assert second and int(second[1]) >= int(first[2]) + int(first[3]) - 1
        assert len(browser.js("[...document.querySelectorAll('#log .bot')].map(b => b.textContent)")) == 2


def test_the_chat_page_shows_a_reasoning_models_thinking_apart(tmp_path):
    from test_reasoning import OPENS

    from loopserve_edge.random_gguf import write_random_llama

    model = write_random_llama(tmp_path / "opens.gguf", seed=0, chat_template=OPENS)
    with _page(tmp_path, "opens", str(model), "--max-tokens", "24") as browser:
        browser.type("Think about it.")
        assert STATS.fullmatch(browser.wait_for(LAST_STATS % (1, 0)))
        # the random model never closes its thinking: all of the reply is thinking, shown apart
        assert browser.js("document.querySelector('#log .thinking').textContent").strip()
        assert browser.js("document.querySelector('#log .bot').textContent") == ""
        browser.type("Again.")
        second = STATS.fullmatch(browser.wait_for(LAST_STATS % (2, 1)))
        assert second and int(second[1]) > 0   # the page sent the answer back: the dialogue went on
