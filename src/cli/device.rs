//! `--device cpu|cuda|cuda:N`: where a command's model runs.

use std::str::FromStr;

use anyhow::{Context, Result};

use bertrt::backend::cuda::CudaBackend;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Device {
    #[default]
    Cpu,
    /// The CUDA device with this ordinal.
    Cuda(usize),
}

impl FromStr for Device {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        match text {
            "cpu" => Ok(Device::Cpu),
            "cuda" => Ok(Device::Cuda(0)),
            _ => text
                .strip_prefix("cuda:")
                .and_then(|ordinal| ordinal.parse().ok())
                .map(Device::Cuda)
                .ok_or_else(|| {
                    format!("expected cpu, cuda or cuda:N (N a device number), not {text:?}")
                }),
        }
    }
}

impl std::fmt::Display for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Device::Cpu => write!(f, "cpu"),
            Device::Cuda(ordinal) => write!(f, "cuda:{ordinal}"),
        }
    }
}

/// Starts the CUDA backend on device `ordinal`, or says why it cannot
/// (built without kernels, no driver or device, no cuBLAS).
pub fn start_cuda(ordinal: usize) -> Result<CudaBackend> {
    CudaBackend::new(ordinal).with_context(|| format!("cannot use --device cuda:{ordinal}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_cpu_cuda_and_an_ordinal() {
        assert_eq!("cpu".parse(), Ok(Device::Cpu));
        assert_eq!("cuda".parse(), Ok(Device::Cuda(0)));
        assert_eq!("cuda:3".parse(), Ok(Device::Cuda(3)));
        for bad in ["gpu", "cuda:", "cuda:x", "cuda:-1", "CUDA"] {
            let error = bad.parse::<Device>().unwrap_err();
            assert!(error.contains("cpu, cuda or cuda:N"), "{bad}: {error}");
        }
        assert_eq!(Device::Cuda(1).to_string(), "cuda:1");
    }
}
