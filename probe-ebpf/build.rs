/// Rebuild when the `bpf-linker` binary changes: building this crate depends on it, and cargo
/// cannot express that dependency otherwise (as in aya-template).
fn main() {
    match which::which("bpf-linker") {
        Ok(path) => println!("cargo:rerun-if-changed={}", path.display()),
        Err(_) => println!("cargo:warning=bpf-linker not found; run `cargo xtask bootstrap`"),
    }
}
