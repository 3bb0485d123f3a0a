//! Run lengths: `--smoke` (the test), `--quick` (under 3 minutes on 2 cores) and the full run.

use serde::Serialize;

use crate::workloads::PgbenchMode;

#[derive(Clone, Debug, Serialize)]
pub struct Settings {
    pub profile: &'static str,
    /// pgbench scale: 100,000 accounts per unit.
    pub scale: u32,
    /// Repetitions; each runs every workload on every target, targets interleaved.
    pub reps: u32,
    /// Length of each pgbench run (-T).
    pub pgbench_seconds: u32,
    pub select_modes: Vec<PgbenchMode>,
    pub select_clients: Vec<u32>,
    /// Measured length of each closed-loop latency run.
    pub latency_seconds: f64,
    /// Unmeasured traffic before each probe run.
    pub warmup_seconds: f64,
    pub open_loop_seconds: f64,
    /// Open-loop rates, in percent of the direct peak TPS.
    pub open_loop_percents: Vec<u32>,
    pub open_loop_connections: usize,
    pub wide_clients: Vec<u32>,
    /// Connections timed by the connection-setup workload.
    pub connect_samples: usize,
    /// Client counts of pgbench -S -C (a new connection per transaction).
    pub connect_per_tx_clients: Vec<u32>,
}

const ALL_MODES: [PgbenchMode; 3] = [
    PgbenchMode::Simple,
    PgbenchMode::Extended,
    PgbenchMode::Prepared,
];

impl Settings {
    /// The documented run: 5 interleaved repetitions of 5-second runs. More, shorter repetitions
    /// spread the machine's drift over every target better than a few long ones.
    pub fn full() -> Settings {
        Settings {
            profile: "full",
            scale: 10,
            reps: 5,
            pgbench_seconds: 5,
            select_modes: ALL_MODES.to_vec(),
            select_clients: vec![1, 8, 32],
            latency_seconds: 5.0,
            warmup_seconds: 0.5,
            open_loop_seconds: 5.0,
            open_loop_percents: vec![50, 80],
            open_loop_connections: 8,
            wide_clients: vec![1, 8],
            connect_samples: 1000,
            connect_per_tx_clients: vec![1, 8],
        }
    }

    /// Every workload once, with short runs: under 3 minutes on 2 cores.
    pub fn quick() -> Settings {
        Settings {
            profile: "quick",
            reps: 1,
            pgbench_seconds: 1,
            latency_seconds: 1.0,
            warmup_seconds: 0.2,
            open_loop_seconds: 1.0,
            connect_samples: 100,
            ..Settings::full()
        }
    }

    /// The end-to-end test: every code path, a small database, minimal lengths.
    pub fn smoke() -> Settings {
        Settings {
            profile: "smoke",
            scale: 1,
            select_clients: vec![1, 8],
            latency_seconds: 0.5,
            warmup_seconds: 0.1,
            open_loop_seconds: 0.5,
            open_loop_connections: 4,
            wide_clients: vec![8],
            connect_samples: 20,
            ..Settings::quick()
        }
    }

    pub fn accounts(&self) -> u64 {
        u64::from(self.scale) * 100_000
    }
}
