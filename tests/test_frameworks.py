"""Real frameworks, served by Portico (the binary, or nginx with PORTICO_TEST_HOST=nginx) and by
gunicorn side by side: a user moving from gunicorn must see the same responses."""

import json
import re
import subprocess
import urllib.parse

import pytest

from conftest import APPS, VENV, Server, app_table, free_port, serve_config


def gunicorn(tmp_path, target, chdir, env=None):
    port = free_port()
    return Server([str(VENV / "bin" / "gunicorn"), "--bind", f"127.0.0.1:{port}",
                   "--chdir", str(chdir), "--workers", "1", target], tmp_path, port, env).wait_ready()


# --- Flask -----------------------------------------------------------------------------

FLASK_CASES = [
    ("GET", "/", None, {}),
    ("POST", "/json", json.dumps({"a": [1, 2]}), {"Content-Type": "application/json"}),
    ("POST", "/json", "{not json", {"Content-Type": "application/json"}),
    ("POST", "/form", "name=ada&tag=x&tag=y", {"Content-Type": "application/x-www-form-urlencoded"}),
    ("GET", "/login?user=grace", None, {}),
    ("GET", "/stream", None, {}),
    # werkzeug gives a HEAD no body: the length is the app's, or unknown (RFC 9110 9.3.2).
    ("HEAD", "/", None, {}),
    ("HEAD", "/stream", None, {}),
    ("GET", "/missing", None, {}),
    ("GET", "/boom", None, {}),
]


@pytest.fixture(scope="module")
def flask_servers(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("flask")
    port = free_port()
    cfg = tmp / "portico.toml"
    cfg.write_text(f'[server]\nlisten = ["127.0.0.1:{port}"]\n' +
                   app_table("flask", "flask_app:app", python_home=str(VENV)))
    portico = serve_config(cfg, tmp, port).wait_ready()
    guni = gunicorn(tmp, "flask_app:app", APPS)
    yield portico, guni
    portico.stop()
    guni.stop()


@pytest.mark.parametrize("method,path,body,headers", FLASK_CASES)
def test_flask_same_as_gunicorn(flask_servers, method, path, body, headers):
    portico, guni = flask_servers
    got = portico.request(method, path, body=body, headers=headers)
    want = guni.request(method, path, body=body, headers=headers)
    assert got[0] == want[0]
    assert got[2] == want[2]
    for h in ("Content-Type", "Location", "Content-Length"):
        assert got[1].get(h) == want[1].get(h), h


def test_flask_session_cookie_round_trip(flask_servers):
    portico, _ = flask_servers
    status, headers, _ = portico.get("/login?user=grace")
    assert status == 302 and headers["Location"] == "/whoami"
    cookie = headers["Set-Cookie"].split(";")[0]
    status, _, body = portico.get("/whoami", headers={"Cookie": cookie})
    assert json.loads(body) == {"user": "grace"}


def test_flask_multipart_upload(flask_servers):
    portico, _ = flask_servers
    payload = bytes(range(256)) * 1024
    boundary = "portico-boundary"
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"b.bin\"\r\n"
            f"Content-Type: application/octet-stream\r\n\r\n").encode() + payload + \
        f"\r\n--{boundary}--\r\n".encode()
    status, _, out = portico.request("POST", "/upload", body=body, headers={
        "Content-Type": f"multipart/form-data; boundary={boundary}"})
    assert status == 200
    assert json.loads(out) == {"filename": "b.bin", "size": len(payload),
                               "head": payload[:8].decode("latin-1")}


def test_flask_error_is_logged_with_traceback(flask_servers):
    portico, _ = flask_servers
    assert portico.get("/boom")[0] == 500
    # Flask handles the exception itself and logs it to wsgi.errors → Portico's log.
    portico.wait_for_log("RuntimeError: flask view failed")


# --- Django ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def django_project(tmp_path_factory):
    root = tmp_path_factory.mktemp("django")
    py = str(VENV / "bin" / "python")
    subprocess.run([str(VENV / "bin" / "django-admin"), "startproject", "mysite", str(root)],
                   check=True)
    settings = root / "mysite" / "settings.py"
    text = settings.read_text()
    text = text.replace("DEBUG = True", "DEBUG = False")
    text = text.replace("ALLOWED_HOSTS = []", "ALLOWED_HOSTS = ['*']")
    text = text.replace("'django.middleware.security.SecurityMiddleware',",
                        "'django.middleware.security.SecurityMiddleware',\n"
                        "    'whitenoise.middleware.WhiteNoiseMiddleware',")
    text += f"\nSTATIC_ROOT = {str(root / 'static')!r}\n"
    settings.write_text(text)
    manage = [py, str(root / "manage.py")]
    subprocess.run(manage + ["migrate", "--noinput", "-v", "0"], check=True, cwd=root)
    subprocess.run(manage + ["collectstatic", "--noinput", "-v", "0"], check=True, cwd=root)
    subprocess.run(manage + ["shell", "-c",
                             "from django.contrib.auth.models import User;"
                             "User.objects.create_superuser('admin', 'a@example.com', 'pw-123456')"],
                   check=True, cwd=root)
    return root


@pytest.fixture(scope="module")
def django_servers(django_project, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("django-run")
    port = free_port()
    cfg = tmp / "portico.toml"
    cfg.write_text(f'[server]\nlisten = ["127.0.0.1:{port}"]\n[[app]]\nname = "mysite"\n'
                   f'target = "mysite.wsgi:application"\npython_path = ["{django_project}"]\n'
                   f'python_home = "{VENV}"\n')
    portico = serve_config(cfg, tmp, port).wait_ready()
    guni = gunicorn(tmp, "mysite.wsgi:application", django_project)
    yield portico, guni
    portico.stop()
    guni.stop()


def admin_login(server, chunked=False):
    """Logs in to the Django admin as a browser would (or with the form sent chunked); returns
    the responses on the way."""
    status, headers, page = server.get("/admin/login/?next=/admin/")
    assert status == 200, page[:500]
    csrf_cookie = re.search(r"csrftoken=([^;]+)", headers["Set-Cookie"]).group(1)
    token = re.search(rb'name="csrfmiddlewaretoken" value="([^"]+)"', page).group(1).decode()
    css = re.search(rb'href="(/static/admin/css/base\.css)"', page).group(1).decode()
    form = urllib.parse.urlencode({"csrfmiddlewaretoken": token, "username": "admin",
                                   "password": "pw-123456", "next": "/admin/"})
    # http.client sends an iterable body chunked.
    body = iter([form.encode()]) if chunked else form
    status, headers, _ = server.request("POST", "/admin/login/?next=/admin/", body=body, headers={
        "Content-Type": "application/x-www-form-urlencoded", "Cookie": f"csrftoken={csrf_cookie}",
        "Referer": f"http://127.0.0.1:{server.port}/admin/login/"})
    return status, headers, css, csrf_cookie


def admin_session_and_css(server, name):
    """Logs in to the admin (CSRF cookie and token), opens it with the session, and fetches
    its stylesheet: (status, content type, bytes) of the CSS."""
    status, headers, css_path, _ = admin_login(server)
    assert status == 302, name
    assert headers["Location"] == "/admin/"
    session = re.search(r"sessionid=([^;]+)", ";".join(headers.get_all("Set-Cookie"))).group(1)
    status, _, page = server.get("/admin/", headers={"Cookie": f"sessionid={session}"})
    assert status == 200 and b"Site administration" in page
    status, css_headers, css = server.get(css_path)
    return (status, css_headers["Content-Type"], css)


def test_django_admin_login_with_csrf_and_static_css(django_servers, django_project):
    portico, guni = django_servers
    results = {name: admin_session_and_css(server, name)
               for name, server in (("portico", portico), ("gunicorn", guni))}
    on_disk = (django_project / "static" / "admin" / "css" / "base.css").read_bytes()
    assert results["portico"] == results["gunicorn"] == (200, "text/css; charset=\"utf-8\"", on_disk)


def test_django_logs_in_with_a_form_sent_chunked(django_servers):
    """Django reads CONTENT_LENGTH bytes of a body and nothing else: behind gunicorn alone a
    chunked form reaches it empty (and the CSRF check refuses it). Portico reads the body
    first (request_buffering, on for WSGI) and hands it over with its length."""
    portico, _ = django_servers
    status, headers, _, _ = admin_login(portico, chunked=True)
    assert (status, headers["Location"]) == (302, "/admin/")


def test_django_rejects_post_without_csrf(django_servers):
    portico, guni = django_servers
    for server in (portico, guni):
        status, _, _ = server.request("POST", "/admin/login/", body="username=admin&password=x",
                                      headers={"Content-Type": "application/x-www-form-urlencoded"})
        assert status == 403
