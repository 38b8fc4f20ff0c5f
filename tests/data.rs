//! Reading labeled data: formats, every bad input's message (file, line,
//! column, what to do), labels, and batch order.

use std::path::{Path, PathBuf};

use bertrt::data::{
    epoch_batches, eval_batches, read_dataset, sha256_hex, DataSpec, Dataset, LabelSet,
};
use bertrt::rng::Rng;
use tempfile::TempDir;

/// Writes `contents` to `dir/name` and returns the path.
fn write(dir: &TempDir, name: &str, contents: impl AsRef<[u8]>) -> PathBuf {
    let path = dir.path().join(name);
    std::fs::write(&path, contents).expect("writing a temp file");
    path
}

fn read(path: &Path) -> Dataset {
    read_dataset(path, &DataSpec::default())
        .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

/// The error message of reading `path`, which must fail.
fn error(path: &Path, spec: &DataSpec) -> String {
    match read_dataset(path, spec) {
        Ok(d) => panic!(
            "{} read {} examples, expected an error",
            path.display(),
            d.examples.len()
        ),
        Err(e) => e.to_string(),
    }
}

fn assert_mentions(message: &str, parts: &[&str]) {
    for part in parts {
        assert!(
            message.contains(part),
            "{message:?} does not mention {part:?}"
        );
    }
}

fn skipping() -> DataSpec {
    DataSpec {
        skip_bad_rows: true,
        ..DataSpec::default()
    }
}

#[test]
fn csv_with_quoted_commas_quotes_and_newlines() {
    let dir = TempDir::new().unwrap();
    let path = write(
        &dir,
        "train.csv",
        "id,text,label\n1,\"Hello, world\",pos\n2,\"two\nlines, \"\"quoted\"\"\",neg\n3,plain,pos\n",
    );
    let d = read(&path);
    let texts: Vec<&str> = d.examples.iter().map(|e| e.text.as_str()).collect();
    assert_eq!(texts, ["Hello, world", "two\nlines, \"quoted\"", "plain"]);
    let lines: Vec<usize> = d.examples.iter().map(|e| e.line).collect();
    assert_eq!(lines, [2, 3, 5], "a record's line is where it starts");
    assert_eq!(d.examples[1].label, "neg");
    assert_eq!(d.skipped, 0);
    assert_eq!(d.path, path);
}

#[test]
fn csv_with_crlf_bom_and_blank_lines() {
    let dir = TempDir::new().unwrap();
    let path = write(
        &dir,
        "a.CSV",
        "\u{feff}text,label\r\nfirst,a\r\n\r\n\"two\r\nlines\",b\r\nlast,c\r\n",
    );
    let d = read(&path);
    let rows: Vec<(&str, &str, usize)> = d
        .examples
        .iter()
        .map(|e| (e.text.as_str(), e.label.as_str(), e.line))
        .collect();
    assert_eq!(
        rows,
        [
            ("first", "a", 2),
            ("two\r\nlines", "b", 4),
            ("last", "c", 6)
        ]
    );
}

#[test]
fn tsv_with_text_pairs_and_custom_columns() {
    let dir = TempDir::new().unwrap();
    let path = write(
        &dir,
        "nli.tsv",
        "premise\thypothesis\tgold\nA man sleeps, soundly.\tA person rests.\tentailment\n\"tab\tinside\"\tx\tneutral\n",
    );
    let spec = DataSpec {
        text_column: "premise".into(),
        label_column: "gold".into(),
        text_pair_column: Some("hypothesis".into()),
        ..DataSpec::default()
    };
    let d = read_dataset(&path, &spec).unwrap();
    assert_eq!(d.examples[0].text, "A man sleeps, soundly.");
    assert_eq!(d.examples[0].text_pair.as_deref(), Some("A person rests."));
    assert_eq!(d.examples[1].text, "tab\tinside");
    assert_eq!(d.examples[1].label, "neutral");
}

#[test]
fn jsonl_with_integer_and_boolean_labels() {
    let dir = TempDir::new().unwrap();
    let path = write(
        &dir,
        "d.jsonl",
        "{\"text\": \"a\", \"label\": 1}\n\n  \n{\"text\": \"b\", \"label\": true}\r\n{\"text\": \"c\", \"label\": \" spam \"}\n",
    );
    let d = read(&path);
    let labels: Vec<(&str, usize)> = d
        .examples
        .iter()
        .map(|e| (e.label.as_str(), e.line))
        .collect();
    assert_eq!(labels, [("1", 1), ("true", 4), ("spam", 5)]);
    assert!(d.examples.iter().all(|e| e.text_pair.is_none()));
}

/// Regression targets come as JSON numbers (VADER's `score`).
#[test]
fn jsonl_with_float_labels_reads_numeric_targets() {
    let dir = TempDir::new().unwrap();
    let path = write(
        &dir,
        "d.jsonl",
        "{\"text\": \"a\", \"label\": 2.25}\n{\"text\": \"b\", \"label\": -1e-3}\n{\"text\": \"c\", \"label\": 3}\n",
    );
    let spec = DataSpec {
        numeric_labels: true,
        ..DataSpec::default()
    };
    let d = read_dataset(&path, &spec).unwrap();
    assert_eq!(d.numeric_labels().unwrap(), [2.25, -1e-3, 3.0]);
}

#[test]
fn json_extension_reads_json_lines() {
    let dir = TempDir::new().unwrap();
    let path = write(&dir, "d.json", "{\"text\": \"a\", \"label\": \"x\"}\n");
    assert_eq!(read(&path).examples.len(), 1);
}

#[test]
fn checksum_is_sha256_of_the_file_bytes() {
    assert_eq!(
        sha256_hex(b"abc"),
        "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    );
    let dir = TempDir::new().unwrap();
    let contents = "text,label\nx,y\n";
    let path = write(&dir, "c.csv", contents);
    assert_eq!(read(&path).sha256, sha256_hex(contents.as_bytes()));
}

#[test]
fn unknown_extension_lists_accepted_formats() {
    let dir = TempDir::new().unwrap();
    let path = write(&dir, "data.parquet", "x");
    let message = error(&path, &DataSpec::default());
    assert_mentions(
        &message,
        &[
            "data.parquet",
            ".parquet",
            ".csv",
            ".tsv",
            ".jsonl",
            ".json",
        ],
    );
    let bare = write(&dir, "data", "x");
    assert_mentions(
        &error(&bare, &DataSpec::default()),
        &["data", "extension", ".csv"],
    );
}

#[test]
fn missing_file_names_the_file() {
    let dir = TempDir::new().unwrap();
    let path = dir.path().join("absent.csv");
    assert_mentions(&error(&path, &DataSpec::default()), &["absent.csv"]);
}

#[test]
fn missing_csv_column_lists_the_columns_found() {
    let dir = TempDir::new().unwrap();
    let path = write(&dir, "m.csv", "sentence,label\nhi,a\n");
    let message = error(&path, &DataSpec::default());
    assert_mentions(
        &message,
        &[
            "m.csv",
            "line 1",
            "\"text\"",
            "\"sentence\"",
            "\"label\"",
            "--text-column",
        ],
    );

    let path = write(&dir, "l.tsv", "text\tclass\nhi\ta\n");
    let message = error(&path, &DataSpec::default());
    assert_mentions(
        &message,
        &[
            "l.tsv",
            "line 1",
            "\"label\"",
            "\"class\"",
            "--label-column",
        ],
    );

    let spec = DataSpec {
        text_pair_column: Some("hypothesis".into()),
        ..DataSpec::default()
    };
    let path = write(&dir, "p.csv", "text,label\nhi,a\n");
    assert_mentions(
        &error(&path, &spec),
        &["p.csv", "\"hypothesis\"", "--text-pair-column"],
    );
}

#[test]
fn duplicate_csv_column_is_an_error() {
    let dir = TempDir::new().unwrap();
    let path = write(&dir, "dup.csv", "text,label,text\nhi,a,ho\n");
    assert_mentions(
        &error(&path, &DataSpec::default()),
        &["dup.csv", "line 1", "\"text\"", "1, 3"],
    );
}

#[test]
fn missing_jsonl_key_lists_the_keys_on_that_line() {
    let dir = TempDir::new().unwrap();
    let path = write(
        &dir,
        "k.jsonl",
        "{\"text\": \"a\", \"label\": \"x\"}\n{\"sentence\": \"b\", \"label\": \"x\"}\n",
    );
    let message = error(&path, &DataSpec::default());
    assert_mentions(
        &message,
        &[
            "k.jsonl",
            "line 2",
            "\"text\"",
            "\"sentence\"",
            "--text-column",
            "--skip-bad-rows",
        ],
    );

    let path = write(&dir, "l.jsonl", "{\"text\": \"a\", \"y\": 0}\n");
    assert_mentions(
        &error(&path, &DataSpec::default()),
        &["l.jsonl", "line 1", "\"label\"", "\"y\"", "--label-column"],
    );
}

#[test]
fn empty_or_missing_text_names_the_line() {
    let dir = TempDir::new().unwrap();
    let csv = write(&dir, "e.csv", "text,label\nok,a\n\"  \",b\n");
    assert_mentions(
        &error(&csv, &DataSpec::default()),
        &["e.csv", "line 3", "text", "empty", "--skip-bad-rows"],
    );

    let jsonl = write(
        &dir,
        "e.jsonl",
        "{\"text\": \"ok\", \"label\": \"a\"}\n{\"text\": null, \"label\": \"a\"}\n",
    );
    assert_mentions(
        &error(&jsonl, &DataSpec::default()),
        &["e.jsonl", "line 2", "\"text\"", "null"],
    );

    let number = write(&dir, "n.jsonl", "{\"text\": 5, \"label\": \"a\"}\n");
    assert_mentions(
        &error(&number, &DataSpec::default()),
        &["n.jsonl", "line 1", "\"text\"", "string"],
    );
}

#[test]
fn empty_or_missing_label_names_the_line() {
    let dir = TempDir::new().unwrap();
    let csv = write(&dir, "e.csv", "text,label\nok,a\nfine,\n");
    assert_mentions(
        &error(&csv, &DataSpec::default()),
        &["e.csv", "line 3", "label", "empty"],
    );

    let jsonl = write(&dir, "f.jsonl", "{\"text\": \"a\", \"label\": 0.5}\n");
    assert_mentions(
        &error(&jsonl, &DataSpec::default()),
        &[
            "f.jsonl",
            "line 1",
            "label",
            "0.5",
            "string, an integer or a boolean",
        ],
    );
}

#[test]
fn short_csv_record_names_its_line() {
    let dir = TempDir::new().unwrap();
    let path = write(&dir, "s.csv", "id,text,label\n1,ok,a\n2,no label\n");
    assert_mentions(
        &error(&path, &DataSpec::default()),
        &["s.csv", "line 3", "2 fields", "header has 3"],
    );
}

#[test]
fn invalid_json_names_the_line() {
    let dir = TempDir::new().unwrap();
    let path = write(
        &dir,
        "bad.jsonl",
        "{\"text\": \"a\", \"label\": \"x\"}\n{\"text\": \"b\", \n",
    );
    assert_mentions(
        &error(&path, &skipping()),
        &["bad.jsonl", "line 2", "invalid JSON at column 14"],
    );

    let array = write(&dir, "arr.json", "[{\"text\": \"a\", \"label\": \"x\"}]\n");
    assert_mentions(
        &error(&array, &DataSpec::default()),
        &["arr.json", "line 1", "array", "jq"],
    );

    let scalar = write(&dir, "str.jsonl", "\"just text\"\n");
    assert_mentions(
        &error(&scalar, &DataSpec::default()),
        &["str.jsonl", "line 1", "object"],
    );
}

#[test]
fn invalid_utf8_names_the_line() {
    let dir = TempDir::new().unwrap();
    let path = write(&dir, "latin1.csv", b"text,label\nok,a\ncaf\xe9,b\n");
    assert_mentions(
        &error(&path, &DataSpec::default()),
        &["latin1.csv", "line 3", "UTF-8"],
    );
}

#[test]
fn empty_files_and_files_without_examples_are_errors() {
    let dir = TempDir::new().unwrap();
    for name in ["empty.csv", "empty.jsonl"] {
        let path = write(&dir, name, "\n  \n");
        assert_mentions(&error(&path, &DataSpec::default()), &[name, "empty"]);
    }
    let header_only = write(&dir, "h.csv", "text,label\n");
    assert_mentions(
        &error(&header_only, &DataSpec::default()),
        &["h.csv", "no examples"],
    );
}

#[test]
fn skip_bad_rows_skips_and_counts() {
    let dir = TempDir::new().unwrap();
    let csv = write(
        &dir,
        "s.csv",
        "text,label\nok,a\n,b\nfine,\ntoo,many,fields\nalso ok,b\n",
    );
    let d = read_dataset(&csv, &skipping()).unwrap();
    assert_eq!(d.skipped, 3);
    let kept: Vec<(&str, usize)> = d
        .examples
        .iter()
        .map(|e| (e.text.as_str(), e.line))
        .collect();
    assert_eq!(kept, [("ok", 2), ("also ok", 6)]);

    let jsonl = write(
        &dir,
        "s.jsonl",
        "{\"text\": \"a\", \"label\": \"x\"}\n{\"label\": \"x\"}\n{\"text\": \"b\"}\n{\"text\": \"\", \"label\": \"x\"}\n{\"text\": \"c\", \"label\": [1]}\n",
    );
    let d = read_dataset(&jsonl, &skipping()).unwrap();
    assert_eq!((d.examples.len(), d.skipped), (1, 4));
}

#[test]
fn skipping_every_row_explains_the_first() {
    let dir = TempDir::new().unwrap();
    let path = write(
        &dir,
        "w.jsonl",
        "{\"sentence\": \"a\", \"label\": \"x\"}\n{\"sentence\": \"b\", \"label\": \"y\"}\n",
    );
    let message = error(&path, &skipping());
    assert_mentions(
        &message,
        &[
            "w.jsonl",
            "every row (2)",
            "the first, line 1",
            "\"sentence\"",
        ],
    );
}

fn multi_label(delimiter: &str) -> DataSpec {
    DataSpec {
        multi_label_delimiter: Some(delimiter.into()),
        ..DataSpec::default()
    }
}

#[test]
fn multi_label_rows_from_json_lists_and_delimited_strings() {
    let dir = TempDir::new().unwrap();
    let jsonl = write(
        &dir,
        "train.jsonl",
        concat!(
            r#"{"text": "a", "label": ["sports", " politics ", "sports"]}"#,
            "\n",
            r#"{"text": "b", "label": []}"#,
            "\n",
            r#"{"text": "c", "label": "tech|sports|"}"#,
            "\n",
            r#"{"text": "d", "label": [1, true]}"#,
            "\n",
        ),
    );
    let d = read_dataset(&jsonl, &multi_label("|")).unwrap();
    let sets: Vec<Vec<String>> = d.examples.iter().map(|e| e.labels.clone()).collect();
    assert_eq!(
        sets,
        [
            vec!["sports", "politics"],
            vec![],
            vec!["tech", "sports"],
            vec!["1", "true"]
        ]
        .map(|s| s.iter().map(|l| l.to_string()).collect::<Vec<_>>())
    );
    // Labels sorted, over every row's set.
    let set = LabelSet::from_training_label_sets(&d);
    assert_eq!(set.labels(), ["1", "politics", "sports", "tech", "true"]);
    assert_eq!(set.encode_label_sets(&d).unwrap()[0], [2, 1]);

    let csv = write(&dir, "dev.csv", "text,label\nx,sports;tech\ny,\nz,golf\n");
    let dev = read_dataset(&csv, &multi_label(";")).unwrap();
    assert_eq!(dev.examples[0].labels, ["sports", "tech"]);
    assert!(
        dev.examples[1].labels.is_empty(),
        "an empty field is no label"
    );
    let err = set.encode_label_sets(&dev).unwrap_err().to_string();
    assert_mentions(&err, &["dev.csv", "line 4", "\"golf\""]);
}

#[test]
fn bad_label_lists_name_the_line() {
    let dir = TempDir::new().unwrap();
    let path = write(
        &dir,
        "train.jsonl",
        "{\"text\": \"a\", \"label\": [\"x\", \" \"]}\n",
    );
    let err = error(&path, &multi_label("|"));
    assert_mentions(&err, &["train.jsonl", "line 1", "item 2", "empty"]);
    let path = write(
        &dir,
        "nested.jsonl",
        "{\"text\": \"a\", \"label\": [\"x\", {\"y\": 1}]}\n",
    );
    let err = error(&path, &multi_label("|"));
    assert_mentions(&err, &["line 1", "item 2", "an object"]);
    // A list without multi-label mode says how to train on it.
    let path = write(
        &dir,
        "single.jsonl",
        "{\"text\": \"a\", \"label\": [\"x\"]}\n",
    );
    let err = error(&path, &DataSpec::default());
    assert_mentions(&err, &["line 1", "--task multi-label"]);
}

fn dataset_with_labels(labels: &[&str]) -> Dataset {
    Dataset {
        path: PathBuf::from("dev.csv"),
        examples: labels
            .iter()
            .enumerate()
            .map(|(i, l)| bertrt::data::Example {
                text: format!("text {i}"),
                text_pair: None,
                label: l.to_string(),
                labels: Vec::new(),
                line: i + 2,
            })
            .collect(),
        skipped: 0,
        sha256: String::new(),
    }
}

#[test]
fn labels_sort_numerically_when_all_are_integers() {
    let set = LabelSet::from_training(&dataset_with_labels(&["10", "2", "-1", "2", "0"]));
    assert_eq!(set.labels(), ["-1", "0", "2", "10"]);
    assert_eq!(set.len(), 4);
    assert_eq!(set.index("10"), Some(3));
    assert_eq!(set.index("3"), None);

    let set = LabelSet::from_training(&dataset_with_labels(&["spam", "ham", "10", "2", "ham"]));
    assert_eq!(set.labels(), ["10", "2", "ham", "spam"]);
}

#[test]
fn encode_maps_labels_and_rejects_unseen_ones() {
    let train = LabelSet::from_training(&dataset_with_labels(&["pos", "neg", "pos"]));
    assert_eq!(
        train.encode(&dataset_with_labels(&["pos", "neg"])).unwrap(),
        [1, 0]
    );

    let dev = dataset_with_labels(&["pos", "neutral", "neg", "mixed"]);
    let message = train.encode(&dev).unwrap_err().to_string();
    assert_mentions(
        &message,
        &[
            "dev.csv",
            "line 3",
            "\"neutral\"",
            "1 more",
            "\"neg\"",
            "\"pos\"",
        ],
    );
}

#[test]
fn from_labels_keeps_order_and_rejects_duplicates() {
    let set = LabelSet::from_labels(vec!["b".into(), "a".into()]).unwrap();
    assert_eq!(set.labels(), ["b", "a"]);
    let message = LabelSet::from_labels(vec!["a".into(), "b".into(), "a".into()])
        .unwrap_err()
        .to_string();
    assert_mentions(&message, &["\"a\"", "more than once"]);
    assert!(LabelSet::from_labels(vec![" ".into()]).is_err());
}

fn random_lengths(n: usize, seed: u64) -> Vec<usize> {
    let mut rng = Rng::new(seed);
    (0..n).map(|_| 4 + rng.below(124)).collect()
}

fn assert_covers_once(batches: &[Vec<usize>], n: usize) {
    let mut all: Vec<usize> = batches.iter().flatten().copied().collect();
    all.sort_unstable();
    assert_eq!(all, (0..n).collect::<Vec<_>>(), "every index exactly once");
}

#[test]
fn epoch_batches_are_seeded_complete_permutations() {
    let lengths = random_lengths(1003, 1);
    for bucketed in [false, true] {
        let a = epoch_batches(&lengths, 32, 7, 0, bucketed);
        assert_eq!(
            a,
            epoch_batches(&lengths, 32, 7, 0, bucketed),
            "same seed and epoch"
        );
        assert_ne!(
            a,
            epoch_batches(&lengths, 32, 7, 1, bucketed),
            "epochs differ"
        );
        assert_ne!(
            a,
            epoch_batches(&lengths, 32, 8, 0, bucketed),
            "seeds differ"
        );
        assert_covers_once(&a, lengths.len());
        assert_eq!(a.len(), 32, "31 full batches and the partial one");
        assert_eq!(a.iter().filter(|b| b.len() != 32).count(), 1);
        assert_eq!(a.iter().map(Vec::len).min(), Some(1003 % 32));
    }
    assert!(epoch_batches(&[], 8, 0, 0, true).is_empty());
}

/// Pad tokens when every batch is padded to its longest example.
fn padding(batches: &[Vec<usize>], lengths: &[usize]) -> usize {
    batches
        .iter()
        .map(|b| {
            let max = b.iter().map(|&i| lengths[i]).max().unwrap_or(0);
            b.iter().map(|&i| max - lengths[i]).sum::<usize>()
        })
        .sum()
}

#[test]
fn bucketing_reduces_padding() {
    let lengths = random_lengths(5000, 2);
    let plain = padding(&epoch_batches(&lengths, 16, 3, 0, false), &lengths);
    let bucketed = padding(&epoch_batches(&lengths, 16, 3, 0, true), &lengths);
    assert!(
        bucketed * 5 < plain,
        "bucketed padding {bucketed} vs unbucketed {plain}"
    );
}

#[test]
fn eval_batches_run_longest_first() {
    let lengths = [3, 9, 1, 9, 5];
    let batches = eval_batches(&lengths, 2);
    assert_eq!(batches, [vec![1, 3], vec![4, 0], vec![2]]);
    let lengths = random_lengths(777, 4);
    let batches = eval_batches(&lengths, 64);
    assert_covers_once(&batches, lengths.len());
    let flat: Vec<usize> = batches.iter().flatten().map(|&i| lengths[i]).collect();
    assert!(flat.windows(2).all(|w| w[0] >= w[1]));
}

/// The reference data sets in `../shared/data`, when this checkout has them.
fn shared(relative: &str) -> Option<PathBuf> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../shared/data")
        .join(relative);
    if path.exists() {
        Some(path)
    } else {
        eprintln!("skipped: {} not present", path.display());
        None
    }
}

#[test]
fn reads_sms_spam() {
    let Some(path) = shared("sms-spam/sms_spam.jsonl") else {
        return;
    };
    let d = read(&path);
    assert_eq!((d.examples.len(), d.skipped), (5574, 0));
    let labels = LabelSet::from_training(&d);
    assert_eq!(labels.labels(), ["ham", "spam"]);
    let encoded = labels.encode(&d).unwrap();
    assert_eq!(encoded.iter().filter(|&&c| c == 1).count(), 747);
    assert_eq!(d.examples[1].text, "Ok lar... Joking wif u oni...");
    assert_eq!(d.examples[1].line, 2);
    assert_eq!(d.sha256, published_sha256("sms-spam/sms_spam.jsonl"));
}

#[test]
fn reads_vader_tweets() {
    let Some(path) = shared("vader-sentiment-4domains/tweets.jsonl") else {
        return;
    };
    let d = read(&path);
    assert_eq!(d.examples.len(), 4200);
    let labels = LabelSet::from_training(&d);
    assert_eq!(labels.labels(), ["negative", "neutral", "positive"]);
    assert_eq!(
        d.sha256,
        published_sha256("vader-sentiment-4domains/tweets.jsonl")
    );
}

/// The checksum `../shared/data/SHA256SUMS` gives for `relative`.
fn published_sha256(relative: &str) -> String {
    let sums = Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/data/SHA256SUMS");
    let sums = std::fs::read_to_string(&sums).expect("reading SHA256SUMS");
    sums.lines()
        .find_map(|l| l.strip_suffix(relative).map(|h| h.trim().to_string()))
        .unwrap_or_else(|| panic!("{relative} not in SHA256SUMS"))
}
