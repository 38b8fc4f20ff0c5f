//! How a checkpoint's linear layers become the backend's.
//!
//! The model names each linear layer ([`LinearSpec`]) and hands it to a
//! [`LinearLoader`], which picks the form: [`F32Linears`] everywhere by
//! default; `crate::quant` supplies one that makes chosen layers INT8. The
//! model itself never knows which form a layer took.
//!
//! # INT8 tensors
//! An INT8 artifact (written by `bertrt quantize`) stores a quantized linear
//! `{prefix}` (a Hugging Face prefix such as
//! `encoder.layer.0.intermediate.dense`) as
//! - `{prefix}.weight_int8`: I8 `[out, in]`, `round(W · diag(s) / scale)` in
//!   `-127..=127`;
//! - `{prefix}.weight_scale`: F32 `[out]`, the per-output-channel `scale`;
//! - `{prefix}.input_smoothing`: F32 `[in]`, SmoothQuant's factors `s`
//!   (optional, 1 when absent): activations are divided by them before they
//!   are quantized;
//! - `{prefix}.bias`: F32 `[out]`, as in the f32 checkpoint;
//!
//! so `W ≈ weight_int8 · weight_scale[:, None] / input_smoothing[None, :]`,
//! which is what [`F32Linears`] reads for backends without INT8 kernels.
//! The fused query/key/value projection is stored as its three parts, each
//! with the same `input_smoothing`.

use std::collections::HashMap;
use std::ops::Range;
use std::path::{Path, PathBuf};

use memmap2::Mmap;
use safetensors::{Dtype, SafeTensors};

use crate::backend::Backend;
use crate::checkpoint::Checkpoint;
use crate::config::BertConfig;
use crate::error::{Error, Result};

pub const INT8_WEIGHT: &str = "weight_int8";
pub const INT8_SCALE: &str = "weight_scale";
pub const INT8_SMOOTHING: &str = "input_smoothing";

/// The four linear layers of an encoder layer, in forward order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum LinearKind {
    /// `attention.self.{query,key,value}`, fused into one projection.
    Qkv,
    AttentionOutput,
    /// The FFN up-projection (GELU follows).
    Intermediate,
    /// The FFN down-projection.
    Output,
}

impl LinearKind {
    pub const ALL: [LinearKind; 4] = [
        LinearKind::Qkv,
        LinearKind::AttentionOutput,
        LinearKind::Intermediate,
        LinearKind::Output,
    ];

    /// This kind's layer in encoder layer `layer` of a model with `config`.
    pub fn spec(self, layer: usize, config: &BertConfig) -> LinearSpec {
        let (hidden, inter) = (config.hidden_size, config.intermediate_size);
        let prefix = format!("encoder.layer.{layer}");
        let one = |part: &str, out, inp| LinearSpec {
            name: format!("{prefix}.{part}"),
            parts: vec![format!("{prefix}.{part}")],
            out_per_part: out,
            in_features: inp,
        };
        match self {
            LinearKind::Qkv => LinearSpec {
                name: format!("{prefix}.attention.self.qkv"),
                parts: ["query", "key", "value"]
                    .map(|p| format!("{prefix}.attention.self.{p}"))
                    .to_vec(),
                out_per_part: hidden,
                in_features: hidden,
            },
            LinearKind::AttentionOutput => one("attention.output.dense", hidden, hidden),
            LinearKind::Intermediate => one("intermediate.dense", inter, hidden),
            LinearKind::Output => one("output.dense", hidden, inter),
        }
    }
}

/// One linear layer as the checkpoint stores it: the `[out_per_part, in]`
/// weights and biases of `parts`, stacked in order, make one
/// `[out_features, in]` layer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LinearSpec {
    /// For reports and quantization records, e.g.
    /// `encoder.layer.0.intermediate.dense` (the fused projection is
    /// `encoder.layer.0.attention.self.qkv`).
    pub name: String,
    /// Checkpoint prefixes (`{part}.weight`, `{part}.bias`).
    pub parts: Vec<String>,
    pub out_per_part: usize,
    pub in_features: usize,
}

impl LinearSpec {
    pub fn out_features(&self) -> usize {
        self.out_per_part * self.parts.len()
    }

    /// Every encoder linear of a model with `config`, in forward order.
    pub fn encoder(config: &BertConfig) -> Vec<LinearSpec> {
        (0..config.num_hidden_layers)
            .flat_map(|layer| LinearKind::ALL.map(|kind| kind.spec(layer, config)))
            .collect()
    }
}

/// What the model loads its linear layers from: the f32 checkpoint and, in
/// an INT8 artifact, the quantized weights.
pub struct ModelTensors<'a> {
    pub checkpoint: &'a Checkpoint,
    pub int8: Int8Tensors,
}

impl<'a> ModelTensors<'a> {
    pub fn new(checkpoint: &'a Checkpoint) -> Result<Self> {
        Ok(ModelTensors {
            checkpoint,
            int8: Int8Tensors::open(checkpoint.path())?,
        })
    }

    /// The stacked f32 weight `[out, in]` and bias of `spec`; INT8 parts
    /// are dequantized.
    pub fn f32_linear(&self, spec: &LinearSpec) -> Result<(Vec<f32>, Vec<f32>)> {
        let (out, inp) = (spec.out_per_part, spec.in_features);
        let mut weight = Vec::with_capacity(spec.out_features() * inp);
        for part in &spec.parts {
            match self.int8.part(part, out, inp)? {
                Some(q) => weight.extend(q.dequantize(inp)),
                None => weight.extend_from_slice(
                    &self
                        .checkpoint
                        .tensor(&format!("{part}.weight"), &[out, inp])?,
                ),
            }
        }
        Ok((weight, self.bias(spec)?))
    }

    /// The stacked bias of `spec`.
    pub fn bias(&self, spec: &LinearSpec) -> Result<Vec<f32>> {
        let mut bias = Vec::with_capacity(spec.out_features());
        for part in &spec.parts {
            bias.extend_from_slice(
                &self
                    .checkpoint
                    .tensor(&format!("{part}.bias"), &[spec.out_per_part])?,
            );
        }
        Ok(bias)
    }
}

/// Makes the backend's form of each linear layer.
pub trait LinearLoader<B: Backend> {
    fn load(&self, backend: &B, tensors: &ModelTensors, spec: &LinearSpec) -> Result<B::Linear>;

    /// The backend the model in `tensors` will run on, set up for these
    /// linears before any is loaded (bf16 and INT8 linears also put
    /// attention's products in bf16). As given by default.
    fn configure(&self, backend: B, _tensors: &ModelTensors) -> B {
        backend
    }
}

/// Every linear in f32 (an INT8 artifact's weights dequantized), for any
/// backend.
pub struct F32Linears;

impl<B: Backend> LinearLoader<B> for F32Linears {
    fn load(&self, backend: &B, tensors: &ModelTensors, spec: &LinearSpec) -> Result<B::Linear> {
        let (weight, bias) = tensors.f32_linear(spec)?;
        Ok(backend.prepare_linear(&weight, &bias, spec.out_features(), spec.in_features))
    }
}

/// One quantized `[out, in]` weight as an INT8 artifact stores it.
#[derive(Clone, Debug, PartialEq)]
pub struct Int8Part {
    /// Row-major `[out, in]`, in `-127..=127`.
    pub values: Vec<i8>,
    /// Per output channel.
    pub scales: Vec<f32>,
    /// Per input channel (SmoothQuant), if any.
    pub smoothing: Option<Vec<f32>>,
}

impl Int8Part {
    /// Back to f32 `[out, in]`.
    pub fn dequantize(&self, in_features: usize) -> Vec<f32> {
        let mut w: Vec<f32> = self.values.iter().map(|&v| f32::from(v)).collect();
        for (row, &scale) in w.chunks_exact_mut(in_features).zip(&self.scales) {
            row.iter_mut().for_each(|v| *v *= scale);
            if let Some(s) = &self.smoothing {
                row.iter_mut().zip(s).for_each(|(v, s)| *v /= s);
            }
        }
        w
    }
}

struct RawEntry {
    dtype: Dtype,
    shape: Vec<usize>,
    bytes: Range<usize>,
}

/// The INT8 tensors of a safetensors file (none in an f32 checkpoint).
pub struct Int8Tensors {
    path: PathBuf,
    map: Option<Mmap>,
    entries: HashMap<String, RawEntry>,
}

impl Int8Tensors {
    /// Indexes the `*.weight_int8`, `*.weight_scale` and
    /// `*.input_smoothing` tensors of `path` (already validated as
    /// safetensors by [`Checkpoint::open`]).
    pub fn open(path: &Path) -> Result<Self> {
        let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
        // SAFETY: read-only private map, as in `Checkpoint::open`.
        let map = unsafe { Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
        let (header_len, metadata) =
            SafeTensors::read_metadata(&map).map_err(|e| Error::CorruptSafetensors {
                path: path.into(),
                message: e.to_string(),
            })?;
        let suffixes = [INT8_WEIGHT, INT8_SCALE, INT8_SMOOTHING].map(|s| format!(".{s}"));
        let entries: HashMap<String, RawEntry> = metadata
            .tensors()
            .into_iter()
            .filter(|(name, _)| suffixes.iter().any(|s| name.ends_with(s.as_str())))
            .map(|(name, info)| {
                let start = 8 + header_len + info.data_offsets.0;
                let entry = RawEntry {
                    dtype: info.dtype,
                    shape: info.shape.clone(),
                    bytes: start..8 + header_len + info.data_offsets.1,
                };
                (name, entry)
            })
            .collect();
        Ok(Int8Tensors {
            path: path.into(),
            map: (!entries.is_empty()).then_some(map),
            entries,
        })
    }

    /// Whether the file holds any INT8 weight.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// `{prefix}.{suffix}`, with or without the `bert.` prefix.
    fn entry(&self, prefix: &str, suffix: &str) -> Option<(String, &RawEntry)> {
        let alternative = match prefix.strip_prefix("bert.") {
            Some(rest) => rest.to_string(),
            None => format!("bert.{prefix}"),
        };
        [prefix.to_string(), alternative]
            .into_iter()
            .map(|p| format!("{p}.{suffix}"))
            .find_map(|name| self.entries.get(&name).map(|e| (name, e)))
    }

    /// The quantized weight `{prefix}` `[out, in]`, checked, or `None` when
    /// it is stored in f32.
    pub fn part(&self, prefix: &str, out: usize, inp: usize) -> Result<Option<Int8Part>> {
        let Some((name, weight)) = self.entry(prefix, INT8_WEIGHT) else {
            return Ok(None);
        };
        let bytes = self.bytes(&name, weight, Dtype::I8, &[out, inp])?;
        let values: Vec<i8> = bytemuck::cast_slice(bytes).to_vec();
        if values.contains(&i8::MIN) {
            return Err(self.invalid(&name, "holds -128; INT8 weights lie in -127..=127"));
        }
        let (scale_name, scale) = self.entry(prefix, INT8_SCALE).ok_or_else(|| {
            self.invalid(
                &format!("{prefix}.{INT8_SCALE}"),
                &format!("is missing but {name} is present"),
            )
        })?;
        let scales = self.f32s(&scale_name, scale, out)?;
        if let Some(bad) = scales.iter().find(|s| !s.is_finite() || **s < 0.0) {
            return Err(self.invalid(
                &scale_name,
                &format!("holds {bad}; scales are finite and >= 0"),
            ));
        }
        let smoothing = match self.entry(prefix, INT8_SMOOTHING) {
            None => None,
            Some((smoothing_name, entry)) => {
                let s = self.f32s(&smoothing_name, entry, inp)?;
                if let Some(bad) = s.iter().find(|s| !s.is_finite() || **s <= 0.0) {
                    return Err(self.invalid(
                        &smoothing_name,
                        &format!("holds {bad}; smoothing factors are finite and > 0"),
                    ));
                }
                Some(s)
            }
        };
        Ok(Some(Int8Part {
            values,
            scales,
            smoothing,
        }))
    }

    fn f32s(&self, name: &str, entry: &RawEntry, len: usize) -> Result<Vec<f32>> {
        let bytes = self.bytes(name, entry, Dtype::F32, &[len])?;
        Ok(bytes
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect())
    }

    fn bytes(&self, name: &str, entry: &RawEntry, dtype: Dtype, shape: &[usize]) -> Result<&[u8]> {
        if entry.dtype != dtype {
            return Err(self.invalid(
                name,
                &format!("has dtype {:?}, expected {dtype:?}", entry.dtype),
            ));
        }
        if entry.shape != shape {
            return Err(Error::WrongShape {
                path: self.path.clone(),
                name: name.into(),
                expected: shape.to_vec(),
                found: entry.shape.clone(),
            });
        }
        let map = self.map.as_ref().expect("entries imply a map");
        Ok(&map[entry.bytes.clone()])
    }

    fn invalid(&self, name: &str, problem: &str) -> Error {
        Error::CorruptSafetensors {
            path: self.path.clone(),
            message: format!(
                "INT8 tensor {name:?} {problem}; quantize the model again with bertrt quantize"
            ),
        }
    }
}
