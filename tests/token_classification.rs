//! Token classification: tagged-data readers and their errors, subword
//! alignment, the seqeval-style entity metric, the token head's gradients,
//! a tagger's windows over texts longer than `max_length`, and `finetune
//! --task token-classification` / `eval` / `predict` end to end on a tiny
//! model.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use bertrt::backend::cpu::CpuBackend;
use bertrt::checkpoint::Checkpoint;
use bertrt::config::BertConfig;
use bertrt::data::{align_tags, first_subwords, read_tagged, Alignment, TagSet, TagSpec};
use bertrt::eval::{entities, EntityReport};
use bertrt::model::TokenBatch;
use bertrt::tag::{Tagger, TextWords, Window, FORWARD_TOKENS};
use bertrt::tokenize::BertTokenizer;
use bertrt::train::classifier::{ForwardMode, SequenceClassifier, Targets};
use bertrt::train::loss::token_cross_entropy;
use common::{check_gradient as check, Rng};
use safetensors::Dtype;

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

fn read_error(dir: &Path, name: &str, text: &str) -> String {
    read_tagged(&write(dir, name, text), &TagSpec::default())
        .unwrap_err()
        .to_string()
}

#[test]
fn conll_reader_takes_first_and_last_columns_and_skips_docstart() {
    let tmp = tempfile::tempdir().unwrap();
    let path = write(
        tmp.path(),
        "a.conll",
        "-DOCSTART- -X- O O\n\nthe\tO\ncat\tB-ANIMAL\n\n\nbig DT NP B-SIZE\ndog NN NP I-SIZE\r\n",
    );
    let data = read_tagged(&path, &TagSpec::default()).unwrap();
    assert_eq!(data.sentences.len(), 2);
    assert_eq!(data.sentences[0].words, ["the", "cat"]);
    assert_eq!(data.sentences[0].tags, ["O", "B-ANIMAL"]);
    assert_eq!(data.sentences[0].lines, [3, 4]);
    assert_eq!(data.sentences[1].words, ["big", "dog"]);
    assert_eq!(data.sentences[1].tags, ["B-SIZE", "I-SIZE"]);
    assert_eq!(data.sentences[1].line(), 7);
}

#[test]
fn jsonl_reader_with_configurable_keys() {
    let tmp = tempfile::tempdir().unwrap();
    let path = write(
        tmp.path(),
        "a.jsonl",
        "{\"w\": [\"the\", \"cat\"], \"t\": [\"O\", \"B-ANIMAL\"]}\n\n{\"w\": [\"dog\"], \"t\": [\"B-ANIMAL\"]}\n",
    );
    let spec = TagSpec {
        tokens_column: "w".into(),
        tags_column: "t".into(),
    };
    let data = read_tagged(&path, &spec).unwrap();
    assert_eq!(data.sentences.len(), 2);
    assert_eq!(data.sentences[1].lines, [3]);
    let err = read_tagged(&path, &TagSpec::default())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("line 1") && err.contains("\"tokens\"") && err.contains("--tokens-column"),
        "{err}"
    );
}

#[test]
fn bad_tagged_input_is_named_by_file_line_and_fix() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let err = read_error(
        dir,
        "count.jsonl",
        "{\"tokens\": [\"a\"], \"tags\": [\"O\"]}\n{\"tokens\": [\"the\", \"cat\"], \"tags\": [\"O\"]}\n",
    );
    assert!(
        err.contains("count.jsonl line 2") && err.contains("2 words but 1 tags"),
        "{err}"
    );
    let err = read_error(dir, "empty.jsonl", "{\"tokens\": [], \"tags\": []}\n");
    assert!(
        err.contains("empty.jsonl line 1") && err.contains("empty sentence"),
        "{err}"
    );
    let err = read_error(dir, "one.conll", "the O\ncat\n");
    assert!(
        err.contains("one.conll line 2") && err.contains("a word and a tag"),
        "{err}"
    );
    let err = read_error(dir, "bio.conll", "the O\ncat E-ANIMAL\n");
    assert!(
        err.contains("bio.conll line 2") && err.contains("\"E-ANIMAL\"") && err.contains("BIO"),
        "{err}"
    );
    let err = read_error(dir, "nothing.conll", "\n\n");
    assert!(err.contains("no tagged sentences"), "{err}");

    // A dev tag unseen in training.
    let train = read_tagged(
        &write(dir, "train.conll", "the O\ncat B-ANIMAL\n"),
        &TagSpec::default(),
    )
    .unwrap();
    let tags = TagSet::from_training(&train);
    assert_eq!(tags.tags(), ["B-ANIMAL", "O"]);
    let dev = read_tagged(
        &write(dir, "dev.conll", "the O\n\nbig B-SIZE\ndog B-ANIMAL\n"),
        &TagSpec::default(),
    )
    .unwrap();
    let err = tags.encode(&dev).unwrap_err().to_string();
    assert!(
        err.contains("dev.conll line 3") && err.contains("\"B-SIZE\"") && err.contains("training"),
        "{err}"
    );
}

fn tiny_model(dir: &Path) -> PathBuf {
    let model = dir.join("tiny");
    common::write_tiny_model(
        &model,
        &common::tiny_config(),
        &common::safetensors_bytes(&common::tiny_tensors(1), Dtype::F32),
    );
    model
}

/// With a real BERT tokenizer (MiniLM's `tokenizer.json`: BertNormalizer
/// and BertPreTokenizer), raw text splits into BasicTokenizer's words, with
/// character offsets into the text, and tokenizing those words gives the
/// tokens of the whole text.
#[test]
fn raw_text_words_are_the_bert_tokenizers_words() {
    let tokenizer = BertTokenizer::from_dir(&common::minilm_dir(), 128).unwrap();
    let text = "I live in Paris. Don't visit São-Paulo (Brazil) or 東京, 2×3€!";
    let input = TextWords::encode(&tokenizer, text).unwrap();
    let logits = vec![0.0; input.tokens.token_count()];
    let words: Vec<(String, usize, usize)> = input
        .word_predictions(&["O".to_string()], &logits)
        .into_iter()
        .map(|w| {
            let slice: String = text.chars().skip(w.start).take(w.end - w.start).collect();
            assert_eq!(slice, w.text);
            (w.text, w.start, w.end)
        })
        .collect();
    let texts: Vec<&str> = words.iter().map(|w| w.0.as_str()).collect();
    assert_eq!(
        texts,
        [
            "I", "live", "in", "Paris", ".", "Don", "'", "t", "visit", "São", "-", "Paulo", "(",
            "Brazil", ")", "or", "東", "京", ",", "2×3€", "!"
        ]
    );
    assert_eq!(&words[3], &("Paris".to_string(), 10, 15));
    assert_eq!(&words[16], &("東".to_string(), 51, 52));
    for text in [text, "  tabs\tand\u{a0}nbsp; [MASK] e-mail: x@y.z  ", ""] {
        let windows = TextWords::encode(&tokenizer, text).unwrap().tokens.windows;
        assert_eq!(windows.len(), 1, "{text:?}");
        assert_eq!(
            windows[0].tokens.encoded.tokens,
            tokenizer.encode(text).unwrap().tokens,
            "{text:?}"
        );
    }
}

#[test]
fn tags_go_to_first_subwords_or_all_subwords() {
    let tmp = tempfile::tempdir().unwrap();
    let tokenizer = BertTokenizer::from_dir(&tiny_model(tmp.path()), 64).unwrap();
    let encoded = tokenizer
        .encode_words_batch(&[vec!["the", "cats", "sat"]])
        .unwrap()
        .remove(0);
    assert_eq!(
        encoded.encoded.tokens,
        ["[CLS]", "the", "cat", "##s", "sat", "[SEP]"]
    );
    assert_eq!(
        encoded.word_ids,
        [None, Some(0), Some(1), Some(1), Some(2), None]
    );
    let tags = TagSet::from_tags(vec!["B-ANIMAL".into(), "I-ANIMAL".into(), "O".into()]);
    let word_tags = [2, 0, 2];
    assert_eq!(
        align_tags(
            &encoded.word_ids,
            &word_tags,
            &tags,
            Alignment::FirstSubword
        ),
        [None, Some(2), Some(0), None, Some(2), None]
    );
    assert_eq!(
        align_tags(&encoded.word_ids, &word_tags, &tags, Alignment::AllSubwords),
        [None, Some(2), Some(0), Some(1), Some(2), None]
    );
    // Truncation cuts off words: they get no token and no label.
    let short = BertTokenizer::from_dir(&tmp.path().join("tiny"), 4).unwrap();
    let encoded = short
        .encode_words_batch(&[vec!["the", "cats", "sat"]])
        .unwrap()
        .remove(0);
    assert_eq!(encoded.word_ids, [None, Some(0), Some(1), None]);
    assert_eq!(encoded.word_lengths, [1, 2, 1], "counted before truncation");
    assert_eq!(
        first_subwords(&encoded.word_ids, 3),
        [Some(1), Some(2), None]
    );
}

/// The tiny encoder under a random `BertForTokenClassification` head over
/// BIO tags, its tokenizer cutting at `max_length` so that short texts
/// already need windows.
fn tiny_tagger(dir: &Path, max_length: usize) -> Tagger<CpuBackend> {
    let model = dir.join("tagger");
    let mut config = common::tiny_config();
    config["architectures"] = serde_json::json!(["BertForTokenClassification"]);
    config["id2label"] = serde_json::json!({"0": "B-ANIMAL", "1": "I-ANIMAL", "2": "O"});
    let mut tensors = common::tiny_tensors(1);
    let mut rng = Rng::new(3);
    tensors.push(("classifier.weight".into(), vec![3, 16], rng.vec(48, 2.0)));
    tensors.push(("classifier.bias".into(), vec![3], vec![0.0; 3]));
    common::write_tiny_model(
        &model,
        &config,
        &common::safetensors_bytes(&tensors, Dtype::F32),
    );
    let mut tagger = Tagger::load(CpuBackend::new(2), &model).unwrap();
    tagger.tokenizer = BertTokenizer::from_dir(&model, max_length).unwrap();
    tagger
}

/// `count` words of one and two tokens (`cats` is `cat ##s`), mixed.
fn long_text(count: usize) -> String {
    const WORDS: [&str; 9] = ["the", "big", "cats", "sat", "on", "a", "mat", "dogs", "ran"];
    let words: Vec<&str> = (0..count).map(|i| WORDS[i * 7 % WORDS.len()]).collect();
    words.join(" ")
}

/// How many tokens of `window` belong to the sentence's words `words`.
fn tokens_of(window: &Window, words: std::ops::Range<usize>) -> usize {
    let first = window.words.start;
    window
        .tokens
        .word_ids
        .iter()
        .flatten()
        .filter(|&&w| words.contains(&(first + w)))
        .count()
}

/// A text longer than `max_length` runs in windows and every word of it is
/// tagged, by `predict_words` and `tag_words` alike, and `predict` finds
/// entities past the first window.
#[test]
fn a_text_longer_than_max_length_has_every_word_tagged() {
    let tmp = tempfile::tempdir().unwrap();
    // The model's own limit, 64 tokens: the text has 183.
    let mut tagger = tiny_tagger(tmp.path(), 64);
    let text = long_text(150);
    let input = TextWords::encode(&tagger.tokenizer, &text).unwrap();
    let windows = &input.tokens.windows;
    assert!(windows.len() >= 3, "{} windows", windows.len());
    assert!(windows.iter().all(|w| w.tokens.encoded.ids.len() <= 64));

    // A long and a short text in one call, as texts and as word lists.
    let predicted = tagger.predict_words(&[&text, "the cat"]).unwrap();
    assert_eq!(predicted[0].len(), 150);
    assert_eq!(predicted[1].len(), 2);
    for word in predicted.iter().flatten() {
        assert!(word.tag.is_some() && word.logits.is_some(), "{word:?}");
    }
    let sentences = [text.split(' ').collect(), vec!["the", "cat"]];
    let tagged = tagger.tag_words(&sentences).unwrap();
    for (words, tags) in predicted.iter().zip(&tagged) {
        let tags: Vec<Option<&str>> = tags
            .iter()
            .map(|t| t.map(|t| tagger.tags[t.tag].as_str()))
            .collect();
        let want: Vec<Option<&str>> = words.iter().map(|w| w.tag.as_deref()).collect();
        assert_eq!(tags, want);
    }

    // Entities are found past the first window too.
    let past_first_window = predicted[0][windows[0].words.end].start;
    let entities = tagger.predict(&[&text]).unwrap().remove(0);
    assert!(
        entities.iter().any(|e| e.start >= past_first_window),
        "{entities:?}"
    );
}

/// A text whose windows hold more than [`FORWARD_TOKENS`] tokens runs in
/// several forward passes, which bound the memory a long input takes, and
/// its words come out as they do when another text shifts where the passes
/// split.
#[test]
fn a_text_over_one_forward_pass_runs_in_several_with_the_same_logits() {
    let tmp = tempfile::tempdir().unwrap();
    let mut tagger = tiny_tagger(tmp.path(), 64);
    let text = long_text(14_000);
    let input = TextWords::encode(&tagger.tokenizer, &text).unwrap();
    assert!(input.tokens.token_count() > FORWARD_TOKENS);

    let alone = tagger.predict_words(&[&text]).unwrap().remove(0);
    let shifted = tagger
        .predict_words(&["the cat sat on the mat", &text])
        .unwrap()
        .remove(1);
    assert_eq!(alone.len(), 14_000);
    for (word, other) in alone.iter().zip(&shifted) {
        assert_eq!((&word.text, word.start), (&other.text, other.start));
        let (logits, other) = (
            word.logits.as_ref().unwrap(),
            other.logits.as_ref().unwrap(),
        );
        for (a, b) in logits.iter().zip(other) {
            assert!((a - b).abs() < 1e-5, "{word:?} vs {other:?}");
        }
    }
}

/// Where windows overlap, a word takes the logits of the window that owns
/// it: of two windows sharing words, the earlier owns those whose first
/// subword lies in the first half of the shared tokens and the later the
/// rest, so each lies farther from its own window's cut.
#[test]
fn overlapping_windows_give_each_word_the_logits_of_the_window_that_owns_it() {
    let tmp = tempfile::tempdir().unwrap();
    // Windows of 16 tokens besides [CLS] and [SEP], sharing up to 4.
    let mut tagger = tiny_tagger(tmp.path(), 18);
    let text = long_text(40);
    let input = TextWords::encode(&tagger.tokenizer, &text).unwrap();
    let windows = &input.tokens.windows;
    assert!(windows.len() >= 3, "{} windows", windows.len());
    // Each window run on its own: its words' logits at their first subwords.
    let alone: Vec<Vec<Vec<f32>>> = windows
        .iter()
        .map(|window| {
            let batch = TokenBatch::from_encoded([&window.tokens.encoded]);
            let logits = tagger.sequence_logits(&batch).unwrap().remove(0);
            first_subwords(&window.tokens.word_ids, window.words.len())
                .into_iter()
                .map(|row| logits[row.unwrap() * 3..][..3].to_vec())
                .collect()
        })
        .collect();
    let logits_in = |k: usize, word: usize| &alone[k][word - windows[k].words.start];

    let merged = tagger.predict_words(&[&text]).unwrap().remove(0);
    let (mut to_earlier, mut to_later, mut disagreeing) = (0, 0, 0);
    for (word, prediction) in merged.iter().enumerate() {
        let holders: Vec<usize> = (0..windows.len())
            .filter(|&k| windows[k].words.contains(&word))
            .collect();
        let owner = match holders[..] {
            [only] => only,
            [earlier, later] => {
                let first_shared = windows[later].words.start;
                let shared = tokens_of(&windows[later], first_shared..windows[earlier].words.end);
                let before = tokens_of(&windows[later], first_shared..word);
                if common::max_abs_diff(logits_in(earlier, word), logits_in(later, word)) > 1e-3 {
                    disagreeing += 1;
                }
                if 2 * before < shared {
                    to_earlier += 1;
                    earlier
                } else {
                    to_later += 1;
                    later
                }
            }
            _ => panic!("word {word} is in windows {holders:?}"),
        };
        // Run in one batch with the other windows rather than alone, so
        // only equal up to the GEMMs' summation order.
        let diff =
            common::max_abs_diff(prediction.logits.as_ref().unwrap(), logits_in(owner, word));
        assert!(
            diff < 1e-5,
            "word {word}: {diff} from window {owner}'s logits"
        );
    }
    assert!(
        to_earlier > 0 && to_later > 0,
        "{to_earlier} and {to_later}"
    );
    assert!(disagreeing > 0, "the windows read shared words differently");
}

/// A text that fits `max_length` is one window, tokenized and run as one
/// sequence always was: the same tokens, and bit for bit the same logits
/// at each word's first subword. One token more and it takes two windows.
#[test]
fn a_text_that_fits_is_tagged_exactly_as_one_sequence() {
    let tmp = tempfile::tempdir().unwrap();
    let mut tagger = tiny_tagger(tmp.path(), 18);
    let text = "the big cats sat on a mat . the dogs ran fast on mat";
    let words: Vec<&str> = tagger
        .tokenizer
        .words(text)
        .unwrap()
        .into_iter()
        .map(|w| &text[w])
        .collect();
    let whole = tagger
        .tokenizer
        .encode_words_batch(std::slice::from_ref(&words))
        .unwrap()
        .remove(0);
    assert_eq!(whole.encoded.ids.len(), 18, "exactly max_length");
    let batch = TokenBatch::from_encoded([&whole.encoded]);
    let logits = tagger.sequence_logits(&batch).unwrap().remove(0);
    let expected: Vec<Vec<f32>> = first_subwords(&whole.word_ids, words.len())
        .into_iter()
        .map(|row| logits[row.unwrap() * 3..][..3].to_vec())
        .collect();

    let input = TextWords::encode(&tagger.tokenizer, text).unwrap();
    assert_eq!(input.tokens.windows.len(), 1);
    assert_eq!(input.tokens.windows[0].tokens, whole);
    let predicted = tagger.predict_words(&[text]).unwrap().remove(0);
    let predicted_logits: Vec<Vec<f32>> = predicted
        .iter()
        .map(|w| w.logits.clone().unwrap())
        .collect();
    assert_eq!(predicted_logits, expected);
    let tagged = tagger.tag_words(&[words]).unwrap().remove(0);
    for (tag, word) in tagged.iter().zip(&predicted) {
        assert_eq!(Some(&tagger.tags[tag.unwrap().tag]), word.tag.as_ref());
    }

    let longer = format!("{text} on");
    let input = TextWords::encode(&tagger.tokenizer, &longer).unwrap();
    assert_eq!(input.tokens.windows.len(), 2);
}

/// A word with more tokens than a window holds gets a window of its own,
/// cut to its first tokens: it is tagged at its first subword, and the
/// words around it are tagged too.
#[test]
fn a_word_longer_than_a_window_is_cut_and_still_tagged() {
    let tmp = tempfile::tempdir().unwrap();
    // Windows of 4 tokens; the long word has 9 (`cat` and 8 `##s`).
    let mut tagger = tiny_tagger(tmp.path(), 6);
    let long = format!("cat{}", "s".repeat(8));
    let text = format!("the dog {long} sat on the mat");
    let input = TextWords::encode(&tagger.tokenizer, &text).unwrap();
    let own = input
        .tokens
        .windows
        .iter()
        .find(|w| w.words == (2..3))
        .expect("a window of its own");
    assert_eq!(
        own.tokens.encoded.tokens,
        ["[CLS]", "cat", "##s", "##s", "##s", "[SEP]"]
    );
    let words = tagger.predict_words(&[&text]).unwrap().remove(0);
    assert_eq!(words.len(), 7);
    assert_eq!(words[2].text, long);
    assert!(words.iter().all(|w| w.tag.is_some()), "{words:?}");
    tagger.predict(&[&text]).unwrap();
    let sentence: Vec<&str> = text.split(' ').collect();
    let tagged = tagger.tag_words(&[sentence]).unwrap().remove(0);
    assert!(tagged.iter().all(Option::is_some), "{tagged:?}");
}

fn spans(tags: &[&str]) -> Vec<(String, usize, usize)> {
    entities(tags)
        .into_iter()
        .map(|e| (e.kind, e.start, e.end))
        .collect()
}

#[test]
fn entity_spans_follow_seqeval() {
    let s = |k: &str, a, b| (k.to_string(), a, b);
    // seqeval.metrics.sequence_labeling.get_entities (default mode):
    // an I- without a B- starts an entity, a type change splits one.
    assert_eq!(spans(&["I-PER", "I-PER", "O"]), [s("PER", 0, 2)]);
    assert_eq!(
        spans(&["B-PER", "I-LOC", "I-LOC"]),
        [s("PER", 0, 1), s("LOC", 1, 3)]
    );
    assert_eq!(
        spans(&["B-PER", "B-PER", "O", "I-ORG"]),
        [s("PER", 0, 1), s("PER", 1, 2), s("ORG", 3, 4)]
    );
    assert_eq!(spans(&["O", "B-LOC", "I-LOC"]), [s("LOC", 1, 3)]);
    assert_eq!(spans(&["O", "O"]), []);
}

#[test]
fn entity_scores_match_hand_computed_seqeval_values() {
    // Gold entities: PER[0,2), LOC[3,4) | ORG[0,1), PER[2,4) (at the end).
    let gold = vec![
        vec!["B-PER", "I-PER", "O", "B-LOC"],
        vec!["B-ORG", "O", "B-PER", "I-PER"],
    ];
    // Predicted: PER[0,2) (an I- start, counts as PER[0,2)), LOC[3,4) |
    // ORG[0,1), PER[2,3), LOC[3,4) (type change at the end).
    let predicted = vec![
        vec!["I-PER", "I-PER", "O", "B-LOC"],
        vec!["B-ORG", "O", "B-PER", "I-LOC"],
    ];
    let report = EntityReport::compute(&gold, &predicted);
    // seqeval: 3 correct of 5 predicted and 4 gold.
    let o = &report.overall;
    assert_eq!((o.gold, o.predicted, o.correct), (4, 5, 3));
    assert!((o.precision - 0.6).abs() < 1e-12);
    assert!((o.recall - 0.75).abs() < 1e-12);
    assert!((o.f1 - 2.0 * 0.6 * 0.75 / 1.35).abs() < 1e-12);
    let per = &report.per_type;
    assert_eq!(
        (per["PER"].gold, per["PER"].predicted, per["PER"].correct),
        (2, 2, 1)
    );
    assert!((per["PER"].f1 - 0.5).abs() < 1e-12);
    assert!((per["LOC"].precision - 0.5).abs() < 1e-12);
    assert!((per["LOC"].recall - 1.0).abs() < 1e-12);
    assert!((per["ORG"].f1 - 1.0).abs() < 1e-12);
    assert!((report.word_accuracy - 6.0 / 8.0).abs() < 1e-12);
    // Nothing predicted: 0, not NaN (seqeval's zero_division default).
    let none = EntityReport::compute(&gold, &vec![vec!["O"; 4]; 2]);
    assert_eq!(none.overall.f1, 0.0);
}

/// Mean cross-entropy over labeled tokens, in f64, written independently
/// of the library's.
fn reference_loss(logits: &[f32], labels: &[Option<usize>], classes: usize) -> f64 {
    let mut total = 0.0;
    let mut n = 0.0;
    for (row, label) in logits.chunks_exact(classes).zip(labels) {
        if let Some(y) = label {
            let lse = row.iter().map(|&z| (z as f64).exp()).sum::<f64>().ln();
            total += lse - row[*y] as f64;
            n += 1.0;
        }
    }
    total / n
}

#[test]
fn token_cross_entropy_gradient_and_ignored_tokens() {
    let classes = 4;
    let labels = [Some(1), None, Some(3), Some(0), None];
    let logits = Rng::new(3).vec(labels.len() * classes, 2.0);
    let mut grad = vec![1.0; logits.len()];
    let loss = token_cross_entropy(&mut grad, &logits, &labels, classes);
    assert!((loss as f64 - reference_loss(&logits, &labels, classes)).abs() < 1e-6);
    // Ignored tokens get exactly no gradient.
    assert!(grad[classes..2 * classes].iter().all(|&g| g == 0.0));
    assert!(grad[4 * classes..].iter().all(|&g| g == 0.0));
    check("token_cross_entropy", &logits, &grad, 100, |z| {
        reference_loss(z, &labels, classes)
    });
    // No labeled token: zero loss and gradient, not NaN.
    let mut grad = vec![1.0; classes];
    assert_eq!(
        token_cross_entropy(&mut grad, &logits[..classes], &[None], classes),
        0.0
    );
    assert!(grad.iter().all(|&g| g == 0.0));
}

/// The whole token classifier (encoder + dropout + per-token linear + loss)
/// against central differences, dropout on.
#[test]
fn token_classifier_gradients_match_central_differences() {
    let tmp = tempfile::tempdir().unwrap();
    let model_dir = tiny_model(tmp.path());
    let config = BertConfig::from_file(&model_dir.join("config.json")).unwrap();
    let ckpt = Checkpoint::open(&model_dir.join("model.safetensors")).unwrap();
    let classes = 3;
    let mut model = SequenceClassifier::new_token_classifier(
        CpuBackend::new(2),
        config,
        &ckpt,
        classes,
        0.2,
        5,
    )
    .unwrap();
    let batch = TokenBatch {
        ids: vec![2, 5, 6, 17, 7, 3, 2, 10, 11, 3],
        type_ids: vec![0; 10],
        offsets: vec![0, 6, 10],
    };
    let labels = [
        None,
        Some(2),
        Some(0),
        None,
        Some(2),
        None,
        None,
        Some(1),
        Some(2),
        None,
    ];
    let mode = ForwardMode {
        dropout_seed: Some(9),
    };
    let logits = model.forward(&batch, mode).unwrap();
    assert_eq!(logits.len(), batch.tokens() * classes);
    model.params.zero_grads(&model.backend);
    let loss = model.backward(&batch, Targets::Tokens(&labels), 1.0);
    assert!((loss as f64 - reference_loss(&logits, &labels, classes)).abs() < 1e-5);
    let exported = model.params.export(&model.backend);
    assert!(
        exported.iter().all(|(n, _, _)| !n.contains("pooler")),
        "a token classifier has no pooler"
    );
    for (name, _, value) in exported {
        let grad = model.params.grad_of(&model.backend, &name).unwrap();
        check(&name, &value, &grad, 10, |v| {
            model.params.set(&model.backend, &name, v).unwrap();
            let logits = model.forward(&batch, mode).unwrap();
            model.params.set(&model.backend, &name, &value).unwrap();
            reference_loss(&logits, &labels, classes)
        });
    }
}

fn bertrt(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_bertrt"))
        .args(args)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8(out.stdout).unwrap(),
        String::from_utf8(out.stderr).unwrap(),
    )
}

/// `bertrt finetune --task token-classification` of `model` on `train`,
/// scored on `valid`, into `out`, with `flags`.
fn finetune_tagger(
    model: &Path,
    train: &Path,
    valid: &Path,
    out: &Path,
    flags: &[&str],
) -> (bool, String, String) {
    let [model, train, valid, out] = [model, train, valid, out].map(|p| p.to_str().unwrap());
    let task = [
        "finetune",
        "--task",
        "token-classification",
        "--model",
        model,
        "--train",
        train,
        "--valid",
        valid,
        "--out",
        out,
    ];
    bertrt(&[&task[..], flags].concat())
}

const TRAIN_CONLL: &str = "\
the O\ncat B-ANIMAL\nsat O\non O\nthe O\nmat B-THING\n
a O\nbig B-ANIMAL\ndog I-ANIMAL\nran O\nfast O\n
the O\nsmall B-ANIMAL\ncats I-ANIMAL\nsat O\n
the O\ndog B-ANIMAL\nran O\nslow O\n
a O\ncat B-ANIMAL\nsat O\non O\na O\nmat B-THING\n
the O\ndogs B-ANIMAL\nran O\non O\nthe O\nmat B-THING\n";

/// Training scores dev on truncated sentences, as it trains, and says how
/// many were cut, since `bertrt eval` tags them whole.
#[test]
fn finetune_says_how_many_dev_sentences_max_length_cuts() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let model = tiny_model(dir);
    let train = write(dir, "train.conll", TRAIN_CONLL);
    let out = dir.join("ner");
    let (ok, _, err) = finetune_tagger(
        &model,
        &train,
        &train,
        &out,
        &["--epochs", "1", "--max-length", "7"],
    );
    assert!(ok, "{err}");
    // Three sentences have six words, over 7 tokens with [CLS] and [SEP].
    assert!(
        err.contains("3 of 6 validation sentences are longer than --max-length 7"),
        "{err}"
    );
}

/// A max length that leaves no room for words beside `[CLS]` and `[SEP]` is
/// refused before training, rather than training on no words and tagging
/// every word `O`; one token of room trains.
#[test]
fn finetune_refuses_a_max_length_without_room_for_words() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let model = tiny_model(dir);
    let train = write(dir, "train.conll", TRAIN_CONLL);
    let out = dir.join("ner");
    let (ok, _, err) = finetune_tagger(&model, &train, &train, &out, &["--max-length", "2"]);
    assert!(!ok);
    assert!(
        err.contains("max_length (--max-length) 2 leaves no room for text beside [CLS] and [SEP]")
            && err.contains("set it to at least 3"),
        "{err}"
    );
    assert!(!out.exists());
    let flags = ["--max-length", "3", "--epochs", "1", "--quiet"];
    let (ok, _, err) = finetune_tagger(&model, &train, &train, &out, &flags);
    assert!(ok, "{err}");
}

#[test]
fn finetune_eval_and_predict_entities_end_to_end() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let model = tiny_model(dir);
    // Every sentence ends with a full stop of its own, as CoNLL's do.
    let train_conll = TRAIN_CONLL.replace("\n\n", "\n. O\n\n") + ". O\n";
    let train = write(dir, "train.conll", &train_conll);
    let out = dir.join("ner");
    let (ok, stdout, err) = finetune_tagger(
        &model,
        &train,
        &train,
        &out,
        &[
            "--batch-size",
            "2",
            "--epochs",
            "40",
            "--lr",
            "3e-3",
            "--max-length",
            "32",
            "--quiet",
        ],
    );
    assert!(ok, "{err}");
    let summary: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(summary["best"]["metric"], "entity_f1");

    // Loss falls: the first epoch's mean step loss against the last's.
    let log = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    let losses: Vec<f64> = log
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter_map(|l| l["loss"].as_f64().filter(|_| l.get("eval").is_none()))
        .collect();
    let per_epoch = 3;
    let first: f64 = losses[..per_epoch].iter().sum::<f64>() / per_epoch as f64;
    let last: f64 = losses[losses.len() - per_epoch..].iter().sum::<f64>() / per_epoch as f64;
    assert!(last < 0.5 * first, "loss {first} -> {last}");

    // The artifact: BertForTokenClassification with HF names, no pooler.
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
    assert_eq!(config["architectures"][0], "BertForTokenClassification");
    assert_eq!(config["id2label"]["0"], "B-ANIMAL");
    assert_eq!(config["label2id"]["O"], 3);
    let meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("bertrt.json")).unwrap()).unwrap();
    assert_eq!(meta["task"], "token-classification");
    assert_eq!(meta["preprocessing"]["label_alignment"], "first-subword");
    assert_eq!(
        meta["labels"],
        serde_json::json!(["B-ANIMAL", "B-THING", "I-ANIMAL", "O"])
    );
    let bytes = std::fs::read(out.join("model.safetensors")).unwrap();
    let names: Vec<String> = safetensors::SafeTensors::deserialize(&bytes)
        .unwrap()
        .names()
        .into_iter()
        .map(String::from)
        .collect();
    assert!(names.contains(&"classifier.weight".to_string()));
    assert!(names.contains(&"bert.encoder.layer.1.attention.self.query.weight".to_string()));
    assert!(names.iter().all(|n| !n.contains("pooler")), "{names:?}");

    // eval reloads it and scores entities.
    let (ok, stdout, err) = bertrt(&[
        "eval",
        "--model",
        out.to_str().unwrap(),
        "--data",
        train.to_str().unwrap(),
    ]);
    assert!(ok, "{err}");
    let report: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    let f1 = report["entity_f1"].as_f64().unwrap();
    assert!(f1 > 0.8, "{report}");
    assert!(report["per_type"]["ANIMAL"]["f1"].as_f64().is_some());
    assert!(
        (f1 - meta["best"]["dev"]["entity_f1"].as_f64().unwrap()).abs() < 1e-9,
        "eval and training's dev score agree (every sentence fits --max-length)"
    );

    // predict: character offsets that slice the input to the entity text
    // ("thé" normalises to "the", and is one byte longer than 3 chars); a
    // full stop is a word of its own, as in training, and not part of the
    // entity before it.
    let lines = "the  big dog ran\nthé cat sat on the mat\n\nthé big dog.\n";
    let input = write(dir, "raw.txt", lines);
    let (ok, stdout, err) = bertrt(&[
        "predict",
        "--model",
        out.to_str().unwrap(),
        "--input",
        input.to_str().unwrap(),
    ]);
    assert!(ok, "{err}");
    let outputs: Vec<serde_json::Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(outputs.len(), 4);
    let mut found = 0;
    for (line, output) in lines.lines().zip(&outputs) {
        for entity in output["entities"].as_array().unwrap() {
            let (start, end) = (
                entity["start"].as_u64().unwrap() as usize,
                entity["end"].as_u64().unwrap() as usize,
            );
            let slice: String = line.chars().skip(start).take(end - start).collect();
            assert_eq!(slice, entity["text"].as_str().unwrap(), "{output}");
            let score = entity["score"].as_f64().unwrap();
            assert!(score > 0.0 && score <= 1.0);
            found += 1;
        }
    }
    assert!(found >= 2, "{outputs:?}");
    assert_eq!(outputs[0]["entities"][0]["text"], "big dog");
    assert_eq!(outputs[0]["entities"][0]["type"], "ANIMAL");
    assert_eq!(outputs[1]["entities"][0]["text"], "cat");
    assert_eq!(outputs[1]["entities"][0]["start"], 4);
    assert_eq!(outputs[1]["entities"][0]["end"], 7);
    assert_eq!(outputs[2]["entities"], serde_json::json!([]));
    assert_eq!(outputs[3]["entities"].as_array().unwrap().len(), 1);
    assert_eq!(outputs[3]["entities"][0]["text"], "big dog");
    assert_eq!(outputs[3]["entities"][0]["start"], 4);
    assert_eq!(outputs[3]["entities"][0]["end"], 11);
    // --words: the full stop is the line's last word.
    let (ok, stdout, err) = bertrt(&[
        "predict",
        "--model",
        out.to_str().unwrap(),
        "--input",
        input.to_str().unwrap(),
        "--words",
    ]);
    assert!(ok, "{err}");
    let words: serde_json::Value = serde_json::from_str(stdout.lines().nth(3).unwrap()).unwrap();
    let words: Vec<(&str, u64, u64, &str)> = words["words"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| {
            (
                w["text"].as_str().unwrap(),
                w["start"].as_u64().unwrap(),
                w["end"].as_u64().unwrap(),
                w["tag"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        words,
        [
            ("thé", 0, 3, "O"),
            ("big", 4, 7, "B-ANIMAL"),
            ("dog", 8, 11, "I-ANIMAL"),
            (".", 11, 12, "O")
        ]
    );
}

#[test]
fn unseen_dev_tag_stops_finetuning_with_its_line() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let model = tiny_model(dir);
    let train = write(dir, "train.conll", TRAIN_CONLL);
    let valid = write(
        dir,
        "valid.conll",
        "the O\ncat B-ANIMAL\n\na O\nmat B-PLACE\n",
    );
    let (ok, _, err) = finetune_tagger(
        &model,
        &train,
        &valid,
        &dir.join("out"),
        &["--max-length", "32", "--quiet"],
    );
    assert!(!ok);
    assert!(
        err.contains("valid.conll line 5") && err.contains("\"B-PLACE\""),
        "{err}"
    );
}

#[test]
fn label_all_subwords_trains_and_is_recorded() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let model = tiny_model(dir);
    let train = write(dir, "train.conll", TRAIN_CONLL);
    let out = dir.join("all");
    let (ok, _, err) = finetune_tagger(
        &model,
        &train,
        &train,
        &out,
        &[
            "--label-all-subwords",
            "--epochs",
            "1",
            "--max-length",
            "32",
            "--quiet",
        ],
    );
    assert!(ok, "{err}");
    let meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("bertrt.json")).unwrap()).unwrap();
    assert_eq!(meta["preprocessing"]["label_alignment"], "all-subwords");
    assert_eq!(meta["recipe"]["label_all_subwords"], true);

    // The flag belongs to token classification only.
    let (ok, _, err) = bertrt(&[
        "finetune",
        "--label-all-subwords",
        "--model",
        model.to_str().unwrap(),
        "--train",
        train.to_str().unwrap(),
        "--valid",
        train.to_str().unwrap(),
        "--out",
        dir.join("other").to_str().unwrap(),
    ]);
    assert!(!ok);
    assert!(
        err.contains("label_all_subwords applies to token-classification only"),
        "{err}"
    );
}

/// LoRA on a token classifier: saved merged, or as PEFT `TOKEN_CLS`
/// adapters (classifier saved whole, no pooler) that `predict` merges into
/// the base at load, to the same per-word logits bit for bit.
#[test]
fn lora_token_classifier_merged_and_unmerged_predict_alike() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let model = tiny_model(dir);
    let train = write(dir, "train.conll", TRAIN_CONLL);
    let finetune = |out: &str, extra: &[&str]| {
        let out = dir.join(out);
        let mut args = vec![
            "finetune",
            "--task",
            "token-classification",
            "--model",
            model.to_str().unwrap(),
            "--train",
            train.to_str().unwrap(),
            "--valid",
            train.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
            "--epochs",
            "2",
            "--lr",
            "1e-2",
            "--max-length",
            "32",
            "--lora-rank",
            "4",
            "--lora-targets",
            "value,intermediate",
            "--quiet",
        ];
        args.extend_from_slice(extra);
        let (ok, _, err) = bertrt(&args);
        assert!(ok, "{err}");
        out
    };
    let merged = finetune("merged", &["--merge-lora"]);
    let adapters = finetune("adapters", &[]);
    assert!(!adapters.join("model.safetensors").exists());
    let config: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(adapters.join("adapter_config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(config["task_type"], "TOKEN_CLS");
    assert_eq!(config["modules_to_save"], serde_json::json!(["classifier"]));
    let text = "the big cat sat\na small dog ran fast\n";
    let from_merged = word_logits(&merged, dir, text);
    assert!(!from_merged.is_empty());
    assert_eq!(from_merged, word_logits(&adapters, dir, text));
}

/// Per-word logits of `model` for `text` (`predict --words`).
fn word_logits(model: &Path, dir: &Path, text: &str) -> Vec<f32> {
    let input = write(dir, "words.txt", text);
    let (ok, stdout, err) = bertrt(&[
        "predict",
        "--model",
        model.to_str().unwrap(),
        "--words",
        "--input",
        input.to_str().unwrap(),
    ]);
    assert!(ok, "{err}");
    stdout
        .lines()
        .flat_map(|l| {
            let line: serde_json::Value = serde_json::from_str(l).unwrap();
            line["words"]
                .as_array()
                .unwrap()
                .iter()
                .flat_map(|w| w["logits"].as_array().unwrap().clone())
                .map(|v| v.as_f64().unwrap() as f32)
                .collect::<Vec<_>>()
        })
        .collect()
}

/// Gradient accumulation averages over labeled tokens like one big batch:
/// micro-batches of 2 sentences x 2 train the same model as batches of 4
/// (no dropout, same order), although the sentences differ in length.
#[test]
fn gradient_accumulation_weights_micro_batches_by_labeled_tokens() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let mut config = common::tiny_config();
    config["hidden_dropout_prob"] = 0.0.into();
    config["attention_probs_dropout_prob"] = 0.0.into();
    let model = dir.join("tiny");
    common::write_tiny_model(
        &model,
        &config,
        &common::safetensors_bytes(&common::tiny_tensors(1), Dtype::F32),
    );
    let train = write(dir, "train.conll", TRAIN_CONLL);
    let run = |out: &str, batch: &str, accum: &str| {
        let out = dir.join(out);
        let (ok, _, err) = finetune_tagger(
            &model,
            &train,
            &train,
            &out,
            &[
                "--batch-size",
                batch,
                "--grad-accum",
                accum,
                "--head-dropout",
                "0",
                "--no-bucketing",
                "--epochs",
                "2",
                "--lr",
                "1e-2",
                "--metric",
                "loss",
                "--max-length",
                "32",
                "--quiet",
            ],
        );
        assert!(ok, "{err}");
        out
    };
    let whole = run("whole", "4", "1");
    let accumulated = run("accumulated", "2", "2");
    let text = "the cat sat on the mat\na big dog ran fast\nthe small cats sat\n";
    let (a, b) = (
        word_logits(&whole, dir, text),
        word_logits(&accumulated, dir, text),
    );
    let diff = common::max_abs_diff(&a, &b);
    assert!(diff < 1e-4, "max |logit difference| {diff}");
    let moved = common::max_abs_diff(&a, &word_logits(&model_before(dir, &model), dir, text));
    assert!(moved > 1e-2, "training changed the model ({moved})");
}

/// The tiny model as a token classifier with its fresh head, practically
/// untrained (lr 1e-12): the baseline that real training must move away
/// from, so that agreeing runs are not agreeing by standing still.
fn model_before(dir: &Path, model: &Path) -> PathBuf {
    let train = dir.join("train.conll");
    let out = dir.join("before");
    let (ok, _, err) = finetune_tagger(
        model,
        &train,
        &train,
        &out,
        &[
            "--batch-size",
            "8",
            "--epochs",
            "1",
            "--lr",
            "1e-12",
            "--max-length",
            "32",
            "--quiet",
        ],
    );
    assert!(ok, "{err}");
    out
}
