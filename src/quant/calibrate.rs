//! Calibration, per-layer error, the end-to-end accuracy check and the
//! choice of INT8 layers (the steps in the module docs of `quant`).

use std::path::Path;

use crate::artifact::{LayerError, QuantizationRecord};
use crate::backend::cpu::gemm::{self, Epilogue, PackedWeight};
use crate::backend::cpu::int8::{linear_int8, Int8Isa, QuantizedWeight};
use crate::backend::cpu::CpuBackend;
use crate::classify::{Classifier, Input};
use crate::config::BertConfig;
use crate::embed::Embedder;
use crate::error::{Error, Result};
use crate::model::linear::{Int8Tensors, ModelTensors};
use crate::model::{
    BertModel, F32Linears, LinearKind, LinearLoader, LinearSpec, ModelFiles, Pooling, TokenBatch,
    Workspace,
};
use crate::tag::{self, Tagger};

use super::{Int8Linears, Int8Plan, QuantizeOptions, Sample};

/// Dev texts used at most: enough to see every outlier channel BERT has
/// (they are a property of the model, not of the input), few enough that
/// quantizing takes seconds.
pub const SAMPLE_LIMIT: usize = 128;
/// Texts per forward pass.
const BATCH: usize = 16;
/// The SmoothQuant strengths tried per linear when `--alpha` is not given
/// (0: plain W8A8). Which one suits a linear varies: in MiniLM-L6 the FFN
/// up-projections want 0.5-0.75, some down-projections none.
pub const ALPHA_CANDIDATES: [f32; 4] = [0.0, 0.25, 0.5, 0.75];
/// SmoothQuant factors are kept within this range of 1, so that a dead
/// channel (all zeros in the sample) cannot blow up its weights.
const SMOOTHING_RANGE: (f32, f32) = (1e-4, 1e4);

/// A calibrated INT8 plan and how it measured against f32.
#[derive(Clone, Debug)]
pub struct Quantization {
    pub plan: Int8Plan,
    pub options: QuantizeOptions,
    /// Every encoder linear, in forward order.
    pub layers: Vec<LayerError>,
    pub source: String,
    pub texts: usize,
    /// Mean-pooled cosine INT8 vs f32 over the sample: worst (and which
    /// text) and mean.
    pub worst_cosine: f64,
    pub worst_text: usize,
    pub mean_cosine: f64,
    /// Classifiers: the fraction of texts given the same label.
    pub label_agreement: Option<f64>,
}

impl Quantization {
    /// Whether the INT8 model meets the bars of `options`.
    pub fn passes(&self) -> bool {
        self.worst_cosine >= self.options.min_cosine
            && self
                .label_agreement
                .is_none_or(|a| a >= self.options.min_label_agreement)
    }

    pub fn int8_layers(&self) -> usize {
        self.plan.len()
    }

    /// One line: how many linears are INT8 and how close to f32.
    pub fn summary(&self) -> String {
        let agreement = self
            .label_agreement
            .map(|a| format!(", label agreement {:.2}%", a * 100.0))
            .unwrap_or_default();
        format!(
            "int8: {} of {} linears INT8, mean-pooled cosine to f32 worst {:.5}, mean {:.5}{agreement} on {} texts ({})",
            self.int8_layers(),
            self.layers.len(),
            self.worst_cosine,
            self.mean_cosine,
            self.texts,
            self.source
        )
    }

    /// The accuracy figures and the per-layer table, for people.
    pub fn report(&self) -> String {
        let mut out = format!(
            "INT8 vs f32 on {} texts ({}): mean-pooled cosine worst {:.5} (text {}), mean {:.5} (bar {})\n",
            self.texts,
            self.source,
            self.worst_cosine,
            self.worst_text + 1,
            self.mean_cosine,
            self.options.min_cosine
        );
        if let Some(agreement) = self.label_agreement {
            out += &format!(
                "label agreement {:.2}% (bar {:.2}%)\n",
                agreement * 100.0,
                self.options.min_label_agreement * 100.0
            );
        }
        out += &format!(
            "{} of {} linears INT8. Relative L2 error of each linear's output vs f32 on f32 inputs, \
             over all tokens and for the worst text (alpha: SmoothQuant strength, 0 = plain W8A8):\n",
            self.int8_layers(),
            self.layers.len(),
        );
        out += &format!(
            "{:<42} {:>9} {:>5} {:>9} {:>10} {:>11} {:>10}\n",
            "linear", "precision", "alpha", "error", "worst text", "plain error", "worst text"
        );
        for layer in &self.layers {
            out += &format!(
                "{:<42} {:>9} {:>5} {:>8.3}% {:>9.3}% {:>10.3}% {:>9.3}%\n",
                layer.layer,
                if layer.int8 { "int8" } else { "f32" },
                layer.alpha,
                layer.relative_error * 100.0,
                layer.worst_text_error * 100.0,
                layer.plain_relative_error * 100.0,
                layer.plain_worst_text_error * 100.0
            );
        }
        out
    }

    /// What `bertrt.json` records.
    pub fn record(&self) -> QuantizationRecord {
        let (int8, f32): (Vec<&LayerError>, Vec<&LayerError>) =
            self.layers.iter().partition(|l| l.int8);
        let names = |layers: Vec<&LayerError>| layers.iter().map(|l| l.layer.clone()).collect();
        QuantizationRecord {
            method:
                "int8 w8a8: symmetric weights per output channel, activations per token at run time"
                    .into(),
            smoothing_alpha: self.options.alpha,
            int8_layers: names(int8),
            f32_layers: names(f32),
            calibration_source: self.source.clone(),
            calibration_texts: self.texts,
            worst_cosine: self.worst_cosine,
            mean_cosine: self.mean_cosine,
            label_agreement: self.label_agreement,
            min_cosine: self.options.min_cosine,
            min_label_agreement: self.options.min_label_agreement,
            passed: self.passes(),
            layer_errors: self.layers.clone(),
        }
    }
}

/// Whether `dir` holds an INT8 artifact.
pub fn is_int8_artifact(dir: &Path) -> Result<bool> {
    let files = ModelFiles::locate(dir)?;
    Ok(!Int8Tensors::open(&files.weights)?.is_empty())
}

/// Calibrates the f32 model in `dir` on `sample`, picks the INT8 layers and
/// measures the result. Classifiers (`config.json` architectures
/// `*ForSequenceClassification`) are also judged on label agreement, and
/// token classifiers on tag agreement, token by token.
pub fn quantize(dir: &Path, sample: &Sample, options: &QuantizeOptions) -> Result<Quantization> {
    options.check()?;
    let files = ModelFiles::locate(dir)?;
    if files.adapter.is_some() {
        return Err(Error::Invalid(format!(
            "{}: LoRA adapters saved apart from their base; quantize a merged model (bertrt finetune --merge-lora)",
            dir.display()
        )));
    }
    let source = &sample.source;
    if sample.texts.is_empty() {
        return Err(Error::Invalid(format!(
            "{source}: no texts to calibrate on"
        )));
    }
    let ckpt = files.checkpoint()?;
    let tensors = ModelTensors::new(&ckpt)?;
    if !tensors.int8.is_empty() {
        return Err(Error::Invalid(format!(
            "{}: already INT8; quantize the f32 model it came from",
            files.weights.display()
        )));
    }
    let config = BertConfig::from_file(&files.config)?;
    let head = if config
        .architectures
        .iter()
        .any(|a| a.ends_with("ForSequenceClassification"))
    {
        Head::Sequence
    } else if ckpt.contains("classifier.weight") && tag::is_token_classifier(dir)? {
        Head::Token
    } else {
        Head::None
    };
    let texts: Vec<&str> = sample.texts.iter().map(String::as_str).collect();

    let mut reference = Subject::load(dir, head, &F32Linears)?;
    let batches = texts
        .chunks(BATCH)
        .map(|chunk| reference.encode(chunk))
        .collect::<Result<Vec<_>>>()?;
    let specs = LinearSpec::encoder(&config);
    let weights = specs
        .iter()
        .map(|spec| tensors.f32_linear(spec))
        .collect::<Result<Vec<_>>>()?;

    let input_max = channel_max_inputs(reference.model(), &batches, &specs)?;
    let alphas = match options.alpha {
        Some(alpha) if alpha > 0.0 => vec![0.0, alpha],
        Some(_) => vec![0.0],
        None => ALPHA_CANDIDATES.to_vec(),
    };
    let candidates: Vec<Vec<Candidate>> = specs
        .iter()
        .zip(&weights)
        .zip(&input_max)
        .map(|((spec, (w, _)), x_max)| {
            alphas
                .iter()
                .map(|&alpha| Candidate {
                    alpha,
                    smoothing: (alpha > 0.0)
                        .then(|| smoothing_factors(x_max, w, spec.in_features, alpha)),
                    error: LinearError::default(),
                })
                .collect()
        })
        .collect();
    let candidates = measure_candidates(reference.model(), &batches, &specs, &weights, candidates)?;
    // Per linear, the candidate whose worst text suffers least: the guard
    // judges the worst text too, and outlier tokens ([CLS], [SEP]) weigh
    // most in short texts. With a fixed --alpha, that alpha.
    let chosen: Vec<&Candidate> = candidates
        .iter()
        .map(|c| match options.alpha {
            Some(_) => c.last().expect("a candidate"),
            None => c
                .iter()
                .min_by(|a, b| a.error.worst_text.total_cmp(&b.error.worst_text))
                .expect("a candidate"),
        })
        .collect();
    let expected = batches
        .iter()
        .map(|b| reference.outputs(b))
        .collect::<Result<Vec<_>>>()?;
    drop(reference);

    // Worst first: the order in which layers go back to f32.
    let mut order: Vec<usize> = (0..specs.len()).collect();
    order.sort_by(|&a, &b| {
        chosen[b]
            .error
            .worst_text
            .total_cmp(&chosen[a].error.worst_text)
    });
    let max_f32 = options
        .max_f32_layers
        .unwrap_or(specs.len())
        .min(specs.len() - 1);
    let mut kept_f32 = 0;
    loop {
        let plan: Int8Plan = order[kept_f32..]
            .iter()
            .map(|&i| (specs[i].name.clone(), chosen[i].smoothing.clone()))
            .collect();
        let mut int8 = Subject::load(dir, head, &Int8Linears::with_plan(plan.clone()))?;
        let closeness = compare(&mut int8, &batches, &expected, config.hidden_size)?;
        let (worst_text, worst_cosine) = closeness
            .cosines
            .iter()
            .copied()
            .enumerate()
            .min_by(|a, b| a.1.total_cmp(&b.1))
            .expect("a non-empty sample");
        let quantization = Quantization {
            layers: specs
                .iter()
                .zip(&chosen)
                .zip(&candidates)
                .map(|((spec, chosen), candidates)| LayerError {
                    layer: spec.name.clone(),
                    int8: plan.contains_key(&spec.name),
                    alpha: chosen.alpha,
                    relative_error: chosen.error.all_tokens,
                    worst_text_error: chosen.error.worst_text,
                    plain_relative_error: candidates[0].error.all_tokens,
                    plain_worst_text_error: candidates[0].error.worst_text,
                })
                .collect(),
            plan,
            options: options.clone(),
            source: source.clone(),
            texts: texts.len(),
            worst_cosine,
            worst_text,
            mean_cosine: closeness.cosines.iter().sum::<f64>() / closeness.cosines.len() as f64,
            label_agreement: closeness.label_agreement,
        };
        if quantization.passes() || kept_f32 >= max_f32 {
            return Ok(quantization);
        }
        kept_f32 += 1;
    }
}

/// How close a model's outputs are to the f32 model's.
struct Closeness {
    /// Mean-pooled cosine, per text.
    cosines: Vec<f64>,
    /// Classifiers: the fraction of texts given the same label (token
    /// classifiers: of tokens given the same tag).
    label_agreement: Option<f64>,
}

/// Runs `subject` on `batches` and compares with `expected` (the f32
/// model's [`Subject::outputs`]).
fn compare(
    subject: &mut Subject,
    batches: &[TokenBatch],
    expected: &[Outputs],
    hidden: usize,
) -> Result<Closeness> {
    let mut cosines = Vec::new();
    let (mut agree, mut labelled) = (0usize, 0usize);
    for (batch, (want_pooled, want_labels)) in batches.iter().zip(expected) {
        let (pooled, labels) = subject.outputs(batch)?;
        cosines.extend(
            pooled
                .chunks_exact(hidden)
                .zip(want_pooled.chunks_exact(hidden))
                .map(|(a, b)| cosine(a, b)),
        );
        if let (Some(got), Some(want)) = (labels, want_labels) {
            agree += got.iter().zip(want).filter(|(a, b)| a == b).count();
            labelled += want.len();
        }
    }
    Ok(Closeness {
        cosines,
        label_agreement: (labelled > 0).then(|| agree as f64 / labelled as f64),
    })
}

/// Mean-pooled encoder output `[sequences, hidden]`, and for classifiers
/// (not regressors) the predicted labels: one per text, or for token
/// classifiers one per token.
type Outputs = (Vec<f32>, Option<Vec<usize>>);

/// The head of the model being quantized, which decides what is compared.
#[derive(Clone, Copy)]
enum Head {
    None,
    Sequence,
    Token,
}

/// The model being measured: an embedder (mean pooling), or a sequence or
/// token classifier (mean pooling of its encoder, and its labels or tags).
enum Subject {
    Encoder(Box<Embedder<CpuBackend>>),
    Classifier(Box<Classifier<CpuBackend>>),
    Tagger(Box<Tagger<CpuBackend>>),
}

/// The index of each row's largest value.
fn argmax_rows(values: &[f32], classes: usize) -> Vec<usize> {
    values
        .chunks_exact(classes)
        .map(|row| {
            (0..classes)
                .max_by(|&a, &b| row[a].total_cmp(&row[b]))
                .unwrap_or(0)
        })
        .collect()
}

impl Subject {
    fn load(dir: &Path, head: Head, linears: &dyn LinearLoader<CpuBackend>) -> Result<Self> {
        let backend = CpuBackend::new(0);
        Ok(match head {
            Head::Sequence => {
                Subject::Classifier(Box::new(Classifier::load_with(backend, dir, linears)?))
            }
            Head::Token => Subject::Tagger(Box::new(Tagger::load_with(backend, dir, linears)?)),
            Head::None => Subject::Encoder(Box::new(Embedder::load_with(
                backend,
                dir,
                None,
                Some(Pooling::Mean),
                false,
                linears,
            )?)),
        })
    }

    fn model(&self) -> &BertModel<CpuBackend> {
        match self {
            Subject::Encoder(e) => &e.model,
            Subject::Classifier(c) => &c.model,
            Subject::Tagger(t) => &t.model,
        }
    }

    fn encode(&self, texts: &[&str]) -> Result<TokenBatch> {
        let encoded = match self {
            Subject::Encoder(e) => e.tokenizer.encode_batch(texts)?,
            Subject::Tagger(t) => t.tokenizer.encode_batch(texts)?,
            Subject::Classifier(c) => c.encode(
                &texts
                    .iter()
                    .map(|&text| Input { text, pair: None })
                    .collect::<Vec<_>>(),
            )?,
        };
        Ok(TokenBatch::from_encoded(&encoded))
    }

    fn outputs(&mut self, batch: &TokenBatch) -> Result<Outputs> {
        match self {
            Subject::Encoder(e) => {
                let mut ws = Workspace::new(e.model.backend());
                e.model.forward(batch, &mut ws)?;
                Ok((e.model.pool(batch, &mut ws, Pooling::Mean)?, None))
            }
            Subject::Classifier(c) => {
                let pooled = c.pooled(batch, Pooling::Mean)?;
                if c.regression {
                    return Ok((pooled, None));
                }
                let labels = argmax_rows(&c.logits(batch)?, c.labels.len());
                Ok((pooled, Some(labels)))
            }
            Subject::Tagger(t) => {
                let pooled = t.pooled(batch, Pooling::Mean)?;
                let tags = argmax_rows(&t.token_logits(batch)?, t.tags.len());
                Ok((pooled, Some(tags)))
            }
        }
    }
}

fn spec_index(layer: usize, kind: LinearKind) -> usize {
    let position = LinearKind::ALL
        .iter()
        .position(|&k| k == kind)
        .expect("a listed kind");
    layer * LinearKind::ALL.len() + position
}

/// The largest `|input|` of each linear per input channel over the sample.
fn channel_max_inputs(
    model: &BertModel<CpuBackend>,
    batches: &[TokenBatch],
    specs: &[LinearSpec],
) -> Result<Vec<Vec<f32>>> {
    let mut max: Vec<Vec<f32>> = specs.iter().map(|s| vec![0.0; s.in_features]).collect();
    let mut ws = Workspace::new(model.backend());
    for batch in batches {
        model.forward_observed(batch, &mut ws, &mut |layer, kind, input| {
            let channels = &mut max[spec_index(layer, kind)];
            for row in input.chunks_exact(channels.len()) {
                channels
                    .iter_mut()
                    .zip(row)
                    .for_each(|(m, x)| *m = m.max(x.abs()));
            }
        })?;
    }
    Ok(max)
}

/// SmoothQuant: `s[p] = max|X[:, p]|^α / max|W[:, p]|^(1-α)`, 1 where
/// either is zero, kept within [`SMOOTHING_RANGE`].
fn smoothing_factors(x_max: &[f32], weight: &[f32], k: usize, alpha: f32) -> Vec<f32> {
    let mut w_max = vec![0.0f32; k];
    for row in weight.chunks_exact(k) {
        w_max
            .iter_mut()
            .zip(row)
            .for_each(|(m, w)| *m = m.max(w.abs()));
    }
    x_max
        .iter()
        .zip(&w_max)
        .map(|(&x, &w)| {
            if x > 0.0 && w > 0.0 {
                (x.powf(alpha) / w.powf(1.0 - alpha)).clamp(SMOOTHING_RANGE.0, SMOOTHING_RANGE.1)
            } else {
                1.0
            }
        })
        .collect()
}

/// One way to quantize a linear: plain (`alpha` 0) or with SmoothQuant
/// factors, and how it measured.
struct Candidate {
    alpha: f32,
    smoothing: Option<Vec<f32>>,
    error: LinearError,
}

/// Relative L2 error `‖y_int8 − y_f32‖ / ‖y_f32‖` of a linear's output
/// (before any GELU) on the f32 model's own inputs.
#[derive(Clone, Copy, Debug, Default)]
struct LinearError {
    /// Over every token of the sample.
    all_tokens: f64,
    /// The largest over the sample's texts, each measured on its own tokens.
    worst_text: f64,
}

/// Measures every candidate of every linear on the sample.
fn measure_candidates(
    model: &BertModel<CpuBackend>,
    batches: &[TokenBatch],
    specs: &[LinearSpec],
    weights: &[(Vec<f32>, Vec<f32>)],
    mut candidates: Vec<Vec<Candidate>>,
) -> Result<Vec<Vec<Candidate>>> {
    let reference: Vec<PackedWeight> = specs
        .iter()
        .zip(weights)
        .map(|(spec, (w, _))| PackedWeight::pack(w, spec.out_features(), spec.in_features))
        .collect();
    let quantized: Vec<Vec<QuantizedWeight>> = specs
        .iter()
        .zip(weights)
        .zip(&candidates)
        .map(|((spec, (w, _)), candidates)| {
            let (n, k) = (spec.out_features(), spec.in_features);
            candidates
                .iter()
                .map(|c| match &c.smoothing {
                    Some(s) => QuantizedWeight::quantize_smoothed(w, n, k, s, Int8Isa::detect()),
                    None => QuantizedWeight::quantize(w, n, k),
                })
                .collect()
        })
        .collect();
    // Per linear and candidate: Σ err² and Σ ref² over all tokens.
    let mut totals: Vec<Vec<[f64; 2]>> =
        candidates.iter().map(|c| vec![[0.0; 2]; c.len()]).collect();
    let mut ws = Workspace::new(model.backend());
    let (mut exact, mut approx) = (Vec::new(), Vec::new());
    for batch in batches {
        model.forward_observed(batch, &mut ws, &mut |layer, kind, input| {
            let i = spec_index(layer, kind);
            let bias = &weights[i].1;
            let rows = input.len() / specs[i].in_features;
            let n = specs[i].out_features();
            exact.resize(rows * n, 0.0);
            approx.resize(rows * n, 0.0);
            gemm::linear(
                input,
                rows,
                &reference[i],
                Some(bias),
                Epilogue::None,
                &mut exact,
            );
            for (c, weight) in quantized[i].iter().enumerate() {
                linear_int8(input, rows, weight, Some(bias), false, &mut approx);
                for text in batch.offsets.windows(2) {
                    let range = text[0] * n..text[1] * n;
                    let (err2, ref2) = approx[range.clone()]
                        .iter()
                        .zip(&exact[range])
                        .fold((0.0f64, 0.0f64), |(e, r), (&a, &x)| {
                            (e + ((a - x) as f64).powi(2), r + (x as f64).powi(2))
                        });
                    let error = &mut candidates[i][c].error;
                    error.worst_text = error.worst_text.max(relative(err2, ref2));
                    totals[i][c][0] += err2;
                    totals[i][c][1] += ref2;
                }
            }
        })?;
    }
    for (candidates, totals) in candidates.iter_mut().zip(&totals) {
        for (c, [err2, ref2]) in candidates.iter_mut().zip(totals) {
            c.error.all_tokens = relative(*err2, *ref2);
        }
    }
    Ok(candidates)
}

/// `sqrt(err2 / ref2)`; 0 when both are 0.
fn relative(err2: f64, ref2: f64) -> f64 {
    if err2 == 0.0 {
        0.0
    } else {
        (err2 / ref2).sqrt()
    }
}

/// Cosine similarity in f64; two zero vectors are identical (1).
fn cosine(a: &[f32], b: &[f32]) -> f64 {
    let dot: f64 = a.iter().zip(b).map(|(&x, &y)| x as f64 * y as f64).sum();
    let na: f64 = a.iter().map(|&x| (x as f64).powi(2)).sum::<f64>().sqrt();
    let nb: f64 = b.iter().map(|&x| (x as f64).powi(2)).sum::<f64>().sqrt();
    match (na > 0.0, nb > 0.0) {
        (true, true) => dot / (na * nb),
        (false, false) => 1.0,
        _ => 0.0,
    }
}
