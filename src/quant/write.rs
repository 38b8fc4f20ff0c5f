//! Writing an INT8 artifact: the source model directory with its
//! `model.safetensors` rewritten (INT8 tensors for the quantized linears,
//! everything else as it was) and the quantization recorded in
//! `bertrt.json`.

use std::collections::HashMap;
use std::path::Path;

use safetensors::tensor::TensorView;
use safetensors::{Dtype, SafeTensors};

use crate::artifact::{self, META_FILE};
use crate::backend::cpu::int8::{Int8Isa, QuantizedWeight};
use crate::checkpoint::Checkpoint;
use crate::config::BertConfig;
use crate::error::{Error, Result};
use crate::model::linear::{INT8_SCALE, INT8_SMOOTHING, INT8_WEIGHT};
use crate::model::{LinearSpec, ModelFiles};

use super::Quantization;

/// Weight files of other formats, which would be stale f32 copies beside
/// the INT8 weights: not copied.
const OTHER_WEIGHT_EXTENSIONS: &[&str] = &[
    "bin",
    "safetensors",
    "onnx",
    "h5",
    "msgpack",
    "ot",
    "pt",
    "pth",
];

/// Writes the INT8 version of the model in `source` to `out` (atomically),
/// as `quantization` planned it. Refuses, naming the figures, when the plan
/// misses its accuracy bars, unless `force`.
pub fn write_int8_artifact(
    source: &Path,
    out: &Path,
    quantization: &Quantization,
    force: bool,
) -> Result<()> {
    if !quantization.passes() && !force {
        let agreement = quantization
            .label_agreement
            .map(|a| {
                format!(
                    ", label agreement {:.2}% (bar {:.2}%)",
                    a * 100.0,
                    quantization.options.min_label_agreement * 100.0
                )
            })
            .unwrap_or_default();
        return Err(Error::Invalid(format!(
            "not writing {}: INT8 misses the accuracy bar (worst mean-pooled cosine {:.5}, bar {}{agreement}); \
             keep more linears in f32 (--max-f32-layers), try another --alpha, or write it anyway with --force",
            out.display(),
            quantization.worst_cosine,
            quantization.options.min_cosine
        )));
    }
    let files = ModelFiles::locate(source)?;
    let same = |a: &Path, b: &Path| match (a.canonicalize(), b.canonicalize()) {
        (Ok(a), Ok(b)) => a == b,
        _ => false,
    };
    if same(source, out) {
        return Err(Error::Invalid(format!(
            "--out {} is the --model directory; write the INT8 model to a new directory",
            out.display()
        )));
    }
    let weights = int8_safetensors(&files, quantization)?;
    let meta = quantization.record().meta_json(source)?;
    artifact::write_dir_atomically(out, |staging| {
        copy_other_files(source, staging)?;
        artifact::write_durable(&staging.join("model.safetensors"), &weights)?;
        artifact::write_durable(&staging.join(META_FILE), &artifact::pretty(&meta))
    })
}

/// The source's tensors with each planned linear's `{part}.weight`
/// replaced by its INT8 tensors (names in [`crate::model::linear`]).
fn int8_safetensors(files: &ModelFiles, quantization: &Quantization) -> Result<Vec<u8>> {
    let config = BertConfig::from_file(&files.config)?;
    // Part prefix (without `bert.`) -> its spec's smoothing, for planned layers.
    let mut planned: HashMap<String, (&LinearSpec, Option<&[f32]>)> = HashMap::new();
    let specs = LinearSpec::encoder(&config);
    for spec in &specs {
        if let Some(smoothing) = quantization.plan.get(&spec.name) {
            for part in &spec.parts {
                planned.insert(part.clone(), (spec, smoothing.as_deref()));
            }
        }
    }
    let ckpt = Checkpoint::open(&files.weights)?;
    let bytes = std::fs::read(&files.weights).map_err(|e| Error::io(&files.weights, e))?;
    let source = SafeTensors::deserialize(&bytes).map_err(|e| Error::CorruptSafetensors {
        path: files.weights.clone(),
        message: e.to_string(),
    })?;
    // (name, dtype, shape, data): owned, since INT8 data is computed here.
    let mut tensors: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = Vec::new();
    let mut quantized = 0;
    for (name, view) in source.tensors() {
        let canonical = name.strip_prefix("bert.").unwrap_or(&name);
        let planned_part = canonical
            .strip_suffix(".weight")
            .and_then(|prefix| planned.get(prefix));
        let Some(&(spec, smoothing)) = planned_part else {
            tensors.push((
                name.clone(),
                view.dtype(),
                view.shape().to_vec(),
                view.data().to_vec(),
            ));
            continue;
        };
        let (n, k) = (spec.out_per_part, spec.in_features);
        let weight = ckpt.tensor(&name, &[n, k])?;
        let q = match smoothing {
            Some(s) => QuantizedWeight::quantize_smoothed(&weight, n, k, s, Int8Isa::detect()),
            None => QuantizedWeight::quantize_for(&weight, n, k, Int8Isa::detect()),
        };
        let prefix = name.strip_suffix(".weight").expect("matched above");
        let values: Vec<u8> = q.to_int8().into_iter().map(|v| v as u8).collect();
        tensors.push((
            format!("{prefix}.{INT8_WEIGHT}"),
            Dtype::I8,
            vec![n, k],
            values,
        ));
        tensors.push((
            format!("{prefix}.{INT8_SCALE}"),
            Dtype::F32,
            vec![n],
            bytemuck::cast_slice(q.scales()).to_vec(),
        ));
        if let Some(s) = smoothing {
            tensors.push((
                format!("{prefix}.{INT8_SMOOTHING}"),
                Dtype::F32,
                vec![k],
                bytemuck::cast_slice(s).to_vec(),
            ));
        }
        quantized += 1;
    }
    let expected: usize = specs
        .iter()
        .filter(|s| quantization.plan.contains_key(&s.name))
        .map(|s| s.parts.len())
        .sum();
    if quantized != expected {
        return Err(Error::Invalid(format!(
            "{}: found {quantized} of the {expected} weights to quantize; is this the checkpoint that was calibrated?",
            files.weights.display()
        )));
    }
    let views = tensors
        .iter()
        .map(|(name, dtype, shape, data)| {
            TensorView::new(*dtype, shape.clone(), data).map(|view| (name.clone(), view))
        })
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|e| Error::Invalid(format!("cannot serialise INT8 tensors: {e}")))?;
    let metadata = HashMap::from([("format".to_string(), "pt".to_string())]);
    safetensors::serialize(views, Some(metadata))
        .map_err(|e| Error::Invalid(format!("cannot serialise INT8 tensors: {e}")))
}

/// Copies `source` into `staging` (recursively), except the weights and
/// `bertrt.json`, which are written anew.
fn copy_other_files(source: &Path, staging: &Path) -> Result<()> {
    for entry in std::fs::read_dir(source).map_err(|e| Error::io(source, e))? {
        let entry = entry.map_err(|e| Error::io(source, e))?;
        let path = entry.path();
        let target = staging.join(entry.file_name());
        let file_type = entry.file_type().map_err(|e| Error::io(&path, e))?;
        // Follow symlinks: the copy must not depend on the source.
        let is_dir = file_type.is_dir() || (file_type.is_symlink() && path.is_dir());
        if is_dir {
            std::fs::create_dir(&target).map_err(|e| Error::io(&target, e))?;
            copy_other_files(&path, &target)?;
            continue;
        }
        let weights = path
            .extension()
            .and_then(|e| e.to_str())
            .is_some_and(|e| OTHER_WEIGHT_EXTENSIONS.contains(&e));
        if weights || entry.file_name() == META_FILE {
            continue;
        }
        std::fs::copy(&path, &target).map_err(|e| Error::io(&path, e))?;
    }
    Ok(())
}
