//! Writes the tests' container image (tests/src/oci.rs) to a directory, to
//! try `vmm run --image` by hand: `cargo run -p vmm-tests --example
//! write_test_image DIR`.
fn main() {
    let dir = std::env::args()
        .nth(1)
        .expect("usage: write_test_image DIR");
    std::fs::create_dir_all(&dir).unwrap();
    let image = vmm_tests::oci::build_test_image(std::path::Path::new(&dir));
    println!(
        "{}\n{}\n{}",
        image.layout.display(),
        image.archive.display(),
        image.id
    );
}
