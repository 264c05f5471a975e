"""Render a report.html in headless Chromium and save a PNG screenshot, to look at a report as a browser shows it.

    python scripts/screenshot_report.py outputs/quickstart/<date>/<time>/report.html /tmp/report.png
    python scripts/screenshot_report.py <report.html> <out.png> --width 1200 --height 3000

Needs a Chromium (Debian: apt-get install -y chromium). The page is loaded from file:// with networking
features off, so the screenshot also shows that the page needs nothing from the network.
"""

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def screenshot(report: Path, png: Path, width: int = 1200, height: int = 2000, timeout: int = 120) -> Path:
    """Save Chromium's rendering of `report` (width x height pixels) to `png`."""
    browser = next((b for b in map(shutil.which, BROWSERS) if b), None)
    if browser is None:
        sys.exit(f"no Chromium found (tried {', '.join(BROWSERS)}): apt-get install -y chromium")
    png = png.absolute()
    png.unlink(missing_ok=True)  # Chromium exits 0 on some failures: a fresh file is the proof it worked
    with tempfile.TemporaryDirectory() as profile:  # a throwaway profile: no state kept between runs
        subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                        "--disable-background-networking", "--disable-component-update", "--disable-sync",
                        "--hide-scrollbars", f"--user-data-dir={profile}", f"--screenshot={png}",
                        f"--window-size={width},{height}", report.absolute().as_uri()],
                       check=True, capture_output=True, timeout=timeout)
    if not png.is_file():
        sys.exit(f"Chromium wrote no screenshot of {report}")
    return png


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("report", type=Path, help="the report.html to render")
    parser.add_argument("png", type=Path, help="where to save the screenshot (keep it out of the repository)")
    parser.add_argument("--width", type=int, default=1200)
    parser.add_argument("--height", type=int, default=2000)
    args = parser.parse_args()
    if not args.report.is_file():
        sys.exit(f"{args.report} is not a file")
    print(screenshot(args.report, args.png, args.width, args.height))


if __name__ == "__main__":
    main()
