"""A real browser for the test world: one page load in headless Chromium, timed by the browser.

Run it inside a namespace (``world.run("laptop", python_argv("braid.netbed.browser", URL))``):
chromedriver and Chromium then live there too, and their connections leave through that
namespace's routes, or through ``--proxy`` (e.g. ``socks5://127.0.0.1:1080``; with a SOCKS5
proxy Chromium has names resolved by the proxy)::

    python -m braid.netbed.browser 'http://198.19.0.1/page/60?size=71680&v=1' \\
        --proxy socks5://127.0.0.1:1080

Every load gets a fresh profile (no cache, no cookies, no connections kept from before) and QUIC
is off; with a proxy, Chromium's own background requests bypass it (:data:`PROXY_BYPASS`). It prints one JSON object: ``load_ms`` (the navigation entry's ``loadEventEnd -
startTime``), ``dom_content_loaded_ms``, ``response_start_ms``, ``resources`` (entries of the
resource timeline), ``scripts`` (``window.braidScripts``: how many of the target's scripts
ran), and ``error`` (None when the page loaded). It exits with status 0 if it loaded, 1 if not.

Needs Debian's ``chromium`` and ``chromium-driver`` and the ``selenium`` package (the ``bench``
extra); :func:`unavailable_reason` says what is missing.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import shutil
import sys
import tempfile
import time
from typing import Any

CHROMIUM = "chromium"
CHROMEDRIVER = "chromedriver"
FLAGS = (
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--no-default-browser-check",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-extensions",
    "--disable-dev-shm-usage",
)

#: With a proxy, these go direct: Chromium's own background requests (update.googleapis.com,
#: clients2.google.com, accounts.google.com, the search engine's preconnect) would otherwise each
#: take a proxy connection (from Braid's warm pool too) in the middle of the measured load, and
#: fail at the server, which cannot resolve them. Sent direct they fail at once at the laptop's
#: resolver, as they do in a load without a proxy.
PROXY_BYPASS = "*.com;*.net;*.org"


def unavailable_reason(chromium: str = CHROMIUM, chromedriver: str = CHROMEDRIVER) -> str | None:
    """Why a page cannot be loaded here, or None if it can."""
    missing = [name for name in (chromium, chromedriver) if shutil.which(name) is None]
    if importlib.util.find_spec("selenium") is None:
        missing.append("the selenium package (pip install -e '.[bench]')")
    if missing:
        return f"missing {', '.join(missing)} (Debian: chromium chromium-driver)"
    return None


_TIMING = """
const nav = performance.getEntriesByType('navigation')[0];
return {
    nav: nav ? nav.toJSON() : null,
    resources: performance.getEntriesByType('resource').length,
    scripts: window.braidScripts || 0,
};
"""


def load(
    url: str,
    proxy: str | None = None,
    timeout: float = 60.0,
    chromium: str = CHROMIUM,
    chromedriver: str = CHROMEDRIVER,
) -> dict[str, Any]:
    """Load ``url`` once in a fresh headless Chromium; what the browser measured (see above)."""
    from selenium import webdriver
    from selenium.common.exceptions import WebDriverException
    from selenium.webdriver.chrome.service import Service

    out: dict[str, Any] = {"url": url, "proxy": proxy, "error": None}
    profile = tempfile.mkdtemp(prefix="braid-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which(chromium) or chromium
    for flag in FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={profile}")
    if proxy:
        options.add_argument(f"--proxy-server={proxy}")
        options.add_argument(f"--proxy-bypass-list={PROXY_BYPASS}")
    else:
        options.add_argument("--no-proxy-server")
    options.page_load_strategy = "normal"  # get() returns after the load event
    driver = None
    began = time.monotonic()
    try:
        driver = webdriver.Chrome(
            options=options, service=Service(shutil.which(chromedriver) or chromedriver)
        )
        out["browser_start_s"] = round(time.monotonic() - began, 3)
        driver.set_page_load_timeout(timeout)
        driver.get(url)
        timing = driver.execute_script(_TIMING)
        nav = timing["nav"]
        if not nav or not nav.get("loadEventEnd"):
            out["error"] = "no navigation timing (the page did not load)"
        else:
            start = nav["startTime"]
            out["load_ms"] = round(nav["loadEventEnd"] - start, 1)
            out["dom_content_loaded_ms"] = round(nav["domContentLoadedEventEnd"] - start, 1)
            out["response_start_ms"] = round(nav["responseStart"] - start, 1)
        out["resources"] = timing["resources"]
        out["scripts"] = timing["scripts"]
    except WebDriverException as exc:
        out["error"] = (exc.msg or type(exc).__name__).strip().splitlines()[0]
    finally:
        if driver is not None:
            driver.quit()
        shutil.rmtree(profile, ignore_errors=True)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m braid.netbed.browser",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("url")
    parser.add_argument("--proxy", help="e.g. socks5://127.0.0.1:1080 (default: none)")
    parser.add_argument("--timeout", type=float, default=60.0, help="page load timeout (s)")
    parser.add_argument("--chromium", default=CHROMIUM)
    parser.add_argument("--chromedriver", default=CHROMEDRIVER)
    args = parser.parse_args(argv)
    reason = unavailable_reason(args.chromium, args.chromedriver)
    if reason:
        result: dict[str, Any] = {"url": args.url, "error": reason}
    else:
        result = load(args.url, args.proxy, args.timeout, args.chromium, args.chromedriver)
    sys.stdout.write(json.dumps(result) + "\n")
    return 0 if result["error"] is None else 1


if __name__ == "__main__":
    sys.exit(main())
