//! libtorch's CUDA backend, loaded in a process of its own: it registers its kernels with
//! libtorch's dispatcher as it loads, so no other test may be training meanwhile.

fn mapped(library: &str) -> bool {
    std::fs::read_to_string("/proc/self/maps")
        .expect("/proc/self/maps")
        .lines()
        .any(|l| l.ends_with(library))
}

/// The linker's `--as-needed` leaves `libtorch_cuda.so` out of every binary (nothing in
/// tch calls into it), so no GPU was ever seen until `load_cuda` mapped it. With a CUDA
/// build of libtorch (setup.sh's torch wheel is one) the loader maps the backend that sits
/// beside the `libtorch_cpu.so` in use; with a CPU-only build there is nothing to load.
#[test]
fn the_cuda_backend_left_out_by_the_linker_is_loaded_from_beside_libtorch_cpu() {
    // Any tensor maps libtorch_cpu.
    let t = tch::Tensor::from_slice(&[1f32, 2.0]);
    assert_eq!(t.size(), [2]);
    let dir = dpfl_ml::model::libtorch_dir().expect("libtorch_cpu.so is mapped");
    let cuda_build = dir.join("libtorch_cuda.so").exists();
    assert!(
        !mapped("/libtorch_cuda.so"),
        "the binary links libtorch_cuda.so itself now: load_cuda's reason to exist is gone"
    );
    assert_eq!(dpfl_ml::model::load_cuda_library(), cuda_build);
    assert_eq!(mapped("/libtorch_cuda.so"), cuda_build);
}
