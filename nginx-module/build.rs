//! Build script: an rpath to the libpython the module embeds (pyenv's is not on the loader
//! path), the interpreter's path for the configuration-time import check, and cfgs for the
//! features and version of the nginx tree that nginx-sys was built against.
use std::env;

fn main() {
    pyo3_build_config::add_libpython_rpath_link_args();
    if let Some(exe) = pyo3_build_config::get().executable() {
        println!("cargo::rustc-env=PORTICO_PYTHON_EXECUTABLE={exe}");
        // Where the embedded interpreter finds its standard library: a worker checks it can
        // read it before starting Python (which would otherwise abort the worker, over and
        // over).
        let stdlib = std::process::Command::new(exe)
            .args([
                "-c",
                "import sysconfig; print(sysconfig.get_paths()['stdlib'])",
            ])
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned());
        if let Some(stdlib) = stdlib {
            println!("cargo::rustc-env=PORTICO_PYTHON_STDLIB={stdlib}");
        }
    }

    // nginx-sys (a direct dependency, so its `links` metadata reaches us) reports the
    // configured features (`http_ssl`, `http_v2`, ...) and the version number.
    println!("cargo::rerun-if-env-changed=DEP_NGINX_FEATURES_CHECK");
    println!(
        "cargo::rustc-check-cfg=cfg(ngx_feature, values({}))",
        env::var("DEP_NGINX_FEATURES_CHECK").unwrap_or_else(|_| "any()".into())
    );
    println!("cargo::rerun-if-env-changed=DEP_NGINX_FEATURES");
    for feature in env::var("DEP_NGINX_FEATURES")
        .unwrap_or_default()
        .split(',')
    {
        let feature = feature.trim();
        if !feature.is_empty() {
            println!("cargo::rustc-cfg=ngx_feature=\"{feature}\"");
        }
    }
    // `ngx_table_elt_t::next` exists from nginx 1.23.0 on.
    println!("cargo::rustc-check-cfg=cfg(nginx1_23_0)");
    println!("cargo::rerun-if-env-changed=DEP_NGINX_VERSION_NUMBER");
    let version: u64 = env::var("DEP_NGINX_VERSION_NUMBER")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    if version >= 1_023_000 {
        println!("cargo::rustc-cfg=nginx1_23_0");
    }
}
