"""The dashboard in a real headless Chromium: log in, submit through the form, watch the job
finish, browse its results and one sample, compare it with another run. Screenshots of each
page are saved in the test's temporary folder."""

from __future__ import annotations

import functools
import shutil
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

import pytest
from conftest import TOKEN
from selenium import webdriver
from selenium.common.exceptions import StaleElementReferenceException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import Select, WebDriverWait

pytestmark = pytest.mark.slow

CHROMEDRIVER = "/usr/bin/chromedriver"
FLAGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-extensions",
         "--disable-background-networking", "--disable-sync", "--disable-default-apps", "--no-first-run",
         "--disable-component-update", "--window-size=1280,1000"]


@pytest.fixture
def browser(tmp_path, monkeypatch):
    monkeypatch.setenv("SE_OFFLINE", "1")  # Selenium Manager must not try to download a driver
    options = webdriver.ChromeOptions()
    for flag in [*FLAGS, f"--user-data-dir={tmp_path / 'profile'}"]:
        options.add_argument(flag)
    options.binary_location = shutil.which("chromium") or "/usr/bin/chromium"
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(180)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture
def foreign_site(tmp_path):
    """Another origin on this machine (127.0.0.1, another port): the same site, so SameSite=Strict lets the cookie go."""
    folder = tmp_path / "foreign"
    folder.mkdir()
    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(SimpleHTTPRequestHandler, directory=str(folder)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield folder, f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def _shot(driver, tmp_path, name: str) -> str:
    path = tmp_path / f"{name}.png"
    assert driver.save_screenshot(str(path)) and path.stat().st_size > 5000
    return driver.find_element(By.TAG_NAME, "body").text


def test_login_submit_watch_results_sample_and_compare(browser, live_service, tiny_model, tmp_path):
    live, driver = live_service, browser
    other = live.client.post("/api/v1/jobs", json={"model": str(tiny_model), "tasks": ["demo_mc"], "limit": 5}).json()["id"]

    driver.get(live.url + "/")
    assert "Paste the service token" in _shot(driver, tmp_path, "1-login")
    driver.find_element(By.ID, "token").send_keys("wrong-token-0123456789")
    driver.find_element(By.ID, "login").click()
    # the login form posts and the page is replaced: read the new page's text, not the old one's
    WebDriverWait(driver, 30, ignored_exceptions=[StaleElementReferenceException]).until(
        lambda d: "not the service's token" in d.find_element(By.TAG_NAME, "body").text
    )
    driver.find_element(By.ID, "token").send_keys(TOKEN)
    driver.find_element(By.ID, "login").click()
    # the click returns before the login's response (and its cookie) has come back
    WebDriverWait(driver, 30).until(lambda d: d.find_elements(By.ID, "submit"))
    cookie = driver.get_cookie("evalfleet_session")
    assert cookie["httpOnly"] is True and cookie["sameSite"] == "Strict"
    assert driver.execute_script("return document.cookie") == ""  # invisible to scripts
    assert "Submit an evaluation" in _shot(driver, tmp_path, "2-jobs")

    for field, value in (("model", "demo"), ("tasks", "demo_mc,demo_arith"), ("limit", "5")):
        element = driver.find_element(By.ID, field)
        element.clear()
        element.send_keys(value)
    Select(driver.find_element(By.ID, "priority")).select_by_visible_text("high")
    driver.find_element(By.ID, "submit").click()
    WebDriverWait(driver, 180).until(lambda d: "/jobs/" in d.current_url)  # a first submit counts the job in a worker process
    job_id = driver.current_url.rstrip("/").split("/")[-1]
    assert len(job_id) == 12

    # The status block refreshes itself (htmx) until the job is done; no reload here.
    WebDriverWait(driver, 240, poll_frequency=0.5, ignored_exceptions=[StaleElementReferenceException]).until(
        lambda d: d.find_element(By.ID, "job-state").text in ("succeeded", "failed", "cancelled"))
    text = _shot(driver, tmp_path, "3-job")
    assert driver.find_element(By.ID, "job-state").text == "succeeded", text
    history = driver.find_element(By.ID, "history").text  # refreshed with the status
    assert "queued" in history and "running" in history and "succeeded" in history
    assert "demo_mc, demo_arith (first 5 each)" in text and "1 started, 0 failed" in text
    done, total = text.split(" requests")[0].rsplit("\n", 1)[-1].split("/")
    assert done == total and int(total) > 0

    driver.find_element(By.ID, "results-link").click()
    text = _shot(driver, tmp_path, "4-results")
    assert f"Results of job {job_id}" in text and "demo_mc" in text and "acc" in text and "exact_match" in text

    driver.find_element(By.LINK_TEXT, "samples").click()
    text = _shot(driver, tmp_path, "5-samples")
    assert "1–5 of 5" in text
    driver.find_elements(By.CLASS_NAME, "sample-link")[1].click()
    text = _shot(driver, tmp_path, "6-sample")
    assert "sample 1" in text and "Choices" in text and "chosen" in text and "log-likelihood" in text.lower()
    assert driver.find_element(By.ID, "prompt").text.strip()
    assert len(driver.find_elements(By.CSS_SELECTOR, "#choices tbody tr")) >= 2

    live.wait_state(other, "succeeded")
    driver.get(live.url + "/results")
    text = _shot(driver, tmp_path, "7-matrix")
    assert job_id in text and other in text and "±" in text

    driver.get(live.url + "/compare")
    Select(driver.find_element(By.ID, "run-a")).select_by_value(job_id)
    Select(driver.find_element(By.ID, "run-b")).select_by_value(other)
    driver.find_element(By.ID, "compare").click()
    text = _shot(driver, tmp_path, "8-compare")
    assert f"A = {job_id}, B = {other}" in text and "mcnemar" in text
    rows = driver.find_elements(By.CSS_SELECTOR, "#comparison tbody tr")
    assert rows and rows[0].text.startswith("demo_mc acc")

    driver.get(live.url + "/pool")
    text = _shot(driver, tmp_path, "9-pool")
    assert "2 CPU slots" in text and "host CPU" in driver.page_source


def test_a_session_survives_nothing_but_its_own_origin_and_ends_at_logout(browser, live_service, foreign_site, tmp_path):
    live, driver = live_service, browser
    folder, foreign = foreign_site
    before = live.client.get("/api/v1/jobs").json()["total"]
    driver.get(live.url + "/login")
    driver.find_element(By.ID, "token").send_keys(TOKEN)
    driver.find_element(By.ID, "login").click()
    WebDriverWait(driver, 30).until(lambda d: d.find_elements(By.ID, "submit"))
    session = driver.get_cookie("evalfleet_session")
    assert session["value"] != TOKEN and TOKEN not in session["value"] and session["httpOnly"] is True

    # A page of another origin posts the dashboard's submit form; the browser sends the cookie along.
    (folder / "attack.html").write_text(
        f'<form id="f" method="post" action="{live.url}/jobs"><input name="model" value="demo">'
        '<input name="tasks" value="demo_ppl"><input name="limit" value="1"></form>'
        '<script>document.getElementById("f").submit()</script>')
    driver.get(foreign + "/attack.html")
    WebDriverWait(driver, 30).until(lambda d: d.current_url.startswith(live.url))
    assert "must come from the service's own pages" in _shot(driver, tmp_path, "10-foreign-post")
    assert live.client.get("/api/v1/jobs").json()["total"] == before  # nothing was queued

    driver.get(live.url + "/")  # the session itself is still good on the service's own pages
    assert "Submit an evaluation" in driver.find_element(By.TAG_NAME, "body").text
    driver.find_element(By.CSS_SELECTOR, "form[action='/logout'] button").click()
    WebDriverWait(driver, 30).until(lambda d: d.current_url.endswith("/login"))
    assert driver.get_cookie("evalfleet_session") is None
    driver.add_cookie({"name": "evalfleet_session", "value": session["value"], "path": "/"})  # a copy kept from before
    driver.get(live.url + "/")
    assert "Paste the service token" in _shot(driver, tmp_path, "11-after-logout")


def test_the_leaderboard_marks_the_best_tests_a_baseline_and_charts_checkpoints(browser, live_service,
                                                                                 leaderboard_jobs, tmp_path):
    live, driver, runs = live_service, browser, leaderboard_jobs
    driver.get(live.url + "/login")
    driver.find_element(By.ID, "token").send_keys(TOKEN)
    driver.find_element(By.ID, "login").click()
    WebDriverWait(driver, 30).until(lambda d: d.find_elements(By.ID, "submit"))

    driver.get(live.url + "/results")
    Select(driver.find_element(By.ID, "group")).select_by_value(runs.group)
    driver.find_element(By.ID, "show-leaderboard").click()
    WebDriverWait(driver, 30).until(lambda d: f"group={runs.group}" in d.current_url)
    _shot(driver, tmp_path, "leaderboard-checkpoints")
    rows = driver.find_elements(By.CSS_SELECTOR, "#leaderboard-1 tbody tr")
    assert [row.text.split()[:3] for row in rows] == [["20", "step-20", runs.jobs["step-20"]],
                                                      ["100", "step-100", runs.jobs["step-100"]]]
    charts = driver.find_elements(By.CSS_SELECTOR, "#step-charts-1 svg.step-chart")
    assert sorted(chart.get_attribute("data-task") for chart in charts) == ["demo_arith", "demo_mc"]
    assert all(len(chart.find_elements(By.CSS_SELECTOR, "circle.point")) == 2 for chart in charts)

    Select(driver.find_element(By.ID, "group")).select_by_value("")
    Select(driver.find_element(By.ID, "baseline")).select_by_value("step-100")
    driver.find_element(By.ID, "show-leaderboard").click()
    WebDriverWait(driver, 30).until(lambda d: "baseline=step-100" in d.current_url)
    _shot(driver, tmp_path, "leaderboard-baseline")
    (table,) = [t for t in driver.find_elements(By.CSS_SELECTOR, "table.leaderboard") if runs.jobs["step-100"] in t.text]
    assert runs.jobs["demo-1shot"] not in table.text  # other settings: another section
    demo = next(r for r in table.find_elements(By.CSS_SELECTOR, "tbody tr") if runs.jobs["demo"] in r.text)
    best = demo.find_elements(By.CSS_SELECTOR, "td.best")
    assert len(best) == 3 and all("★" in cell.text for cell in best)  # both tasks and the mean
    assert "+" in [v.text for v in demo.find_elements(By.CSS_SELECTOR, ".verdict")]
    twin = next(r for r in table.find_elements(By.CSS_SELECTOR, "tbody tr") if runs.jobs["step-20"] in r.text)
    assert {v.text for v in twin.find_elements(By.CSS_SELECTOR, ".verdict")} == {"≈"}


def test_a_group_page_lists_the_sweeps_jobs_and_the_job_list_links_to_it(browser, live_service, tmp_path):
    live, driver = live_service, browser
    sweep = live.client.post("/api/v1/sweeps", json={
        "name": "in-the-browser", "models": ["demo"], "tasks": [["demo_mc"]], "limit": 3,
        "settings": [{"num_fewshot": 0}, {"num_fewshot": 1}]}).json()
    group, jobs = sweep["group"], [cell["job"] for cell in sweep["submitted"]]
    assert len(jobs) == 2

    driver.get(live.url + "/login")
    driver.find_element(By.ID, "token").send_keys(TOKEN)
    driver.find_element(By.ID, "login").click()
    WebDriverWait(driver, 30).until(lambda d: d.find_elements(By.ID, "submit"))
    driver.find_element(By.CSS_SELECTOR, f"a.group-link[href='/groups/{group}']").click()
    WebDriverWait(driver, 30).until(lambda d: d.current_url.endswith(f"/groups/{group}"))
    assert f"group {group}" in driver.find_element(By.TAG_NAME, "h1").text and "in-the-browser" in driver.title

    text = _shot(driver, tmp_path, "group")
    assert "2 jobs:" in text

    def rows(d):  # read at once: htmx swaps the table every 2 s while a job runs
        return [(row.find_element(By.TAG_NAME, "a").get_attribute("href"), row.find_element(By.CLASS_NAME, "state").text,
                 row.find_element(By.CLASS_NAME, "job-settings").text, row.text)
                for row in d.find_elements(By.CSS_SELECTOR, "#jobs-table tbody tr")]

    shown = WebDriverWait(driver, 30, ignored_exceptions=[StaleElementReferenceException]).until(rows)
    assert [href for href, *_ in shown] == [f"{live.url}/jobs/{job}" for job in jobs]
    assert [settings for _, _, settings, _ in shown] == ["(num_fewshot=0)", "(num_fewshot=1)"]
    assert all(state in ("queued", "placed", "running", "succeeded") and "demo / demo_mc" in row
               for _, state, _, row in shown), shown
    driver.get(shown[1][0])
    assert driver.find_element(By.TAG_NAME, "h1").text == f"Job {jobs[1]}"
    assert live.client.post(f"/api/v1/groups/{group}/cancel").status_code in (200, 409)  # no load left behind
