use std::path::PathBuf;

use anyhow::{bail, Result};
use serde::Serialize;

use bertrt::backend::cpu::isa::Isa;
use bertrt::backend::cpu::{gemm, CpuBackend};
use bertrt::backend::cuda::CudaBackend;
use bertrt::backend::train::TrainBackend;
use bertrt::backend::Precision;
use bertrt::lora::LoraTarget;
use bertrt::model::Pooling;
use bertrt::train::{finetune, finetune_seeds, Metric, Task, TrainRecipe};

use super::device::{start_cuda, Device};

/// Every setting may also come from `--config train.toml` (same names, with
/// underscores); flags given here override the file. Defaults: see
/// `bertrt::train::recipe`.
#[derive(clap::Args, Serialize)]
pub struct Args {
    /// TOML file with any of the settings below.
    #[arg(long)]
    #[serde(skip)]
    config: Option<PathBuf>,
    /// Hugging Face model directory to start from.
    #[arg(long)]
    model: Option<PathBuf>,
    /// Training data: .csv, .tsv or .jsonl (token classification: .conll
    /// or .jsonl with word and tag lists).
    #[arg(long)]
    train: Option<PathBuf>,
    /// Validation data, for evaluation, early stopping and calibration.
    #[arg(long)]
    valid: Option<PathBuf>,
    /// Output model directory (replaced atomically at each improvement).
    #[arg(long)]
    out: Option<PathBuf>,
    /// classification (one label per text), multi-label (any number of
    /// labels per text), regression (numeric labels) or
    /// token-classification (a BIO tag per word) [default:
    /// classification].
    #[arg(long, value_enum)]
    task: Option<Task>,
    /// Column (CSV/TSV) or key (JSONL) of the text [default: text].
    #[arg(long)]
    text_column: Option<String>,
    /// Column or key of the label [default: label].
    #[arg(long)]
    label_column: Option<String>,
    /// Column or key of a second text, for sentence-pair tasks.
    #[arg(long)]
    text_pair_column: Option<String>,
    /// Token classification, JSON Lines: key of the word list [default:
    /// tokens].
    #[arg(long)]
    tokens_column: Option<String>,
    /// Token classification, JSON Lines: key of the tag list [default:
    /// tags].
    #[arg(long)]
    tags_column: Option<String>,
    /// Token classification: train every subword of a word (later ones
    /// with the word's I- tag) instead of only the first.
    #[arg(long)]
    #[serde(skip_serializing_if = "is_false")]
    label_all_subwords: bool,
    /// Multi-label: separates the labels in a label string; JSON Lines may
    /// give a list instead [default: |].
    #[arg(long)]
    label_delimiter: Option<String>,
    /// Skip (and count) rows with empty or missing text or label.
    #[arg(long)]
    #[serde(skip_serializing_if = "is_false")]
    skip_bad_rows: bool,
    /// [default: 3]
    #[arg(long)]
    epochs: Option<usize>,
    /// Examples per micro-batch [default: 16].
    #[arg(long)]
    batch_size: Option<usize>,
    /// Micro-batches per optimizer step [default: 1].
    #[arg(long)]
    grad_accum: Option<usize>,
    /// Peak learning rate [default: 3e-5].
    #[arg(long)]
    lr: Option<f32>,
    /// Fraction of steps of linear warm-up [default: 0.1].
    #[arg(long)]
    warmup_ratio: Option<f32>,
    /// AdamW weight decay, not applied to biases and LayerNorm [default: 0.01].
    #[arg(long)]
    weight_decay: Option<f32>,
    /// Clip the global gradient norm to this [default: 1.0].
    #[arg(long)]
    max_grad_norm: Option<f32>,
    /// Tokens per input, special tokens included [default: 128].
    #[arg(long)]
    max_length: Option<usize>,
    /// [default: pooler, as BertForSequenceClassification]
    #[arg(long, value_enum)]
    pooling: Option<Pooling>,
    /// Dropout before the classifier [default: 0.1].
    #[arg(long)]
    head_dropout: Option<f32>,
    /// [default: 42]
    #[arg(long, conflicts_with = "seeds")]
    seed: Option<u64>,
    /// Train once per seed into OUT/seed-N and report dev metrics as mean
    /// and standard deviation.
    #[arg(long, value_delimiter = ',')]
    #[serde(skip)]
    seeds: Option<Vec<u64>>,
    /// Also evaluate every N optimizer steps.
    #[arg(long)]
    eval_every: Option<usize>,
    /// Stop after N evaluations without improvement.
    #[arg(long)]
    patience: Option<usize>,
    /// Selects the best checkpoint [default: macro-f1; multi-label:
    /// micro-f1; regression: pearson; token-classification: entity-f1].
    #[arg(long, value_enum)]
    metric: Option<Metric>,
    /// Batch examples in random order instead of grouping similar lengths.
    #[arg(long)]
    #[serde(skip)]
    no_bucketing: bool,
    /// Skip temperature scaling on dev.
    #[arg(long)]
    #[serde(skip)]
    no_calibration: bool,
    /// Keep the default decisions (argmax; 0.5 per label) instead of
    /// tuning thresholds on dev (binary: the positive class's, for
    /// --metric; multi-label: each label's, for its F1).
    #[arg(long)]
    #[serde(skip)]
    no_threshold_tuning: bool,
    /// Where to train: cpu, cuda (device 0) or cuda:N. Not part of the
    /// recipe: the same recipe trains on either.
    #[arg(long, default_value_t = Device::Cpu)]
    #[serde(skip)]
    device: Device,
    /// CPU threads (0: one per core; --device cpu only).
    #[arg(long)]
    threads: Option<usize>,
    /// What the linear layers multiply in (master weights and optimizer
    /// state stay fp32): fp32; bf16, bf16 operands with f32 sums (fastest
    /// on CPUs with AVX512_BF16); or fp16 (--device cuda only), fp16
    /// operands with f32 sums and dynamic loss scaling, the scale and
    /// skipped steps logged in metrics.jsonl [default: fp32].
    #[arg(long, value_enum)]
    precision: Option<Precision>,
    /// Keep only each layer's input from the forward pass and recompute
    /// the layer's activations in backward: activation memory of one layer
    /// instead of all, for about 30% more compute.
    #[arg(long)]
    #[serde(skip_serializing_if = "is_false")]
    grad_checkpointing: bool,
    /// Keep the embeddings fixed.
    #[arg(long)]
    #[serde(skip_serializing_if = "is_false")]
    freeze_embeddings: bool,
    /// Keep the embeddings and the lowest N layers fixed.
    #[arg(long)]
    freeze_bottom: Option<usize>,
    /// Train only the pooler and classifier (frozen encoder).
    #[arg(long)]
    #[serde(skip_serializing_if = "is_false")]
    head_only: bool,
    /// Layer l of L gets lr * decay^(L-l); the head the full lr.
    #[arg(long)]
    layer_lr_decay: Option<f32>,
    /// Learning rate of the pooler and classifier [default: --lr].
    #[arg(long)]
    head_lr: Option<f32>,
    /// Loss weights per class: "balanced" or a JSON file {label: weight}.
    #[arg(long)]
    class_weights: Option<String>,
    /// Focal loss with this gamma instead of cross-entropy (class weights
    /// act as its alpha) [default: 0, cross-entropy].
    #[arg(long)]
    focal_gamma: Option<f32>,
    /// Gradual unfreezing, phases WHAT:EPOCHS with WHAT head, topN or all,
    /// e.g. "head:1,top2:1,top6:1,all:1" (replaces --epochs); each phase
    /// restarts the optimizer and warm-up, and is rolled back if dev got
    /// worse.
    #[arg(long)]
    unfreeze_schedule: Option<String>,
    /// LoRA: train a rank-R adapter on each --lora-targets linear of every
    /// layer, plus the pooler and classifier, the base model frozen
    /// [default: off].
    #[arg(long, value_name = "R")]
    lora_rank: Option<usize>,
    /// LoRA: adapter updates are scaled by alpha / rank [default: 2 x
    /// --lora-rank].
    #[arg(long, value_name = "ALPHA")]
    lora_alpha: Option<f32>,
    /// LoRA: which linears of each layer get an adapter, comma-separated:
    /// query, key, value, dense (attention output), intermediate, output
    /// (feed-forward output) [default: query,value].
    #[arg(long, value_enum, value_delimiter = ',')]
    lora_targets: Option<Vec<LoraTarget>>,
    /// LoRA: save a plain model with the adapters merged into its weights,
    /// instead of the adapters alone (adapter_config.json and
    /// adapter_model.safetensors, loaded on top of the --model they were
    /// trained on).
    #[arg(long)]
    #[serde(skip_serializing_if = "is_false")]
    merge_lora: bool,
    /// No progress output.
    #[arg(long)]
    #[serde(skip)]
    quiet: bool,
}

fn is_false(value: &bool) -> bool {
    !value
}

pub fn run(args: Args) -> Result<()> {
    let mut overrides = serde_json::to_value(&args)?;
    if args.no_bucketing {
        overrides["bucket_by_length"] = false.into();
    }
    if args.no_calibration {
        overrides["calibrate"] = false.into();
    }
    if args.no_threshold_tuning {
        overrides["tune_thresholds"] = false.into();
    }
    let recipe = TrainRecipe::resolve(args.config.as_deref(), overrides)?;
    match args.device {
        Device::Cpu => {
            if recipe.precision == Precision::Fp16 {
                bail!(
                    "--precision fp16 needs --device cuda; on the CPU, half precision is bf16 \
                     (--precision bf16)"
                );
            }
            if recipe.precision == Precision::Bf16 && !gemm::bf16_native(Isa::detect()) {
                eprintln!(
                    "note: this CPU lacks AVX512_BF16; bf16 matmuls run on the portable kernel, \
                     slower than fp32 (same numbers)"
                );
            }
            let backend = || CpuBackend::new(recipe.threads).with_precision(recipe.precision);
            train(backend, &recipe, &args)
        }
        Device::Cuda(ordinal) => {
            // Started here so that a missing device is reported before any
            // data is read; later seeds start their own.
            let mut started = Some(start_cuda(ordinal)?);
            let backend = || {
                started
                    .take()
                    .unwrap_or_else(|| {
                        CudaBackend::new(ordinal).expect("the device started for the first seed")
                    })
                    .with_precision(recipe.precision)
            };
            train(backend, &recipe, &args)
        }
    }
}

/// Fine-tunes once, or once per `--seeds` seed, and prints the report.
fn train<B: TrainBackend>(
    mut backend: impl FnMut() -> B,
    recipe: &TrainRecipe,
    args: &Args,
) -> Result<()> {
    if let Some(seeds) = &args.seeds {
        let report = finetune_seeds(backend, recipe, seeds, args.quiet)?;
        outln!("{}", serde_json::to_string_pretty(&report)?)?;
        return Ok(());
    }
    let summary = finetune(backend(), recipe, args.quiet)?;
    let mut report = serde_json::json!({
        "out": summary.out,
        "steps": summary.steps,
        "samples_per_s": summary.samples_per_second,
        "stopped_early": summary.stopped_early,
        "best": summary.best,
    });
    if let Some(skipped) = summary.skipped_steps {
        report["skipped_steps"] = skipped.into();
    }
    outln!("{}", serde_json::to_string_pretty(&report)?)?;
    Ok(())
}
