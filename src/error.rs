//! Errors a user can act on: each names the file, tensor or field at fault
//! and, where there is one, the fix.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("{dir}: no {file} found; a model directory needs config.json, model.safetensors and tokenizer.json (or vocab.txt)")]
    MissingFile { dir: PathBuf, file: &'static str },

    #[error("{dir}: holds only pytorch_model.bin, a Python pickle, which bertrt does not execute (loading a pickle can run arbitrary code). Convert it once with: python -c \"from transformers import AutoModel; m = AutoModel.from_pretrained('{dir}'); m.save_pretrained('{dir}', safe_serialization=True)\"")]
    PickleOnly { dir: PathBuf },

    #[error("{path}: invalid config: {message}")]
    Config { path: PathBuf, message: String },

    #[error("{path}: unsupported {field} {value:?}; bertrt supports {supported}")]
    Unsupported {
        path: PathBuf,
        field: &'static str,
        value: String,
        supported: &'static str,
    },

    #[error("{path}: not a valid safetensors file ({message}); the file may be truncated or corrupt, download or convert it again")]
    CorruptSafetensors { path: PathBuf, message: String },

    #[error("{path}: missing tensor {name:?} (also looked for {alternatives:?}); is this a BERT checkpoint matching its config.json?")]
    MissingTensor {
        path: PathBuf,
        name: String,
        alternatives: Vec<String>,
    },

    #[error("{path}: tensor {name:?} has shape {found:?}, expected {expected:?} from config.json")]
    WrongShape {
        path: PathBuf,
        name: String,
        expected: Vec<usize>,
        found: Vec<usize>,
    },

    #[error("{path}: tensor {name:?} has dtype {dtype}; bertrt reads F32, F16 and BF16")]
    UnsupportedDtype {
        path: PathBuf,
        name: String,
        dtype: String,
    },

    #[error("{path}: {message}")]
    Tokenizer { path: PathBuf, message: String },

    #[error("{0}")]
    Invalid(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }
}
