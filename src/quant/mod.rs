//! INT8 inference on the CPU: which encoder linears run in INT8, with which
//! SmoothQuant factors, and the accuracy guard that decides whether an INT8
//! model may be written.
//!
//! A plan comes from calibration ([`quantize`]): the f32 model runs a
//! [`Sample`] (dev texts if given, always with [`BUILTIN_SENTENCES`]) and
//! 1. records each linear's largest input magnitude per input channel;
//! 2. derives SmoothQuant factors
//!    `s[p] = max|X[:, p]|^α / max|W[:, p]|^(1-α)` for a few α (the activation is
//!    divided by `s`, the weight multiplied: BERT's LayerNorm outputs carry a
//!    few channels far larger than the rest, which would otherwise set every
//!    token's quantization step). They cannot be folded into the preceding
//!    LayerNorm as in pre-LN models: in BERT (post-LN) that output is also
//!    the residual, so the INT8 kernel applies `1/s` while it quantizes;
//! 3. measures each linear's relative output error on f32 inputs for each α
//!    (0: plain W8A8) and keeps the α whose worst sample text suffers least;
//!    then measures the whole model against f32 (mean-pooled cosine; label
//!    agreement for classifiers, tag agreement per token for token
//!    classifiers);
//! 4. while the model misses the bar, moves the linear with the largest
//!    error back to f32 (at most `max_f32_layers` of them).
//!
//! LayerNorm, softmax, embeddings, the pooler and classifier heads stay
//! f32; attention's two products run in bf16 where the host has AVX512_BF16
//! ([`int8_attention`]), which the guard of step 3 measures with the rest. [`Int8Linears`] loads a model with a plan, or an INT8 artifact as
//! stored (see [`crate::model::linear`] for its tensor names).
//!
//! [`Bf16Linears`] is the other reduced-precision form: every encoder
//! linear in bf16 (no calibration needed: bf16 keeps f32's range, and its
//! products are summed in f32), and attention's products with them.

mod calibrate;
mod write;

use std::collections::BTreeMap;
use std::path::Path;

use crate::backend::cpu::int8::QuantizedWeight;
use crate::backend::cpu::isa::Isa;
use crate::backend::cpu::{gemm, CpuBackend, CpuLinear};
use crate::backend::Precision;
use crate::error::{Error, Result};
use crate::model::linear::{Int8Part, ModelTensors};
use crate::model::{F32Linears, LinearLoader, LinearSpec};

pub use calibrate::{is_int8_artifact, quantize, Quantization, ALPHA_CANDIDATES, SAMPLE_LIMIT};
pub use write::write_int8_artifact;

/// The accuracy bars of `bertrt quantize`.
pub const MIN_COSINE: f64 = 0.995;
pub const MIN_LABEL_AGREEMENT: f64 = 0.99;

/// Part of every calibration sample: short and long, plain and noisy,
/// several scripts, and the empty text (two tokens, so mean pooling
/// averages nothing away: the hardest case for INT8).
pub const BUILTIN_SENTENCES: &[&str] = &[
    "",
    "Hello!",
    "What time does the pharmacy open on Sundays?",
    "The committee postponed its decision until the budget figures are audited.",
    "I loved the first half of the film, but the ending felt rushed and predictable.",
    "Battery life is terrible: 3 hours at most, and the charger gets hot.",
    "A 5% rise in interest rates would add roughly $240 to the average monthly mortgage payment.",
    "Photosynthesis converts light energy into chemical energy stored in glucose.",
    "lol this is sooo good 😂😂 cant stop listening!!!",
    "Please reset my password; the link in the e-mail (sent 12/03) has expired.",
    "The defendant's lawyer argued that the evidence had been obtained without a valid warrant.",
    "Der Zug nach München fährt heute wegen Bauarbeiten später ab.",
    "Le musée est fermé le lundi, mais les jardins restent ouverts au public.",
    "El servicio fue rápido y la comida estaba deliciosa.",
    "東京の天気は明日晴れるでしょう。",
    "我们明天早上九点在会议室开会。",
    "Москва — столица России.",
    "SELECT name, price FROM products WHERE stock > 0 ORDER BY price DESC;",
    "Mix two cups of flour with one teaspoon of baking soda, then fold in the butter.",
    "Shares of the chipmaker fell 8 percent after it cut its revenue forecast for the third quarter.",
    "The patient reported mild headaches and occasional dizziness after starting the new medication.",
    "To be, or not to be, that is the question.",
    "Error 404: the page you requested could not be found.",
    "Our hotel room overlooked the harbour, and every morning fishing boats left before sunrise \
     while gulls circled above the market stalls that lined the quay, selling bread, cheese, \
     fruit and the previous night's catch to locals and tourists alike.",
];

/// How the record names [`BUILTIN_SENTENCES`] as the calibration source.
pub const BUILTIN_SOURCE: &str = "built-in sentences";

/// The texts INT8 is calibrated on and judged by.
#[derive(Clone, Debug, PartialEq)]
pub struct Sample {
    /// Where the texts came from, for reports and the record.
    pub source: String,
    pub texts: Vec<String>,
}

impl Sample {
    /// [`BUILTIN_SENTENCES`], plus all of them joined into one long text:
    /// long inputs reach positions, and activation ranges, that short ones
    /// never do.
    pub fn builtin() -> Self {
        let mut texts: Vec<String> = BUILTIN_SENTENCES.iter().map(|s| s.to_string()).collect();
        texts.push(BUILTIN_SENTENCES.join(" "));
        Sample {
            source: BUILTIN_SOURCE.into(),
            texts,
        }
    }

    /// The first [`SAMPLE_LIMIT`] of `texts` (from `source`), then the
    /// built-in ones: edge cases (the empty text, a long one) a dev split
    /// may lack, which the accuracy guard should see anyway.
    pub fn from_texts(source: &str, texts: Vec<String>) -> Self {
        let builtin = Self::builtin();
        Sample {
            source: format!("{source} + {}", builtin.source),
            texts: texts
                .into_iter()
                .take(SAMPLE_LIMIT)
                .chain(builtin.texts)
                .collect(),
        }
    }
}

/// How `bertrt quantize` (and `--int8` on load) builds and judges a plan.
#[derive(Clone, Debug, PartialEq)]
pub struct QuantizeOptions {
    /// SmoothQuant strength in `[0, 1]` for every linear (0: plain W8A8);
    /// `None` tries [`calibrate::ALPHA_CANDIDATES`] per linear.
    pub alpha: Option<f32>,
    /// How many linears may be kept in f32 to reach the bar (`None`: any).
    pub max_f32_layers: Option<usize>,
    pub min_cosine: f64,
    pub min_label_agreement: f64,
}

impl Default for QuantizeOptions {
    fn default() -> Self {
        QuantizeOptions {
            alpha: None,
            max_f32_layers: None,
            min_cosine: MIN_COSINE,
            min_label_agreement: MIN_LABEL_AGREEMENT,
        }
    }
}

impl QuantizeOptions {
    fn check(&self) -> Result<()> {
        if let Some(alpha) = self.alpha.filter(|a| !(0.0..=1.0).contains(a)) {
            return Err(Error::Invalid(format!(
                "--alpha {alpha} is outside 0..=1 (0 turns smoothing off, 0.5 is usual)"
            )));
        }
        for (flag, value) in [
            ("--min-cosine", self.min_cosine),
            ("--min-agreement", self.min_label_agreement),
        ] {
            if !(0.0..=1.0).contains(&value) {
                return Err(Error::Invalid(format!("{flag} {value} is outside 0..=1")));
            }
        }
        Ok(())
    }
}

/// The linear layers to quantize, by [`LinearSpec::name`], each with its
/// SmoothQuant factors (`None`: plain W8A8).
pub type Int8Plan = BTreeMap<String, Option<Vec<f32>>>;

/// A [`LinearLoader`] for the CPU backend: the layers of `plan` are
/// quantized as they load, layers an INT8 artifact stores in INT8 load as
/// stored, and the rest stay f32.
#[derive(Clone, Debug, Default)]
pub struct Int8Linears {
    plan: Int8Plan,
}

impl Int8Linears {
    /// Quantizes the layers of `plan`.
    pub fn with_plan(plan: Int8Plan) -> Self {
        Int8Linears { plan }
    }

    /// Only what the checkpoint stores in INT8 (nothing, for an f32 model):
    /// how CPU commands load a model without `--int8`.
    pub fn stored() -> Self {
        Self::default()
    }

    /// What CPU commands load `dir` with: with `int8`, an f32 model is
    /// calibrated on [`Sample::builtin`] and quantized as `bertrt quantize`
    /// would (the returned [`Quantization`] says how it measured); an INT8
    /// artifact loads as stored either way.
    pub fn for_model(dir: &Path, int8: bool) -> Result<(Self, Option<Quantization>)> {
        if !int8 || calibrate::is_int8_artifact(dir)? {
            return Ok((Self::stored(), None));
        }
        let quantization = quantize(dir, &Sample::builtin(), &QuantizeOptions::default())?;
        Ok((
            Self::with_plan(quantization.plan.clone()),
            Some(quantization),
        ))
    }
}

impl LinearLoader<CpuBackend> for Int8Linears {
    fn load(
        &self,
        backend: &CpuBackend,
        tensors: &ModelTensors,
        spec: &LinearSpec,
    ) -> Result<CpuLinear> {
        if let Some(smoothing) = self.plan.get(&spec.name) {
            let (weight, bias) = tensors.f32_linear(spec)?;
            let (n, k) = (spec.out_features(), spec.in_features);
            let weight = match smoothing {
                Some(s) => QuantizedWeight::quantize_smoothed(&weight, n, k, s, backend.int8_isa()),
                None => QuantizedWeight::quantize_for(&weight, n, k, backend.int8_isa()),
            };
            return Ok(backend.prepare_linear_int8(weight, &bias));
        }
        match stored_int8(tensors, spec)? {
            Some(weight) => {
                let weight = to_quantized_weight(&weight, spec, backend);
                Ok(backend.prepare_linear_int8(weight, &tensors.bias(spec)?))
            }
            None => F32Linears.load(backend, tensors, spec),
        }
    }

    /// A model with INT8 linears runs attention's products in bf16 where
    /// the host multiplies bf16 natively ([`int8_attention`]).
    fn configure(&self, backend: CpuBackend, tensors: &ModelTensors) -> CpuBackend {
        if self.plan.is_empty() && tensors.int8.is_empty() {
            return backend;
        }
        let precision = int8_attention(backend.isa());
        backend.with_precision(precision)
    }
}

/// What attention's `Q·Kᵀ` and `P·V` multiply in next to INT8 linears on a
/// backend capped at `isa`: bf16 where the host has AVX512_BF16, else f32.
///
/// With the linears at INT8 speed, attention's two f32 products became
/// the largest cost at long sequences (a third of MiniLM's INT8 forward at
/// seq 512); in bf16 they run at twice the rate. The accuracy guard of
/// [`quantize`] measures the model with the attention it will run, and
/// bf16 scores do not move it: the INT8 error comes from the linears.
/// Without native bf16 the emulated kernel would be slower than f32.
pub fn int8_attention(isa: Isa) -> Precision {
    if gemm::bf16_native(isa) {
        Precision::Bf16
    } else {
        Precision::Fp32
    }
}

/// A [`LinearLoader`] for the CPU backend: every encoder linear with its
/// products in bf16 (`--dtype bf16`).
pub struct Bf16Linears;

impl LinearLoader<CpuBackend> for Bf16Linears {
    fn load(
        &self,
        backend: &CpuBackend,
        tensors: &ModelTensors,
        spec: &LinearSpec,
    ) -> Result<CpuLinear> {
        if stored_int8(tensors, spec)?.is_some() {
            return Err(Error::Invalid(format!(
                "{} is an INT8 model ({} is stored in INT8); run it without --dtype bf16",
                tensors.checkpoint.path().display(),
                spec.name
            )));
        }
        let (weight, bias) = tensors.f32_linear(spec)?;
        Ok(backend.prepare_linear_bf16(&weight, &bias, spec.out_features(), spec.in_features))
    }

    /// Attention's `Q·Kᵀ` and `P·V` in bf16 too, as under PyTorch's bf16
    /// autocast (softmax stays f32).
    fn configure(&self, backend: CpuBackend, _tensors: &ModelTensors) -> CpuBackend {
        backend.with_precision(Precision::Bf16)
    }
}

/// The parts of `spec` an INT8 artifact stores, stacked, or `None` when it
/// stores them in f32. Parts of one layer are all INT8 or all f32, with one
/// smoothing (they share the layer's input).
fn stored_int8(tensors: &ModelTensors, spec: &LinearSpec) -> Result<Option<Int8Part>> {
    let parts = spec
        .parts
        .iter()
        .map(|p| tensors.int8.part(p, spec.out_per_part, spec.in_features))
        .collect::<Result<Vec<_>>>()?;
    if parts.iter().all(Option::is_none) {
        return Ok(None);
    }
    let mismatch = |problem: &str| Error::CorruptSafetensors {
        path: tensors.checkpoint.path().into(),
        message: format!(
            "{} ({}): {problem}; quantize the model again with bertrt quantize",
            spec.name,
            spec.parts.join(", ")
        ),
    };
    let parts: Vec<Int8Part> = parts
        .into_iter()
        .collect::<Option<_>>()
        .ok_or_else(|| mismatch("some parts are INT8 and some f32"))?;
    let smoothing = parts[0].smoothing.clone();
    if parts.iter().any(|p| p.smoothing != smoothing) {
        return Err(mismatch("the parts' input_smoothing differ"));
    }
    Ok(Some(Int8Part {
        values: parts
            .iter()
            .flat_map(|p| p.values.iter().copied())
            .collect(),
        scales: parts
            .iter()
            .flat_map(|p| p.scales.iter().copied())
            .collect(),
        smoothing,
    }))
}

/// `part` (checked by [`crate::model::linear::Int8Tensors::part`]) packed
/// for `backend`'s INT8 kernel.
fn to_quantized_weight(
    part: &Int8Part,
    spec: &LinearSpec,
    backend: &CpuBackend,
) -> QuantizedWeight {
    let (n, k) = (spec.out_features(), spec.in_features);
    let weight = QuantizedWeight::from_int8(&part.values, &part.scales, n, k, backend.int8_isa());
    match &part.smoothing {
        Some(s) => weight.with_smoothing(s),
        None => weight,
    }
}
