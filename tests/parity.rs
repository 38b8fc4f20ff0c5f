//! PyTorch parity on all-MiniLM-L6-v2: token ids, last hidden state, pooler
//! and mean pooling against `tests/fixtures/forward.*` (transformers, fp32,
//! eager attention), for every sentence alone and in batches, on both the
//! SIMD backend and the reference backend.

mod common;

use bertrt::backend::cpu::{CpuBackend, ReferenceBackend};
use bertrt::backend::Backend;
use bertrt::model::{BertModel, ModelFiles, Pooling, TokenBatch, Workspace};
use bertrt::tokenize::{BertTokenizer, Encoded};
use common::{max_abs_diff, Fixture};

const TOLERANCE: f32 = 1e-4;

struct Sentence {
    text: String,
    n_tokens: usize,
    /// The fixture lists at most the first 40 tokens.
    tokens: Vec<String>,
}

fn sentences() -> Vec<Sentence> {
    common::fixture_sentences()
        .iter()
        .map(|s| Sentence {
            text: s["text"].as_str().unwrap().to_string(),
            n_tokens: s["n_tokens"].as_u64().unwrap() as usize,
            tokens: s["tokens"]
                .as_array()
                .unwrap()
                .iter()
                .map(|t| t.as_str().unwrap().to_string())
                .collect(),
        })
        .collect()
}

fn load<B: Backend>(backend: B) -> (BertModel<B>, BertTokenizer) {
    let dir = common::minilm_dir();
    let model = BertModel::load(backend, &ModelFiles::locate(&dir).unwrap()).unwrap();
    (model, BertTokenizer::from_dir(&dir, 512).unwrap())
}

fn encode_all(tokenizer: &BertTokenizer) -> Vec<Encoded> {
    sentences()
        .iter()
        .map(|s| tokenizer.encode(&s.text).unwrap())
        .collect()
}

struct Outputs {
    hidden: Vec<f32>,
    mean: Vec<f32>,
    pooler: Vec<f32>,
}

fn run<B: Backend>(model: &BertModel<B>, encoded: &[&Encoded]) -> Outputs {
    let batch = TokenBatch::from_encoded(encoded.iter().copied());
    let mut ws = Workspace::new(model.backend());
    model.forward(&batch, &mut ws).unwrap();
    Outputs {
        hidden: model.last_hidden_state(&ws),
        mean: model.pool(&batch, &mut ws, Pooling::Mean).unwrap(),
        pooler: model.pool(&batch, &mut ws, Pooling::Pooler).unwrap(),
    }
}

#[test]
fn token_ids_and_tokens_match_hugging_face() {
    let fixture = Fixture::open("forward.safetensors");
    let (_, tokenizer) = load(ReferenceBackend);
    for (i, (sentence, encoded)) in sentences().iter().zip(encode_all(&tokenizer)).enumerate() {
        assert_eq!(
            encoded.ids,
            fixture.ids(&format!("s{i}.input_ids")),
            "sentence {i}"
        );
        assert_eq!(encoded.ids.len(), sentence.n_tokens, "sentence {i}");
        assert_eq!(
            encoded.tokens[..sentence.tokens.len()],
            sentence.tokens,
            "sentence {i}"
        );
        assert!(encoded.type_ids.iter().all(|&t| t == 0));
    }
}

fn check_each_sentence_alone<B: Backend>(backend: B, sentences: std::ops::Range<usize>) {
    let fixture = Fixture::open("forward.safetensors");
    let (model, tokenizer) = load(backend);
    let encoded = encode_all(&tokenizer);
    let mut worst = 0.0f32;
    for i in sentences.clone() {
        let out = run(&model, &[&encoded[i]]);
        let diffs = [
            (
                "last_hidden_state",
                max_abs_diff(
                    &out.hidden,
                    &fixture.get(&format!("s{i}.last_hidden_state")).1,
                ),
            ),
            (
                "mean_pooled",
                max_abs_diff(&out.mean, &fixture.get(&format!("s{i}.mean_pooled")).1),
            ),
            (
                "pooler_output",
                max_abs_diff(&out.pooler, &fixture.get(&format!("s{i}.pooler_output")).1),
            ),
        ];
        for (what, diff) in diffs {
            assert!(
                diff <= TOLERANCE,
                "sentence {i} {what}: max abs diff {diff}"
            );
            worst = worst.max(diff);
        }
    }
    eprintln!(
        "{}, sentences {sentences:?}: worst max abs diff {worst:e}",
        model.backend_description()
    );
}

#[test]
fn every_sentence_alone_matches_pytorch() {
    check_each_sentence_alone(CpuBackend::new(0), 0..12);
}

#[test]
fn reference_backend_matches_pytorch() {
    // The scalar backend is slow on the 512-token input; the short ones
    // exercise every op.
    check_each_sentence_alone(ReferenceBackend, 0..11);
}

#[test]
fn padded_batch_matches_pytorch() {
    let fixture = Fixture::open("forward.safetensors");
    let (model, tokenizer) = load(CpuBackend::new(0));
    let encoded = encode_all(&tokenizer);
    let batch: Vec<&Encoded> = encoded[..6].iter().collect();
    let out = run(&model, &batch);

    let (shape, want_hidden) = fixture.get("batch.last_hidden_state");
    let (seq, hidden) = (shape[1], shape[2]);
    let mask = &fixture.get("batch.attention_mask").1;
    let ids = fixture.ids("batch.input_ids");
    // Our batches are packed: compare each sequence's real tokens with the
    // matching rows of PyTorch's right-padded tensor.
    let mut row = 0;
    for (s, e) in batch.iter().enumerate() {
        let len = mask[s * seq..(s + 1) * seq]
            .iter()
            .filter(|&&m| m == 1.0)
            .count();
        assert_eq!(len, e.ids.len(), "sequence {s} length");
        assert_eq!(&ids[s * seq..s * seq + len], e.ids.as_slice());
        let got = &out.hidden[row * hidden..(row + len) * hidden];
        let want = &want_hidden[s * seq * hidden..(s * seq + len) * hidden];
        let diff = max_abs_diff(got, want);
        assert!(diff <= TOLERANCE, "batch sequence {s}: max abs diff {diff}");
        row += len;
    }
    let diff = max_abs_diff(&out.mean, &fixture.get("batch.mean_pooled").1);
    assert!(diff <= TOLERANCE, "batch mean_pooled: max abs diff {diff}");
}

#[test]
fn outputs_do_not_depend_on_batch_companions() {
    // Alone vs. in a batch with the 512-token input (what a padded runtime
    // would pad to 512) and every other sentence.
    let (model, tokenizer) = load(CpuBackend::new(0));
    let encoded = encode_all(&tokenizer);
    let all: Vec<&Encoded> = encoded.iter().collect();
    let together = run(&model, &all);
    let hidden = model.config().hidden_size;
    let mut row = 0;
    for (i, e) in encoded.iter().enumerate() {
        let alone = run(&model, &[e]);
        let len = e.ids.len();
        let diffs = [
            max_abs_diff(
                &alone.hidden,
                &together.hidden[row * hidden..(row + len) * hidden],
            ),
            max_abs_diff(&alone.mean, &together.mean[i * hidden..(i + 1) * hidden]),
            max_abs_diff(
                &alone.pooler,
                &together.pooler[i * hidden..(i + 1) * hidden],
            ),
        ];
        assert!(diffs.iter().all(|&d| d <= 1e-5), "sentence {i}: {diffs:?}");
        row += len;
    }
}

#[test]
fn text_pairs_get_segment_ids() {
    let (_, tokenizer) = load(ReferenceBackend);
    let pair = tokenizer.encode_pair("the cat sat", "on the mat").unwrap();
    assert_eq!(pair.tokens.first().map(String::as_str), Some("[CLS]"));
    let first_sep = pair.tokens.iter().position(|t| t == "[SEP]").unwrap();
    assert!(pair.type_ids[..=first_sep].iter().all(|&t| t == 0));
    assert!(pair.type_ids[first_sep + 1..].iter().all(|&t| t == 1));
    assert_eq!(pair.tokens.last().map(String::as_str), Some("[SEP]"));
}

#[test]
fn truncation_is_ours_not_the_files() {
    // The shipped tokenizer.json truncates at 128; we must not.
    let dir = common::minilm_dir();
    let long = "word ".repeat(300);
    let at_512 = BertTokenizer::from_dir(&dir, 512)
        .unwrap()
        .encode(&long)
        .unwrap();
    assert_eq!(at_512.ids.len(), 302);
    let at_16 = BertTokenizer::from_dir(&dir, 16)
        .unwrap()
        .encode(&long)
        .unwrap();
    assert_eq!(at_16.ids.len(), 16);
    assert_eq!(at_16.tokens.last().map(String::as_str), Some("[SEP]"));
    // No padding either.
    let short = BertTokenizer::from_dir(&dir, 512)
        .unwrap()
        .encode("hi")
        .unwrap();
    assert_eq!(short.ids.len(), 3);
}

#[test]
fn vocab_txt_tokenizer_matches_tokenizer_json() {
    let dir = common::minilm_dir();
    let tmp = tempfile::tempdir().unwrap();
    for file in ["vocab.txt", "tokenizer_config.json"] {
        std::fs::copy(dir.join(file), tmp.path().join(file)).unwrap();
    }
    let from_vocab = BertTokenizer::from_dir(tmp.path(), 512).unwrap();
    let from_json = BertTokenizer::from_dir(&dir, 512).unwrap();
    for s in sentences() {
        assert_eq!(
            from_vocab.encode(&s.text).unwrap(),
            from_json.encode(&s.text).unwrap(),
            "{:?}",
            s.text
        );
    }
}
