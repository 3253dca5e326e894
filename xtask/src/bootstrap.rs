//! Installs what building and testing need, idempotently and quietly when all is present:
//! nightly `rust-src`, `bpf-linker` built on the nightly's own libLLVM, tracefs, Debian packages,
//! and a prebuilt libduckdb.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, bail};

/// Debian packages the tests, demo and benchmarks use.
const DEBIAN_PACKAGES: &[(&str, &str)] = &[
    ("nginx-light", "/usr/sbin/nginx"),
    ("apache2-utils", "/usr/bin/ab"),
    ("nftables", "/usr/sbin/nft"),
    ("postgresql-15", "/usr/lib/postgresql/15/bin/postgres"),
    ("procps", "/usr/bin/pgrep"),
    ("protobuf-compiler", "/usr/bin/protoc"),
    ("clickhouse-server", "/usr/sbin/clickhouse-server"),
    ("chromium", "/usr/bin/chromium"),
    // setcap: the probe's file capabilities, as its image sets them (tests/tests/deploy.rs).
    ("libcap2-bin", "/sbin/setcap"),
];

/// Where the prebuilt libduckdb goes; `.cargo/config.toml` points DUCKDB_LIB_DIR here.
const DUCKDB_LIB_DIR: &str = "/var/tmp/bakeoff-duckdb/1.5.6";

/// DuckDB's own release build of libduckdb.so (C API), as published on the npm registry for its
/// Node bindings; must match the C API the `duckdb` crate (=1.10506.x) was generated from.
const DUCKDB_NPM_PACKAGE: &str = "@duckdb/node-bindings-linux-x64@1.5.6-r.1";

/// Where the libLLVM symlinks for building bpf-linker live (outside the clone).
const LLVM_PREFIX: &str = "/var/tmp/bakeoff-llvm";

fn output(cmd: &mut Command) -> Result<String> {
    let out = cmd
        .output()
        .with_context(|| format!("cannot run {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn run(step: &str, cmd: &mut Command) -> Result<()> {
    eprintln!("bootstrap: {step}");
    let status = cmd
        .status()
        .with_context(|| format!("bootstrap step `{step}`: cannot run {cmd:?}"))?;
    if !status.success() {
        bail!("bootstrap step `{step}` failed ({status}): {cmd:?}");
    }
    Ok(())
}

pub fn bootstrap() -> Result<()> {
    bootstrap_parts(Part::ALL)
}

/// What `cargo xtask bootstrap --only` can install on its own: the container images'
/// build stages (deploy/images/) take only what their binary needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Part {
    /// Nightly `rust-src` and bpf-linker: building the probe's kernel programs.
    EbpfToolchain,
    /// tracefs mounted (the probe's tests).
    Tracefs,
    /// The Debian packages the tests, demo and benchmarks use.
    Debian,
    /// The PyPI packages the tests use.
    Python,
    /// The prebuilt libduckdb the collector links.
    Libduckdb,
}

impl Part {
    pub const ALL: &[Part] = &[
        Part::EbpfToolchain,
        Part::Tracefs,
        Part::Debian,
        Part::Python,
        Part::Libduckdb,
    ];
}

/// Installs the given parts, in the order of `Part::ALL`.
pub fn bootstrap_parts(parts: &[Part]) -> Result<()> {
    for part in Part::ALL.iter().filter(|p| parts.contains(p)) {
        match part {
            Part::EbpfToolchain => {
                rust_src()?;
                bpf_linker()?;
            }
            Part::Tracefs => tracefs()?,
            Part::Debian => debian_packages()?,
            Part::Python => python_packages()?,
            Part::Libduckdb => libduckdb()?,
        }
    }
    Ok(())
}

/// PyPI packages the tests use: grpcio, a third-party gRPC implementation for the HTTP/2 tests;
/// kubernetes-validate, the Kubernetes API's JSON schemas for the deploy manifests' test
/// (deploy/kubernetes/validate.py; it brings jsonschema and PyYAML).
const PYTHON_PACKAGES: &[(&str, &str)] = &[
    ("grpcio==1.85.3", "grpc"),
    ("kubernetes-validate==1.37.0", "kubernetes_validate"),
];

fn python_packages() -> Result<()> {
    for (package, module) in PYTHON_PACKAGES {
        let present = Command::new("python3")
            .args(["-c", &format!("import {module}")])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !present {
            run(
                &format!("pip install {package}"),
                Command::new("python3").args(["-m", "pip", "install", "-q", package]),
            )?;
        }
    }
    Ok(())
}

fn rust_src() -> Result<()> {
    let installed = output(Command::new("rustup").args([
        "component",
        "list",
        "--toolchain",
        "nightly",
        "--installed",
    ]))
    .context(
        "the nightly toolchain is needed to build the eBPF programs (rustup toolchain list)",
    )?;
    if installed.lines().any(|l| l.starts_with("rust-src")) {
        return Ok(());
    }
    run(
        "rustup component add rust-src --toolchain nightly",
        Command::new("rustup").args(["component", "add", "rust-src", "--toolchain", "nightly"]),
    )
}

/// LLVM major version of the nightly, from `rustc +nightly -vV`.
fn nightly_llvm_major() -> Result<u32> {
    let vv = output(Command::new("rustc").args(["+nightly", "-vV"]))?;
    let version = vv
        .lines()
        .find_map(|l| l.strip_prefix("LLVM version: "))
        .context("`rustc +nightly -vV` prints no LLVM version")?;
    version
        .split('.')
        .next()
        .and_then(|m| m.trim().parse().ok())
        .with_context(|| format!("cannot parse LLVM version `{version}`"))
}

fn cargo_bin(name: &str) -> PathBuf {
    let home = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cargo")
        });
    home.join("bin").join(name)
}

fn bpf_linker() -> Result<()> {
    let major = nightly_llvm_major()?;
    let stamp = PathBuf::from(LLVM_PREFIX).join(format!("bpf-linker.llvm-{major}"));
    if cargo_bin("bpf-linker").exists() && stamp.exists() {
        return Ok(());
    }
    let sysroot = output(Command::new("rustc").args(["+nightly", "--print", "sysroot"]))?;
    let lib_dir = Path::new(sysroot.trim()).join("lib");
    let libllvm = std::fs::read_dir(&lib_dir)
        .with_context(|| format!("cannot list {}", lib_dir.display()))?
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .find(|n| n.starts_with(&format!("libLLVM.so.{major}")))
        .with_context(|| format!("no libLLVM.so.{major}* in {}", lib_dir.display()))?;
    let prefix_lib = PathBuf::from(LLVM_PREFIX).join("lib");
    std::fs::create_dir_all(&prefix_lib)
        .with_context(|| format!("cannot create {}", prefix_lib.display()))?;
    for link in ["libLLVM.so", libllvm.as_str()] {
        let path = prefix_lib.join(link);
        let _ = std::fs::remove_file(&path);
        std::os::unix::fs::symlink(lib_dir.join(&libllvm), &path)
            .with_context(|| format!("cannot link {}", path.display()))?;
    }
    run(
        &format!("cargo install bpf-linker (LLVM {major}, linked to the nightly's libLLVM)"),
        Command::new("cargo")
            .current_dir(std::env::temp_dir())
            .env("LLVM_PREFIX", LLVM_PREFIX)
            .env_remove("CARGO_TARGET_DIR")
            .args([
                "install",
                "bpf-linker",
                "--no-default-features",
                "--features",
                &format!("llvm-{major}"),
                "--locked",
                "--force",
            ]),
    )?;
    std::fs::write(&stamp, b"").with_context(|| format!("cannot write {}", stamp.display()))?;
    Ok(())
}

fn tracefs() -> Result<()> {
    if Path::new("/sys/kernel/tracing/events").is_dir()
        || Path::new("/sys/kernel/debug/tracing/events").is_dir()
    {
        return Ok(());
    }
    run(
        "mount tracefs",
        Command::new("mount").args(["-t", "tracefs", "nodev", "/sys/kernel/tracing"]),
    )
}

fn debian_packages() -> Result<()> {
    let missing: Vec<&str> = DEBIAN_PACKAGES
        .iter()
        .filter(|(_, bin)| !Path::new(bin).exists())
        .map(|(pkg, _)| *pkg)
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    run(
        "apt-get update",
        Command::new("apt-get").args(["update", "-qq"]),
    )?;
    run(
        &format!("apt-get install {}", missing.join(" ")),
        Command::new("apt-get")
            .env("DEBIAN_FRONTEND", "noninteractive")
            .args(["install", "-y", "-qq", "--no-install-recommends"])
            .args(&missing),
    )
}

/// Fetches libduckdb.so so the collector links it instead of compiling DuckDB's C++ (~30 min
/// here). npm checks the package's integrity hash from the registry.
fn libduckdb() -> Result<()> {
    let dir = Path::new(DUCKDB_LIB_DIR);
    let lib = dir.join("libduckdb.so");
    if lib.exists() {
        return Ok(());
    }
    if !Path::new("/usr/bin/npm").exists()
        && output(Command::new("sh").args(["-c", "command -v npm"])).is_err()
    {
        run(
            "apt-get install npm",
            Command::new("apt-get")
                .env("DEBIAN_FRONTEND", "noninteractive")
                .args(["install", "-y", "-qq", "--no-install-recommends", "npm"]),
        )?;
    }
    let staging = dir.with_extension("partial");
    let _ = std::fs::remove_dir_all(&staging);
    std::fs::create_dir_all(&staging)
        .with_context(|| format!("cannot create {}", staging.display()))?;
    run(
        &format!("npm pack {DUCKDB_NPM_PACKAGE} (prebuilt libduckdb)"),
        Command::new("npm")
            .args(["pack", "--silent", DUCKDB_NPM_PACKAGE, "--pack-destination"])
            .arg(&staging)
            .stdout(std::process::Stdio::null()),
    )?;
    let tarball = std::fs::read_dir(&staging)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|x| x == "tgz"))
        .with_context(|| format!("npm pack left no .tgz in {}", staging.display()))?;
    run(
        "unpack libduckdb.so",
        Command::new("tar")
            .arg("-xzf")
            .arg(&tarball)
            .arg("-C")
            .arg(&staging)
            .args(["--strip-components=1", "package/libduckdb.so"]),
    )?;
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    std::fs::rename(staging.join("libduckdb.so"), &lib)
        .with_context(|| format!("cannot move libduckdb.so into {}", dir.display()))?;
    let _ = std::fs::remove_dir_all(&staging);
    Ok(())
}
