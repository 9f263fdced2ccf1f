"""Open a report.html in headless Chromium, check that it renders, and take a screenshot.

    python scripts/screenshot_report.py RUN/report.html [--out report.png] [--width 1200] [--height 1600]

Prints one JSON line: the page title, how many images it has and how many failed to load, the
page height, and the browser console's errors. Exits 1 if an image failed to load or the console
logged an error. Needs Debian's ``chromium`` and ``chromium-driver`` (``/usr/bin/chromium``,
``/usr/bin/chromedriver``; ``apt-get install chromium chromium-driver``) and ``selenium`` (the
``dev`` extra); nothing is downloaded.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"

# Headless, as root, and quiet on a closed network: no background connections, no updates.
FLAGS = (
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
)


def browser_paths() -> tuple[str, str] | None:
    """Chromium and ChromeDriver, or None when either is missing."""
    chromium = shutil.which("chromium") or (CHROMIUM if Path(CHROMIUM).exists() else None)
    driver = shutil.which("chromedriver") or (CHROMEDRIVER if Path(CHROMEDRIVER).exists() else None)
    return (chromium, driver) if chromium and driver else None


def check_page(path: Path, out: Path | None, width: int = 1200, height: int = 1600) -> dict:
    """Load ``path`` in headless Chromium; what it rendered, and a screenshot at ``out``."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    paths = browser_paths()
    if paths is None:
        raise FileNotFoundError("Chromium or ChromeDriver is missing: apt-get install chromium chromium-driver")
    options = webdriver.ChromeOptions()
    options.binary_location = paths[0]
    for flag in FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--window-size={width},{height}")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    with tempfile.TemporaryDirectory() as profile:
        options.add_argument(f"--user-data-dir={profile}")
        driver = webdriver.Chrome(options=options, service=Service(executable_path=paths[1]))
        try:
            driver.get(Path(path).resolve().as_uri())
            state = driver.execute_script(
                "return {ready: document.readyState, title: document.title,"
                " height: document.documentElement.scrollHeight,"
                " images: Array.from(document.images).map(i => [i.complete, i.naturalWidth, i.alt])}"
            )
            console = driver.get_log("browser")
            if out is not None:
                driver.save_screenshot(str(out))
        finally:
            driver.quit()
    broken = [alt for complete, natural_width, alt in state["images"] if not (complete and natural_width > 0)]
    return {
        "ready": state["ready"],
        "title": state["title"],
        "height": state["height"],
        "images": len(state["images"]),
        "broken_images": broken,
        "console_errors": [entry["message"] for entry in console if entry["level"] in ("SEVERE", "ERROR")],
        "console": len(console),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("report", type=Path)
    parser.add_argument("--out", type=Path, default=None, help="the screenshot (PNG)")
    parser.add_argument("--width", type=int, default=1200)
    parser.add_argument("--height", type=int, default=1600)
    args = parser.parse_args()
    result = check_page(args.report, args.out, args.width, args.height)
    print(json.dumps(result))
    return 0 if result["ready"] == "complete" and not result["broken_images"] and not result["console_errors"] else 1


if __name__ == "__main__":
    sys.exit(main())
