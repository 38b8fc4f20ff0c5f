//! Training progress on stderr: a live line with ETA on a terminal, plain
//! periodic lines otherwise (logs, CI).

use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

pub struct Progress {
    total_steps: usize,
    started: Instant,
    terminal: bool,
    last_line: Instant,
    quiet: bool,
}

impl Progress {
    pub fn new(total_steps: usize, quiet: bool) -> Self {
        Progress {
            total_steps,
            started: Instant::now(),
            terminal: std::io::stderr().is_terminal(),
            last_line: Instant::now(),
            quiet,
        }
    }

    pub fn step(&mut self, step: usize, epoch: usize, loss: f32, lr: f32, samples_per_s: f64) {
        if self.quiet {
            return;
        }
        let done = step + 1;
        let elapsed = self.started.elapsed().as_secs_f64();
        let eta = elapsed / done as f64 * (self.total_steps - done) as f64;
        let line = format!(
            "epoch {epoch} step {done}/{} loss {loss:.4} lr {lr:.2e} {samples_per_s:.1} samples/s eta {}",
            self.total_steps,
            format_duration(eta)
        );
        if self.terminal {
            let width = 30;
            let filled = width * done / self.total_steps.max(1);
            eprint!(
                "\r[{}{}] {line}\x1b[K",
                "#".repeat(filled),
                "-".repeat(width - filled)
            );
            let _ = std::io::stderr().flush();
        } else if self.last_line.elapsed() >= Duration::from_secs(10) || done == self.total_steps {
            eprintln!("{line}");
            self.last_line = Instant::now();
        }
    }

    pub fn message(&mut self, message: &str) {
        if self.quiet {
            return;
        }
        if self.terminal {
            eprint!("\r\x1b[K");
        }
        eprintln!("{message}");
    }
}

fn format_duration(seconds: f64) -> String {
    let s = seconds.round() as u64;
    format!("{}:{:02}:{:02}", s / 3600, s / 60 % 60, s % 60)
}
