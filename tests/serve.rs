//! `bertrt serve` end to end: the real binary on an ephemeral loopback port,
//! driven by a minimal HTTP/1.1 client over raw TCP.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use safetensors::Dtype;
use serde_json::{json, Value};

struct Response {
    status: u16,
    headers: Vec<(String, String)>,
    body: String,
}

impl Response {
    fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.body))
    }

    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    fn error(&self) -> String {
        self.json()["error"].as_str().unwrap().to_owned()
    }
}

/// One request on its own connection (`Connection: close`).
fn http(addr: SocketAddr, method: &str, path: &str, body: &[u8]) -> Response {
    let mut stream = TcpStream::connect(addr).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(120)))
        .unwrap();
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).unwrap();
    // A server that refuses a large body early may close before reading it.
    let _ = stream.write_all(body);
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).unwrap();
    let text = String::from_utf8(raw).unwrap();
    let (head, body) = text.split_once("\r\n\r\n").expect("a complete response");
    let mut lines = head.lines();
    let status = lines
        .next()
        .unwrap()
        .split(' ')
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    let headers = lines
        .filter_map(|line| line.split_once(": "))
        .map(|(n, v)| (n.to_owned(), v.to_owned()))
        .collect();
    Response {
        status,
        headers,
        body: body.to_owned(),
    }
}

fn post(addr: SocketAddr, path: &str, body: Value) -> Response {
    http(addr, "POST", path, body.to_string().as_bytes())
}

fn get(addr: SocketAddr, path: &str) -> Response {
    http(addr, "GET", path, b"")
}

/// A running `bertrt serve`, killed on drop unless it already exited.
struct Server {
    child: Child,
    addr: SocketAddr,
    log: Arc<Mutex<String>>,
}

impl Server {
    fn start(model: &Path, extra: &[&str]) -> Server {
        let mut child = Command::new(env!("CARGO_BIN_EXE_bertrt"))
            .args(["serve", "--port", "0", "--model"])
            .arg(model)
            .args(extra)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let log = Arc::new(Mutex::new(String::new()));
        let (addr_tx, addr_rx) = std::sync::mpsc::channel();
        let stderr = child.stderr.take().unwrap();
        let sink = Arc::clone(&log);
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let line = line.unwrap();
                if let Some(addr) = line.strip_prefix("listening on ") {
                    let _ = addr_tx.send(addr.parse::<SocketAddr>().unwrap());
                }
                let mut log = sink.lock().unwrap();
                log.push_str(&line);
                log.push('\n');
            }
        });
        let addr = addr_rx
            .recv_timeout(Duration::from_secs(60))
            .unwrap_or_else(|_| panic!("server did not start: {}", log.lock().unwrap()));
        let server = Server { child, addr, log };
        let deadline = Instant::now() + Duration::from_secs(60);
        while get(server.addr, "/health").status != 200 {
            assert!(Instant::now() < deadline, "never healthy: {}", server.log());
            std::thread::sleep(Duration::from_millis(20));
        }
        server
    }

    fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    fn terminate(&self) {
        let status = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    }

    fn wait(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(Instant::now() < deadline, "did not exit: {}", self.log());
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn tiny_model() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let weights = common::safetensors_bytes(&common::tiny_tensors(1), Dtype::F32);
    common::write_tiny_model(dir.path(), &common::tiny_config(), &weights);
    dir
}

fn vectors(response: &Response) -> Vec<Vec<f32>> {
    assert_eq!(response.status, 200, "{}", response.body);
    serde_json::from_str(&response.body).unwrap()
}

/// A text of about `words` wordpieces for MiniLM.
fn long_text(words: usize) -> String {
    let pool = [
        "serving", "models", "with", "dynamic", "batching", "is", "fun", "and", "fast",
    ];
    (0..words)
        .map(|i| pool[i % pool.len()])
        .collect::<Vec<_>>()
        .join(" ")
}

#[test]
fn every_route_answers_on_the_tiny_model() {
    let model = tiny_model();
    let server = Server::start(model.path(), &["--max-batch-requests", "8"]);
    let addr = server.addr;

    assert_eq!(get(addr, "/health").json()["status"], "ok");

    let info = get(addr, "/info").json();
    assert_eq!(info["max_input_length"], 64);
    assert_eq!(info["max_batch_requests"], 8);
    assert_eq!(info["hidden_size"], 16);
    assert_eq!(info["model_dtype"], "float32");
    assert_eq!(info["weights_dtype"], "F32");
    assert_eq!(info["int8"], false);
    assert_eq!(info["model_type"]["embedding"]["pooling"], "mean");
    assert_eq!(info["task"], "embedding");
    assert!(info["labels"].is_null());
    assert_eq!(info["version"], env!("CARGO_PKG_VERSION"));

    // TEI's shape: per input, tokens with the text they came from and its
    // character offsets ("ö" is two bytes but one character).
    let tokens = post(
        addr,
        "/tokenize",
        json!({"inputs": ["the cat sat", "Dögs"]}),
    )
    .json();
    assert_eq!(
        tokens[1],
        json!([
            {"id": 2, "text": "[CLS]", "special": true, "start": null, "stop": null},
            {"id": 10, "text": "Dög", "special": false, "start": 0, "stop": 3},
            {"id": 17, "text": "s", "special": false, "start": 3, "stop": 4},
            {"id": 3, "text": "[SEP]", "special": true, "start": null, "stop": null},
        ])
    );
    let texts: Vec<&str> = tokens[0]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["text"].as_str().unwrap())
        .collect();
    assert_eq!(texts, ["[CLS]", "the", "cat", "sat", "[SEP]"]);
    assert_eq!(tokens[0][2]["id"], 6);
    assert_eq!(
        (&tokens[0][2]["start"], &tokens[0][2]["stop"]),
        (&json!(4), &json!(7))
    );
    let bare = post(
        addr,
        "/tokenize",
        json!({"inputs": "the cat", "add_special_tokens": false}),
    )
    .json();
    let ids: Vec<&Value> = bare[0]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| &t["id"])
        .collect();
    assert_eq!(ids, [&json!(5), &json!(6)]);

    // One text, normalized by default.
    let one = vectors(&post(addr, "/embed", json!({"inputs": "the cat sat"})));
    assert_eq!(one.len(), 1);
    assert_eq!(one[0].len(), 16);
    let norm: f32 = one[0].iter().map(|x| x * x).sum::<f32>().sqrt();
    assert!((norm - 1.0).abs() < 1e-5, "norm {norm}");

    // A list comes back in order and equals each text alone.
    let texts = ["the dog ran fast", "a small cat", "the cat sat"];
    let many = vectors(&post(addr, "/embed", json!({"inputs": texts})));
    assert_eq!(many.len(), 3);
    assert!(common::max_abs_diff(&many[2], &one[0]) < 1e-5);
    for (text, vector) in texts.iter().zip(&many) {
        let alone = vectors(&post(addr, "/embed", json!({"inputs": [text]})));
        assert!(common::max_abs_diff(&alone[0], vector) < 1e-5);
    }

    let raw = vectors(&post(
        addr,
        "/embed",
        json!({"inputs": ["the cat sat"], "normalize": false, "pooling": "cls"}),
    ));
    let raw_norm: f32 = raw[0].iter().map(|x| x * x).sum::<f32>().sqrt();
    assert!((raw_norm - 1.0).abs() > 1e-3, "pooling cls, not normalized");
    let pooler = vectors(&post(
        addr,
        "/embed",
        json!({"inputs": "a", "pooling": "pooler"}),
    ));
    assert_eq!(pooler[0].len(), 16);

    let predict = post(addr, "/predict", json!({"inputs": "the cat sat"}));
    assert_eq!(predict.status, 422);
    assert!(
        predict.error().contains("no classification head"),
        "{}",
        predict.body
    );
    assert!(
        predict.error().contains("bertrt finetune"),
        "{}",
        predict.body
    );

    let metrics = get(addr, "/metrics");
    assert_eq!(metrics.status, 200);
    assert!(metrics
        .header("content-type")
        .unwrap()
        .starts_with("text/plain"));
    let text = metrics.body;
    for needle in [
        "bertrt_requests_total{route=\"/embed\",status=\"200\"} 7",
        "bertrt_requests_total{route=\"/predict\",status=\"422\"} 1",
        "bertrt_request_duration_seconds_bucket{route=\"/embed\",le=\"+Inf\"} 7",
        "bertrt_queue_duration_seconds_count 7",
        "bertrt_tokenization_duration_seconds_count 9",
        "bertrt_batch_tokens_sum",
        "bertrt_batch_size_bucket{le=\"1\"}",
        "bertrt_input_length_tokens_bucket{le=\"8\"}",
        "bertrt_inference_duration_seconds_bucket",
        "bertrt_queue_depth 0",
        "# TYPE bertrt_predictions_total counter",
        "# TYPE bertrt_prediction_confidence histogram",
    ] {
        assert!(text.contains(needle), "metrics lack {needle}:\n{text}");
    }
}

#[test]
fn every_error_status() {
    let model = tiny_model();
    let server = Server::start(
        model.path(),
        &["--max-batch-requests", "4", "--max-body-bytes", "2048"],
    );
    let addr = server.addr;
    let check = |response: Response, status: u16, needle: &str| {
        assert_eq!(response.status, status, "{}", response.body);
        assert_eq!(response.header("content-type"), Some("application/json"));
        assert!(response.error().contains(needle), "{}", response.body);
    };

    check(
        http(addr, "POST", "/embed", b"{\"inputs\": "),
        400,
        "not valid JSON",
    );
    check(
        post(addr, "/embed", json!({"inputs": []})),
        422,
        "empty list",
    );
    check(
        post(addr, "/embed", json!({"inputs": ["a", 7]})),
        422,
        "[1] is a number",
    );
    check(
        post(addr, "/predict", json!({"inputs": {"text": "a"}})),
        422,
        "is an object",
    );
    check(
        post(addr, "/tokenize", json!({"text": "a"})),
        422,
        "missing field \"inputs\"",
    );
    check(
        post(addr, "/embed", json!({"inputs": ["a", "b", "c", "d", "e"]})),
        422,
        "limit of 4 per request (--max-batch-requests)",
    );
    check(
        post(addr, "/embed", json!({"inputs": "a", "normalize": "yes"})),
        422,
        "normalize",
    );
    check(
        post(addr, "/embed", json!({"inputs": "a", "pooling": "max"})),
        422,
        "pooling",
    );
    let big = json!({"inputs": "cat ".repeat(1000)});
    check(post(addr, "/embed", big), 413, "length limit");
    check(get(addr, "/nope"), 404, "no such route");
    assert_eq!(get(addr, "/embed").status, 405);

    // Over-long inputs are truncated to the model's 64 positions.
    let long = "the cat sat on the mat ".repeat(20);
    let tokens = post(addr, "/tokenize", json!({"inputs": long})).json();
    assert_eq!(tokens[0].as_array().unwrap().len(), 64);
    assert_eq!(
        vectors(&post(addr, "/embed", json!({"inputs": long}))).len(),
        1
    );

    let strict = Server::start(model.path(), &["--no-truncate", "--max-input-length", "8"]);
    let refused = post(strict.addr, "/embed", json!({"inputs": ["a cat", long]}));
    assert_eq!(refused.status, 422);
    assert!(
        refused.error().contains("input 1 is longer than 8 tokens"),
        "{}",
        refused.body
    );
    let fits = "the cat sat on the mat"; // 6 words + [CLS] [SEP] = 8 tokens
    assert_eq!(
        vectors(&post(strict.addr, "/embed", json!({"inputs": fits}))).len(),
        1
    );
    assert_eq!(get(strict.addr, "/info").json()["truncate"], false);
}

/// `--int8` quantizes on load and `--dtype bf16` runs bf16 linears: /info
/// says which, and the embeddings stay close to the fp32 ones.
#[test]
fn int8_and_bf16_serving_report_their_dtype_and_stay_close_to_fp32() {
    let model = common::minilm_dir();
    let texts = json!(["A man is playing a guitar.", "The new movie is awesome!"]);
    let fp32 = Server::start(&model, &[]);
    let reference = vectors(&post(fp32.addr, "/embed", json!({"inputs": texts})));
    drop(fp32);
    for (flags, dtype, min_cosine) in [
        (&["--int8"][..], "int8", 0.995),
        (&["--dtype", "bf16"][..], "bfloat16", 0.9995),
    ] {
        let server = Server::start(&model, flags);
        let info = get(server.addr, "/info").json();
        assert_eq!(info["model_dtype"], dtype, "{info}");
        assert_eq!(info["int8"], dtype == "int8", "{info}");
        let served = vectors(&post(server.addr, "/embed", json!({"inputs": texts})));
        for (a, b) in served.iter().zip(&reference) {
            let cosine = common::cosine(a, b);
            assert!(cosine >= min_cosine, "{dtype}: cosine {cosine}");
        }
    }
    let out = Command::new(env!("CARGO_BIN_EXE_bertrt"))
        .args([
            "serve", "--int8", "--dtype", "bf16", "--port", "0", "--model",
        ])
        .arg(&model)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("--dtype"), "{stderr}");
}

#[test]
fn flooded_queue_answers_429_with_retry_after() {
    let server = Server::start(
        &common::minilm_dir(),
        &[
            "--max-queue",
            "1",
            "--max-batch-requests",
            "1",
            "--threads",
            "1",
        ],
    );
    let addr = server.addr;
    let body = json!({"inputs": long_text(200)});
    let clients: Vec<_> = (0..24)
        .map(|_| {
            let body = body.clone();
            std::thread::spawn(move || post(addr, "/embed", body))
        })
        .collect();
    let responses: Vec<Response> = clients.into_iter().map(|c| c.join().unwrap()).collect();
    let ok = responses.iter().filter(|r| r.status == 200).count();
    let refused: Vec<&Response> = responses.iter().filter(|r| r.status == 429).collect();
    assert_eq!(ok + refused.len(), responses.len(), "only 200 or 429");
    assert!(ok >= 1, "some requests are served");
    assert!(!refused.is_empty(), "a flooded queue refuses some");
    for response in refused {
        assert_eq!(response.header("retry-after"), Some("1"));
        assert!(
            response.error().contains("queue is full"),
            "{}",
            response.body
        );
    }
    let metrics = get(addr, "/metrics").body;
    assert!(metrics.contains("bertrt_requests_total{route=\"/embed\",status=\"429\"}"));
    // The server still serves after the flood.
    assert_eq!(
        vectors(&post(addr, "/embed", json!({"inputs": "still here"}))).len(),
        1
    );
}

#[test]
fn sigterm_drains_in_flight_requests_then_exits_0() {
    let mut server = Server::start(
        &common::minilm_dir(),
        // A debug build on a loaded CI box can take longer than the default
        // drain timeout for these 64 sequences; this test is about draining.
        &[
            "--max-batch-requests",
            "16",
            "--threads",
            "1",
            "--drain-timeout-secs",
            "600",
        ],
    );
    let addr = server.addr;
    let body = json!({"inputs": vec![long_text(120); 16]});
    let clients: Vec<_> = (0..4)
        .map(|_| {
            let body = body.clone();
            std::thread::spawn(move || post(addr, "/embed", body))
        })
        .collect();
    // Let the requests arrive and queue behind each other, then stop.
    let deadline = Instant::now() + Duration::from_secs(30);
    while !get(addr, "/metrics")
        .body
        .contains("bertrt_tokenization_duration_seconds_count 4")
    {
        assert!(Instant::now() < deadline, "requests never arrived");
        std::thread::sleep(Duration::from_millis(5));
    }
    server.terminate();
    let started = Instant::now();
    for client in clients {
        let response = client.join().unwrap();
        assert_eq!(response.status, 200, "{}", response.body);
        assert_eq!(vectors(&response).len(), 16);
    }
    let status = server.wait(Duration::from_secs(60));
    assert!(status.success(), "exit status {status}: {}", server.log());
    let log = server.log();
    assert!(log.contains("draining") && log.contains("drained"), "{log}");
    assert!(TcpStream::connect(addr).is_err(), "no longer listening");
    eprintln!("drained in {:?}", started.elapsed());
}

#[test]
fn minilm_embed_matches_the_cli() {
    let model = common::minilm_dir();
    let texts = [
        "A man is playing a guitar.",
        "The new movie is awesome!",
        &long_text(300),
    ];
    let mut cli = Command::new(env!("CARGO_BIN_EXE_bertrt"))
        .args(["embed", "--model"])
        .arg(&model)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    cli.stdin
        .take()
        .unwrap()
        .write_all((texts.join("\n") + "\n").as_bytes())
        .unwrap();
    let out = cli.wait_with_output().unwrap();
    assert!(out.status.success());
    let expected: Vec<Vec<f32>> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|line| {
            serde_json::from_str::<Value>(line).unwrap()["embedding"]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_f64().unwrap() as f32)
                .collect()
        })
        .collect();

    let server = Server::start(&model, &[]);
    let served = vectors(&post(
        server.addr,
        "/embed",
        json!({"inputs": texts, "normalize": false}),
    ));
    assert_eq!(served.len(), expected.len());
    for (a, b) in served.iter().zip(&expected) {
        assert_eq!(a.len(), 384);
        let cosine = common::cosine(a, b);
        assert!(cosine >= 0.99999, "cosine {cosine}");
    }
}

/// Fine-tunes the tiny model in `dir` on the CSV `data` (columns text,
/// `label_column`) with `flags`; returns the trained model directory.
fn finetune_tiny(
    dir: &Path,
    data: &Path,
    label_column: &str,
    flags: &[&str],
) -> std::path::PathBuf {
    let trained = dir.join("trained");
    let output = Command::new(env!("CARGO_BIN_EXE_bertrt"))
        .args(["finetune", "--label-column", label_column, "--model"])
        .arg(dir)
        .arg("--train")
        .arg(data)
        .arg("--valid")
        .arg(data)
        .arg("--out")
        .arg(&trained)
        .args(["--max-length", "16", "--quiet"])
        .args(flags)
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    trained
}

/// `bertrt predict`'s JSON line for one text.
fn cli_predict(model: &Path, text: &str) -> Value {
    let child = Command::new(env!("CARGO_BIN_EXE_bertrt"))
        .args(["predict", "--model"])
        .arg(model)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .as_ref()
        .unwrap()
        .write_all(format!("{text}\n").as_bytes())
        .unwrap();
    serde_json::from_slice(&child.wait_with_output().unwrap().stdout).unwrap()
}

/// A fine-tuned classifier serves /predict: labels sorted by calibrated
/// probability, equal to `bertrt predict`, and raw scores on request.
#[test]
fn predict_on_a_fine_tuned_model_matches_the_cli() {
    let dir = tiny_model();
    let data = dir.path().join("train.csv");
    std::fs::write(&data, "text,label\nthe cat sat,cat\na cat sat on a mat,cat\nthe dog ran,dog\na big dog ran fast,dog\n").unwrap();
    let trained = finetune_tiny(
        dir.path(),
        &data,
        "label",
        &["--epochs", "2", "--lr", "1e-3"],
    );
    let cli = cli_predict(&trained, "the dog ran");

    let server = Server::start(&trained, &[]);
    let addr = server.addr;
    let info = get(addr, "/info").json();
    assert_eq!(info["max_input_length"], 16, "{info}");
    assert_eq!(info["task"], "sequence-classification", "{info}");
    let predict = post(
        addr,
        "/predict",
        json!({"inputs": ["the dog ran", "the cat sat"]}),
    );
    assert_eq!(predict.status, 200, "{}", predict.body);
    let body = predict.json();
    let first = body[0].as_array().unwrap();
    assert_eq!(first.len(), 2);
    assert!(first[0]["score"].as_f64().unwrap() >= first[1]["score"].as_f64().unwrap());
    for entry in first {
        let label = entry["label"].as_str().unwrap();
        let want = cli["probs"][label].as_f64().unwrap();
        assert!(
            (entry["score"].as_f64().unwrap() - want).abs() < 1e-5,
            "{label}: {entry} vs {cli}"
        );
        // The artifact's decision (a tuned threshold included) marks the
        // label `bertrt predict` gives.
        assert_eq!(
            entry["predicted"],
            label == cli["label"],
            "{entry} vs {cli}"
        );
    }
    let raw = post(
        addr,
        "/predict",
        json!({"inputs": "the dog ran", "raw_scores": true}),
    );
    assert_eq!(raw.status, 200, "{}", raw.body);
}

/// A regression model answers /predict with its one raw output, equal to
/// `bertrt predict`'s score.
#[test]
fn predict_on_a_regression_model_returns_the_raw_score() {
    let dir = tiny_model();
    let data = dir.path().join("scores.csv");
    std::fs::write(
        &data,
        "text,score\nthe cat sat,1.5\nthe dog ran,-1.0\na big dog ran,-2.0\n",
    )
    .unwrap();
    let trained = finetune_tiny(
        dir.path(),
        &data,
        "score",
        &["--task", "regression", "--epochs", "1"],
    );
    let cli = cli_predict(&trained, "the dog ran");

    let server = Server::start(&trained, &[]);
    let predict = post(server.addr, "/predict", json!({"inputs": "the dog ran"}));
    assert_eq!(predict.status, 200, "{}", predict.body);
    let body = predict.json();
    assert_eq!(body.as_array().unwrap().len(), 1, "{body}");
    assert_eq!(body[0]["label"], "score");
    let want = cli["score"].as_f64().unwrap();
    assert!(
        (body[0]["score"].as_f64().unwrap() - want).abs() < 1e-5,
        "{body} vs {cli}"
    );
}

/// A multi-label model answers /predict with one sigmoid probability per
/// label and marks the labels its per-label thresholds pick, as `bertrt
/// predict` does.
#[test]
fn predict_on_a_multi_label_model_applies_its_thresholds() {
    let dir = tiny_model();
    let data = dir.path().join("train.csv");
    std::fs::write(
        &data,
        "text,topics\nthe cat sat,cat\nthe dog ran,dog\nthe cat and the dog,cat|dog\na bird sang,\n",
    )
    .unwrap();
    let trained = finetune_tiny(
        dir.path(),
        &data,
        "topics",
        &["--task", "multi-label", "--epochs", "2", "--lr", "1e-3"],
    );
    let cli = cli_predict(&trained, "the cat and the dog");
    let server = Server::start(&trained, &[]);
    let predict = post(
        server.addr,
        "/predict",
        json!({"inputs": "the cat and the dog"}),
    );
    assert_eq!(predict.status, 200, "{}", predict.body);
    let chosen: Vec<&str> = cli["labels"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l.as_str().unwrap())
        .collect();
    for entry in predict.json().as_array().unwrap() {
        let label = entry["label"].as_str().unwrap();
        let want = cli["probs"][label].as_f64().unwrap();
        assert!(
            (entry["score"].as_f64().unwrap() - want).abs() < 1e-5,
            "{entry} vs {cli}"
        );
        assert_eq!(
            entry["predicted"],
            chosen.contains(&label),
            "{entry} vs {cli}"
        );
    }
}

/// A token classifier written in code: the tiny encoder under a random
/// `BertForTokenClassification` head over BIO tags. Untrained, but its tags
/// vary from word to word, and the served entities are checked against
/// `bertrt predict`'s.
fn tiny_tagger() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let mut tensors = common::tiny_tensors(1);
    let mut rng = common::Rng::new(3);
    tensors.push(("classifier.weight".into(), vec![3, 16], rng.vec(48, 2.0)));
    tensors.push(("classifier.bias".into(), vec![3], vec![0.0; 3]));
    let mut config = common::tiny_config();
    config["architectures"] = json!(["BertForTokenClassification"]);
    config["id2label"] = json!({"0": "B-ANIMAL", "1": "I-ANIMAL", "2": "O"});
    let weights = common::safetensors_bytes(&tensors, Dtype::F32);
    common::write_tiny_model(dir.path(), &config, &weights);
    dir
}

/// A token classifier serves /predict as entities with character offsets
/// into each input, the same as `bertrt predict` prints, a text over the
/// max input length in windows as `predict` runs it (and refused with
/// `--no-truncate`, or when its windows are more than `--max-batch-requests`);
/// /info reports the task and tags, /embed still answers, and entities count
/// in /metrics.
#[test]
fn token_classifier_serves_the_entities_bertrt_predict_prints() {
    let model = tiny_tagger();
    // Two spaces, a multi-byte character, an empty text, a long one,
    // punctuation (words of their own) and CJK characters (each a word), and
    // two over the model's 64 tokens (96 and 90 words), one between short
    // ones: each input's rows are its own windows'.
    let longer_than_the_model = "the big dog ran on a mat . ".repeat(12);
    let also_longer = "a cat sat on the big mat and ran . ".repeat(9);
    let texts = [
        "the  big dog ran",
        "thé cat sat on the mat",
        "",
        also_longer.trim_end(),
        "a small dog ran fast on a big mat and the cat sat",
        "the big dog, a cat... sat on the mat! 东京: the dog's mat-cat.",
        longer_than_the_model.trim_end(),
    ];
    let input = model.path().join("texts.txt");
    std::fs::write(&input, texts.join("\n") + "\n").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_bertrt"))
        .args(["predict", "--model"])
        .arg(model.path())
        .arg("--input")
        .arg(&input)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let cli: Vec<Value> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|line| serde_json::from_str::<Value>(line).unwrap()["entities"].clone())
        .collect();
    assert_eq!(cli.len(), texts.len());

    let server = Server::start(model.path(), &["--max-batch-requests", "16"]);
    let addr = server.addr;
    let info = get(addr, "/info").json();
    assert_eq!(info["task"], "token-classification", "{info}");
    assert_eq!(
        info["model_type"]["token_classifier"]["id2label"]["1"],
        "I-ANIMAL"
    );
    assert_eq!(info["labels"], json!(["B-ANIMAL", "I-ANIMAL", "O"]));

    let predict = post(addr, "/predict", json!({ "inputs": texts }));
    assert_eq!(predict.status, 200, "{}", predict.body);
    let served = predict.json();
    let mut found = 0;
    for ((text, served), cli) in texts.iter().zip(served.as_array().unwrap()).zip(&cli) {
        let (served, cli) = (served.as_array().unwrap(), cli.as_array().unwrap());
        assert_eq!(served.len(), cli.len(), "{text:?}: {served:?} vs {cli:?}");
        for (entity, want) in served.iter().zip(cli) {
            for field in ["type", "text", "start", "end"] {
                assert_eq!(entity[field], want[field], "{text:?}: {entity} vs {want}");
            }
            let score = entity["score"].as_f64().unwrap();
            assert!(
                (score - want["score"].as_f64().unwrap()).abs() < 1e-5,
                "{entity} vs {want}"
            );
            assert!(score > 0.0 && score <= 1.0, "{entity}");
            // Offsets are characters of the input, not bytes or tokens.
            let (start, end) = (
                entity["start"].as_u64().unwrap() as usize,
                entity["end"].as_u64().unwrap() as usize,
            );
            let slice: String = text.chars().skip(start).take(end - start).collect();
            assert_eq!(slice, entity["text"].as_str().unwrap(), "{entity}");
            found += 1;
        }
    }
    assert!(found >= 2, "the random head finds some entities: {served}");
    assert_eq!(served[2], json!([]));

    // One text: its entities alone, not wrapped in a list per input.
    let one = post(addr, "/predict", json!({ "inputs": texts[1] }));
    assert_eq!(one.status, 200, "{}", one.body);
    assert_eq!(
        one.json().as_array().unwrap().len(),
        cli[1].as_array().unwrap().len()
    );

    let raw = post(addr, "/predict", json!({"inputs": "a", "raw_scores": true}));
    assert_eq!(raw.status, 422, "{}", raw.body);
    assert!(raw.error().contains("raw_scores"), "{}", raw.body);
    assert_eq!(
        vectors(&post(addr, "/embed", json!({"inputs": "the cat"})))[0].len(),
        16
    );

    let metrics = get(addr, "/metrics").body;
    for needle in [
        "bertrt_requests_total{route=\"/predict\",status=\"200\"} 2",
        "bertrt_requests_total{route=\"/predict\",status=\"422\"} 1",
        "bertrt_predictions_total{label=\"ANIMAL\"}",
        "bertrt_prediction_confidence_count",
    ] {
        assert!(
            metrics.contains(needle),
            "metrics lack {needle}:\n{metrics}"
        );
    }
    drop(server);

    let strict = Server::start(model.path(), &["--no-truncate"]);
    let refused = post(strict.addr, "/predict", json!({ "inputs": texts }));
    assert_eq!(refused.status, 422, "{}", refused.body);
    assert!(
        refused.error().contains("input 3 is longer than 64 tokens"),
        "{}",
        refused.body
    );
    let fits = post(strict.addr, "/predict", json!({ "inputs": texts[1] }));
    assert_eq!(fits.status, 200, "{}", fits.body);
    drop(strict);

    // A request's windows count against --max-batch-requests: its job runs
    // in one forward pass.
    let small = Server::start(model.path(), &["--max-batch-requests", "1"]);
    let refused = post(small.addr, "/predict", json!({ "inputs": texts[6] }));
    assert_eq!(refused.status, 422, "{}", refused.body);
    assert!(
        refused.error().contains(
            "2 windows of up to 64 tokens, and a request may hold at most 1 (--max-batch-requests)"
        ),
        "{}",
        refused.body
    );
}

/// A token classifier's request whose words alone show that it runs as more
/// windows than `--max-batch-requests` is refused before it is tokenized,
/// saying at least how many; one that only its tokens show to be too many is
/// refused once they are known, saying exactly how many.
#[test]
fn a_tagger_request_of_too_many_windows_is_refused_before_tokenizing_where_its_words_show_it() {
    let model = tiny_tagger();
    let server = Server::start(model.path(), &["--max-batch-requests", "1"]);
    // 108 KB: 28,000 words that take a token each, in windows of 62 tokens
    // sharing 15, are at least 1 + ceil((28,000 - 62) / 47) = 596 windows.
    let words = "the big dog ran on a mat . ".repeat(4000);
    let refused = post(server.addr, "/predict", json!({ "inputs": words }));
    assert_eq!(refused.status, 422, "{}", refused.body);
    assert_eq!(
        refused.error(),
        "the inputs run as at least 596 windows of up to 64 tokens, and a request may hold at most 1 (--max-batch-requests); send shorter texts or fewer per request"
    );
    // The quick count takes `dog.` for one word: 40 fit one window, but
    // the tokenizer's 80 words take two.
    let dots = "dog. ".repeat(40);
    let refused = post(server.addr, "/predict", json!({ "inputs": dots }));
    assert_eq!(refused.status, 422, "{}", refused.body);
    assert!(
        refused
            .error()
            .starts_with("the inputs run as 2 windows of up to 64 tokens"),
        "{}",
        refused.body
    );
    let fits = post(
        server.addr,
        "/predict",
        json!({ "inputs": "dog. ".repeat(12) }),
    );
    assert_eq!(fits.status, 200, "{}", fits.body);
}

/// A max input length with no room for text beside `[CLS]` and `[SEP]` is
/// refused at start-up, for a token classifier (whose windows would hold
/// no words) as for an encoder (whose every input would be the same).
#[test]
fn a_max_input_length_without_room_for_text_is_refused_at_start_up() {
    for model in [tiny_tagger(), tiny_model()] {
        let mut child = Command::new(env!("CARGO_BIN_EXE_bertrt"))
            .args(["serve", "--port", "0", "--max-input-length", "2", "--model"])
            .arg(model.path())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(60);
        let status = loop {
            if let Some(status) = child.try_wait().unwrap() {
                break status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("serve started with --max-input-length 2");
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let mut stderr = String::new();
        child
            .stderr
            .take()
            .unwrap()
            .read_to_string(&mut stderr)
            .unwrap();
        assert!(!status.success(), "{stderr}");
        assert!(
            stderr.contains(
                "--max-input-length 2 leaves no room for text beside [CLS] and [SEP], so every input would run as those two tokens alone; set it to at least 3"
            ),
            "{stderr}"
        );
    }
}
