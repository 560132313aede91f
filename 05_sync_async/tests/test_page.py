"""The one-page demo in a real headless Chromium, driven over the DevTools protocol."""

import asyncio
import itertools
import json
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest
import redis
from conftest import CAT_CLASSES, CHAPTER, Started, start_worker, wait_until

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="needs Chromium (Debian: apt-get install chromium)"
)


@pytest.fixture
def devtools(tmp_path: Path) -> Iterator[str]:
    """A headless Chromium; yields the DevTools HTTP address."""
    assert CHROMIUM is not None  # pytestmark skips the module without it
    browser = subprocess.Popen(
        [
            CHROMIUM,
            "--headless",
            "--no-sandbox",  # tests may run as root, where Chromium refuses its sandbox
            "--disable-gpu",
            "--remote-debugging-port=0",
            f"--user-data-dir={tmp_path}",
            "about:blank",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # its renderer and helper processes share the group
    )
    # With port 0 Chromium picks a free port and writes it to this file.
    port_file = tmp_path / "DevToolsActivePort"
    wait_until(lambda: port_file.exists() and port_file.read_text().strip(), 60, "Chromium")
    yield f"http://127.0.0.1:{port_file.read_text().split()[0]}"
    os.killpg(browser.pid, signal.SIGKILL)
    browser.wait()


class Page:
    """Just enough of the DevTools protocol: send a command, wait for its answer."""

    def __init__(self, socket: aiohttp.ClientWebSocketResponse):
        self.socket, self.ids = socket, itertools.count(1)

    async def send(self, method: str, **params: object) -> dict:
        command_id = next(self.ids)
        await self.socket.send_json({"id": command_id, "method": method, "params": params})
        async for message in self.socket:
            answer = json.loads(message.data)
            if answer.get("id") == command_id:  # everything else is an event
                assert "error" not in answer, answer
                result: dict = answer["result"]
                return result
        raise ConnectionError("DevTools connection closed")

    async def text(self, element_id: str) -> str | None:
        """The element's text, or None while the page has no such element (yet)."""
        script = f"document.getElementById({element_id!r})?.textContent ?? null"
        value: str | None = (await self.send("Runtime.evaluate", expression=script))["result"].get(
            "value"
        )
        return value


async def pick_the_sample_and_wait(
    devtools: str, url: str
) -> tuple[str | None, str | None, str | None]:
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{devtools}/json/list") as response:
            (target,) = [t for t in await response.json() if t["type"] == "page"]
        async with session.ws_connect(target["webSocketDebuggerUrl"], max_msg_size=0) as socket:
            page = Page(socket)
            await page.send("Page.enable")
            await page.send("Page.navigate", url=url)
            while await page.text("file") is None:  # the input exists once the page is parsed
                await asyncio.sleep(0.1)
            root = (await page.send("DOM.getDocument"))["root"]["nodeId"]
            node = (await page.send("DOM.querySelector", nodeId=root, selector="#file"))["nodeId"]
            # As if the user picked the file: Chromium fires the input's change event.
            sample = str(CHAPTER / "samples" / "chelsea.jpg")
            await page.send("DOM.setFileInputFiles", nodeId=node, files=[sample])
            deadline = time.monotonic() + 90
            while time.monotonic() < deadline:
                accurate = await page.text("async")
                if accurate == "Egyptian cat" or await page.text("error"):
                    break
                await asyncio.sleep(0.1)
            return await page.text("sync"), await page.text("async"), await page.text("error")


def test_the_page_shows_both_answers(
    proxy: str, start: Started, db: redis.Redis, devtools: str
) -> None:
    start_worker(start)
    sync, accurate, error = asyncio.run(pick_the_sample_and_wait(devtools, f"{proxy}/"))
    assert error == ""
    assert sync in CAT_CLASSES
    assert accurate == "Egyptian cat"
