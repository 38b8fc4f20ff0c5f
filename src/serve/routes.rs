//! The HTTP surface: routes, their handlers, and request accounting.
//!
//! Handlers validate and tokenize (off the model threads: short inputs on the
//! request's own task, long ones on tokio's blocking pool), then queue the
//! tokens and await the worker's reply. Response shapes follow
//! text-embeddings-inference, and for token classifiers (which it does not
//! serve) the Hugging Face token-classification pipeline.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Serialize;
use serde_json::json;
use tokio::sync::oneshot;

use super::error::ApiError;
use super::metrics::Metrics;
use super::model::{ClassifierHead, Head, LinearNumerics, ModelInfo, Task, NO_HEAD};
use super::queue::{Job, Queue, Rejected};
use super::request::{self, Inputs, PredictRequest};
use crate::classify::Prediction;
use crate::embed::l2_normalize;
use crate::model::{Pooling, TokenBatch};
use crate::tag::{fewest_windows, EntitySpan, TextWords};
use crate::tokenize::{BertTokenizer, Encoded, TokenSpan};

/// Requests with at most this many bytes of text are tokenized inline (see
/// [`App::tokenize`]): about 200 MiniLM tokens, well under a millisecond.
const INLINE_TOKENIZE_BYTES: usize = 1024;

/// A tokenized input, as far as the length policy and metrics care.
trait Tokenized: Send + 'static {
    /// Tokens the model runs for the input.
    fn token_count(&self) -> usize;

    /// The input's own length in tokens, for the metrics.
    fn input_tokens(&self) -> usize {
        self.token_count()
    }
}

impl Tokenized for Encoded {
    fn token_count(&self) -> usize {
        self.ids.len()
    }
}

impl Tokenized for Vec<TokenSpan> {
    fn token_count(&self) -> usize {
        self.len()
    }
}

/// All its windows' tokens: with `--no-truncate`, a text that needs more
/// than one window is over the max input length and refused; with
/// truncation it runs in windows and nothing is cut.
impl Tokenized for TextWords {
    fn token_count(&self) -> usize {
        self.tokens.token_count()
    }

    /// Counting words that windows share once.
    fn input_tokens(&self) -> usize {
        self.tokens.text_token_count()
    }
}

/// A tokenized input the model can run: one sequence, or for a token
/// classifier one per window of a long text ([`crate::tag::WordWindows`]).
trait Runnable: Tokenized {
    fn sequences(&self) -> impl Iterator<Item = &Encoded>;
}

impl Runnable for Encoded {
    fn sequences(&self) -> impl Iterator<Item = &Encoded> {
        std::iter::once(self)
    }
}

impl Runnable for TextWords {
    fn sequences(&self) -> impl Iterator<Item = &Encoded> {
        self.tokens.encoded()
    }
}

/// Everything a handler needs, shared by all of them.
pub struct App {
    pub info: ModelInfo,
    pub tokenizer: BertTokenizer,
    pub queue: Arc<Queue>,
    pub metrics: Arc<Metrics>,
    /// Workers whose warm-up forward has run.
    pub ready: Arc<AtomicUsize>,
    pub workers: usize,
    /// False with `--no-truncate`: over-long inputs are refused.
    pub truncate: bool,
}

impl App {
    fn is_ready(&self) -> bool {
        self.ready.load(Ordering::SeqCst) == self.workers
    }

    fn max_inputs(&self) -> usize {
        self.queue.limits().max_batch_requests
    }

    /// Runs `encode` over each text of `inputs`, enforcing the length
    /// policy. Short requests are tokenized on the request's own task: that
    /// takes tens of microseconds, less than the two thread hand-offs to and
    /// from the blocking pool would add. Longer ones go to the blocking pool,
    /// so one big request does not hold up the other connections.
    async fn tokenize<T: Tokenized>(
        self: &Arc<Self>,
        inputs: &Inputs,
        encode: impl Fn(&BertTokenizer, &str) -> crate::Result<T> + Send + 'static,
    ) -> Result<Vec<T>, ApiError> {
        let texts = inputs.texts();
        let bytes: usize = texts.iter().map(|text| text.len()).sum();
        let encoded = if bytes <= INLINE_TOKENIZE_BYTES {
            self.encode_all(&texts, &encode)
        } else {
            let app = Arc::clone(self);
            let texts: Vec<String> = texts.into_iter().map(str::to_owned).collect();
            tokio::task::spawn_blocking(move || {
                let texts: Vec<&str> = texts.iter().map(String::as_str).collect();
                app.encode_all(&texts, &encode)
            })
            .await
            .map_err(|e| ApiError::internal(format!("tokenization task failed: {e}")))?
        }
        .map_err(|e| ApiError::validation(e.to_string()))?;
        // Truncation keeps a single sequence within the limit, but not a
        // token classifier's windows taken together.
        let limit = self.info.max_input_length;
        let over = |e: &T| !self.truncate && e.token_count() > limit;
        if let Some(i) = encoded.iter().position(over) {
            return Err(ApiError::validation(format!(
                "input {i} is longer than {limit} tokens (the max input length) and the server runs with --no-truncate"
            )));
        }
        Ok(encoded)
    }

    fn encode_all<T: Tokenized>(
        &self,
        texts: &[&str],
        encode: &impl Fn(&BertTokenizer, &str) -> crate::Result<T>,
    ) -> crate::Result<Vec<T>> {
        let started = Instant::now();
        let encoded = texts
            .iter()
            .map(|text| encode(&self.tokenizer, text))
            .collect::<crate::Result<Vec<_>>>()?;
        let lengths = encoded.iter().map(Tokenized::input_tokens);
        self.metrics.record_tokenization(started.elapsed(), lengths);
        Ok(encoded)
    }

    /// Tokenizes `inputs` with `encode`, queues them for `task` and waits
    /// for one row per sequence (per text, but per window of a token
    /// classifier's long text); returns the tokenized texts with the rows,
    /// for answers that need both.
    async fn infer<T: Runnable>(
        self: &Arc<Self>,
        task: Task,
        inputs: &Inputs,
        encode: impl Fn(&BertTokenizer, &str) -> crate::Result<T> + Send + 'static,
    ) -> Result<(Vec<T>, Vec<Vec<f32>>), ApiError> {
        if !self.is_ready() {
            return Err(ApiError::unavailable("the model is warming up"));
        }
        let admission = self.queue.admit().map_err(|r| self.rejected(r))?;
        let encoded = self.tokenize(inputs, encode).await?;
        // A job runs in one forward pass, so its size bounds the worker's
        // memory: a tagger's long texts count as their windows.
        let sequences: usize = encoded.iter().map(|e| e.sequences().count()).sum();
        if sequences > self.max_inputs() {
            return Err(self.too_many_windows(sequences));
        }
        let (reply, answer) = oneshot::channel();
        let job = Job {
            task,
            inputs: TokenBatch::from_encoded(encoded.iter().flat_map(Runnable::sequences)),
            enqueued: Instant::now(),
            reply,
        };
        self.queue
            .push(job, admission)
            .map_err(|r| self.rejected(r))?;
        let rows = answer
            .await
            .map_err(|_| ApiError::internal("the model worker stopped"))?
            .map_err(ApiError::internal)?;
        Ok((encoded, rows))
    }

    /// Refuses a tagger's request whose texts surely run as more windows
    /// than a request may hold, before tokenizing them (up to
    /// `--max-body-bytes` of text): the fewest windows their words can
    /// take, from a count of words in one pass over the bytes
    /// ([`BertTokenizer::least_words`]), far cheaper than tokenizing.
    /// [`Self::infer`] refuses the rest once their windows are known.
    fn refuse_surely_too_many_windows(&self, inputs: &Inputs) -> Result<(), ApiError> {
        // With --no-truncate a text over one window is refused as too long.
        if !self.truncate {
            return Ok(());
        }
        let capacity = self.tokenizer.max_length() - self.tokenizer.special_tokens();
        let mut windows = 0;
        for text in inputs.texts() {
            let Some(words) = self.tokenizer.least_words(text) else {
                return Ok(());
            };
            windows += fewest_windows(words, capacity);
        }
        if windows > self.max_inputs() {
            return Err(self.too_many_windows(format!("at least {windows}")));
        }
        Ok(())
    }

    /// A tagger's request refused for running as `windows` windows, more
    /// than `--max-batch-requests`.
    fn too_many_windows(&self, windows: impl std::fmt::Display) -> ApiError {
        ApiError::validation(format!(
            "the inputs run as {windows} windows of up to {} tokens, and a request may hold at most {} (--max-batch-requests); send shorter texts or fewer per request",
            self.info.max_input_length,
            self.max_inputs()
        ))
    }

    fn rejected(&self, why: Rejected) -> ApiError {
        match why {
            Rejected::Full => ApiError::overloaded(self.queue.limits().capacity),
            Rejected::Closed => ApiError::unavailable("the server is shutting down"),
        }
    }
}

pub fn router(app: Arc<App>, max_body_bytes: usize) -> Router {
    Router::new()
        .route("/embed", post(embed))
        .route("/predict", post(predict))
        .route("/tokenize", post(tokenize))
        .route("/info", get(info))
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .fallback(|| async { ApiError::not_found() })
        .layer(DefaultBodyLimit::max(max_body_bytes))
        .layer(middleware::from_fn_with_state(Arc::clone(&app), track))
        .with_state(app)
}

/// Counts every response by route and status, with its latency.
async fn track(State(app): State<Arc<App>>, request: Request, next: Next) -> Response {
    let started = Instant::now();
    let path = request.uri().path().to_owned();
    let response = next.run(request).await;
    app.metrics
        .record_request(&path, response.status().as_u16(), started.elapsed());
    response
}

/// The body, or the rejection (413 over `--max-body-bytes`) in our error
/// shape.
fn body(body: Result<Bytes, BytesRejection>) -> Result<Bytes, ApiError> {
    body.map_err(|rejection| ApiError::rejection(rejection.status(), rejection.body_text()))
}

async fn embed(
    State(app): State<Arc<App>>,
    raw: Result<Bytes, BytesRejection>,
) -> Result<Json<Vec<Vec<f32>>>, ApiError> {
    let request = request::embed(&body(raw)?, app.max_inputs(), app.info.has_pooler)?;
    let pooling = request.pooling.unwrap_or(app.info.pooling);
    let (_, mut rows) = app
        .infer(Task::Embed(pooling), &request.inputs, BertTokenizer::encode)
        .await?;
    if request.normalize {
        rows.iter_mut().for_each(|row| l2_normalize(row));
    }
    Ok(Json(rows))
}

/// One label's entry in a `/predict` answer: TEI's `{label, score}`, plus
/// whether the model predicts it (the artifact's decision rule: a tuned
/// threshold can pick a label that is not the top score, and a multi-label
/// model picks any number of them). Regression has no `predicted`.
#[derive(Serialize)]
struct Score<'a> {
    label: &'a str,
    score: f32,
    #[serde(skip_serializing_if = "Option::is_none")]
    predicted: Option<bool>,
}

async fn predict(
    State(app): State<Arc<App>>,
    raw: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let request = request::predict(&body(raw)?, app.max_inputs())?;
    Ok(match &app.info.head {
        Head::Embedder => return Err(ApiError::validation(NO_HEAD)),
        Head::Classifier(head) => {
            one_or_many(&request.inputs, &scores(&app, head, &request).await?)
        }
        Head::Tagger { tags } => {
            one_or_many(&request.inputs, &entities(&app, tags, &request).await?)
        }
    })
}

/// The answer for one input alone when `inputs` was one text, else the list.
fn one_or_many<T: Serialize>(inputs: &Inputs, per_input: &[T]) -> Response {
    if inputs.is_one() {
        Json(&per_input[0]).into_response()
    } else {
        Json(per_input).into_response()
    }
}

/// A sequence classifier's labels per input, most probable first.
async fn scores<'a>(
    app: &Arc<App>,
    head: &'a ClassifierHead,
    request: &PredictRequest,
) -> Result<Vec<Vec<Score<'a>>>, ApiError> {
    let (_, logits) = app
        .infer(Task::Classify, &request.inputs, BertTokenizer::encode)
        .await?;
    let temperature = head.temperature.unwrap_or(1.0);
    let labels = &head.labels;
    Ok(logits
        .iter()
        .map(|row| {
            let prediction = head
                .decision
                .apply(row, labels.len(), temperature)
                .remove(0);
            let (chosen, probs) = match &prediction {
                // One output, a number: nothing to normalise.
                Prediction::Score(score) => {
                    return vec![Score {
                        label: &labels[0],
                        score: *score,
                        predicted: None,
                    }];
                }
                Prediction::Class { label, probs } => (std::slice::from_ref(label), probs),
                Prediction::Labels { labels, probs } => (labels.as_slice(), probs),
            };
            for &l in chosen {
                app.metrics.record_prediction(&labels[l], probs[l]);
            }
            let values = if request.raw_scores { row } else { probs };
            let mut scores: Vec<Score> = labels
                .iter()
                .zip(values)
                .enumerate()
                .map(|(i, (label, &score))| Score {
                    label,
                    score,
                    predicted: Some(chosen.contains(&i)),
                })
                .collect();
            scores.sort_by(|a, b| b.score.total_cmp(&a.score));
            scores
        })
        .collect())
}

/// A token classifier's entities per input, in text order, exactly as
/// `bertrt predict` prints them: `{type, text, start, end, score}` with
/// `start..end` in characters of the input. They mirror the Hugging Face
/// token-classification pipeline with `aggregation_strategy="simple"`
/// (`entity_group` is `type`, `word` is `text`, `score` the mean over the
/// entity), except that each word (split as the tokenizer pre-tokenizes the
/// text: for BERT at whitespace and punctuation) takes its first subword's
/// tag, as in training, and `text` is the input's own slice from the first
/// word's start to the last word's end rather than decoded tokens. A text
/// longer than the max input length runs in overlapping windows, as the
/// pipeline's `stride` does.
async fn entities(
    app: &Arc<App>,
    tags: &[String],
    request: &PredictRequest,
) -> Result<Vec<Vec<EntitySpan>>, ApiError> {
    if request.raw_scores {
        return Err(ApiError::validation(
            "\"raw_scores\" is for sequence classifiers; this token classifier answers with entities",
        ));
    }
    app.refuse_surely_too_many_windows(&request.inputs)?;
    let (inputs, rows) = app
        .infer(Task::Tag, &request.inputs, TextWords::encode)
        .await?;
    // A row per window: an input's logits are its windows' rows in order.
    let mut rows = rows.into_iter();
    let found: Vec<Vec<EntitySpan>> = inputs
        .iter()
        .map(|input| {
            let windows = input.tokens.windows.len();
            let logits: Vec<f32> = rows.by_ref().take(windows).flatten().collect();
            input.entities(tags, &logits)
        })
        .collect();
    for entity in found.iter().flatten() {
        app.metrics.record_prediction(&entity.kind, entity.score);
    }
    Ok(found)
}

/// A token in text-embeddings-inference's `/tokenize` shape: `text` is the
/// piece of the input it came from (the token itself for special tokens),
/// `start`/`stop` its character offsets (null for special tokens).
#[derive(Serialize)]
struct Token<'a> {
    id: u32,
    text: &'a str,
    special: bool,
    start: Option<usize>,
    stop: Option<usize>,
}

/// Tokens per input after truncation, special tokens included unless
/// `add_special_tokens` is false.
async fn tokenize(
    State(app): State<Arc<App>>,
    raw: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let request = request::tokenize(&body(raw)?, app.max_inputs())?;
    let add_special_tokens = request.add_special_tokens;
    let spans = app
        .tokenize(&request.inputs, move |tokenizer, text| {
            tokenizer.spans(text, add_special_tokens)
        })
        .await?;
    let tokens: Vec<Vec<Token>> = request
        .inputs
        .texts()
        .into_iter()
        .zip(&spans)
        .map(|(text, spans)| {
            // Byte position of every character, and of the end.
            let bytes: Vec<usize> = text
                .char_indices()
                .map(|(at, _)| at)
                .chain([text.len()])
                .collect();
            spans
                .iter()
                .map(|span| match span.chars {
                    Some((start, stop)) => Token {
                        id: span.id,
                        // Offsets come from the tokenizer; never index past the text.
                        text: match (bytes.get(start), bytes.get(stop)) {
                            (Some(&from), Some(&to)) if from <= to => &text[from..to],
                            _ => &span.token,
                        },
                        special: false,
                        start: Some(start),
                        stop: Some(stop),
                    },
                    None => Token {
                        id: span.id,
                        text: &span.token,
                        special: true,
                        start: None,
                        stop: None,
                    },
                })
                .collect()
        })
        .collect();
    Ok(Json(tokens).into_response())
}

async fn info(State(app): State<Arc<App>>) -> Json<serde_json::Value> {
    let info = &app.info;
    let limits = app.queue.limits();
    let pooling = match info.pooling {
        Pooling::Mean => "mean",
        Pooling::Cls => "cls",
        Pooling::Pooler => "pooler",
    };
    // TEI's model_type for the classifier and the embedder; TEI serves no
    // token classifiers, so theirs is our own "token_classifier".
    let (model_type, labels, temperature) = match &info.head {
        Head::Embedder => (json!({ "embedding": { "pooling": pooling } }), None, None),
        Head::Classifier(head) => (
            json!({ "classifier": { "id2label": id2label(&head.labels) } }),
            Some(&head.labels),
            head.temperature,
        ),
        Head::Tagger { tags } => (
            json!({ "token_classifier": { "id2label": id2label(tags) } }),
            Some(tags),
            None,
        ),
    };
    Json(json!({
        "model_id": info.id,
        "model_dtype": info.numerics.name(),
        "weights_dtype": info.weights_dtype,
        "model_type": model_type,
        "task": info.head.task(),
        "labels": labels,
        "temperature": temperature,
        "hidden_size": info.hidden_size,
        "max_input_length": info.max_input_length,
        "truncate": app.truncate,
        "max_batch_tokens": limits.max_batch_tokens,
        "max_batch_requests": limits.max_batch_requests,
        "max_client_batch_size": limits.max_batch_requests,
        "max_concurrent_requests": limits.capacity,
        "max_wait_ms": limits.max_wait.as_secs_f64() * 1e3,
        "workers": app.workers,
        "backend": info.backend,
        "int8": info.numerics == LinearNumerics::Int8,
        "version": crate::VERSION,
    }))
}

/// `{"0": label, ...}`, as in a Hugging Face `config.json`.
fn id2label(labels: &[String]) -> serde_json::Value {
    labels
        .iter()
        .enumerate()
        .map(|(i, label)| (i.to_string(), serde_json::Value::from(label.as_str())))
        .collect::<serde_json::Map<_, _>>()
        .into()
}

/// 200 once every worker has run its warm-up forward, 503 before.
async fn health(State(app): State<Arc<App>>) -> Result<Json<serde_json::Value>, ApiError> {
    if app.is_ready() {
        Ok(Json(json!({ "status": "ok" })))
    } else {
        Err(ApiError::unavailable("the model is warming up"))
    }
}

async fn metrics(State(app): State<Arc<App>>) -> impl IntoResponse {
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        app.metrics.render(app.queue.depth()),
    )
}
