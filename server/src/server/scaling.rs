//! A service's scaling settings, their defaults and rules, and the duration syntax the API
//! uses for them ("250ms", "30s", "5m", "1h30m").

use serde::{Deserialize, Serialize};

/// How a service scales; the durations are in milliseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Scaling {
    /// Instances kept even when idle (0: scale to zero).
    pub min: u32,
    /// Instances at most.
    pub max: u32,
    /// Requests one instance serves at once.
    pub concurrency: u32,
    /// Idle time before an instance is frozen.
    pub freeze_after_ms: u64,
    /// Idle time before an instance is stopped (at least `freeze_after`).
    pub stop_after_ms: u64,
    /// How long a request may take, time held in the queue included.
    pub request_timeout_ms: u64,
    /// Requests held per service while no instance can take them.
    pub queue: u32,
    /// The concurrency per instance the autoscaler aims at (0: 70% of `concurrency`).
    pub target: u32,
    /// The autoscaler's stable window (its panic window is a tenth of it).
    pub stable_window_ms: u64,
}

impl Default for Scaling {
    fn default() -> Scaling {
        Scaling {
            min: 0,
            max: 10,
            concurrency: 80,
            freeze_after_ms: 30_000,
            stop_after_ms: 300_000,
            request_timeout_ms: 300_000,
            queue: 100,
            target: 0,
            stable_window_ms: 60_000,
        }
    }
}

pub const MAX_INSTANCES: u32 = 1000;
pub const MAX_CONCURRENCY: u32 = 10_000;
pub const MAX_QUEUE: u32 = 100_000;
/// 24 hours: longer is almost certainly a unit mistake.
pub const MAX_DURATION_MS: u64 = 24 * 3600 * 1000;

/// What the API accepts to change scaling: every field is optional, unknown ones are refused.
#[derive(Debug, Default, Clone, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
#[schemars(rename = "ScalingPatch")]
pub struct Patch {
    #[schemars(range(max = 1000))]
    pub min: Option<u32>,
    #[schemars(range(min = 1, max = 1000))]
    pub max: Option<u32>,
    #[schemars(range(min = 1, max = 10000))]
    pub concurrency: Option<u32>,
    pub freeze_after: Option<String>,
    pub stop_after: Option<String>,
    pub request_timeout: Option<String>,
    #[schemars(range(min = 1, max = 100000))]
    pub queue: Option<u32>,
    /// 0: back to the default, 70% of `concurrency`.
    #[schemars(range(max = 10000))]
    pub target: Option<u32>,
    pub stable_window: Option<String>,
}

/// What the API shows.
#[derive(Debug, Serialize, PartialEq, Eq, schemars::JsonSchema)]
#[schemars(rename = "Scaling")]
pub struct View {
    pub min: u32,
    pub max: u32,
    pub concurrency: u32,
    pub freeze_after: String,
    pub stop_after: String,
    pub request_timeout: String,
    pub queue: u32,
    /// The concurrency per instance the autoscaler aims at.
    pub target: u32,
    /// Whether `target` was set (false: 70% of `concurrency`).
    pub target_set: bool,
    pub stable_window: String,
}

impl Scaling {
    /// The autoscaler's concurrency target per instance.
    pub fn target(&self) -> u32 {
        if self.target == 0 {
            (self.concurrency * 7 / 10).max(1)
        } else {
            self.target
        }
    }

    /// Applies `patch` and checks the result; the error names the field.
    pub fn apply(mut self, patch: &Patch) -> Result<Scaling, String> {
        let dur = |field: &str, v: &Option<String>, cur: u64| match v {
            Some(s) => parse_duration(s).map_err(|e| format!("{field}: {e}")),
            None => Ok(cur),
        };
        self.min = patch.min.unwrap_or(self.min);
        self.max = patch.max.unwrap_or(self.max);
        self.concurrency = patch.concurrency.unwrap_or(self.concurrency);
        self.queue = patch.queue.unwrap_or(self.queue);
        self.target = patch.target.unwrap_or(self.target);
        self.stable_window_ms = dur("stable_window", &patch.stable_window, self.stable_window_ms)?;
        self.freeze_after_ms = dur("freeze_after", &patch.freeze_after, self.freeze_after_ms)?;
        self.stop_after_ms = dur("stop_after", &patch.stop_after, self.stop_after_ms)?;
        self.request_timeout_ms = dur("request_timeout", &patch.request_timeout, self.request_timeout_ms)?;
        self.validate()?;
        Ok(self)
    }

    pub fn validate(&self) -> Result<(), String> {
        if !(1..=MAX_INSTANCES).contains(&self.max) {
            return Err(format!("max: {} must be from 1 to {MAX_INSTANCES}", self.max));
        }
        if self.min > self.max {
            return Err(format!("min: {} is more than max ({})", self.min, self.max));
        }
        if !(1..=MAX_CONCURRENCY).contains(&self.concurrency) {
            return Err(format!("concurrency: {} must be from 1 to {MAX_CONCURRENCY}", self.concurrency));
        }
        if !(1..=MAX_QUEUE).contains(&self.queue) {
            return Err(format!("queue: {} must be from 1 to {MAX_QUEUE}", self.queue));
        }
        if self.target > self.concurrency {
            return Err(format!(
                "target: {} is more than concurrency ({}): an instance never holds more than concurrency requests",
                self.target, self.concurrency
            ));
        }
        if !(1000..=3_600_000).contains(&self.stable_window_ms) {
            return Err(format!("stable_window: {} must be from 1s to 1h", format_duration(self.stable_window_ms)));
        }
        for (field, ms) in [
            ("freeze_after", self.freeze_after_ms),
            ("stop_after", self.stop_after_ms),
            ("request_timeout", self.request_timeout_ms),
        ] {
            if ms == 0 || ms > MAX_DURATION_MS {
                return Err(format!("{field}: {} must be more than 0 and at most 24h", format_duration(ms)));
            }
        }
        if self.stop_after_ms < self.freeze_after_ms {
            return Err(format!(
                "stop_after: {} is shorter than freeze_after ({}): an instance is frozen before it is stopped",
                format_duration(self.stop_after_ms),
                format_duration(self.freeze_after_ms)
            ));
        }
        Ok(())
    }

    pub fn view(&self) -> View {
        View {
            min: self.min,
            max: self.max,
            concurrency: self.concurrency,
            freeze_after: format_duration(self.freeze_after_ms),
            stop_after: format_duration(self.stop_after_ms),
            request_timeout: format_duration(self.request_timeout_ms),
            queue: self.queue,
            target: self.target(),
            target_set: self.target != 0,
            stable_window: format_duration(self.stable_window_ms),
        }
    }
}

/// Parses a duration: one or more `<integer><unit>` with units `ms`, `s`, `m`, `h`, as in
/// "250ms", "30s", "1h30m"; returns milliseconds.
pub fn parse_duration(s: &str) -> Result<u64, String> {
    let bad = || format!("{s:?} is not a duration like \"500ms\", \"30s\", \"5m\" or \"1h30m\"");
    if s.is_empty() {
        return Err(bad());
    }
    let mut total: u64 = 0;
    let mut rest = s;
    while !rest.is_empty() {
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 {
            return Err(bad());
        }
        let n: u64 = rest[..digits].parse().map_err(|_| bad())?;
        rest = &rest[digits..];
        let unit_len = rest.bytes().take_while(u8::is_ascii_alphabetic).count();
        let factor = match &rest[..unit_len] {
            "ms" => 1,
            "s" => 1000,
            "m" => 60_000,
            "h" => 3_600_000,
            _ => return Err(bad()),
        };
        rest = &rest[unit_len..];
        total = n.checked_mul(factor).and_then(|v| total.checked_add(v)).ok_or_else(bad)?;
    }
    Ok(total)
}

/// The shortest form [`parse_duration`] reads back: "1h30m", "45s", "1500ms".
pub fn format_duration(ms: u64) -> String {
    if ms == 0 {
        return "0s".into();
    }
    if !ms.is_multiple_of(1000) {
        return format!("{ms}ms");
    }
    let mut out = String::new();
    let (h, m, s) = (ms / 3_600_000, ms / 60_000 % 60, ms / 1000 % 60);
    for (n, unit) in [(h, "h"), (m, "m"), (s, "s")] {
        if n != 0 {
            out.push_str(&format!("{n}{unit}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        let ok: &[(&str, u64, &str)] = &[
            ("250ms", 250, "250ms"),
            ("30s", 30_000, "30s"),
            ("5m", 300_000, "5m"),
            ("1h30m", 5_400_000, "1h30m"),
            ("90s", 90_000, "1m30s"),
            ("1s500ms", 1500, "1500ms"),
            ("0s", 0, "0s"),
            ("2h", 7_200_000, "2h"),
        ];
        for (input, ms, shown) in ok {
            assert_eq!(parse_duration(input), Ok(*ms), "{input}");
            assert_eq!(format_duration(*ms), *shown, "{input}");
            assert_eq!(parse_duration(shown), Ok(*ms), "{shown} reads back");
        }
        for bad in ["", "30", "s", "5 m", "1.5s", "-1s", "3d", "10sec", "99999999999999999999h", "1h:"] {
            let err = parse_duration(bad).unwrap_err();
            assert!(err.contains("is not a duration"), "{bad:?}: {err}");
        }
    }

    #[test]
    fn patches() {
        let base = Scaling::default();
        let ok = base
            .apply(&Patch {
                min: Some(1),
                max: Some(3),
                freeze_after: Some("10s".into()),
                stop_after: Some("1m".into()),
                ..Default::default()
            })
            .unwrap();
        assert_eq!((ok.min, ok.max, ok.freeze_after_ms, ok.stop_after_ms), (1, 3, 10_000, 60_000));
        let cases: &[(Patch, &str)] = &[
            (Patch { min: Some(5), max: Some(2), ..Default::default() }, "min: 5 is more than max (2)"),
            (Patch { max: Some(0), ..Default::default() }, "max: 0 must be from 1"),
            (Patch { concurrency: Some(0), ..Default::default() }, "concurrency: 0"),
            (Patch { queue: Some(0), ..Default::default() }, "queue: 0"),
            (Patch { target: Some(81), ..Default::default() }, "target: 81 is more than concurrency (80)"),
            (Patch { stable_window: Some("500ms".into()), ..Default::default() }, "stable_window: 500ms must be"),
            (Patch { freeze_after: Some("soon".into()), ..Default::default() }, "freeze_after: \"soon\" is not"),
            (Patch { request_timeout: Some("0s".into()), ..Default::default() }, "request_timeout: 0s must be"),
            (Patch { stop_after: Some("25h".into()), ..Default::default() }, "stop_after: 25h must be"),
            (
                Patch { freeze_after: Some("10m".into()), stop_after: Some("1m".into()), ..Default::default() },
                "stop_after: 1m is shorter than freeze_after (10m)",
            ),
        ];
        for (patch, want) in cases {
            let err = base.apply(patch).unwrap_err();
            assert!(err.contains(want), "{patch:?}: got {err:?}, want {want:?}");
        }
    }
}
