"""The command line and portico.toml: clear errors, the right exit codes, nothing bound."""

import json
import os
import signal
import socket
import subprocess

import pytest
import trustme

from conftest import APPS, BINARY, VENV, Server, app_table, free_port, needs, wait_until

pytestmark = needs("binary")


def test_check_accepts_a_valid_config(run_portico, tmp_path):
    cfg = tmp_path / "ok.toml"
    cfg.write_text(app_table("a", "validated:application"))
    result = run_portico("check", "--config", str(cfg))
    assert result.returncode == 0, result.stderr
    assert "ok (1 app(s))" in result.stdout


def test_check_nginx_accepts_apps_that_nginx_locations_route(run_portico, tmp_path):
    """A portico.toml for nginx has its apps routed by locations, all at the default mount:
    `portico check` says what to run, and `portico check --nginx` accepts it."""
    cfg = tmp_path / "for-nginx.toml"
    cfg.write_text(app_table("a", "validated:application") + app_table("b", "validated:application"))
    result = run_portico("check", "--config", str(cfg))
    assert result.returncode == 64
    assert "`/` is also the mount of app[0]" in result.stderr
    assert "portico check --nginx" in result.stderr
    result = run_portico("check", "--nginx", "--config", str(cfg))
    assert result.returncode == 0, result.stderr
    assert "ok (2 app(s))" in result.stdout


def test_config_errors_name_file_line_and_key_all_at_once(run_portico, tmp_path):
    cfg = tmp_path / "bad.toml"
    cfg.write_text('[server]\nlisten = ["nowhere"]\n\n[[app]]\nname = "a"\ntarget = "no colon here"\n'
                   'mount = "relative"\n')
    for command in ("check", "serve"):
        result = run_portico(command, "--config", str(cfg))
        assert result.returncode == 64
        assert f"{cfg}:2: server.listen[0]: `nowhere` is not HOST:PORT" in result.stderr
        assert f"{cfg}:6: app[0].target" in result.stderr
        assert f"{cfg}:7: app[0].mount" in result.stderr


def test_type_errors_and_unknown_keys_are_all_named_in_one_pass(run_portico, tmp_path):
    cfg = tmp_path / "typos.toml"
    cfg.write_text('[[app]]\nname = "a"\ntarget = "validated:application"\nproceses = 4\n'
                   'threads = "many"\nmax_body_size = "lots"\nmount = "relative"\n')
    result = run_portico("check", "--config", str(cfg))
    assert result.returncode == 64
    for line, key, what in ((4, "app[0].proceses", "unknown field `proceses`"),
                            (5, "app[0].threads",
                             'invalid type: string "many", expected a whole number'),
                            (6, "app[0].max_body_size", "`lots` is not a size"),
                            (7, "app[0].mount", "must start with `/`")):
        assert f"{cfg}:{line}: {key}: " in result.stderr and what in result.stderr, \
            (key, result.stderr)


def test_unknown_key_is_an_error(run_portico, tmp_path):
    cfg = tmp_path / "typo.toml"
    cfg.write_text(app_table("a", "validated:application") + "thread = 3\n")
    result = run_portico("check", "--config", str(cfg))
    assert result.returncode == 64
    assert f"{cfg}:6" in result.stderr and "unknown field `thread`" in result.stderr


def test_a_pool_user_or_group_that_does_not_exist_is_a_config_error(run_portico, tmp_path):
    """As nginx's `user` directive: a name is looked up when the config is read, so a typo
    stops the start with the file, line and key, not at the first worker's spawn."""
    cfg = tmp_path / "who.toml"
    cfg.write_text(app_table("a", "validated:application", mode="pool",
                             user="no-such-user-here", group="no-such-group-here"))
    for command in ("check", "serve"):
        result = run_portico(command, "--config", str(cfg))
        assert result.returncode == 64, (command, result.stderr)
        assert f"{cfg}:7: app[0].user: no user `no-such-user-here` on this machine" \
            in result.stderr
        assert f"{cfg}:8: app[0].group: no group `no-such-group-here` on this machine" \
            in result.stderr


def test_import_error_shows_traceback_and_binds_nothing(tmp_path):
    port = free_port()
    server = Server([str(BINARY), "run", "broken_import:app",
                     "--python-path", str(APPS), "--bind", f"127.0.0.1:{port}"], tmp_path, port)
    assert server.proc.wait(30) == 70
    err = server.stderr()
    assert "app `app` cannot be loaded" in err
    assert "Traceback (most recent call last)" in err
    assert "ModuleNotFoundError: No module named 'this_module_does_not_exist'" in err
    assert "listening" not in err


def test_missing_callable(run_portico):
    result = run_portico("run", "validated:nothing_here", "--python-path", str(APPS),
                         "--bind", f"127.0.0.1:{free_port()}")
    assert result.returncode == 70
    assert "module `validated` has no attribute `nothing_here`" in result.stderr


def test_port_in_use(run_portico):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_portico("run", "validated:application", "--python-path", str(APPS),
                             "--bind", f"127.0.0.1:{port}")
    assert result.returncode == 71
    assert f"cannot listen on 127.0.0.1:{port}" in result.stderr


def test_a_port_in_use_is_found_before_any_app_starts(run_portico, tmp_path):
    """The listen addresses are tried before the apps are imported: an ASGI app never runs a
    lifespan startup that no shutdown would follow (uvicorn runs the shutdown; here the
    startup never happens)."""
    (tmp_path / "lifespan_probe.py").write_text(
        "import pathlib\n"
        "MARK = pathlib.Path(__file__).with_name('imported')\n"
        "MARK.write_text('imported')\n"
        "async def app(scope, receive, send):\n"
        "    pass\n")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_portico("run", "lifespan_probe:app", "--interface", "asgi",
                             "--python-path", str(tmp_path), "--bind", f"127.0.0.1:{port}")
    assert result.returncode == 71, result.stderr
    assert f"cannot listen on 127.0.0.1:{port}" in result.stderr
    assert not (tmp_path / "imported").exists()


def test_reload_refuses_a_pid_file_whose_pid_is_not_portico(run_portico, tmp_path):
    """A pid file left by a server killed with -9, its pid since taken by another program:
    `portico reload` says so and signals nothing (it would kill that program with SIGHUP)."""
    bystander = subprocess.Popen(["sleep", "60"])
    try:
        pid_file = tmp_path / "portico.pid"
        pid_file.write_text(f"{bystander.pid}\n")
        cfg = tmp_path / "portico.toml"
        cfg.write_text(f'[server]\npid_file = "{pid_file}"\n\n'
                       + app_table("a", "validated:application"))
        result = run_portico("reload", "--config", str(cfg))
        assert result.returncode == 1, result.stdout + result.stderr
        assert f"pid {bystander.pid} in {pid_file} is not a running portico process" \
            in result.stderr
        assert bystander.poll() is None, "the bystander got the SIGHUP"
    finally:
        bystander.kill()
        bystander.wait()


def test_status_of_an_nginx_says_when_it_is_not_running_or_runs_no_pool(run_portico, tmp_path):
    pid_file = tmp_path / "nginx.pid"
    result = run_portico("status", "--nginx", str(pid_file))
    assert result.returncode == 1
    assert f"{pid_file}: " in result.stderr and "(is nginx running?)" in result.stderr
    # A live process that started no pool (this test's own).
    pid_file.write_text(f"{os.getpid()}\n")
    result = run_portico("status", "--nginx", str(pid_file))
    assert result.returncode == 1
    assert f"nginx (master pid {os.getpid()}) runs no pool" in result.stderr, result.stderr
    # One of the two, not both or neither.
    assert run_portico("status").returncode == 2
    assert run_portico("status", "--nginx", str(pid_file), "--config", "x").returncode == 2


def test_run_flags_are_validated_by_name(run_portico):
    result = run_portico("run", "validated:application", "--threads", "0", "--bind", "x",
                         "--forwarded-allow-ips", "10.0.0.0/8,lb.local")
    assert result.returncode == 64
    assert "--threads: must be at least 1" in result.stderr
    assert "--bind: `x` is not HOST:PORT" in result.stderr
    assert "--forwarded-allow-ips: `lb.local` is not an IP address" in result.stderr


def test_run_serves_an_app(tmp_path):
    port = free_port()
    server = Server([str(BINARY), "run", "validated:application",
                     "--python-path", str(APPS), "--bind", f"127.0.0.1:{port}"], tmp_path, port)
    try:
        server.wait_ready()
        assert server.get("/hello")[2] == b"Hello, world!"
    finally:
        server.stop()


def test_run_with_workers_serves_from_a_pool_of_that_many_processes(tmp_path):
    """`portico run APP --workers 3`, as `gunicorn -w 3 APP`: three worker processes take the
    requests, and the config file written for them is gone once the server stops."""
    port = free_port()
    tmpdir = tmp_path / "tmp"
    tmpdir.mkdir()
    server = Server([str(BINARY), "run", "pool_app:application", "--python-path", str(APPS),
                     "--bind", f"127.0.0.1:{port}", "--workers", "3", "--threads", "1"],
                    tmp_path, port, env={"TMPDIR": str(tmpdir)})
    try:
        server.wait_ready()
        [run_dir] = tmpdir.glob("portico-run-*")
        assert (run_dir.stat().st_mode & 0o777) == 0o700
        assert (run_dir / "portico.toml").exists()
        pids = set()
        wait_until(lambda: pids.add(int(server.get("/pid")[2])) or len(pids) == 3,
                   timeout=15, interval=0, what="answers from three workers")
        assert server.proc.pid not in pids
    finally:
        server.proc.send_signal(signal.SIGTERM)
        server.proc.wait(30)
    assert not run_dir.exists()


@pytest.mark.parametrize("workers", [[], ["--workers", "1"]], ids=["in-process", "pool"])
def test_the_embedded_python_finds_its_own_standard_library_from_any_directory(
        tmp_path, workers):
    """Started from `/` with systemd's PATH (as nginx and `portico pool` are by their units),
    the app runs on the standard library of the Python portico embeds, not on whichever
    `lib/python3.X` the directory or PATH leads CPython's guess to (Debian's, which lacks
    the `math` that pyenv's libpython needs): its sys.base_prefix is that Python's."""
    (tmp_path / "probe.py").write_text(
        "import json, math, sys\n"
        "def app(environ, start_response):\n"
        "    start_response('200 OK', [('Content-Type', 'application/json')])\n"
        "    return [json.dumps([sys.base_prefix, sys.argv, math.floor(2.5)]).encode()]\n")
    base = subprocess.run([str(VENV / "bin" / "python"), "-c", "import sys; print(sys.base_prefix)"],
                          capture_output=True, text=True, check=True).stdout.strip()
    port = free_port()
    server = Server([str(BINARY), "run", "probe:app", "--python-path", str(tmp_path),
                     "--bind", f"127.0.0.1:{port}", *workers], tmp_path, port, cwd="/",
                    env={"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"})
    try:
        server.wait_ready()
        code, _, body = server.get("/")
        assert code == 200, server.log()
        assert json.loads(body) == [base, ["portico"], 2]
    finally:
        server.stop()


@pytest.mark.parametrize("mode", ["in-process", "pool"])
def test_relative_paths_are_taken_from_the_config_file_named_without_a_directory(tmp_path, mode):
    """`--config portico.toml`, run from its own directory, with a relative python_path,
    chdir, pid_file and access_log: the app imports after its chdir, and the pid file and
    access log land beside the config file, where `portico reload` run from `/` finds them."""
    site = tmp_path / "site"
    (site / "app").mkdir(parents=True)
    (site / "app" / "main.py").write_text(
        "import os\n"
        "def app(environ, start_response):\n"
        "    start_response('200 OK', [('Content-Type', 'text/plain')])\n"
        "    return [os.getcwd().encode()]\n")
    port = free_port()
    (site / "portico.toml").write_text(
        f'[server]\nlisten = ["127.0.0.1:{port}"]\npid_file = "portico.pid"\n'
        f'access_log = "access.log"\n\n[[app]]\nname = "site"\ntarget = "main:app"\n'
        f'python_path = ["app"]\nchdir = "app"\nmode = "{mode}"\n')
    server = Server([str(BINARY), "serve", "--config", "portico.toml"], tmp_path, port, cwd=site)
    try:
        server.wait_ready()
        code, _, body = server.get("/")
        assert (code, body) == (200, str(site / "app").encode()), server.log()
        wait_until(lambda: (site / "access.log").exists()
                   and "GET / HTTP/1.1" in (site / "access.log").read_text(), 10,
                   what="the access log beside the config file")
        assert (site / "portico.pid").read_text().strip() == str(server.proc.pid)
        reload = subprocess.run([str(BINARY), "reload", "--config", str(site / "portico.toml")],
                                capture_output=True, text=True, timeout=30, cwd="/")
        assert reload.returncode == 0, reload.stderr
    finally:
        server.stop()


def test_run_workers_must_be_at_least_one(run_portico):
    result = run_portico("run", "pool_app:application", "--workers", "0")
    assert result.returncode == 64
    assert "--workers: must be at least 1" in result.stderr


def test_check_and_serve_refuse_a_key_that_does_not_match_the_certificate(run_portico, tmp_path):
    ca = trustme.CA()
    leaf, other = ca.issue_cert("localhost"), ca.issue_cert("localhost")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    leaf.cert_chain_pems[0].write_to_path(str(cert))
    other.private_key_pem.write_to_path(str(key))  # a valid key, but not this cert's
    cfg = tmp_path / "tls.toml"
    cfg.write_text(f'[server]\nlisten = ["127.0.0.1:{free_port()}"]\n\n[server.tls]\n'
                   f'listen = ["127.0.0.1:{free_port()}"]\ncertificate = "{cert}"\nkey = "{key}"\n\n'
                   + app_table("a", "validated:application"))
    for command in ("check", "serve"):
        result = run_portico(command, "--config", str(cfg))
        assert result.returncode == 64, (command, result.stderr)
        assert "server.tls" in result.stderr and "do not work together" in result.stderr
