//! Build script: links libpython with an rpath so test binaries find it.
fn main() {
    // Lets the crate's own unit tests (which start an interpreter) find libpython.
    pyo3_build_config::add_libpython_rpath_link_args();
}
