"""Browser tests of the web admin: Debian's chromium and chromedriver driven by Selenium, one browser per module.

Nothing is downloaded: the driver path is given, so Selenium Manager never runs. A screenshot of each page is
saved under the module's temporary directory (``screenshots/``).
"""

import os
import shutil
import tempfile

import pytest
from selenium import webdriver
from selenium.common.exceptions import StaleElementReferenceException
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from pmaster.tests.daemon_fixture import wait_for
from pmaster.tests.webadmin_fixture import PASSWORD, Web, queued, send, start_web_daemon

WAIT = 20


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("browser")
    daemon = start_web_daemon(tmp)
    profile = tempfile.mkdtemp(dir=str(tmp))
    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--window-size=1280,1000", "--user-data-dir=%s" % profile):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=webdriver.ChromeService(executable_path="/usr/bin/chromedriver"),
                              options=options)
    driver.set_page_load_timeout(WAIT)
    shots = os.path.join(str(tmp), "screenshots")
    os.makedirs(shots)
    base = "http://127.0.0.1:%d" % daemon.web_port
    try:
        driver.get(base + "/login")
        driver.find_element(By.ID, "user").send_keys("admin")
        driver.find_element(By.ID, "password").send_keys(PASSWORD)
        driver.find_element(By.ID, "login").click()
        WebDriverWait(driver, WAIT).until(lambda d: d.find_elements(By.ID, "chart-svg"))
        yield {"driver": driver, "daemon": daemon, "base": base, "shots": shots}
    finally:
        driver.quit()
        daemon.stop()
        shutil.rmtree(profile, ignore_errors=True)


def _shot(env, name):
    path = os.path.join(env["shots"], "webadmin-%s.png" % name)
    env["driver"].save_screenshot(path)
    assert os.path.getsize(path) > 1000


def _api(env) -> Web:
    web = Web(env["daemon"].web_port)
    web.login()
    return web


def test_log_in_shows_the_dashboard(env):
    d = env["driver"]
    d.get(env["base"] + "/")
    assert d.find_element(By.ID, "chart-svg")
    assert "Dashboard" in d.title
    _shot(env, "dashboard")


def test_chart_moves_after_mail_is_sent(env):
    d = env["driver"]
    d.get(env["base"] + "/")

    def received_sum():
        # The chart is redrawn at every event: an element found a moment ago may be gone; look again.
        for _ in range(50):
            try:
                lines = d.find_elements(By.CSS_SELECTOR, "#chart-svg polyline[data-series=received]")
                return int(lines[0].get_attribute("data-sum")) if lines else -1
            except StaleElementReferenceException:
                continue
        return -1

    before = received_sum()
    for i in range(3):
        send(env["daemon"], "alice@example.org", "chart%d@sent.example" % i, "chart")
    WebDriverWait(d, WAIT).until(lambda _: received_sum() >= before + 3)
    WebDriverWait(d, WAIT, ignored_exceptions=(StaleElementReferenceException,)).until(
        lambda _: int(d.find_element(By.ID, "total-received").text or "0") >= 3)
    _shot(env, "dashboard-live")


def test_hold_release_and_delete_a_message(env):
    d = env["driver"]
    web = _api(env)
    send(env["daemon"], "alice@example.org", "browser@example.org", "browser subject")
    qid = wait_for(lambda: queued(web, recipient="browser@example.org"), 15)[0]["id"]
    d.get(env["base"] + "/queue")
    _shot(env, "queue")
    d.find_element(By.LINK_TEXT, qid).click()
    _shot(env, "message")
    for action, effect in (("hold", "held"), ("release", "released"), ("delete", "deleted")):
        if action != "hold":
            d.get(env["base"] + "/queue/" + qid)
        d.find_element(By.ID, "one-" + action).click()
        WebDriverWait(d, WAIT).until(lambda x: x.find_elements(By.ID, "confirm"))
        d.find_element(By.ID, "confirm").click()
        WebDriverWait(d, WAIT).until(lambda x: x.find_elements(By.ID, "effects"))
        assert "%s: %s" % (qid, effect) in d.find_element(By.ID, "effects").text
        if action == "hold":
            assert env["daemon"].envelope(qid)["held"] is True
        elif action == "release":
            assert env["daemon"].envelope(qid)["held"] is False
    assert qid not in env["daemon"].queue_ids()


def _edit_config(env, text, button):
    d = env["driver"]
    d.get(env["base"] + "/config")
    area = d.find_element(By.ID, "config-text")
    d.execute_script("arguments[0].value = arguments[1];", area, text)
    d.find_element(By.ID, button).click()


def test_config_with_an_error_shows_it_at_its_line_and_is_not_applied(env):
    daemon = env["daemon"]
    bad = daemon.config_text.replace("  retry-max = 4h\n", "  retry-max = whenever\n")
    line = bad.split("\n").index("  retry-max = whenever") + 1
    _edit_config(env, bad, "apply")
    d = env["driver"]
    diag = WebDriverWait(d, WAIT).until(lambda x: x.find_elements(By.CSS_SELECTOR, "#line-%d .diag.error" % line))
    assert diag[0].text.startswith("%d:" % line)
    assert d.find_element(By.ID, "apply-error")
    _shot(env, "config-error")
    with open(daemon.config_path) as f:
        assert f.read() == daemon.config_text


def test_valid_config_is_applied_and_the_route_tester_shows_the_new_route(env):
    daemon = env["daemon"]
    new = daemon.config_text.replace("[route]\n", "[route]\n  @browser.example  pipe(cat >/dev/null)\n")
    _edit_config(env, new, "apply")
    d = env["driver"]
    WebDriverWait(d, WAIT).until(lambda x: x.find_elements(By.ID, "applied"))
    _shot(env, "config")
    d.get(env["base"] + "/route")
    d.find_element(By.ID, "address").send_keys("someone@browser.example")
    d.find_element(By.ID, "route").click()
    result = WebDriverWait(d, WAIT).until(lambda x: x.find_elements(By.ID, "route-result"))
    assert "cat >/dev/null" in result[0].text
    assert '"recipient": "someone@browser.example"' in result[0].text
    _shot(env, "route")
