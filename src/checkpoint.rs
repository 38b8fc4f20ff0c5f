//! `model.safetensors`, memory-mapped.
//!
//! F32 tensors are used in place from the map (the word-embedding table alone
//! is half of MiniLM's 90 MB); F16 and BF16 tensors are converted to f32 once.
//! Names are Hugging Face's, with or without the `bert.` prefix that
//! task-head checkpoints (`BertForSequenceClassification`, ...) carry.
//! A checkpoint may carry overrides: tensors computed at load that replace
//! or add to the file's (LoRA adapters merged into their layers, see
//! [`crate::lora`]).

use std::collections::HashMap;
use std::ops::Deref;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use memmap2::Mmap;
use safetensors::{Dtype, SafeTensors};

use crate::error::{Error, Result};
use crate::model::linear::{INT8_SCALE, INT8_SMOOTHING, INT8_WEIGHT};

/// f32 tensor data on the host: either a view into the mapped file or an
/// owned conversion.
#[derive(Clone)]
pub enum HostTensor {
    Mapped {
        map: Arc<Mmap>,
        start: usize,
        len: usize,
    },
    Owned(Arc<[f32]>),
}

impl Deref for HostTensor {
    type Target = [f32];

    fn deref(&self) -> &[f32] {
        match self {
            HostTensor::Mapped { map, start, len } => {
                bytemuck::cast_slice(&map[*start..*start + *len * 4])
            }
            HostTensor::Owned(data) => data,
        }
    }
}

impl From<Vec<f32>> for HostTensor {
    fn from(data: Vec<f32>) -> Self {
        HostTensor::Owned(data.into())
    }
}

struct Entry {
    dtype: Dtype,
    shape: Vec<usize>,
    /// Absolute byte range in the file.
    start: usize,
    end: usize,
}

/// An open safetensors file.
pub struct Checkpoint {
    path: PathBuf,
    map: Arc<Mmap>,
    entries: HashMap<String, Entry>,
    /// Tensors that replace or add to the file's, by name, with shapes.
    overrides: HashMap<String, (Vec<usize>, HostTensor)>,
}

impl Checkpoint {
    pub fn open(path: &Path) -> Result<Self> {
        let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
        // SAFETY: the map is read-only and private to this process; a model
        // file rewritten underneath a running process is outside our
        // contract, as with every mmap-based loader (safetensors, candle).
        let map = unsafe { Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
        let corrupt = |message: String| Error::CorruptSafetensors {
            path: path.into(),
            message,
        };
        let (header_len, metadata) = SafeTensors::read_metadata(&map).map_err(|e| match e {
            safetensors::SafeTensorError::MetadataIncompleteBuffer => corrupt(format!(
                "the header describes more data than the file's {} bytes hold",
                map.len()
            )),
            other => corrupt(other.to_string()),
        })?;
        let data_start = 8 + header_len;
        let entries = metadata
            .tensors()
            .into_iter()
            .map(|(name, info)| {
                let entry = Entry {
                    dtype: info.dtype,
                    shape: info.shape.clone(),
                    start: data_start + info.data_offsets.0,
                    end: data_start + info.data_offsets.1,
                };
                (name, entry)
            })
            .collect();
        Ok(Checkpoint {
            path: path.into(),
            map: Arc::new(map),
            entries,
            overrides: HashMap::new(),
        })
    }

    /// This checkpoint with `tensors` (name, shape, values) read in place
    /// of the file's tensors of those names, or beside them.
    pub fn with_overrides(mut self, tensors: Vec<(String, Vec<usize>, Vec<f32>)>) -> Self {
        for (name, shape, data) in tensors {
            self.overrides.insert(name, (shape, data.into()));
        }
        self
    }

    /// SHA-256 of the file's bytes, as recorded for a LoRA adapter's base.
    pub fn sha256(&self) -> String {
        crate::data::sha256_hex(&self.map)
    }

    /// Every tensor in the file with its shape (overrides aside).
    pub fn shapes(&self) -> Vec<(String, Vec<usize>)> {
        self.entries
            .iter()
            .map(|(name, e)| (name.clone(), e.shape.clone()))
            .collect()
    }

    /// The shape of tensor `name` in the file, if it holds it.
    pub fn shape(&self, name: &str) -> Option<&[usize]> {
        self.entries.get(name).map(|e| e.shape.as_slice())
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The dtype most parameters are stored in, for `bertrt info`.
    pub fn dominant_dtype(&self) -> String {
        let mut bytes_by_dtype: HashMap<String, usize> = HashMap::new();
        for entry in self.entries.values() {
            *bytes_by_dtype
                .entry(format!("{:?}", entry.dtype))
                .or_default() += entry.end - entry.start;
        }
        bytes_by_dtype
            .into_iter()
            .max_by_key(|(_, bytes)| *bytes)
            .map(|(dtype, _)| dtype)
            .unwrap_or_else(|| "none".into())
    }

    /// Parameters: the elements of floating-point tensors and of an INT8
    /// model's int8 weights (`bertrt quantize`), whose per-channel scales and
    /// smoothing factors describe those weights rather than add to them,
    /// overrides that add a tensor included. Integer buffers such as
    /// `position_ids` are not parameters.
    pub fn parameter_count(&self) -> usize {
        self.parameters_by_dtype().iter().map(|(_, n)| n).sum()
    }

    /// [`Self::parameter_count`] by storage dtype, most first: one entry for
    /// an f32 model, int8 and f32 for an INT8 one (its embeddings, norms,
    /// biases and any linears kept f32).
    pub fn parameters_by_dtype(&self) -> Vec<(String, usize)> {
        let mut by_dtype: HashMap<String, usize> = HashMap::new();
        for (name, entry) in &self.entries {
            let suffix = name.rsplit('.').next().unwrap_or(name);
            let parameter = match entry.dtype {
                Dtype::F32 | Dtype::F16 | Dtype::BF16 | Dtype::F64 => {
                    suffix != INT8_SCALE && suffix != INT8_SMOOTHING
                }
                Dtype::I8 => suffix == INT8_WEIGHT,
                _ => false,
            };
            if parameter {
                *by_dtype.entry(format!("{:?}", entry.dtype)).or_default() +=
                    entry.shape.iter().product::<usize>();
            }
        }
        // Overrides (merged LoRA adapters, a new head) are f32.
        let added: usize = self
            .overrides
            .iter()
            .filter(|(name, _)| self.resolve(name).is_none())
            .map(|(_, (shape, _))| shape.iter().product::<usize>())
            .sum();
        if added > 0 {
            *by_dtype.entry(format!("{:?}", Dtype::F32)).or_default() += added;
        }
        let mut by_dtype: Vec<(String, usize)> = by_dtype.into_iter().collect();
        by_dtype.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        by_dtype
    }

    /// Whether the file holds `name` (checked with and without `bert.`).
    pub fn contains(&self, name: &str) -> bool {
        self.override_of(name).is_some() || self.resolve(name).is_some()
    }

    fn override_of(&self, name: &str) -> Option<&(Vec<usize>, HostTensor)> {
        std::iter::once(name.to_string())
            .chain(alternative_names(name))
            .find_map(|candidate| self.overrides.get(&candidate))
    }

    fn resolve(&self, name: &str) -> Option<&Entry> {
        std::iter::once(name.to_string())
            .chain(alternative_names(name))
            .find_map(|candidate| self.entries.get(&candidate))
    }

    /// Reads tensor `name` as f32, checking its shape.
    pub fn tensor(&self, name: &str, expected_shape: &[usize]) -> Result<HostTensor> {
        if let Some((shape, data)) = self.override_of(name) {
            if shape != expected_shape {
                return Err(Error::WrongShape {
                    path: self.path.clone(),
                    name: name.into(),
                    expected: expected_shape.to_vec(),
                    found: shape.clone(),
                });
            }
            return Ok(data.clone());
        }
        let entry = self.resolve(name).ok_or_else(|| Error::MissingTensor {
            path: self.path.clone(),
            name: name.into(),
            alternatives: alternative_names(name),
        })?;
        if entry.shape != expected_shape {
            return Err(Error::WrongShape {
                path: self.path.clone(),
                name: name.into(),
                expected: expected_shape.to_vec(),
                found: entry.shape.clone(),
            });
        }
        let bytes = &self.map[entry.start..entry.end];
        let len = expected_shape.iter().product::<usize>();
        match entry.dtype {
            Dtype::F32 if entry.start % 4 == 0 => Ok(HostTensor::Mapped {
                map: self.map.clone(),
                start: entry.start,
                len,
            }),
            // Misaligned F32 (headers are padded to 8 bytes by every current
            // writer, but the format does not promise it) falls back to a copy.
            Dtype::F32 => Ok(bytes
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect::<Vec<_>>()
                .into()),
            Dtype::F16 => Ok(bytes
                .chunks_exact(2)
                .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32())
                .collect::<Vec<_>>()
                .into()),
            Dtype::BF16 => Ok(bytes
                .chunks_exact(2)
                .map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32())
                .collect::<Vec<_>>()
                .into()),
            other => Err(Error::UnsupportedDtype {
                path: self.path.clone(),
                name: name.into(),
                dtype: format!("{other:?}"),
            }),
        }
    }
}

/// Other spellings of `name` that Hugging Face also loads: base-model
/// checkpoints omit the `bert.` prefix that task-head ones carry, and
/// checkpoints converted from TensorFlow name LayerNorm's parameters
/// `gamma`/`beta`.
fn alternative_names(name: &str) -> Vec<String> {
    let prefix_swapped = match name.strip_prefix("bert.") {
        Some(rest) => rest.to_string(),
        None => format!("bert.{name}"),
    };
    let legacy = |n: &str| {
        n.strip_suffix("LayerNorm.weight")
            .map(|stem| format!("{stem}LayerNorm.gamma"))
            .or_else(|| {
                n.strip_suffix("LayerNorm.bias")
                    .map(|stem| format!("{stem}LayerNorm.beta"))
            })
    };
    let mut names = vec![prefix_swapped.clone()];
    names.extend(legacy(name));
    names.extend(legacy(&prefix_swapped));
    names
}
