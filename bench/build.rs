//! Embeds the libtorch library directory as an rpath so this crate's binaries and
//! tests run without anyone exporting `LD_LIBRARY_PATH`.
fn main() {
    if let Ok(dir) = std::env::var("DEP_TCH_LIBTORCH_LIB") {
        println!("cargo:rustc-link-arg=-Wl,-rpath,{dir}");
    }
}
