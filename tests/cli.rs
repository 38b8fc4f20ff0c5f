//! The `bertrt` binary end to end on all-MiniLM-L6-v2.

mod common;

use std::io::Write;
use std::process::{Command, Stdio};

use common::{cosine, Fixture};

fn bertrt(args: &[&str], stdin: &str) -> (bool, String, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_bertrt"))
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // A command that fails early (a bad model directory) may exit before
    // reading its input; that is its answer, not the test's failure.
    let fed = child.stdin.take().unwrap().write_all(stdin.as_bytes());
    if let Err(error) = fed {
        assert_eq!(error.kind(), std::io::ErrorKind::BrokenPipe, "{error}");
    }
    let out = child.wait_with_output().unwrap();
    (
        out.status.success(),
        String::from_utf8(out.stdout).unwrap(),
        String::from_utf8(out.stderr).unwrap(),
    )
}

fn fixture_texts() -> Vec<String> {
    common::fixture_sentences()
        .iter()
        .map(|s| s["text"].as_str().unwrap().to_string())
        .collect()
}

fn embeddings(stdout: &str) -> Vec<Vec<f32>> {
    stdout
        .lines()
        .map(|line| {
            let v: serde_json::Value = serde_json::from_str(line).unwrap();
            v["embedding"]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_f64().unwrap() as f32)
                .collect()
        })
        .collect()
}

/// `bertrt embed` of the fixture sentences (with `extra` flags) against
/// PyTorch's fp32 mean pooling: the worst cosine.
fn embed_fixture_worst_cosine(extra: &[&str]) -> f64 {
    let model = common::minilm_dir();
    let fixture = Fixture::open("forward.safetensors");
    let texts = fixture_texts();
    // One text has newlines inside, so feed JSON lines; small batches check
    // that order survives batching.
    let input: String = texts
        .iter()
        .map(|t| serde_json::to_string(t).unwrap() + "\n")
        .collect();
    let model_arg = model.to_str().unwrap();
    let mut args = vec![
        "embed",
        "--model",
        model_arg,
        "--jsonl",
        "--batch-size",
        "5",
    ];
    args.extend_from_slice(extra);
    let (ok, stdout, stderr) = bertrt(&args, &input);
    assert!(ok, "{stderr}");
    let got = embeddings(&stdout);
    assert_eq!(got.len(), texts.len());
    got.iter()
        .enumerate()
        .map(|(i, e)| cosine(e, &fixture.get(&format!("s{i}.mean_pooled")).1))
        .fold(1.0, f64::min)
}

#[test]
fn embed_matches_pytorch_mean_pooling() {
    let worst = embed_fixture_worst_cosine(&[]);
    assert!(worst >= 0.99999, "worst cosine {worst}");
}

#[test]
fn embed_bf16_stays_close_to_pytorch_fp32() {
    let worst = embed_fixture_worst_cosine(&["--dtype", "bf16"]);
    eprintln!("--dtype bf16: worst cosine to PyTorch fp32 {worst:.6}");
    assert!(worst >= 0.9995, "worst cosine {worst}");
    let (ok, _, stderr) = bertrt(
        &["embed", "--model", "unused", "--int8", "--dtype", "bf16"],
        "",
    );
    assert!(!ok && stderr.contains("--dtype"), "{stderr}");
}

#[test]
fn embed_on_cuda_is_fp32_and_an_unusable_device_says_why() {
    for numerics in [["--dtype", "bf16"].as_slice(), &["--int8"]] {
        let mut args = vec!["embed", "--model", "unused", "--device", "cuda"];
        args.extend_from_slice(numerics);
        let (ok, _, stderr) = bertrt(&args, "");
        assert!(!ok && stderr.contains("CPU paths"), "{stderr}");
    }
    // No machine has a device 99; the device is checked before the model.
    let (ok, _, stderr) = bertrt(&["embed", "--model", "unused", "--device", "cuda:99"], "");
    assert!(
        !ok && stderr.contains("cannot use --device cuda:99: "),
        "{stderr}"
    );
}

#[test]
fn embed_plain_lines_keeps_order_and_empty_lines() {
    let model = common::minilm_dir();
    let model_arg = model.to_str().unwrap();
    let (ok, stdout, stderr) = bertrt(
        &[
            "embed",
            "--model",
            model_arg,
            "--normalize",
            "--batch-size",
            "2",
        ],
        "first text\n\nthird text\r\nfourth",
    );
    assert!(ok, "{stderr}");
    let got = embeddings(&stdout);
    assert_eq!(got.len(), 4);
    for e in &got {
        let norm: f32 = e.iter().map(|x| x * x).sum::<f32>().sqrt();
        assert!((norm - 1.0).abs() < 1e-5);
    }
    // The empty line embeds like an empty text, i.e. like the fixture's "".
    let (_, alone, _) = bertrt(&["embed", "--model", model_arg, "--normalize"], "\n");
    assert!(cosine(&got[1], &embeddings(&alone)[0]) > 0.999999);
}

#[test]
fn tokenize_prints_ids_and_tokens() {
    let model = common::minilm_dir();
    let (ok, stdout, stderr) = bertrt(
        &["tokenize", "--model", model.to_str().unwrap()],
        "The quick brown fox jumps over the lazy dog.\n",
    );
    assert!(ok, "{stderr}");
    let v: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    assert_eq!(v["tokens"][0], "[CLS]");
    assert_eq!(v["tokens"][1], "the");
    let fixture = Fixture::open("forward.safetensors");
    let want: Vec<u32> = fixture.ids("s0.input_ids");
    let got: Vec<u32> = v["ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect();
    assert_eq!(got, want);
}

#[test]
fn info_describes_the_model() {
    let model = common::minilm_dir();
    let (ok, stdout, stderr) = bertrt(&["info", "--model", model.to_str().unwrap()], "");
    assert!(ok, "{stderr}");
    for needle in [
        "BertModel",
        "6 layers",
        "hidden 384",
        "parameters:     22713216",
        "F32",
        "tokenizer.json",
        "max length:     512",
    ] {
        assert!(stdout.contains(needle), "{stdout} lacks {needle}");
    }
}

#[test]
fn bad_model_dir_fails_with_message() {
    let tmp = tempfile::tempdir().unwrap();
    let (ok, _, stderr) = bertrt(&["embed", "--model", tmp.path().to_str().unwrap()], "x\n");
    assert!(!ok);
    assert!(stderr.contains("model.safetensors"), "{stderr}");
}

#[test]
fn invalid_jsonl_names_the_line() {
    let model = common::minilm_dir();
    let (ok, _, stderr) = bertrt(
        &["embed", "--model", model.to_str().unwrap(), "--jsonl"],
        "\"fine\"\n{\"txt\": 1}\n",
    );
    assert!(!ok);
    assert!(stderr.contains("stdin line 2"), "{stderr}");
}

/// `bertrt CMD` with a stdout whose reader has already gone, as under
/// `bertrt CMD | head -1` once `head` exits: its exit status and stderr.
fn bertrt_into_closed_pipe(args: &[&str]) -> (bool, String) {
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    let out = Command::new(env!("CARGO_BIN_EXE_bertrt"))
        .args(args)
        .stdin(Stdio::null())
        .stdout(writer)
        .stderr(Stdio::piped())
        .output()
        .unwrap();
    (out.status.success(), String::from_utf8(out.stderr).unwrap())
}

/// A closed stdout ends a command quietly (exit 0, nothing on stderr)
/// instead of panicking (`println!`) or failing with "Broken pipe": both
/// for the line-by-line writers and for the one-shot reports.
#[test]
fn a_closed_stdout_ends_the_command_quietly() {
    let model = common::minilm_dir();
    let input = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(input.path(), "the cat sat\n".repeat(100)).unwrap();
    let model_arg = model.to_str().unwrap();
    let input_arg = input.path().to_str().unwrap();
    for args in [
        &["info", "--model", model_arg][..],
        &["tokenize", "--model", model_arg, "--input", input_arg][..],
        &["embed", "--model", model_arg, "--input", input_arg][..],
    ] {
        let (ok, stderr) = bertrt_into_closed_pipe(args);
        assert!(ok && stderr.is_empty(), "{args:?}: {stderr}");
    }
}
