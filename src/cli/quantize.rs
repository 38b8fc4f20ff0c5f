use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

use bertrt::backend::cpu::CpuBackend;
use bertrt::data::{self, DataSpec};
use bertrt::model::LinearLoader;
use bertrt::quant::{self, Bf16Linears, Int8Linears, QuantizeOptions, Sample};

#[derive(clap::Args)]
pub struct Args {
    /// The f32 model directory to quantize (an embedder or a fine-tuned classifier).
    #[arg(long)]
    model: PathBuf,
    /// Where to write the INT8 model directory.
    #[arg(long)]
    out: PathBuf,
    /// Calibration and accuracy sample: a labeled dev split (.csv, .tsv or
    /// .jsonl, as for finetune --valid) or a text file, one text per line
    /// [default: built-in sentences only]. The first 128 texts are used,
    /// with the built-in sentences added as edge cases.
    #[arg(long)]
    calibration: Option<PathBuf>,
    /// Column (CSV/TSV) or key (JSON Lines) of the calibration text.
    #[arg(long, default_value = "text")]
    text_column: String,
    /// Write the INT8 model even if it misses the accuracy bars.
    #[arg(long)]
    force: bool,
    /// SmoothQuant strength in 0..=1 for every linear (0: plain W8A8)
    /// [default: the best of 0, 0.25, 0.5, 0.75 per linear].
    #[arg(long)]
    alpha: Option<f32>,
    /// At most this many linears stay f32 to reach the bars [default: as many as needed].
    #[arg(long)]
    max_f32_layers: Option<usize>,
    /// Worst mean-pooled cosine to the f32 model the INT8 model must reach.
    #[arg(long, default_value_t = quant::MIN_COSINE)]
    min_cosine: f64,
    /// Classifiers: fraction of sample texts that must keep their f32 label
    /// (token classifiers: of tokens that must keep their f32 tag).
    #[arg(long, default_value_t = quant::MIN_LABEL_AGREEMENT)]
    min_agreement: f64,
}

pub fn run(args: Args) -> Result<()> {
    let sample = match &args.calibration {
        Some(path) => Sample::from_texts(
            &path.display().to_string(),
            read_texts(path, &args.text_column)?,
        ),
        None => Sample::builtin(),
    };
    let options = QuantizeOptions {
        alpha: args.alpha,
        max_f32_layers: args.max_f32_layers,
        min_cosine: args.min_cosine,
        min_label_agreement: args.min_agreement,
    };
    let quantization = quant::quantize(&args.model, &sample, &options)?;
    // A reader gone from stdout (`| head`) does not stop the artifact being
    // written: the report's write error waits until it is.
    let printed =
        std::io::Write::write_all(&mut std::io::stdout(), quantization.report().as_bytes());
    if !quantization.passes() && args.force {
        eprintln!("warning: below the accuracy bar; writing anyway (--force)");
    }
    quant::write_int8_artifact(&args.model, &args.out, &quantization, args.force)?;
    printed?;
    outln!("wrote {}", args.out.display())?;
    Ok(())
}

/// Texts of a dev split (by extension) or of a plain text file.
fn read_texts(path: &Path, text_column: &str) -> Result<Vec<String>> {
    let extension = path.extension().and_then(|e| e.to_str()).unwrap_or("");
    let texts: Vec<String> = if ["csv", "tsv", "jsonl"].contains(&extension) {
        let spec = DataSpec {
            text_column: text_column.into(),
            ..DataSpec::default()
        };
        data::read_dataset(path, &spec)?
            .examples
            .into_iter()
            .map(|e| e.text)
            .collect()
    } else {
        std::fs::read_to_string(path)
            .with_context(|| format!("cannot read calibration texts {}", path.display()))?
            .lines()
            .map(str::to_string)
            .collect()
    };
    if texts.is_empty() {
        bail!("{}: no calibration texts", path.display());
    }
    Ok(texts)
}

/// The precision flags of embed/predict/eval.
#[derive(clap::Args, Clone, Copy, Debug)]
pub struct Numerics {
    /// Run the encoder's linear layers in INT8: an f32 model is quantized on
    /// load (calibrated on built-in sentences, as `bertrt quantize` does);
    /// an INT8 model (from `bertrt quantize`) runs INT8 without this flag.
    #[arg(long, conflicts_with = "dtype")]
    pub int8: bool,
    /// What the encoder's linear layers multiply in: fp32, or bf16 operands
    /// with f32 sums (fastest on CPUs with AVX512_BF16).
    #[arg(long, value_enum, default_value_t = Dtype::Fp32)]
    pub dtype: Dtype,
}

/// What inference's linear layers multiply in: the CPU's precisions (fp16
/// is a CUDA training precision, [`bertrt::backend::Precision::Fp16`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Dtype {
    Fp32,
    Bf16,
}

impl Numerics {
    /// How to load `dir`'s linear layers.
    pub fn load_linears(&self, dir: &Path) -> Result<Box<dyn LinearLoader<CpuBackend>>> {
        Ok(match self.dtype {
            Dtype::Bf16 => Box::new(Bf16Linears),
            Dtype::Fp32 => Box::new(load_linears(dir, self.int8)?),
        })
    }
}

/// How embed/predict/eval load `dir`: with `int8`, an f32 model is
/// quantized on load (calibrated on built-in sentences; the result is
/// reported on stderr); an INT8 model runs INT8 either way.
fn load_linears(dir: &Path, int8: bool) -> Result<Int8Linears> {
    let (linears, quantization) = Int8Linears::for_model(dir, int8)?;
    if let Some(q) = quantization {
        eprintln!("{}", q.summary());
        if !q.passes() {
            eprintln!(
                "warning: INT8 misses the accuracy bar on this model; `bertrt quantize --model {}` shows the per-layer error",
                dir.display()
            );
        }
    }
    Ok(linears)
}
