"""The Ray dashboard of a running search, opened in headless Chromium with token authentication
on, as Ray documents it: the token goes in the dashboard's sign-in prompt (a cookie afterwards).
Writes docs/dashboard.png (the named actors) and docs/metrics-sample.txt (the engine's
ray_autoprune_* metrics as the node's Prometheus endpoint exports them).

Needs Debian's chromium and PyPI's playwright (no browser download: /usr/bin/chromium is used).
    python benchmarks/dashboard.py
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DASHBOARD = "http://127.0.0.1:8265"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-sync",
                 "--disable-background-networking", "--disable-component-update"]


def token() -> str:
    return (Path.home() / ".ray" / "auth_token").read_text().strip()


def api(path: str, port_url: str = DASHBOARD, timeout: float = 5.0):
    request = urllib.request.Request(port_url + path, headers={"Authorization": f"Bearer {token()}"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return response.read().decode()


def wait_for(check, what: str, seconds: float = 600.0):
    deadline = time.time() + seconds
    while time.time() < deadline:
        try:
            value = check()
            if value:
                return value
        except Exception:   # noqa: BLE001 - not up yet
            pass
        time.sleep(2)
    raise TimeoutError(f"waited {seconds:.0f} s for {what}")


def start_search(run_dir: Path) -> subprocess.Popen:
    args = ["autoprune-ray", "run", str(ROOT / "configs/quick.yaml"), "--no-progress",
            "--set", "ray.include_dashboard=true", "--set", "name=dashboard", "--set", f"run_dir={run_dir}",
            "--set", "search.max_evaluations=12"]
    return subprocess.Popen(args, cwd=ROOT, start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=open(run_dir.parent / "dashboard-run.log", "w"))


def actor_names() -> list[str]:
    listed = json.loads(api("/api/v0/actors?limit=100"))
    return sorted(a.get("name") or "" for a in listed["data"]["result"]["result"] if a.get("state") == "ALIVE")


def metrics_lines() -> list[str]:
    nodes = json.loads(api("/nodes?view=summary"))
    ports = {int(m.group(1)) for m in re.finditer(r'"metricsExportPort":\s*(\d+)', json.dumps(nodes))}
    for port in ports:
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
        lines = [line for line in text.splitlines() if "ray_autoprune" in line and not line.startswith("#")]
        if lines:
            return lines
    return []


def screenshot(out: Path) -> None:
    from playwright.sync_api import sync_playwright
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 900})
        page.goto(DASHBOARD + "/#/actors")
        prompt = page.get_by_role("dialog")   # Ray's prompt: "Authentication Token Required"
        prompt.wait_for(timeout=30_000)
        prompt.locator("input").first.fill(token())
        page.keyboard.press("Enter")
        page.wait_for_timeout(3000)
        page.goto(DASHBOARD + "/#/actors")
        page.wait_for_timeout(8000)
        page.screenshot(path=str(out))
        text = page.inner_text("body")
        browser.close()
    if "evaluator-0" not in text:
        raise RuntimeError(f"the actors page does not name the evaluator; it shows: {text[:600]!r}")


def main() -> int:
    work = Path("/tmp/autoprune-dashboard")
    shutil.rmtree(work, ignore_errors=True)   # a fresh run each time
    work.mkdir()
    run = start_search(work / "run")
    try:
        names = wait_for(lambda: [n for n in actor_names() if n.startswith("dashboard:")] or None, "the actors")
        print("actors:", names)
        wait_for(lambda: any("evaluated" in x for x in metrics_lines()), "a first evaluation")
        lines = metrics_lines()
        (ROOT / "docs").mkdir(exist_ok=True)
        (ROOT / "docs/metrics-sample.txt").write_text("\n".join(lines) + "\n")
        screenshot(ROOT / "docs/dashboard.png")
        print("wrote docs/dashboard.png and docs/metrics-sample.txt")
    finally:
        os.killpg(run.pid, signal.SIGINT)
        try:
            run.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(run.pid, signal.SIGKILL)
    return 0


if __name__ == "__main__":
    sys.exit(main())
