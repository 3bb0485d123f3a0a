//! CPU accounting from /proc: one proxy process (utime + stime of all its threads) and the whole
//! box (every CPU's busy time), sampled around each workload run.

use std::fs;

/// Clock ticks per second for /proc times (USER_HZ).
pub fn clock_ticks_per_sec() -> f64 {
    // SAFETY: sysconf only reads a configuration value; it has no memory-safety preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 { t as f64 } else { 100.0 }
}

/// utime + stime of a process in clock ticks, summed over its threads by the kernel.
pub fn process_ticks(pid: u32) -> Option<u64> {
    parse_process_ticks(&fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)
}

fn parse_process_ticks(stat: &str) -> Option<u64> {
    // The command name (field 2) is in parentheses and may contain spaces: fields are counted
    // from the last ')'. Field 3 (state) is index 0 there, so utime (14) and stime (15) are 11, 12.
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut f = rest.split_whitespace().skip(11);
    let utime: u64 = f.next()?.parse().ok()?;
    let stime: u64 = f.next()?.parse().ok()?;
    Some(utime + stime)
}

/// Busy and total clock ticks of all CPUs together, from the first line of /proc/stat.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BoxTicks {
    pub busy: u64,
    pub total: u64,
}

pub fn box_ticks() -> Option<BoxTicks> {
    parse_box_ticks(&fs::read_to_string("/proc/stat").ok()?)
}

fn parse_box_ticks(stat: &str) -> Option<BoxTicks> {
    let line = stat.lines().find(|l| l.starts_with("cpu "))?;
    // user nice system idle iowait irq softirq steal (guest times are already in user/nice).
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .take(8)
        .map(|x| x.parse().ok())
        .collect::<Option<_>>()?;
    if v.len() < 8 {
        return None;
    }
    let total: u64 = v.iter().sum();
    Some(BoxTicks {
        busy: total - v[3] - v[4],
        total,
    })
}

/// The share of all CPUs (0 to 1) busy over `window` while the harness runs nothing: other work
/// on the machine, which makes every figure noisier and lands in box CPU.
pub fn background_busy(window: std::time::Duration) -> Option<f64> {
    let before = box_ticks()?;
    std::thread::sleep(window);
    let after = box_ticks()?;
    let total = after.total.checked_sub(before.total).filter(|&t| t > 0)?;
    Some(after.busy.saturating_sub(before.busy) as f64 / total as f64)
}

/// CPU snapshot taken before a run; `finish` turns it into per-query figures.
pub struct CpuSample {
    proxy: Option<(u32, u64)>,
    host: Option<BoxTicks>,
}

/// CPU spent during one run, normalised by the number of queries it executed.
#[derive(Clone, Copy, Debug, Default)]
pub struct CpuCost {
    /// Milliseconds of proxy CPU per 1,000 queries (numerically: µs per query).
    pub proxy_ms_per_1k_queries: Option<f64>,
    /// Microseconds of busy CPU, all cores and all processes, per query.
    pub box_us_per_query: Option<f64>,
}

impl CpuSample {
    pub fn start(proxy_pid: Option<u32>) -> CpuSample {
        CpuSample {
            proxy: proxy_pid.and_then(|p| process_ticks(p).map(|t| (p, t))),
            host: box_ticks(),
        }
    }

    pub fn finish(self, queries: u64) -> CpuCost {
        if queries == 0 {
            return CpuCost::default();
        }
        let tick_us = 1e6 / clock_ticks_per_sec();
        let q = queries as f64;
        let proxy = self.proxy.and_then(|(pid, before)| {
            let after = process_ticks(pid)?;
            // µs per query equals ms per 1,000 queries.
            Some(after.saturating_sub(before) as f64 * tick_us / q)
        });
        let host = self.host.and_then(|before| {
            let after = box_ticks()?;
            Some(after.busy.saturating_sub(before.busy) as f64 * tick_us / q)
        });
        CpuCost {
            proxy_ms_per_1k_queries: proxy,
            box_us_per_query: host,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn process_ticks_skip_a_command_name_with_spaces_and_parens() {
        let stat = "4242 (pg bouncer) (x)) S 1 4242 4242 0 -1 4194560 100 0 0 0 \
                    250 75 0 0 20 0 1 0 12345 1000000 200 18446744073709551615";
        assert_eq!(parse_process_ticks(stat), Some(325));
    }

    #[test]
    fn box_ticks_leave_out_idle_and_iowait() {
        let stat = "cpu  100 5 50 1000 20 3 2 1 0 0\ncpu0 50 2 25 500 10 1 1 0 0 0\n";
        let t = parse_box_ticks(stat).unwrap();
        assert_eq!(t.total, 1181);
        assert_eq!(t.busy, 161);
    }

    #[test]
    fn the_running_process_has_readable_ticks() {
        assert!(process_ticks(std::process::id()).is_some());
        assert!(box_ticks().is_some());
    }
}
