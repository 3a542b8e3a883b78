//! Build script: gives the `portico` binary an rpath to the libpython it embeds (pyenv's is
//! not on the loader path).
fn main() {
    pyo3_build_config::add_libpython_rpath_link_args();
}
