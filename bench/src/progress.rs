//! The progress line on stderr: rewritten in place on a terminal, one line per step otherwise.

use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

/// A message between progress lines.
pub fn note(msg: &str) {
    let clear = if std::io::stderr().is_terminal() {
        "\r\x1b[K"
    } else {
        ""
    };
    eprintln!("{clear}portcullis-bench: {msg}");
}

pub struct Progress {
    total: usize,
    done: usize,
    start: Instant,
    tty: bool,
}

impl Progress {
    pub fn new(total: usize) -> Progress {
        Progress {
            total,
            done: 0,
            start: Instant::now(),
            tty: std::io::stderr().is_terminal(),
        }
    }

    /// Announces the step about to run.
    pub fn step(&mut self, rep: u32, reps: u32, workload: &str, target: &str) {
        let elapsed = self.start.elapsed();
        let left = if self.done == 0 {
            String::from("?")
        } else {
            clock(elapsed.mul_f64((self.total - self.done) as f64 / self.done as f64))
        };
        self.done += 1;
        let line = format!(
            "[{:>4}/{}] rep {rep}/{reps} · {workload} · {target} · {} elapsed, ~{left} left",
            self.done,
            self.total,
            clock(elapsed)
        );
        let mut err = std::io::stderr().lock();
        if self.tty {
            let _ = write!(err, "\r\x1b[K{line}");
        } else {
            let _ = writeln!(err, "{line}");
        }
        let _ = err.flush();
    }

    pub fn finish(&self) {
        if self.tty {
            eprintln!();
        }
        note(&format!(
            "{} steps in {}",
            self.done,
            clock(self.start.elapsed())
        ));
    }
}

fn clock(d: Duration) -> String {
    let s = d.as_secs();
    format!("{}:{:02}", s / 60, s % 60)
}
