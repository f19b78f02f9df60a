"""HTTP-level tests of the web admin against a real daemon on loopback (SPEC 8)."""

import json
import os
import re
import subprocess
import sys
import urllib.parse

import pytest

from pmaster.tests.daemon_fixture import REPO, wait_for
from pmaster.tests.webadmin_fixture import PASSWORD, Web, queued, send, start_web_daemon

XSS_SENDER = '"<script>s()</script>"@example.org'
XSS_RCPT = '"<script>r()</script>"@example.org'


@pytest.fixture(scope="module")
def daemon(tmp_path_factory):
    d = start_web_daemon(tmp_path_factory.mktemp("web"))
    yield d
    d.stop()


@pytest.fixture
def web(daemon):
    w = Web(daemon.web_port)
    assert w.login().status == 303
    return w


def _one(web, daemon, rcpt, subject="plain"):
    before = {m["id"] for m in queued(web)}
    send(daemon, "alice@example.org", rcpt, subject)
    found = wait_for(lambda: [m for m in queued(web, recipient=rcpt) if m["id"] not in before], 15)
    assert found, "message to %s not in the queue" % rcpt
    return found[0]["id"]


def _raw_script(text: str) -> bool:
    return re.search(r"<script>[a-z]+\(?\)?</script>", text) is not None


# -- every route needs a session

@pytest.mark.parametrize("path", ["/", "/queue", "/queue/0123456789ABCDEFGH", "/config", "/route?address=a@b"])
def test_page_without_session_redirects_to_login(daemon, path):
    reply = Web(daemon.web_port).get(path)
    assert reply.status == 303
    assert reply.headers["Location"].startswith("/login")


def test_event_stream_without_session_is_refused(daemon):
    assert Web(daemon.web_port).get("/events").status == 401


@pytest.mark.parametrize("path", ["/api/stats", "/api/queue", "/api/config", "/api/route?address=a@example.org"])
def test_api_without_session_or_basic_is_refused(daemon, path):
    reply = Web(daemon.web_port).get(path)
    assert reply.status == 401
    assert reply.headers["WWW-Authenticate"].startswith("Basic")


def test_api_accepts_http_basic(daemon):
    token = __import__("base64").b64encode(("admin:%s" % PASSWORD).encode()).decode()
    reply = Web(daemon.web_port).get("/api/stats", {"Authorization": "Basic " + token})
    assert reply.status == 200
    assert "totals" in reply.json()


def test_post_without_session_changes_nothing(daemon, web):
    qid = _one(web, daemon, "nosession@example.org")
    reply = Web(daemon.web_port).post_form("/queue/action", {"action": "delete", "id": qid, "confirm": "yes"})
    assert reply.status == 401
    assert qid in daemon.queue_ids()


# -- log-in

def test_wrong_password_is_refused(daemon):
    w = Web(daemon.web_port, source="127.0.0.2")
    reply = w.login(password="wrong")
    assert reply.status == 403
    assert "Wrong user name or password" in reply.text
    assert not w.cookies.get("pmaster_session")
    assert w.get("/").status == 303


def test_failed_logins_are_slowed_per_client(daemon):
    slow = Web(daemon.web_port, source="127.0.0.3")
    for _ in range(3):
        assert slow.login(password="wrong").status == 403
    refused = slow.login()  # the right password, but too soon
    assert refused.status == 403
    assert "wait" in refused.text
    assert "Retry-After" in refused.headers
    other = Web(daemon.web_port, source="127.0.0.4")
    assert other.login().status == 303


def test_session_cookie_is_httponly_and_samesite_strict(daemon):
    reply = Web(daemon.web_port).login()
    cookie = reply.headers["Set-Cookie"]
    assert "HttpOnly" in cookie
    assert "SameSite=Strict" in cookie
    assert "Secure" not in cookie  # plain HTTP on loopback


def test_login_with_foreign_origin_is_refused(daemon):
    w = Web(daemon.web_port)
    reply = w.post_form("/login", {"user": "admin", "password": PASSWORD}, origin="http://evil.example")
    assert reply.status == 403
    assert not w.cookies.get("pmaster_session")


def test_logout_ends_the_session(daemon, web):
    assert web.post_form("/logout", {"csrf": web.csrf()}).status == 303
    assert web.get("/queue").status == 303


# -- headers

@pytest.mark.parametrize("path", ["/login", "/static/app.css", "/no-such-page", "/api/stats", "/"])
def test_security_headers_on_every_response(daemon, web, path):
    for client in (web, Web(daemon.web_port)):
        reply = client.get(path)
        csp = reply.headers["Content-Security-Policy"]
        assert "default-src 'self'" in csp and "frame-ancestors 'none'" in csp
        assert "unsafe-inline" not in csp
        assert reply.headers["X-Content-Type-Options"] == "nosniff"
        assert reply.headers["Referrer-Policy"] == "no-referrer"


def test_pages_load_nothing_from_outside_and_have_no_inline_script(web):
    for path in ("/", "/queue", "/config", "/route"):
        text = web.get(path).text
        assert not re.search(r'(src|href)="(https?:)?//', text)
        assert re.findall(r"<script[^>]*>", text) == ['<script src="/static/app.js" defer>']


# -- CSRF and origin

def test_post_without_csrf_token_changes_nothing(daemon, web):
    qid = _one(web, daemon, "nocsrf@example.org")
    reply = web.post_form("/queue/action", {"action": "hold", "id": qid, "confirm": "yes"})
    assert reply.status == 403
    assert daemon.envelope(qid).get("held") is not True


def test_post_with_foreign_origin_changes_nothing(daemon, web):
    qid = _one(web, daemon, "foreign@example.org")
    reply = web.post_form("/queue/action", {"action": "delete", "id": qid, "confirm": "yes", "csrf": web.csrf()},
                          origin="http://evil.example")
    assert reply.status == 403
    assert qid in daemon.queue_ids()


def test_post_without_origin_or_referer_changes_nothing(daemon, web):
    qid = _one(web, daemon, "noorigin@example.org")
    reply = web.post_form("/queue/action", {"action": "delete", "id": qid, "confirm": "yes", "csrf": web.csrf()},
                          origin=None)
    assert reply.status == 403
    assert qid in daemon.queue_ids()


def test_post_with_same_origin_referer_and_token_holds(daemon, web):
    qid = _one(web, daemon, "referer@example.org")
    reply = web.post_form("/queue/action", {"action": "hold", "id": qid, "confirm": "yes", "csrf": web.csrf()},
                          origin=None, headers={"Referer": web.origin + "/queue"})
    assert reply.status == 200
    assert "%s: held" % qid in reply.text
    assert daemon.envelope(qid)["held"] is True


def test_basic_api_post_needs_json(daemon, web):
    qid = _one(web, daemon, "basicform@example.org")
    token = __import__("base64").b64encode(("admin:%s" % PASSWORD).encode()).decode()
    w = Web(daemon.web_port)
    reply = w.post_form("/api/queue/action", {"action": "delete", "ids": qid}, headers={"Authorization": "Basic " + token})
    assert reply.status == 403
    assert qid in daemon.queue_ids()


def test_get_never_changes_state(daemon, web):
    qid = _one(web, daemon, "get@example.org")
    reply = web.get("/queue/action?" + urllib.parse.urlencode({"action": "delete", "id": qid, "confirm": "yes"}))
    assert reply.status in (404, 405)
    assert qid in daemon.queue_ids()


# -- escaping of what came from mail

def test_script_in_subject_sender_and_recipient_is_escaped(daemon, web):
    before = {m["id"] for m in queued(web)}
    send(daemon, XSS_SENDER, XSS_RCPT, "<script>subj()</script>")
    new = wait_for(lambda: [m for m in queued(web) if m["id"] not in before], 15)
    qid = new[0]["id"]
    for path in ("/queue", "/queue?text=script", "/queue/" + qid):
        text = web.get(path).text
        assert not _raw_script(text), path
        assert "&lt;script&gt;subj()&lt;/script&gt;" in text


def test_script_in_last_reply_is_escaped(daemon, web):
    qid = _one(web, daemon, "x@xss.example")
    wait_for(lambda: "reply" in json.dumps(web.get("/api/queue/" + qid).json()["recipients"]), 15)
    text = web.get("/queue/" + qid).text
    assert "&lt;script&gt;reply&lt;/script&gt;" in text
    assert not _raw_script(text)


def test_script_in_bounce_text_is_escaped(daemon, web):
    before = {m["id"] for m in queued(web)}
    send(daemon, "returned@example.org", "x@bounce.example", "will bounce")
    report = wait_for(lambda: [m for m in queued(web, recipient="returned@example.org") if m["id"] not in before], 20)
    qid = report[0]["id"]
    detail = web.get("/api/queue/" + qid).json()
    assert "<script>bounced</script>" in detail["body_preview"]
    text = web.get("/queue/" + qid).text
    assert "&lt;script&gt;bounced&lt;/script&gt;" in text
    assert not _raw_script(text)


def test_script_in_log_line_is_escaped(daemon, web):
    before = {m["id"] for m in queued(web)}
    send(daemon, XSS_SENDER, "logline@example.org", "log")
    qid = wait_for(lambda: [m for m in queued(web) if m["id"] not in before], 15)[0]["id"]
    wait_for(lambda: web.get("/api/queue/" + qid).json()["log"], 15)
    text = web.get("/queue/" + qid).text
    log_html = text[text.index('id="log"'):]
    assert "from=&lt;&quot;&lt;script&gt;s()&lt;/script&gt;&quot;@example.org&gt;" in log_html
    assert not _raw_script(text)


# -- queue

def test_queue_filter_by_recipient_domain_state_and_text(daemon, web):
    qid = _one(web, daemon, "filterme@example.org", "unusual-subject-42")
    assert [m["id"] for m in queued(web, recipient="filterme@")] == [qid]
    assert qid in [m["id"] for m in queued(web, domain="example.org")]
    assert qid not in [m["id"] for m in queued(web, domain="other.test")]
    assert qid in [m["id"] for m in queued(web, state="deferred")]
    assert [m["id"] for m in queued(web, text="unusual-subject-42")] == [qid]
    assert qid not in [m["id"] for m in queued(web, age="1d")]


def test_queue_filter_by_sender(daemon, web):
    before = {m["id"] for m in queued(web)}
    send(daemon, "carol.unique@example.org", "bob@example.org", "from carol")
    new = wait_for(lambda: [m for m in queued(web, sender="carol.unique") if m["id"] not in before], 15)
    assert len(new) == 1 and new[0]["sender"] == "carol.unique@example.org"


def test_queue_is_paged_on_the_server(daemon, web):
    for i in range(3):
        _one(web, daemon, "page%d@example.org" % i)
    data = web.get("/api/queue?recipient=page&per_page=2").json()
    assert data["total"] == 3 and data["pages"] == 2 and len(data["messages"]) == 2
    second = web.get("/api/queue?recipient=page&per_page=2&page=2").json()
    assert len(second["messages"]) == 1
    assert 'id="next"' in web.get("/queue?recipient=page&n=2").text


def test_bad_filter_is_answered_not_raised(web):
    data = web.get("/api/queue?state=bogus&age=soon").json()
    assert len(data["problems"]) == 2


def test_action_form_asks_for_confirmation_first(daemon, web):
    qid = _one(web, daemon, "confirm@example.org")
    reply = web.post_form("/queue/action", {"action": "delete", "id": qid, "csrf": web.csrf()})
    assert reply.status == 200 and 'id="confirm"' in reply.text
    assert qid in daemon.queue_ids()
    done = web.post_form("/queue/action", {"action": "delete", "id": qid, "csrf": web.csrf(), "confirm": "yes"})
    assert "%s: deleted" % qid in done.text
    assert qid not in daemon.queue_ids()


def test_action_on_a_filter_applies_to_every_match(daemon, web):
    ids = {_one(web, daemon, "bulk%d@example.org" % i) for i in range(2)}
    reply = web.post_form("/queue/action", {"action": "hold", "scope": "filter", "f_recipient": "bulk",
                                            "csrf": web.csrf(), "confirm": "yes"})
    assert "2 of 2 message(s) done" in reply.text
    assert all(daemon.envelope(q)["held"] for q in ids)


def test_api_release_and_retry_report_their_effect(daemon, web):
    qid = _one(web, daemon, "release@example.org")
    web.api("POST", "/api/queue/action", {"action": "hold", "ids": [qid]}, {"X-CSRF-Token": web.csrf()})
    reply = web.api("POST", "/api/queue/action", {"action": "release", "ids": [qid]}, {"X-CSRF-Token": web.csrf()})
    assert reply.json()["results"] == [{"id": qid, "ok": True, "effect": "%s: released" % qid}]
    retry = web.api("POST", "/api/queue/action", {"action": "retry", "ids": [qid]}, {"X-CSRF-Token": web.csrf()})
    assert retry.json()["results"][0]["effect"] == "%s: flushed" % qid


def test_api_bounce_returns_the_message(daemon, web):
    qid = _one(web, daemon, "tobounce@example.org")
    reply = web.api("POST", "/api/queue/action", {"action": "bounce", "ids": [qid]}, {"X-CSRF-Token": web.csrf()})
    assert reply.json()["results"][0]["effect"].startswith("%s: bounced 1 recipient" % qid)
    assert qid not in daemon.queue_ids()


def test_action_on_unknown_id_reports_it(web):
    reply = web.api("POST", "/api/queue/action", {"action": "hold", "ids": ["0000000000000NOPE0"]},
                    {"X-CSRF-Token": web.csrf()})
    assert reply.json()["failed"] == 1


def test_message_detail_shows_recipient_state_attempts_and_log(daemon, web):
    qid = _one(web, daemon, "detail@example.org", "detail subject")
    wait_for(lambda: web.get("/api/queue/" + qid).json()["recipients"][0]["attempts"] >= 1, 15)
    detail = web.get("/api/queue/" + qid).json()
    r = detail["recipients"][0]
    assert r["state"] == "pending" and r["last_reply"].startswith("exit 75") and r["next_attempt"]
    assert ["Subject", "detail subject"] in detail["headers"]
    assert "hello" in detail["body_preview"]
    assert any("status=deferred" in line["message"] for line in detail["log"])


def test_unknown_message_is_404(web):
    assert web.get("/queue/0000000000000NOPE0").status == 404
    assert web.get("/api/queue/..%2Fetc").status == 404


# -- dashboard and events

def test_stats_count_received_messages(daemon, web):
    before = web.get("/api/stats").json()["totals"]["received"]
    send(daemon, "alice@example.org", "s@sent.example", "counted")
    wait_for(lambda: web.get("/api/stats").json()["totals"]["received"] > before, 15)
    assert wait_for(lambda: web.get("/api/stats").json()["totals"]["delivered"] >= 1, 15)


def test_event_stream_sends_stats(daemon, web):
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", daemon.web_port, timeout=10)
    conn.request("GET", "/events", headers={"Cookie": "pmaster_session=" + web.cookies["pmaster_session"]})
    resp = conn.getresponse()
    assert resp.status == 200 and resp.headers["Content-Type"].startswith("text/event-stream")
    data = b""
    while b"event: stats" not in data or not data.endswith(b"\n\n"):
        data += resp.read1(4096)
    conn.close()
    payload = data.split(b"event: stats\ndata: ", 1)[1].split(b"\n", 1)[0]
    assert "history" in json.loads(payload)


# -- route tester

def test_route_tester_gives_what_pmaster_route_json_gives(daemon, web):
    cli = subprocess.run([sys.executable, "-m", "pmaster", "route", "-c", daemon.config_path, "--json",
                          "x@sent.example"], capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=REPO))
    api = web.get("/api/route?address=x@sent.example&listener=test").json()
    assert api["results"] == json.loads(cli.stdout)
    page = web.get("/route?address=x@sent.example&listener=test").text
    assert "cat &gt;/dev/null" in page


def test_route_tester_reports_no_route(web):
    api = web.get("/api/route?address=nobody@nowhere.test").json()
    assert api["results"] == [] and "5.1.1" in api["error"]


# -- configuration (each test gets its own daemon: applying changes the file)

@pytest.fixture
def cfg_daemon(tmp_path):
    d = start_web_daemon(tmp_path)
    yield d
    d.stop()


def _config_form(web, path=None):
    page = web.get("/config" + ("?" + urllib.parse.urlencode({"file": path}) if path else ""))
    base = re.search(r'name="base" value="([0-9a-f]+)"', page.text).group(1)
    return page, base


def test_config_page_lists_the_file_and_its_includes(cfg_daemon):
    web = Web(cfg_daemon.web_port)
    web.login()
    text = web.get("/config").text
    assert os.path.join(cfg_daemon.tmp, "routes.inc") in text
    assert "[webadmin]" in text


def test_config_with_an_error_shows_it_at_its_line_and_is_not_written(cfg_daemon):
    web = Web(cfg_daemon.web_port)
    web.login()
    _, base = _config_form(web)
    bad = cfg_daemon.config_text.replace("  retry-min = 1h\n", "  retry-min = soon\n")
    line = bad.split("\n").index("  retry-min = soon") + 1
    reply = web.post_form("/config", {"csrf": web.csrf(), "text": bad, "base": base, "do": "apply"})
    assert re.search(r'<li id="line-%d" class="has-error">.*?<div class="diag error" id="diag-%d">%d:' % (
        line, line, line), reply.text)
    with open(cfg_daemon.config_path) as f:
        assert f.read() == cfg_daemon.config_text


def test_applied_config_is_backed_up_reloaded_and_routes(cfg_daemon):
    web = Web(cfg_daemon.web_port)
    web.login()
    _, base = _config_form(web)
    new = cfg_daemon.config_text.replace("[route]\n", "[route]\n  @new.example  pipe(cat >/dev/null)\n")
    reply = web.post_form("/config", {"csrf": web.csrf(), "text": new, "base": base, "do": "apply"})
    assert 'id="applied"' in reply.text, reply.text
    with open(cfg_daemon.config_path) as f:
        assert f.read() == new
    backups = [n for n in os.listdir(cfg_daemon.tmp) if n.startswith("pmaster.cf.") and n.endswith(".bak")]
    assert len(backups) == 1
    assert wait_for(lambda: web.get("/api/route?address=a@new.example").json()["results"], 15)


def test_config_changed_on_disk_is_never_overwritten(cfg_daemon):
    web = Web(cfg_daemon.web_port)
    web.login()
    _, base = _config_form(web)
    with open(cfg_daemon.config_path, "a") as f:
        f.write("# changed by someone else\n")
    reply = web.api("POST", "/api/config/apply", {"text": cfg_daemon.config_text + "# mine\n", "base": base},
                    {"X-CSRF-Token": web.csrf()})
    assert reply.status == 409
    with open(cfg_daemon.config_path) as f:
        assert f.read().endswith("# changed by someone else\n")


def test_failed_reload_keeps_the_running_configuration_and_says_why(cfg_daemon):
    web = Web(cfg_daemon.web_port)
    web.login()
    _, base = _config_form(web)
    garbage = os.path.join(cfg_daemon.tmp, "garbage.pem")
    with open(garbage, "w") as f:
        f.write("not a certificate\n")
    new = cfg_daemon.config_text.replace(
        "  listen-port = 127.0.0.1:%d\n" % cfg_daemon.port,
        "  listen-port = 127.0.0.1:%d\n  tls-certificate = %s\n  tls-key = %s\n" % (cfg_daemon.port, garbage, garbage))
    new = new.replace("[route]\n", "[route]\n  @later.example  pipe(cat >/dev/null)\n")
    reply = web.api("POST", "/api/config/apply", {"text": new, "base": base}, {"X-CSRF-Token": web.csrf()})
    result = reply.json()
    assert result["applied"] and result["reload_error"], result
    assert web.get("/api/route?address=a@later.example").json()["results"] == []


def test_include_file_can_be_edited(cfg_daemon):
    web = Web(cfg_daemon.web_port)
    web.login()
    inc = os.path.join(cfg_daemon.tmp, "routes.inc")
    _, base = _config_form(web, inc)
    reply = web.api("POST", "/api/config/apply", {"file": inc, "text": "@inc.example  pipe(cat >/dev/null)\n",
                                                  "base": base}, {"X-CSRF-Token": web.csrf()})
    assert reply.json()["applied"], reply.text
    assert wait_for(lambda: web.get("/api/route?address=a@inc.example").json()["results"], 15)


def test_file_outside_the_configuration_is_refused(cfg_daemon):
    web = Web(cfg_daemon.web_port)
    web.login()
    assert web.get("/config?file=/etc/passwd").status == 404
    reply = web.api("POST", "/api/config/apply", {"file": "/etc/passwd", "text": "x", "base": ""},
                    {"X-CSRF-Token": web.csrf()})
    assert reply.status == 404


def test_post_with_null_origin_from_another_site_changes_nothing(daemon, web):
    qid = _one(web, daemon, "nullorigin@example.org")
    reply = web.post_form("/queue/action", {"action": "delete", "id": qid, "confirm": "yes", "csrf": web.csrf()},
                          origin="null", headers={"Sec-Fetch-Site": "cross-site"})
    assert reply.status == 403
    assert qid in daemon.queue_ids()


# -- HTTPS and check

def test_https_listener_sets_a_secure_cookie(tmp_path):
    import ssl

    import trustme

    from pmaster.tests.webadmin_fixture import WEB_CONFIG

    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1")
    cert.private_key_and_cert_chain_pem.write_to_path(str(tmp_path / "web.pem"))
    config = WEB_CONFIG.replace("  password-file = {tmp}/passwords\n", "  password-file = {tmp}/passwords\n"
                                "  tls-certificate = {tmp}/web.pem\n  tls-key = {tmp}/web.pem\n")
    d = start_web_daemon(tmp_path, config)
    try:
        import http.client

        context = ssl.create_default_context()
        ca.configure_trust(context)
        conn = http.client.HTTPSConnection("127.0.0.1", d.web_port, timeout=20, context=context)
        body = urllib.parse.urlencode({"user": "admin", "password": PASSWORD})
        conn.request("POST", "/login", body, {"Content-Type": "application/x-www-form-urlencoded",
                                              "Origin": "https://127.0.0.1:%d" % d.web_port})
        resp = conn.getresponse()
        resp.read()
        conn.close()
        assert resp.status == 303
        assert "; Secure" in resp.headers["Set-Cookie"]
    finally:
        d.stop()


def test_check_warns_about_webadmin_off_loopback_without_tls(tmp_path):
    cfg = tmp_path / "pmaster.cf"
    cfg.write_text("[webadmin]\n  listen-port = 0.0.0.0:8025\n[route]\n  @x.test pipe(true)\n")
    proc = subprocess.run([sys.executable, "-m", "pmaster", "check", "-c", str(cfg)], capture_output=True,
                          text=True, env=dict(os.environ, PYTHONPATH=REPO))
    assert "%s:2:3: warning: [webadmin] listens on 0.0.0.0:8025 without tls-certificate" % cfg in proc.stdout + proc.stderr
