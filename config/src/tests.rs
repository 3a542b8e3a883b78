use super::*;
use std::time::Duration;

fn load(text: &str) -> Result<Config, ConfigErrors> {
    let path = Path::new("/etc/portico.toml");
    let config = Config::from_toml(text, path)?;
    config.validate(text, path)?;
    Ok(config)
}

/// Each error as (line, key, message), to compare at once.
fn line_key_message(errors: &[ConfigError]) -> Vec<(Option<usize>, Option<&str>, &str)> {
    errors
        .iter()
        .map(|e| (e.line, e.key.as_deref(), e.message.as_str()))
        .collect()
}

#[test]
fn minimal_app_gets_documented_defaults() {
    let c = load("[[app]]\nname = \"hello\"\ntarget = \"hello:app\"\n").unwrap();
    assert_eq!(c.server.listen, vec!["127.0.0.1:8000"]);
    assert_eq!(c.server.threads, 1);
    let app = &c.app[0];
    assert_eq!(app.mount, "/");
    assert_eq!(app.script_name(), "");
    assert_eq!(app.interface, Interface::Wsgi);
    assert_eq!(app.mode, Mode::InProcess);
    assert_eq!(app.threads, 4);
    assert_eq!(app.max_body_size, ByteSize(100 << 20));
    assert_eq!(app.request_timeout, Seconds::from_secs(60));
}

#[test]
fn unknown_key_names_file_line_and_key() {
    let err = load("[server]\nlisten = [\"127.0.0.1:1\"]\nthreds = 2\n").unwrap_err();
    let text = err.to_string();
    assert!(text.starts_with("/etc/portico.toml:3:"), "{text}");
    assert!(text.contains("threds"), "{text}");
}

#[test]
fn wrong_type_is_located() {
    let err = load("[[app]]\nname = \"a\"\ntarget = \"a:b\"\nthreads = \"many\"\n").unwrap_err();
    assert!(err.to_string().starts_with("/etc/portico.toml:4:"), "{err}");
}

#[test]
fn validate_reports_every_problem_at_once_with_lines() {
    let text = "[server]\nlisten = [\"nowhere\"]\n\n[[app]]\nname = \"a\"\nmount = \"api\"\ntarget = \"x y\"\n\n[[app]]\nname = \"a\"\ntarget = \"ok:app\"\nthreads = 0\n";
    let errors = load(text).unwrap_err().0;
    let found: Vec<(Option<usize>, Option<&str>)> =
        errors.iter().map(|e| (e.line, e.key.as_deref())).collect();
    assert!(
        found.contains(&(Some(2), Some("server.listen[0]"))),
        "{found:?}"
    );
    assert!(
        found.contains(&(Some(6), Some("app[0].mount"))),
        "{found:?}"
    );
    assert!(
        found.contains(&(Some(7), Some("app[0].target"))),
        "{found:?}"
    );
    assert!(
        found.contains(&(Some(10), Some("app[1].name"))),
        "{found:?}"
    );
    assert!(
        found.contains(&(Some(12), Some("app[1].threads"))),
        "{found:?}"
    );
}

#[test]
fn same_mount_twice_is_an_error() {
    let err = load("[[app]]\nname=\"a\"\ntarget=\"a\"\nmount=\"/x/\"\n[[app]]\nname=\"b\"\ntarget=\"b\"\nmount=\"/x\"\n")
        .unwrap_err();
    assert!(err.to_string().contains("app[1].mount"), "{err}");
}

#[test]
fn in_process_apps_must_share_chdir_and_listeners_must_differ() {
    let err = load("[server]\nlisten=[\"127.0.0.1:1\", \"127.0.0.1:1\"]\n[[app]]\nname=\"a\"\ntarget=\"a\"\nchdir=\"/\"\n[[app]]\nname=\"b\"\ntarget=\"b\"\nmount=\"/b\"\nchdir=\"/tmp\"\n")
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("server.listen[1]: `127.0.0.1:1` is also server.listen[0]"),
        "{err}"
    );
    assert!(
        err.contains("app[1].chdir: in-process apps share one working directory"),
        "{err}"
    );
}

#[test]
fn too_long_durations_and_non_ascii_mounts_are_refused() {
    let err = load("[[app]]\nname=\"a\"\ntarget=\"a\"\nrequest_timeout=9e18\n").unwrap_err();
    assert!(err.to_string().contains("is not a duration"), "{err}");
    let err = load("[[app]]\nname=\"a\"\ntarget=\"a\"\nmount=\"/caf\u{e9}\"\n").unwrap_err();
    assert!(err.to_string().contains("plain ASCII path prefix"), "{err}");
}

#[test]
fn no_app_is_an_error() {
    let err = load("[server]\n").unwrap_err();
    assert!(err.to_string().contains("nothing to serve"), "{err}");
}

#[test]
fn sizes_and_durations_parse_as_sysadmins_write_them() {
    let c = load("[[app]]\nname=\"a\"\ntarget=\"a\"\nmax_body_size=\"512K\"\nrequest_timeout=\"1.5s\"\nbody_timeout=\"2m\"\n").unwrap();
    assert_eq!(c.app[0].max_body_size, ByteSize(512 * 1024));
    assert_eq!(
        c.app[0].request_timeout.0,
        std::time::Duration::from_millis(1500)
    );
    assert_eq!(c.app[0].body_timeout, Seconds::from_secs(120));
    let err = load("[[app]]\nname=\"a\"\ntarget=\"a\"\nmax_body_size=\"lots\"\n").unwrap_err();
    assert!(err.to_string().contains("`lots` is not a size"), "{err}");
}

#[test]
fn request_buffering_defaults_to_on_for_wsgi_and_off_for_asgi() {
    let c = load("[[app]]\nname=\"w\"\ntarget=\"w\"\nmount=\"/w\"\n[[app]]\nname=\"a\"\ntarget=\"a\"\ninterface=\"asgi\"\nmount=\"/a\"\n").unwrap();
    assert!(c.app[0].buffers_request_body());
    assert!(!c.app[1].buffers_request_body());
    let c = load("[[app]]\nname=\"w\"\ntarget=\"w\"\nrequest_buffering=false\n").unwrap();
    assert!(!c.app[0].buffers_request_body());
    let c = load("[[app]]\nname=\"a\"\ntarget=\"a\"\ninterface=\"asgi\"\nrequest_buffering=true\n")
        .unwrap();
    assert!(c.app[0].buffers_request_body());
}

#[test]
fn changed_settings_name_each_key_a_reload_leaves_alone() {
    let before = "[server]\nlisten=[\"127.0.0.1:1\"]\n[[app]]\nname=\"a\"\ntarget=\"a\"\nmode=\"pool\"\nprocesses=2\n[[app]]\nname=\"b\"\ntarget=\"b\"\n";
    let after = "[server]\nlisten=[\"127.0.0.1:2\"]\n[[app]]\nname=\"a\"\ntarget=\"a\"\nmode=\"pool\"\nprocesses=4\nthreads=8\n[[app]]\nname=\"c\"\ntarget=\"c\"\n";
    let none = |_: &str| false;
    assert_eq!(
        changed_settings(before, after, none),
        vec![
            "server.listen".to_owned(),
            "app `a`: processes, threads".to_owned(),
            "app `b` removed".to_owned(),
            "app `c` added".to_owned(),
        ]
    );
    // A pool whose new generation took its settings is left out.
    assert!(!changed_settings(before, after, |app| app == "a")
        .iter()
        .any(|c| c.starts_with("app `a`")));
    assert_eq!(
        changed_app_keys(before, after, "a"),
        ["processes", "threads"]
    );
    assert!(changed_app_keys(before, after, "b").is_empty());
    assert!(changed_settings(before, before, none).is_empty());
    assert!(changed_settings(before, "not toml [", none).is_empty());
}

#[test]
fn each_server_side_key_and_no_other_makes_an_app_differ_for_the_server() {
    let base = "[[app]]\nname=\"a\"\ntarget=\"a\"\nmode=\"pool\"\n";
    let app = |extra: &str| load(&format!("{base}{extra}\n")).unwrap().app.remove(0);
    let original = app("");
    let server_side = [
        ("name", "name=\"b\""),
        ("mount", "mount=\"/x/\""),
        ("interface", "interface=\"asgi\""),
        ("mode", "mode=\"in-process\""),
        ("pool_socket", "pool_socket=\"/run/a.sock\""),
        ("max_body_size", "max_body_size=\"1M\""),
        ("body_timeout", "body_timeout=\"5s\""),
        ("request_buffering", "request_buffering=false"),
        (
            "websocket_max_message_size",
            "websocket_max_message_size=\"1K\"",
        ),
        (
            "websocket_per_message_deflate",
            "websocket_per_message_deflate=false",
        ),
    ];
    assert_eq!(
        server_side.map(|(key, _)| key),
        SERVER_SIDE_APP_KEYS,
        "one case per server-side key"
    );
    for (key, line) in server_side {
        // The line must replace what `base` says of the key, not add to it.
        let changed = match key {
            "name" | "mode" => load(&base.replace(
                if key == "name" {
                    "name=\"a\""
                } else {
                    "mode=\"pool\""
                },
                line,
            ))
            .unwrap()
            .app
            .remove(0),
            _ => app(line),
        };
        assert!(!original.same_for_the_server(&changed), "{key}");
    }
    for worker_side in ["processes=3", "threads=7", "env={A=\"1\"}", "target=\"b\""] {
        let changed = match worker_side.starts_with("target") {
            true => load(&format!(
                "{}{worker_side}\n",
                base.replace("target=\"a\"\n", "")
            ))
            .unwrap()
            .app
            .remove(0),
            false => app(worker_side),
        };
        assert!(original.same_for_the_server(&changed), "{worker_side}");
    }
}

#[test]
fn a_bad_forwarded_allow_ips_entry_is_named_with_its_line() {
    let err = load("[server]\nforwarded_allow_ips = [\"10.0.0.0/8\", \"proxy.local\"]\n[[app]]\nname=\"a\"\ntarget=\"a\"\n").unwrap_err();
    let text = err.to_string();
    assert!(text.starts_with("/etc/portico.toml:2:"), "{text}");
    assert!(text.contains("server.forwarded_allow_ips[1]"), "{text}");
    assert!(
        text.contains("`proxy.local` is not an IP address"),
        "{text}"
    );
    let c = load("[[app]]\nname=\"a\"\ntarget=\"a\"\n").unwrap();
    assert!(c.server.trusted_proxies().trusts("::1".parse().unwrap()));
    assert!(!c
        .server
        .trusted_proxies()
        .trusts("10.1.1.1".parse().unwrap()));
}

#[test]
fn bare_module_target_means_application() {
    assert_eq!(split_target("mysite.wsgi"), ("mysite.wsgi", "application"));
    assert_eq!(split_target("app:create_app"), ("app", "create_app"));
}

#[test]
fn shipped_examples_are_valid() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples");
    let mut seen = 0;
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "toml") {
            Config::load(&path).unwrap_or_else(|e| panic!("{e}"));
            seen += 1;
        }
    }
    assert!(seen >= 2);
}

#[test]
fn relative_paths_are_relative_to_the_config_file() {
    let mut c = load("[[app]]\nname=\"a\"\ntarget=\"a\"\n").unwrap();
    c.app[0].python_path = vec!["apps".into(), "/abs".into()];
    c.app[0].chdir = Some("work".into());
    c.resolve_paths(Path::new("/etc/portico"));
    assert_eq!(
        c.app[0].python_path,
        vec![PathBuf::from("/etc/portico/apps"), PathBuf::from("/abs")]
    );
    assert_eq!(c.app[0].chdir, Some(PathBuf::from("/etc/portico/work")));
}

const APP: &str = "[[app]]\nname=\"a\"\ntarget=\"a:app\"\n";

#[test]
fn the_pid_file_and_an_access_log_file_are_relative_to_the_config_file() {
    let mut c = load(&format!(
        "[server]\npid_file = \"run/p.pid\"\naccess_log = \"logs/a.log\"\n{APP}"
    ))
    .unwrap();
    c.resolve_paths(Path::new("/etc/portico"));
    assert_eq!(
        c.server.pid_file,
        Some(PathBuf::from("/etc/portico/run/p.pid"))
    );
    assert_eq!(c.server.access_log, "/etc/portico/logs/a.log");
    for kept in ["-", "off"] {
        let mut c = load(&format!("[server]\naccess_log = \"{kept}\"\n{APP}")).unwrap();
        c.resolve_paths(Path::new("/etc/portico"));
        assert_eq!(c.server.access_log, kept);
    }
}

#[test]
fn a_config_file_named_without_a_directory_gives_absolute_paths() {
    // As `--config portico.toml` names it: its directory is the working directory, which an
    // app's `chdir` changes later.
    let text = "[server]\npid_file = \"p.pid\"\n[[app]]\nname=\"a\"\ntarget=\"a:app\"\npython_path=[\"src\"]\n";
    let c = Config::from_text(text, Path::new("portico.toml"), Routing::Mounts).unwrap();
    let here = std::env::current_dir().unwrap();
    assert_eq!(c.app[0].python_path, vec![here.join("src")]);
    assert_eq!(c.server.pid_file, Some(here.join("p.pid")));
}

#[test]
fn pool_socket_is_for_pools_and_one_per_app() {
    let errors = load(
        "[server]\nlisten = [\"127.0.0.1:1\"]\n\
         [[app]]\nname = \"a\"\ntarget = \"m:app\"\nmount = \"/a\"\npool_socket = \"/run/a.sock\"\n\
         [[app]]\nname = \"b\"\ntarget = \"m:app\"\nmount = \"/b\"\nmode = \"pool\"\npool_socket = \"/run/a.sock\"\n",
    )
    .unwrap_err()
    .to_string();
    assert!(
        errors.contains("app[0].pool_socket") && errors.contains("only for mode = \"pool\""),
        "{errors}"
    );
    assert!(
        errors.contains("app[1].pool_socket") && errors.contains("also the pool_socket of app[0]"),
        "{errors}"
    );
}

#[test]
fn pool_users_and_groups_must_exist_and_are_for_pools_only() {
    let errors = load(
        "[[app]]\nname = \"a\"\ntarget = \"m:app\"\nmount = \"/a\"\nmode = \"pool\"\n\
         user = \"no-such-user-here\"\ngroup = \"no-such-group-here\"\n\
         [[app]]\nname = \"b\"\ntarget = \"m:app\"\nmount = \"/b\"\nuser = \"root\"\n\
         env = { A = \"1\" }\n",
    )
    .unwrap_err()
    .0;
    let found = line_key_message(&errors);
    assert!(
        found.contains(&(
            Some(6),
            Some("app[0].user"),
            "no user `no-such-user-here` on this machine"
        )),
        "{found:?}"
    );
    assert!(
        found.contains(&(
            Some(7),
            Some("app[0].group"),
            "no group `no-such-group-here` on this machine"
        )),
        "{found:?}"
    );
    for (line, k) in [(12, "app[1].user"), (13, "app[1].env")] {
        assert!(
            found.iter().any(|(l, key, message)| *l == Some(line)
                && *key == Some(k)
                && message.starts_with("is only for mode = \"pool\"")),
            "{k}: {found:?}"
        );
    }
    // Names every machine has, and numbers that name nobody, are accepted.
    load(
        "[[app]]\nname = \"a\"\ntarget = \"m:app\"\nmode = \"pool\"\nuser = \"root\"\n\
         group = \"54321\"\n",
    )
    .unwrap();
}

#[test]
fn one_pass_names_every_refused_key_and_every_other_problem() {
    let text = "[[app]]\nname = \"a\"\ntarget = \"m:app\"\nproceses = 4\nmax_request = 100\n\
                threads = 0\nmax_memory = \"lots\"\nqueue_size = \"many\"\n";
    let path = Path::new("/etc/portico.toml");
    let dir = std::env::temp_dir().join(format!("portico-config-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("portico.toml");
    std::fs::write(&file, text).unwrap();
    let errors = Config::load(&file).unwrap_err().0;
    std::fs::remove_dir_all(&dir).unwrap();
    let found: Vec<(Option<usize>, Option<&str>)> =
        errors.iter().map(|e| (e.line, e.key.as_deref())).collect();
    assert_eq!(
        found,
        [
            (Some(4), Some("app[0].proceses")),
            (Some(5), Some("app[0].max_request")),
            (Some(6), Some("app[0].threads")),
            (Some(7), Some("app[0].max_memory")),
            (Some(8), Some("app[0].queue_size")),
        ],
        "{errors:?}"
    );
    assert!(errors[0].message.starts_with("unknown field `proceses`"));
    assert!(
        errors[3].message.contains("`lots` is not a size"),
        "{errors:?}"
    );
    // from_toml alone reports the parse errors, all of them, with their keys.
    let parse_only = Config::from_toml(text, path).unwrap_err().0;
    assert_eq!(parse_only.len(), 4, "{parse_only:?}");
}

#[test]
fn pool_settings_on_an_in_process_app_are_refused() {
    let errors = load(
        "[[app]]\nname = \"a\"\ntarget = \"m:app\"\nprocesses = 4\nmax_requests = 10\n\
         [[app]]\nname = \"b\"\ntarget = \"m:app\"\nmount = \"/b\"\nmode = \"pool\"\n\
         processes = 4\nmax_requests = 10\n",
    )
    .unwrap_err()
    .0;
    let keys: Vec<(Option<usize>, Option<&str>)> =
        errors.iter().map(|e| (e.line, e.key.as_deref())).collect();
    assert_eq!(
        keys,
        [
            (Some(4), Some("app[0].processes")),
            (Some(5), Some("app[0].max_requests"))
        ],
        "{errors:?}"
    );
}

#[test]
fn queue_timeout_is_refused_where_no_request_waits_for_a_thread() {
    let path = Path::new("/etc/portico.toml");
    let text = "[[app]]\nname = \"w\"\ntarget = \"m:app\"\nqueue_timeout = \"5s\"\n\
         [[app]]\nname = \"a\"\ntarget = \"m:app\"\nmount = \"/a\"\ninterface = \"asgi\"\n\
         queue_timeout = \"5s\"\nmax_lifetime = \"1h\"\n\
         [[app]]\nname = \"p\"\ntarget = \"m:app\"\nmount = \"/p\"\ninterface = \"asgi\"\n\
         mode = \"pool\"\nqueue_timeout = \"500ms\"\nmax_lifetime = \"1h\"\n";
    let errors = Config::from_text(text, path, Routing::Mounts)
        .unwrap_err()
        .0;
    let found = line_key_message(&errors);
    assert_eq!(found.len(), 2, "{found:?}");
    assert_eq!(found[0].0, Some(10), "{found:?}");
    assert_eq!(found[0].1, Some("app[1].queue_timeout"), "{found:?}");
    assert!(found[0].2.starts_with("is for WSGI apps and pooled apps"));
    assert_eq!(found[1].1, Some("app[1].max_lifetime"), "{found:?}");
    assert!(found[1].2.starts_with("is only for mode = \"pool\""));
    // The WSGI app and the pooled ASGI app keep theirs.
    // (0, no limit, is a queue_timeout that an in-process ASGI app has anyway.)
    let fixed = text.replace(
        "queue_timeout = \"5s\"\nmax_lifetime = \"1h\"\n",
        "queue_timeout = 0\n",
    );
    let config = Config::from_text(&fixed, path, Routing::Mounts).unwrap();
    assert_eq!(
        config.app[0].queue_timeout.as_limit(),
        Some(Duration::from_secs(5))
    );
    assert_eq!(
        config.app[2].queue_timeout.as_limit(),
        Some(Duration::from_millis(500))
    );
    assert_eq!(
        config.app[2].max_lifetime.as_limit(),
        Some(Duration::from_secs(3600))
    );
}

#[test]
fn touch_reload_is_for_pools_and_names_files() {
    let path = Path::new("/etc/portico.toml");
    let errors = Config::from_text(
        "[[app]]\nname = \"a\"\ntarget = \"m:app\"\ntouch_reload = [\"restart.txt\"]\n\
         [[app]]\nname = \"b\"\ntarget = \"m:app\"\nmount = \"/b\"\nmode = \"pool\"\n\
         touch_reload = [\"tmp/restart.txt\", \".\"]\n",
        path,
        Routing::Mounts,
    )
    .unwrap_err()
    .0;
    let found = line_key_message(&errors);
    assert_eq!(found.len(), 2, "{found:?}");
    assert_eq!(found[0].0, Some(4), "{found:?}");
    assert_eq!(found[0].1, Some("app[0].touch_reload"), "{found:?}");
    assert!(found[0].2.starts_with("is only for mode = \"pool\""));
    assert_eq!(found[1].1, Some("app[1].touch_reload[1]"), "{found:?}");
    assert_eq!(
        found[1].2,
        "`/etc/.` is a directory: name a file, whose change reloads the app"
    );
    // Relative to the config file's directory, whether the file exists yet or not.
    let config = Config::from_text(
        "[[app]]\nname = \"b\"\ntarget = \"m:app\"\nmode = \"pool\"\n\
         touch_reload = [\"tmp/restart.txt\", \"/srv/site/wsgi.py\"]\n",
        path,
        Routing::Mounts,
    )
    .unwrap();
    assert_eq!(
        config.app[0].touch_reload,
        [
            PathBuf::from("/etc/tmp/restart.txt"),
            PathBuf::from("/srv/site/wsgi.py")
        ]
    );
}
