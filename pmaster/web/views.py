"""HTML pages of the web admin, rendered from the dicts of ``api.Api``; they work without JavaScript.

API: one function per page, each ``(..., csrf) -> str`` (a whole HTML document): ``login_page``,
  ``dashboard_page``, ``queue_page``, ``message_page``, ``confirm_page``, ``result_page``, ``config_page``,
  ``route_page``, ``error_page``.
Invariants: every value is passed through ``e`` (``html.escape`` with quotes) before it reaches the page:
  addresses, subjects, headers, replies and log lines come from mail and may carry markup. No inline script
  or style (the Content-Security-Policy forbids both): behaviour lives in /static/app.js, looks in
  /static/app.css. Every form that changes state is a POST carrying the session's CSRF token.
"""

import html
import json
import urllib.parse
from typing import Dict, List, Mapping, Optional, Sequence

ACTION_LABELS = (("retry", "Retry now"), ("hold", "Hold"), ("release", "Release"), ("delete", "Delete"),
                 ("bounce", "Bounce"))


def e(value: object) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def _layout(title: str, body: str, csrf: Optional[str], active: str = "") -> str:
    nav = ""
    if csrf is not None:
        links = "".join('<a href="%s"%s>%s</a>' % (href, ' class="active"' if key == active else "", label)
                        for key, href, label in (("dashboard", "/", "Dashboard"), ("queue", "/queue", "Queue"),
                                                 ("config", "/config", "Configuration"),
                                                 ("route", "/route", "Route tester")))
        nav = ('<nav>%s<form method="post" action="/logout" class="logout">%s'
               '<button type="submit">Log out</button></form></nav>' % (links, _csrf(csrf)))
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            "<title>%s - pmaster</title><link rel=\"stylesheet\" href=\"/static/app.css\">"
            "<script src=\"/static/app.js\" defer></script></head>"
            "<body><header><h1>pmaster</h1>%s</header><main>%s</main></body></html>\n"
            % (e(title), nav, body))


def _csrf(token: str) -> str:
    return '<input type="hidden" name="csrf" value="%s">' % e(token)


def error_page(status: int, message: str, csrf: Optional[str] = None) -> str:
    return _layout("Error %d" % status, '<h2>Error %d</h2><p class="error">%s</p>' % (status, e(message)), csrf)


def login_page(message: str = "", user: str = "", next_url: str = "/") -> str:
    note = '<p class="error" id="login-error">%s</p>' % e(message) if message else ""
    body = ('<h2>Log in</h2>%s<form method="post" action="/login" class="login">'
            '<input type="hidden" name="next" value="%s">'
            '<label>User <input name="user" id="user" value="%s" autocomplete="username" required></label>'
            '<label>Password <input name="password" id="password" type="password" '
            'autocomplete="current-password" required></label>'
            '<button type="submit" id="login">Log in</button></form>' % (note, e(next_url), e(user)))
    return _layout("Log in", body, None)


# -- dashboard

def dashboard_page(stats: Dict[str, object], csrf: str) -> str:
    totals = stats["totals"]
    queue = stats["queue"]
    cells = [("received", "Received"), ("delivered", "Delivered"), ("deferred", "Deferred"),
             ("bounced", "Bounced"), ("rejected", "Rejected")]
    counters = "".join('<div class="stat"><span class="label">%s</span><span class="value" id="total-%s">%s</span>'
                       '</div>' % (label, key, e(totals.get(key, 0))) for key, label in cells)
    live = ('<div class="stat"><span class="label">Sessions</span><span class="value" id="sessions">%s</span></div>'
            % e(stats["sessions"]))
    for state in ("active", "deferred", "hold"):
        live += ('<div class="stat"><span class="label">Queue %s</span><span class="value" id="queue-%s">%s</span>'
                 '</div>' % (state, state, e(queue.get(state, 0))))
    live += ('<div class="stat"><span class="label">Oldest message</span><span class="value" id="oldest">%s s</span>'
             '</div>' % e(stats["oldest"]))
    body = ('<h2>Dashboard</h2><p class="note">Totals since the daemon started; the chart shows messages per %s s '
            'over the last hour, live.</p><section class="stats">%s</section><section class="stats">%s</section>'
            '<section><h3>Throughput</h3><div id="chart" data-stats="%s"></div>'
            '<p class="legend"><span class="k-received">received</span> <span class="k-delivered">delivered</span> '
            '<span class="k-deferred">deferred</span> <span class="k-bounced">bounced</span> '
            '<span class="k-rejected">rejected</span></p></section>'
            % (e(stats["interval"]), counters, live, e(json.dumps(stats))))
    return _layout("Dashboard", body, csrf, "dashboard")


# -- queue

def _filter_form(flt: Mapping[str, str]) -> str:
    fields = "".join('<label>%s <input name="%s" value="%s"></label>' % (label, name, e(flt.get(name, "")))
                     for name, label in (("sender", "Sender"), ("recipient", "Recipient"), ("domain", "Domain"),
                                         ("text", "Text"), ("age", "Older than")))
    states = "".join('<option value="%s"%s>%s</option>' % (s, " selected" if flt.get("state") == s else "", s or "any")
                     for s in ("", "active", "deferred", "hold"))
    return ('<form method="get" action="/queue" class="filter">%s<label>State <select name="state">%s</select>'
            '</label><button type="submit" id="apply-filter">Filter</button></form>' % (fields, states))


def _actions(prefix: str = "") -> str:
    return "".join('<button type="submit" name="action" value="%s" id="%s%s">%s</button>'
                   % (a, prefix, a, label) for a, label in ACTION_LABELS)


def queue_page(data: Dict[str, object], csrf: str) -> str:
    flt = data["filter"]
    problems = "".join('<p class="error">%s</p>' % e(p) for p in data["problems"])
    rows = []
    for m in data["messages"]:
        rows.append('<tr id="row-%s"><td><input type="checkbox" name="id" value="%s" aria-label="select"></td>'
                    '<td><a href="/queue/%s">%s</a></td><td>%s</td><td>%s</td><td>%s</td><td>%s</td>'
                    '<td class="num">%s</td><td>%s</td></tr>'
                    % (e(m["id"]), e(m["id"]), e(urllib.parse.quote(m["id"])), e(m["id"]), e(m["state"]),
                       e("<%s>" % m["sender"]), e(", ".join(m["recipients"])), e(m["subject"]), e(m["size"]),
                       e(m["arrival"])))
    table = ('<table class="queue"><thead><tr><th></th><th>Queue id</th><th>State</th><th>Sender</th>'
             '<th>Recipients</th><th>Subject</th><th>Size</th><th>Arrival</th></tr></thead><tbody>%s</tbody></table>'
             % "".join(rows)) if rows else '<p id="empty">No message matches.</p>'
    query = {k: v for k, v in flt.items() if v}
    pager = []
    if data["page"] > 1:
        pager.append('<a href="/queue?%s" id="prev">previous</a>'
                     % e(urllib.parse.urlencode(dict(query, page=data["page"] - 1))))
    pager.append("page %d of %d (%d messages)" % (data["page"], data["pages"], data["total"]))
    if data["page"] < data["pages"]:
        pager.append('<a href="/queue?%s" id="next">next</a>'
                     % e(urllib.parse.urlencode(dict(query, page=data["page"] + 1))))
    hidden = "".join('<input type="hidden" name="f_%s" value="%s">' % (e(k), e(v)) for k, v in query.items())
    body = ('<h2>Queue</h2>%s%s<p class="pager" id="pager">%s</p>'
            '<form method="post" action="/queue/action" id="selection">%s%s'
            '<div class="actions">On the selected messages: %s</div>%s</form>'
            '<form method="post" action="/queue/action" class="by-filter">%s<input type="hidden" name="scope" '
            'value="filter">%s<div class="actions">On all %d messages matching the filter: %s</div></form>'
            % (_filter_form(flt), problems, " | ".join(pager), _csrf(csrf),
               '<input type="hidden" name="scope" value="selection">', _actions("sel-"), table,
               _csrf(csrf), hidden, data["total"], _actions("all-")))
    return _layout("Queue", body, csrf, "queue")


def message_page(m: Dict[str, object], csrf: str, note: str = "") -> str:
    envelope = [("Queue id", m["id"]), ("State", m["state"]), ("Sender", "<%s>" % m["sender"]),
                ("Size", m["size"]), ("Arrival", m["arrival"]), ("Client", "%s [%s]" % (m["client_name"],
                                                                                      m["client_address"])),
                ("HELO", m["helo"]), ("Listener", m["listener"]), ("TLS", m["tls"] or "no")]
    env_html = "".join("<tr><th>%s</th><td>%s</td></tr>" % (e(k), e(v)) for k, v in envelope)
    rcpts = "".join('<tr><td>%s</td><td>%s</td><td>%s</td><td class="num">%s</td><td>%s</td><td>%s</td></tr>'
                    % (e(r["address"]), e(r["mailer"]), e(r["state"]), e(r["attempts"]), e(r["last_reply"]),
                       e(r["next_attempt"] or "")) for r in m["recipients"])
    headers = "".join("<tr><th>%s</th><td>%s</td></tr>" % (e(n), e(v)) for n, v in m["headers"])
    log = "".join('<li>%s %s %s</li>' % (e(line["time"]), e(line["level"]), e(line["message"]))
                  for line in m["log"]) or "<li>No log lines recorded since the daemon started.</li>"
    preview = e(m["body_preview"]) + ("\n[... cut]" if m["body_truncated"] else "")
    note_html = '<p class="effect" id="effect">%s</p>' % e(note) if note else ""
    body = ('<h2>Message %s</h2>%s<form method="post" action="/queue/action" class="one">%s'
            '<input type="hidden" name="id" value="%s"><input type="hidden" name="scope" value="selection">'
            '<div class="actions">%s</div></form>'
            '<h3>Envelope</h3><table class="kv">%s</table>'
            '<h3>Recipients</h3><table class="queue"><thead><tr><th>Address</th><th>Mailer</th><th>State</th>'
            '<th>Attempts</th><th>Last reply</th><th>Next attempt</th></tr></thead><tbody>%s</tbody></table>'
            '<h3>Headers</h3><table class="kv headers">%s</table>'
            '<h3>Body (preview)</h3><pre class="body">%s</pre><h3>Log</h3><ul class="log" id="log">%s</ul>'
            % (e(m["id"]), note_html, _csrf(csrf), e(m["id"]), _actions("one-"), env_html, rcpts, headers,
               preview, log))
    return _layout("Message %s" % m["id"], body, csrf, "queue")


def confirm_page(action: str, ids: Sequence[str], scope: str, flt: Mapping[str, str], csrf: str) -> str:
    label = dict(ACTION_LABELS).get(action, action)
    hidden = "".join('<input type="hidden" name="id" value="%s">' % e(q) for q in ids) if scope != "filter" else ""
    hidden += "".join('<input type="hidden" name="f_%s" value="%s">' % (e(k), e(v)) for k, v in flt.items() if v)
    what = ("all %d messages matching the filter" % len(ids)) if scope == "filter" else (
        "%d message%s" % (len(ids), "" if len(ids) == 1 else "s"))
    listing = "".join("<li>%s</li>" % e(q) for q in list(ids)[:20]) + ("<li>...</li>" if len(ids) > 20 else "")
    body = ('<h2>Confirm</h2><p id="confirm-text">%s %s?</p><ul>%s</ul><form method="post" action="/queue/action">'
            '%s<input type="hidden" name="action" value="%s"><input type="hidden" name="scope" value="%s">%s'
            '<input type="hidden" name="confirm" value="yes"><button type="submit" id="confirm">%s</button> '
            '<a href="/queue">Cancel</a></form>'
            % (e(label), e(what), listing, _csrf(csrf), e(action), e(scope), hidden, e(label)))
    return _layout("Confirm", body, csrf, "queue")


def result_page(result: Dict[str, object], csrf: str) -> str:
    items = "".join('<li class="%s">%s</li>' % ("ok" if r["ok"] else "error", e(r["effect"]))
                    for r in result["results"]) or "<li>No message matched: nothing done.</li>"
    body = ('<h2>Done</h2><p id="summary">%s: %d of %d message(s) done, %d failed.</p><ul id="effects">%s</ul>'
            '<p><a href="/queue">Back to the queue</a></p>'
            % (e(result["action"]), result["done"], result["count"], result["failed"], items))
    return _layout("Done", body, csrf, "queue")


# -- configuration

def config_page(files: List[Dict[str, object]], current: Dict[str, object], text: str, base: str,
                check: Optional[Dict[str, object]], csrf: str, outcome: Optional[Dict[str, object]] = None) -> str:
    tabs = "".join('<li><a href="/config?%s"%s>%s</a>%s</li>'
                   % (e(urllib.parse.urlencode({"file": f["path"]})),
                      ' class="active"' if f["path"] == current["path"] else "", e(f["path"]),
                      "" if f["writable"] else " (read-only)") for f in files)
    path = current["path"]
    diags: List[Dict[str, object]] = list(check["diagnostics"]) if check else []
    by_line: Dict[int, List[Dict[str, object]]] = {}
    others = []
    for d in diags:
        if d["file"] == path:
            by_line.setdefault(int(d["line"]), []).append(d)
        else:
            others.append(d)
    lines = []
    for n, line in enumerate(text.split("\n"), 1):
        notes = "".join('<div class="diag %s" id="diag-%d">%s:%s: %s: %s</div>'
                        % (e(d["severity"]), n, e(d["line"]), e(d["col"]), e(d["severity"]), e(d["message"]))
                        for d in by_line.get(n, []))
        cls = " class=\"has-%s\"" % ("error" if any(d["severity"] == "error" for d in by_line.get(n, []))
                                      else "warning") if n in by_line else ""
        lines.append('<li id="line-%d"%s><code>%s</code>%s</li>' % (n, cls, e(line) or " ", notes))
    other_html = "".join('<div class="diag %s">%s</div>' % (e(d["severity"]), e(d["text"])) for d in others)
    messages = ""
    if outcome is not None:
        if outcome.get("applied") and not outcome.get("error"):
            messages += '<p class="effect" id="applied">Applied: written (backup %s) and reloaded.</p>' % e(
                outcome.get("backup"))
        if outcome.get("error"):
            messages += '<p class="error" id="apply-error">%s</p>' % e(outcome["error"])
    elif check is not None:
        if check.get("error"):
            messages += '<p class="error" id="check-error">%s</p>' % e(check["error"])
        elif check["valid"]:
            messages += '<p class="effect" id="valid">Valid%s.</p>' % (
                " (with warnings)" if diags else "")
        else:
            messages += '<p class="error" id="invalid">Not valid: see the errors at their lines below.</p>'
    if current["writable"]:
        editor = ('<form method="post" action="/config" class="editor">%s<input type="hidden" name="file" value="%s">'
                  '<input type="hidden" name="base" value="%s"><textarea name="text" id="config-text" rows="30" '
                  'spellcheck="false">%s</textarea><div class="actions"><button type="submit" name="do" '
                  'value="validate" id="validate">Validate</button><button type="submit" name="do" value="apply" '
                  'id="apply">Apply</button></div></form>' % (_csrf(csrf), e(path), e(base), e(text)))
    else:
        editor = '<p class="readonly" id="readonly">Read-only: %s.</p>' % e(current["reason"])
    body = ('<h2>Configuration</h2><ul class="files">%s</ul>%s%s<h3>%s</h3><ol class="listing" id="listing">%s</ol>%s'
            % (tabs, messages, other_html, e(path), "".join(lines), editor))
    return _layout("Configuration", body, csrf, "config")


# -- route tester

def route_page(listeners: Sequence[str], address: str, listener: str, result: Optional[Dict[str, object]],
               csrf: str) -> str:
    options = '<option value="">(unnamed [route] table)</option>' + "".join(
        '<option value="%s"%s>%s</option>' % (e(n), " selected" if n == listener else "", e(n)) for n in listeners)
    out = ""
    if result is not None:
        if result.get("error"):
            out += '<p class="error" id="route-error">%s</p>' % e(result["error"])
        out += '<pre id="route-result">%s</pre>' % e(json.dumps(result.get("results", []), indent=2))
    body = ('<h2>Route tester</h2><form method="get" action="/route" class="route"><label>Address '
            '<input name="address" id="address" value="%s" required></label><label>Listener <select name="listener" '
            'id="listener">%s</select></label><button type="submit" id="route">Route</button></form>%s'
            % (e(address), options, out))
    return _layout("Route tester", body, csrf, "route")
