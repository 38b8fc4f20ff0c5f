//! LoRA (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language
//! Models"): a frozen linear layer `y = x·Wᵀ + b` gains a trainable
//! low-rank update, `y = x·Wᵀ + b + s·(x·Aᵀ)·Bᵀ`, with A `[r, in]`, B
//! `[out, r]` and `s = alpha / r`.
//!
//! What training and loading share lives here: the targets (Hugging Face's
//! module names), the merge `W + s·B·A`, and adapters saved apart from
//! their base in PEFT's layout (`adapter_config.json` and
//! `adapter_model.safetensors`, tensors named
//! `base_model.model.<module>.lora_A.weight`, the trained head under its
//! own name). Loaders merge such adapters into the base weights at load
//! ([`Adapter::checkpoint`]); the base is found by the path recorded in
//! `adapter_config.json` and must still hash to the SHA-256 recorded in
//! `bertrt.json` ([`AdapterBase`]), so a moved or changed base is refused
//! rather than silently combined with adapters trained on another.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::checkpoint::Checkpoint;
use crate::error::{Error, Result};

/// PEFT's adapter settings file.
pub const ADAPTER_CONFIG: &str = "adapter_config.json";
/// PEFT's adapter weights file.
pub const ADAPTER_WEIGHTS: &str = "adapter_model.safetensors";
/// PEFT's prefix of every tensor name in [`ADAPTER_WEIGHTS`] (the
/// `PeftModel` wraps the task model as `base_model.model`).
pub const PEFT_PREFIX: &str = "base_model.model.";

/// A linear layer of every encoder layer that can carry an adapter, named
/// by the last part of its Hugging Face module name.
#[derive(
    Clone,
    Copy,
    Debug,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Hash,
    Serialize,
    Deserialize,
    clap::ValueEnum,
)]
#[serde(rename_all = "lowercase")]
pub enum LoraTarget {
    /// `attention.self.query`.
    Query,
    /// `attention.self.key`.
    Key,
    /// `attention.self.value`.
    Value,
    /// `attention.output.dense`, the attention output projection.
    Dense,
    /// `intermediate.dense`, the feed-forward up-projection.
    Intermediate,
    /// `output.dense`, the feed-forward down-projection.
    Output,
}

impl LoraTarget {
    /// PEFT's default for BERT (`query`, `value`).
    pub const DEFAULT: [LoraTarget; 2] = [LoraTarget::Query, LoraTarget::Value];

    /// The Hugging Face module of this linear in encoder layer `layer`.
    pub fn module(self, layer: usize) -> String {
        let name = match self {
            LoraTarget::Query => "attention.self.query",
            LoraTarget::Key => "attention.self.key",
            LoraTarget::Value => "attention.self.value",
            LoraTarget::Dense => "attention.output.dense",
            LoraTarget::Intermediate => "intermediate.dense",
            LoraTarget::Output => "output.dense",
        };
        format!("bert.encoder.layer.{layer}.{name}")
    }
}

/// The adapters of a run: on which linears, of which rank and scale.
#[derive(Clone, Debug, PartialEq)]
pub struct LoraSpec {
    pub rank: usize,
    pub alpha: f32,
    pub targets: Vec<LoraTarget>,
}

impl LoraSpec {
    /// `s = alpha / r`, which multiplies the low-rank update.
    pub fn scale(&self) -> f32 {
        self.alpha / self.rank as f32
    }
}

/// `weight += scale · B·A` for `weight` `[out, in]`, A `[rank, in]` and B
/// `[out, rank]`: the adapter folded into its layer. Each element's update
/// is summed in f64 and added once, so the merged weight is the nearest
/// f32 to the exact `W + s·B·A` whichever order the rank is summed in;
/// training's merged save and a loader's merge agree bit for bit.
pub fn merge(weight: &mut [f32], a: &[f32], b: &[f32], scale: f32, rank: usize) {
    let inputs = a.len() / rank;
    assert_eq!(weight.len(), b.len() / rank * inputs, "weight is [out, in]");
    for (row, b_row) in weight.chunks_exact_mut(inputs).zip(b.chunks_exact(rank)) {
        for (i, w) in row.iter_mut().enumerate() {
            let update: f64 = b_row
                .iter()
                .enumerate()
                .map(|(r, &b)| b as f64 * a[r * inputs + i] as f64)
                .sum();
            *w = (*w as f64 + scale as f64 * update) as f32;
        }
    }
}

/// `adapter_config.json` in PEFT's `LoraConfig` format. `target_modules`
/// lists every adapted module by its full name: PEFT matches a plain
/// suffix such as `output.dense` against `attention.output.dense` too, so
/// full names are the only list that says exactly which layers carry one.
/// `modules_to_save` names modules by suffix (`pooler` is `bert.pooler`);
/// PEFT saves and loads their tensors under the plain names
/// (`base_model.model.bert.pooler.dense.weight`, not
/// `...pooler.modules_to_save.default...`), as [`ADAPTER_WEIGHTS`] holds
/// them. Settings left out take PEFT's defaults, which are what bertrt
/// trains (no DoRA, no LoRA bias). `bench/hf-roundtrip.sh --lora` loads
/// such a directory with `PeftModel.from_pretrained` (PEFT 0.21.2) and
/// checks every tensor and bertrt's predictions.
pub fn adapter_config(
    spec: &LoraSpec,
    layers: usize,
    base: &Path,
    task_type: &str,
    modules_to_save: &[&str],
) -> serde_json::Value {
    let target_modules: Vec<String> = (0..layers)
        .flat_map(|l| spec.targets.iter().map(move |t| t.module(l)))
        .collect();
    serde_json::json!({
        "peft_type": "LORA",
        "task_type": task_type,
        "base_model_name_or_path": base,
        "r": spec.rank,
        "lora_alpha": spec.alpha,
        "lora_dropout": 0.0,
        "target_modules": target_modules,
        "modules_to_save": modules_to_save,
        "bias": "none",
        "fan_in_fan_out": false,
        "use_rslora": false,
        "init_lora_weights": true,
        "inference_mode": true,
    })
}

/// The `adapter_base` entry of `bertrt.json`: the base model an adapter
/// artifact was trained on, which loading checks is still the same file.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct AdapterBase {
    /// The base model directory (also `base_model_name_or_path` in
    /// `adapter_config.json`).
    pub model: PathBuf,
    /// SHA-256 of its `model.safetensors`.
    pub sha256: String,
    /// `model` relative to the adapter directory, where both lie under one
    /// root: tried when `model` is gone, so a tree moved or copied whole
    /// (a project synced to a server) still loads. The SHA-256 check still
    /// decides whether the file found there is the base.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub relative: Option<PathBuf>,
}

impl AdapterBase {
    /// The base model for adapters to be saved in `adapters`: `base` made
    /// absolute, and relative to `adapters` as well.
    pub fn new(base: &Path, adapters: &Path, sha256: String) -> Result<Self> {
        let model = std::path::absolute(base).map_err(|e| Error::io(base, e))?;
        let relative = match (resolved(base), resolved(adapters)) {
            (Some(base), Some(adapters)) => relative_path(&base, &adapters),
            _ => None,
        };
        Ok(AdapterBase {
            model,
            sha256,
            relative,
        })
    }

    /// The base model directories to try for adapters in `adapters`, in
    /// order: the recorded path, then the relative one.
    pub fn candidates(&self, adapters: &Path) -> Vec<PathBuf> {
        let mut dirs = vec![self.model.clone()];
        dirs.extend(self.relative.as_ref().map(|r| adapters.join(r)));
        dirs
    }
}

/// `path` with symlinks and `..` resolved, as far as it exists (the
/// adapters' directory may not yet): its deepest existing ancestor
/// canonicalized, then the rest. None if the rest holds `..`.
fn resolved(path: &Path) -> Option<PathBuf> {
    let path = std::path::absolute(path).ok()?;
    let existing = path.ancestors().find(|a| a.exists())?;
    let rest = path.strip_prefix(existing).ok()?;
    if rest
        .components()
        .any(|c| c == std::path::Component::ParentDir)
    {
        return None;
    }
    Some(existing.canonicalize().ok()?.join(rest))
}

/// `target` as a path from `from` (both resolved): `..` for each of
/// `from`'s components past their common prefix, then the rest of
/// `target`. None when they share nothing below the root, where a
/// relative path would not survive a move.
fn relative_path(target: &Path, from: &Path) -> Option<PathBuf> {
    use std::path::Component;
    let (target, from): (Vec<_>, Vec<_>) =
        (target.components().collect(), from.components().collect());
    let common = target.iter().zip(&from).take_while(|(a, b)| a == b).count();
    let below_root = target[..common]
        .iter()
        .any(|c| matches!(c, Component::Normal(_)));
    if !below_root {
        return None;
    }
    let up = from[common..].iter().map(|_| Component::ParentDir);
    Some(up.chain(target[common..].iter().copied()).collect())
}

/// The key of [`AdapterBase`] in `bertrt.json`.
pub const ADAPTER_BASE_KEY: &str = "adapter_base";

/// LoRA adapters saved apart from their base model, in a model directory.
#[derive(Clone, Debug, PartialEq)]
pub struct Adapter {
    /// `adapter_model.safetensors`.
    pub weights: PathBuf,
    pub base: AdapterBase,
    /// `lora_alpha / r`.
    pub scale: f32,
}

impl Adapter {
    /// The adapters in `dir`, if it holds `adapter_config.json`.
    pub fn read(dir: &Path) -> Result<Option<Self>> {
        let config_path = dir.join(ADAPTER_CONFIG);
        if !config_path.exists() {
            return Ok(None);
        }
        let config = read_json(&config_path)?;
        let bad = |message: String| Error::Config {
            path: config_path.clone(),
            message,
        };
        if config["peft_type"] != "LORA" {
            return Err(bad(format!(
                "peft_type {}: only LORA adapters load",
                config["peft_type"]
            )));
        }
        // Variants whose update is not W + (alpha/r)·B·A with one r and
        // alpha for every layer: merging them here would be silently wrong.
        let unsupported = [
            (
                "use_rslora",
                config["use_rslora"] == true,
                "scale alpha/sqrt(r)",
            ),
            (
                "use_dora",
                config["use_dora"] == true,
                "weight-decomposed LoRA",
            ),
            (
                "bias",
                !matches!(config["bias"].as_str(), None | Some("none")),
                "trained biases",
            ),
            (
                "rank_pattern",
                config["rank_pattern"]
                    .as_object()
                    .is_some_and(|m| !m.is_empty()),
                "per-layer ranks",
            ),
            (
                "alpha_pattern",
                config["alpha_pattern"]
                    .as_object()
                    .is_some_and(|m| !m.is_empty()),
                "per-layer alphas",
            ),
        ];
        if let Some((field, _, what)) = unsupported.iter().find(|(_, set, _)| *set) {
            return Err(bad(format!(
                "{field} ({what}) adapters do not load; merge them in PEFT (merge_and_unload) and load the merged model"
            )));
        }
        let rank = config["r"]
            .as_u64()
            .filter(|&r| r > 0)
            .ok_or_else(|| bad("r must be a whole number, at least 1".into()))?;
        let alpha = config["lora_alpha"]
            .as_f64()
            .ok_or_else(|| bad("lora_alpha must be a number".into()))?;
        let meta_path = dir.join(crate::artifact::META_FILE);
        let base = read_json(&meta_path)?
            .get(ADAPTER_BASE_KEY)
            .cloned()
            .ok_or_else(|| Error::Config {
                path: meta_path.clone(),
                message: format!("no {ADAPTER_BASE_KEY}: these adapters do not say which base model they were trained on (SHA-256)"),
            })
            .and_then(|v| {
                serde_json::from_value::<AdapterBase>(v).map_err(|e| Error::Config {
                    path: meta_path.clone(),
                    message: format!("{ADAPTER_BASE_KEY}: {e}"),
                })
            })?;
        Ok(Some(Adapter {
            weights: dir.join(ADAPTER_WEIGHTS),
            base,
            scale: (alpha / rank as f64) as f32,
        }))
    }

    /// The base model's weights with every adapter merged into its layer
    /// and the saved modules (the trained head) in place. The base is the
    /// first of the files `first`, then `others` (its `model.safetensors`
    /// at the candidate paths, [`AdapterBase::candidates`]) whose SHA-256
    /// is the recorded one: each is hashed at most once, and the file
    /// merged is the one hashed. When none is, the first one's refusal
    /// (its SHA-256, or why it did not open) is returned.
    pub fn checkpoint(&self, first: &Path, others: &[PathBuf]) -> Result<Checkpoint> {
        let base = others
            .iter()
            .fold(self.verified_base(first), |found, path| {
                found.or_else(|refusal| self.verified_base(path).map_err(|_| refusal))
            })?;
        self.merge_into(base)
    }

    /// The checkpoint at `path`, if its SHA-256 is the recorded base's.
    fn verified_base(&self, path: &Path) -> Result<Checkpoint> {
        let base = Checkpoint::open(path)?;
        let sha256 = base.sha256();
        if sha256 != self.base.sha256 {
            return Err(Error::Invalid(format!(
                "{}: the LoRA adapters in {} were trained on a base model with SHA-256 {}, but this file has {sha256}; restore the original base model, or retrain (--merge-lora saves a self-contained model)",
                path.display(),
                self.weights.display(),
                self.base.sha256
            )));
        }
        Ok(base)
    }

    /// `base` with the adapters merged in and the saved modules in place.
    fn merge_into(&self, base: Checkpoint) -> Result<Checkpoint> {
        let adapters = Checkpoint::open(&self.weights)?;
        let mut tensors = Vec::new();
        for (name, shape) in adapters.shapes() {
            let module = name.strip_prefix(PEFT_PREFIX).unwrap_or(&name);
            if module.contains(".lora_B.") {
                continue;
            }
            let Some(module) = module.strip_suffix(".lora_A.weight") else {
                // A saved module (classifier, pooler): replaces the base's.
                tensors.push((
                    module.to_string(),
                    shape.clone(),
                    adapters.tensor(&name, &shape)?.to_vec(),
                ));
                continue;
            };
            let &[rank, inputs] = shape.as_slice() else {
                return Err(Error::Invalid(format!(
                    "{}: {name} has shape {shape:?}; lora_A is [r, in]",
                    self.weights.display()
                )));
            };
            let b_name = name.replace(".lora_A.weight", ".lora_B.weight");
            let outputs = adapters.shape(&b_name).map(|s| s[0]).ok_or_else(|| {
                Error::Invalid(format!(
                    "{}: {name} has no {b_name}",
                    self.weights.display()
                ))
            })?;
            let a = adapters.tensor(&name, &[rank, inputs])?;
            let b = adapters.tensor(&b_name, &[outputs, rank])?;
            let weight_name = format!("{module}.weight");
            let mut weight = base.tensor(&weight_name, &[outputs, inputs])?.to_vec();
            merge(&mut weight, &a, &b, self.scale, rank);
            tensors.push((weight_name, vec![outputs, inputs], weight));
        }
        Ok(base.with_overrides(tensors))
    }
}

fn read_json(path: &Path) -> Result<serde_json::Value> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    serde_json::from_str(&text).map_err(|e| Error::Config {
        path: path.into(),
        message: e.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The relative path is worked out from resolved paths: `..` in the
    /// base's path as given, an output directory not yet created, and a
    /// symlinked parent all give the path that resolves on disk.
    #[test]
    fn adapters_record_the_base_relative_to_themselves() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path();
        std::fs::create_dir_all(root.join("models/base")).unwrap();
        std::fs::create_dir_all(root.join("work/runs")).unwrap();
        std::os::unix::fs::symlink(root.join("work/runs"), root.join("runs")).unwrap();
        let base = AdapterBase::new(
            &root.join("work/../models/base"),
            &root.join("runs/lora"),
            "0".repeat(64),
        )
        .unwrap();
        assert_eq!(base.relative, Some(PathBuf::from("../../../models/base")));
        // Once saved, the adapters' directory exists and `..` resolves on
        // disk, through the symlink.
        let adapters = root.join("runs/lora");
        std::fs::create_dir(&adapters).unwrap();
        let found = adapters.join(base.relative.as_ref().unwrap());
        assert_eq!(
            std::fs::canonicalize(found).unwrap(),
            std::fs::canonicalize(root.join("models/base")).unwrap()
        );
        // Sharing only the root: nothing that would survive a move.
        assert_eq!(relative_path(Path::new("/a/b"), Path::new("/c/d")), None);
    }

    #[test]
    fn merge_adds_scaled_product() {
        // W [2, 3], A [1, 3], B [2, 1], scale 2: W + 2·B·A.
        let mut w = vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0];
        merge(&mut w, &[1.0, 0.0, -1.0], &[0.5, 2.0], 2.0, 1);
        assert_eq!(w, [2.0, 2.0, 2.0, 8.0, 5.0, 2.0]);
    }

    #[test]
    fn refuses_adapter_variants_it_cannot_merge() {
        let dir = tempfile::tempdir().unwrap();
        let base = serde_json::json!({"peft_type": "LORA", "r": 8, "lora_alpha": 16});
        for (field, value) in [
            ("use_rslora", serde_json::json!(true)),
            ("use_dora", serde_json::json!(true)),
            ("bias", serde_json::json!("lora_only")),
            ("rank_pattern", serde_json::json!({"query": 4})),
            ("alpha_pattern", serde_json::json!({"value": 32})),
        ] {
            let mut config = base.clone();
            config[field] = value;
            std::fs::write(dir.path().join(ADAPTER_CONFIG), config.to_string()).unwrap();
            let err = Adapter::read(dir.path()).expect_err(field).to_string();
            assert!(
                err.contains(field) && err.contains("merge_and_unload"),
                "{err}"
            );
        }
    }
}
