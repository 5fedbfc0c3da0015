"""Headless Chromium for the page's test and its screenshots: the system's browser, driven by
Playwright.

Why Playwright over raw DevTools (``--remote-debugging-port``) or ``chromium --screenshot``:
``--screenshot`` cannot click, and a hand-written DevTools client would re-implement what
Playwright already does well (waiting for an element, clicking it, a screenshot of the page).
Why Debian's ``chromium`` rather than Playwright's own browser build: ``playwright install``
downloads that build from outside the package registries, which this project's machines (and
CI) cannot reach; Playwright drives any recent Chromium through ``executable_path``.

The flags: a closed network refuses Chromium's own background connections (component updates,
sync, field trials), so they are turned off; ``--no-sandbox`` because tests run as root;
``--disable-gpu`` because there is none. Playwright gives each launch a new, empty profile.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from playwright.sync_api import Page

CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
VIEWPORT = {"width": 1280, "height": 860}


def find_chromium() -> str | None:
    """The system Chromium: ``$RAYREC_CHROMIUM``, else ``chromium`` (Debian) or ``chromium-browser`` on PATH."""
    return os.environ.get("RAYREC_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")


@contextmanager
def chromium_page(viewport: dict[str, int] = VIEWPORT) -> Iterator[Page]:
    """A page in a fresh headless Chromium, closed on exit.

    Raises ``FileNotFoundError`` when no Chromium is installed (``apt-get install chromium``).
    """
    from playwright.sync_api import sync_playwright

    executable = find_chromium()
    if executable is None:
        raise FileNotFoundError("no chromium on PATH: apt-get install chromium (or set RAYREC_CHROMIUM)")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable, headless=True, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport=viewport)
            page.set_default_timeout(60_000)  # a loaded 2-core machine: the first request can take seconds
            yield page
        finally:
            browser.close()


def show_user(page: Page, base_url: str, user_id: int) -> None:
    """Open ``/ui`` and show ``user_id`` the way a person would: type the ID, press Enter, wait
    until the page says it has rendered that user."""
    page.goto(f"{base_url}/ui")
    page.fill("#user", str(user_id))
    page.press("#user", "Enter")
    page.wait_for_selector(f'body[data-shown="{user_id}"]')
