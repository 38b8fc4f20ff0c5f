//! Compiles the CUDA kernels in `kernels/` to PTX when `nvcc` is found.
//!
//! For each `kernels/*.cu` and each target in [`ARCHS`], `nvcc -ptx` writes
//! `$OUT_DIR/<name>.compute_<NN>.ptx`, which `src/backend/cuda/kernels.rs`
//! embeds with `include_str!`; the driver JIT-compiles it for the GPU at run
//! time (PTX for compute_80 runs on any sm_80+ part, compute_90 is used on
//! Hopper). `ptxas` then assembles every PTX file for its `sm_NN` so that
//! register, shared-memory and spill problems fail or warn here, in CI, and
//! not on a GPU machine. Spills and local-memory use always print as cargo
//! warnings; `BERTRT_PTXAS_VERBOSE=1` prints the whole `ptxas -v` report
//! (registers, shared memory, spills per kernel) as warnings too, and it is
//! always written to `$OUT_DIR/ptxas-report.txt`.
//!
//! When this succeeds the crate is built with `cfg(bertrt_cuda_kernels)`.
//! Without nvcc it prints one warning and sets nothing: the crate still
//! builds and `CudaBackend::new` reports "built without CUDA kernels".
//!
//! nvcc is looked up as `$BERTRT_NVCC`, then on `PATH`, then in
//! `$CUDA_HOME/bin` and `$CUDA_PATH/bin`. `BERTRT_NO_CUDA_KERNELS=1` skips the
//! kernels even when nvcc is there (to check the fallback path). After
//! installing nvcc (`scripts/install-nvcc.sh`), `touch build.rs` to rebuild.
//!
//! Flags: `-O3 -lineinfo -std=c++17`, and deliberately NOT
//! `--use_fast_math`: it would flush denormals to zero and replace `expf`,
//! `erfcf`, `tanhf`, `sqrtf` and divisions by approximations, moving
//! LayerNorm, softmax and GELU several ulps away from the CPU reference. These
//! kernels are memory-bound, so the approximations would buy little; a kernel
//! that needs a fast intrinsic uses it explicitly (`__expf`), and its test
//! states the tolerance.

use std::path::{Path, PathBuf};
use std::process::Command;

/// Virtual architectures we emit PTX for; ptxas checks each on `sm_NN`.
const ARCHS: [u32; 2] = [80, 90];

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=kernels");
    for var in [
        "BERTRT_NVCC",
        "BERTRT_NO_CUDA_KERNELS",
        "BERTRT_PTXAS_VERBOSE",
        "CUDA_HOME",
        "CUDA_PATH",
    ] {
        println!("cargo:rerun-if-env-changed={var}");
    }
    println!("cargo:rustc-check-cfg=cfg(bertrt_cuda_kernels)");

    if env_flag("BERTRT_NO_CUDA_KERNELS") {
        println!(
            "cargo:warning=BERTRT_NO_CUDA_KERNELS is set: building without CUDA kernels \
             (the CUDA backend will report \"built without CUDA kernels\")"
        );
        return;
    }
    let Some(nvcc) = find_nvcc() else {
        println!(
            "cargo:warning=nvcc not found (PATH, $CUDA_HOME/bin): building without CUDA \
             kernels; the CUDA backend will report \"built without CUDA kernels\". \
             Install it with scripts/install-nvcc.sh, then `touch build.rs`."
        );
        return;
    };
    println!("cargo:rerun-if-changed={}", nvcc.display());
    let ptxas = nvcc
        .parent()
        .map(|dir| dir.join("ptxas"))
        .filter(|p| p.is_file())
        .unwrap_or_else(|| PathBuf::from("ptxas"));
    let verbose = env_flag("BERTRT_PTXAS_VERBOSE");
    let out_dir = PathBuf::from(std::env::var_os("OUT_DIR").expect("OUT_DIR"));

    let mut sources: Vec<PathBuf> = std::fs::read_dir("kernels")
        .expect("kernels/ is missing")
        .map(|entry| entry.expect("reading kernels/").path())
        .filter(|p| p.extension().is_some_and(|e| e == "cu"))
        .collect();
    sources.sort();

    // One thread per kernel file: nvcc and ptxas are single-threaded.
    let reports: Vec<String> = std::thread::scope(|scope| {
        let jobs: Vec<_> = sources
            .iter()
            .map(|src| {
                let (nvcc, ptxas, out_dir) = (&nvcc, &ptxas, &out_dir);
                scope.spawn(move || compile(nvcc, ptxas, src, out_dir))
            })
            .collect();
        jobs.into_iter()
            .map(|job| job.join().expect("kernel compile thread panicked"))
            .collect()
    });

    let report = reports.concat();
    std::fs::write(out_dir.join("ptxas-report.txt"), &report).expect("writing ptxas-report.txt");
    for line in report.lines() {
        let alarming = line.contains("warning")
            || (line.contains("spill")
                && !line.contains(" 0 bytes spill stores, 0 bytes spill loads"))
            || (line.contains("stack frame") && !line.contains(" 0 bytes stack frame"));
        if verbose || alarming {
            println!("cargo:warning={line}");
        }
    }
    println!("cargo:rustc-cfg=bertrt_cuda_kernels");
}

/// Compiles one `.cu` file for every arch; returns its ptxas report.
fn compile(nvcc: &Path, ptxas: &Path, src: &Path, out_dir: &Path) -> String {
    let stem = src
        .file_stem()
        .unwrap()
        .to_str()
        .expect("UTF-8 kernel file name");
    let mut report = String::new();
    for arch in ARCHS {
        let ptx = out_dir.join(format!("{stem}.compute_{arch}.ptx"));
        run(Command::new(nvcc)
            .args(["-ptx", "-std=c++17", "-O3", "-lineinfo", "-Ikernels"])
            .arg(format!("-arch=compute_{arch}"))
            .arg("-o")
            .arg(&ptx)
            .arg(src));
        let cubin = out_dir.join(format!("{stem}.sm_{arch}.cubin"));
        let stderr = run(Command::new(ptxas)
            .args(["-v", "--warn-on-spills", "--warn-on-local-memory-usage"])
            .arg(format!("-arch=sm_{arch}"))
            .arg("-o")
            .arg(&cubin)
            .arg(&ptx));
        for line in stderr.lines() {
            report.push_str(&format!("{stem}.cu sm_{arch}: {}\n", line.trim()));
        }
    }
    report
}

/// Runs a command, panicking with its output on failure; returns its stderr.
fn run(cmd: &mut Command) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    if !out.status.success() {
        // ptxas 11.8 segfaults on some sm_90 builds with -lineinfo (see the
        // note in kernels/attention.cu): say so rather than leave a riddle.
        let hint = if out.status.code().is_none() {
            "\n(the tool was killed by a signal: ptxas 11.8 crashes on some sm_90 \
             -lineinfo builds of large inlined device functions; marking the \
             function __noinline__ worked around it in kernels/attention.cu)"
        } else {
            ""
        };
        panic!(
            "{cmd:?} failed ({}):\n{}{stderr}{hint}",
            out.status,
            String::from_utf8_lossy(&out.stdout)
        );
    }
    stderr
}

fn find_nvcc() -> Option<PathBuf> {
    if let Some(path) = std::env::var_os("BERTRT_NVCC") {
        return Some(PathBuf::from(path)).filter(|p| p.is_file());
    }
    let on_path = std::env::var_os("PATH")
        .into_iter()
        .flat_map(|paths| std::env::split_paths(&paths).collect::<Vec<_>>())
        .map(|dir| dir.join("nvcc"));
    let in_home = ["CUDA_HOME", "CUDA_PATH"]
        .into_iter()
        .filter_map(std::env::var_os)
        .map(|home| Path::new(&home).join("bin/nvcc"));
    on_path.chain(in_home).find(|p| p.is_file())
}

fn env_flag(name: &str) -> bool {
    std::env::var(name).is_ok_and(|v| !v.is_empty() && v != "0")
}
