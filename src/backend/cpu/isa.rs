//! Run-time CPU feature detection.
//!
//! Every SIMD routine is compiled for all instruction sets and picked at run
//! time, so one binary runs on any x86-64 host (and on other architectures
//! through the portable path). `BERTRT_ISA=avx512|avx2|portable` forces a
//! lower path, which is how tests compare the paths against each other.

use std::sync::OnceLock;

/// The widest instruction set a kernel may use on this host.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Isa {
    /// Plain Rust; the compiler may still auto-vectorise.
    Portable,
    /// AVX2 with FMA (256-bit).
    Avx2Fma,
    /// AVX-512 F/BW/DQ/VL (512-bit).
    Avx512,
}

impl Isa {
    /// What this host supports, capped by `BERTRT_ISA` when set.
    pub fn detect() -> Isa {
        static CACHED: OnceLock<Isa> = OnceLock::new();
        *CACHED.get_or_init(|| {
            let host = Isa::host();
            match std::env::var("BERTRT_ISA").ok().as_deref() {
                Some("portable") => Isa::Portable,
                Some("avx2") => host.min(Isa::Avx2Fma),
                _ => host,
            }
        })
    }

    /// Every path this host can run, for tests that compare them.
    pub fn available() -> Vec<Isa> {
        let host = Isa::host();
        [Isa::Portable, Isa::Avx2Fma, Isa::Avx512]
            .into_iter()
            .filter(|isa| *isa <= host)
            .collect()
    }

    fn host() -> Isa {
        #[cfg(target_arch = "x86_64")]
        {
            if is_x86_feature_detected!("avx512f")
                && is_x86_feature_detected!("avx512bw")
                && is_x86_feature_detected!("avx512dq")
                && is_x86_feature_detected!("avx512vl")
            {
                return Isa::Avx512;
            }
            if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
                return Isa::Avx2Fma;
            }
        }
        Isa::Portable
    }

    pub fn name(self) -> &'static str {
        match self {
            Isa::Portable => "portable",
            Isa::Avx2Fma => "avx2+fma",
            Isa::Avx512 => "avx512",
        }
    }
}
