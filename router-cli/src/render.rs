//! Output: human tables and JSON, from the views in [`crate::view`].
//!
//! Tables are plain text, columns separated by two spaces, padded to the
//! widest cell (counted in characters), the last column unpadded so lines
//! carry no trailing spaces. JSON for one-shot commands is pretty-printed;
//! `watch` writes one compact object per line so each line parses alone.

use std::io::{self, Write};

use serde::Serialize;
use switchyard_control_plane::decision::DecisionReason;

use crate::view::{
    AffinityView, ChoiceView, DrainView, EndpointView, ModelsView, SessionsView, StateView,
    UsageView,
};

/// ANSI: cursor home, then clear the screen (redraw in place under `watch`).
pub const CLEAR_SCREEN: &str = "\x1b[H\x1b[2J";

/// A text table.
#[derive(Debug)]
pub struct Table {
    headers: Vec<&'static str>,
    rows: Vec<Vec<String>>,
}

impl Table {
    /// An empty table with these column headers.
    pub fn new(headers: &[&'static str]) -> Self {
        Self {
            headers: headers.to_vec(),
            rows: Vec::new(),
        }
    }

    /// Appends a row (missing cells print empty; extra cells are dropped).
    pub fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    /// True when no row was added.
    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    /// Writes the header line and the rows.
    pub fn write(&self, out: &mut dyn Write) -> io::Result<()> {
        let cols = self.headers.len();
        let mut widths: Vec<usize> = self.headers.iter().map(|h| h.chars().count()).collect();
        for row in &self.rows {
            for (w, cell) in widths.iter_mut().zip(row) {
                *w = (*w).max(cell.chars().count());
            }
        }
        let header: Vec<String> = self.headers.iter().map(|h| (*h).to_owned()).collect();
        for row in std::iter::once(&header).chain(&self.rows) {
            let mut line = String::new();
            for (i, width) in widths.iter().enumerate() {
                let cell = row.get(i).map_or("", String::as_str);
                if i + 1 == cols {
                    line.push_str(cell);
                } else {
                    line.push_str(cell);
                    let pad = width - cell.chars().count() + 2;
                    line.extend(std::iter::repeat_n(' ', pad));
                }
            }
            writeln!(out, "{}", line.trim_end())?;
        }
        Ok(())
    }
}

/// Writes `value` as pretty JSON and a newline.
pub fn json_pretty(out: &mut dyn Write, value: &impl Serialize) -> Result<(), crate::CliError> {
    serde_json::to_writer_pretty(&mut *out, value)?;
    writeln!(out)?;
    Ok(())
}

/// Writes `value` as one line of compact JSON.
pub fn json_line(out: &mut dyn Write, value: &impl Serialize) -> Result<(), crate::CliError> {
    serde_json::to_writer(&mut *out, value)?;
    writeln!(out)?;
    Ok(())
}

/// `850ms`, `3.2s`, `4m05s`, `2h07m`.
pub fn duration_ms(ms: u64) -> String {
    if ms >= NEVER_MS {
        // The embedded control plane's own session does not expire.
        "never".to_owned()
    } else if ms < 1_000 {
        format!("{ms}ms")
    } else if ms < 60_000 {
        // One decimal, truncated: never claims more time than there is.
        format!("{}.{}s", ms / 1_000, (ms % 1_000) / 100)
    } else if ms < 3_600_000 {
        let s = ms / 1_000;
        format!("{}m{:02}s", s / 60, s % 60)
    } else {
        let m = ms / 60_000;
        format!("{}h{:02}m", m / 60, m % 60)
    }
}

/// A year: anything longer is shown as `never`.
const NEVER_MS: u64 = 365 * 24 * 3_600_000;

fn list_or_dash(items: &[String]) -> String {
    if items.is_empty() {
        "-".to_owned()
    } else {
        items.join(",")
    }
}

fn health(e: &EndpointView) -> String {
    let mut text = if e.healthy {
        "ok".to_owned()
    } else if e.health_detail.is_empty() {
        "down".to_owned()
    } else {
        format!("down: {}", e.health_detail)
    };
    let failed: Vec<&str> = e
        .failing_models
        .iter()
        .filter(|m| !e.missing_models.contains(m))
        .map(String::as_str)
        .collect();
    if !failed.is_empty() {
        text.push_str(&format!(" (failing: {})", failed.join(",")));
    }
    if !e.missing_models.is_empty() {
        text.push_str(&format!(" (missing: {})", e.missing_models.join(",")));
    }
    text
}

/// The value, or a dash for an empty one (an empty cell would shift the
/// columns for a reader splitting on whitespace).
fn or_dash(value: &str) -> String {
    if value.is_empty() {
        "-".to_owned()
    } else {
        value.to_owned()
    }
}

fn drain_state(draining: bool) -> &'static str {
    if draining { "draining" } else { "active" }
}

fn circuit(open: bool, half_open: bool) -> &'static str {
    match (open, half_open) {
        (true, true) => "trial",
        (false, true) => "half-open",
        (true, false) => "open",
        (false, false) => "closed",
    }
}

fn yes_no(b: bool) -> &'static str {
    if b { "yes" } else { "no" }
}

/// The endpoints table.
pub fn endpoints(out: &mut dyn Write, state: &StateView) -> io::Result<()> {
    if state.endpoints.is_empty() {
        return writeln!(out, "no endpoints configured");
    }
    let mut t = Table::new(&[
        "URL",
        "KIND",
        "VERSION",
        "HEALTH",
        "DRAIN",
        "CIRCUIT",
        "IN-FLIGHT",
        "LIMIT/MODEL",
        "ADVERTISED",
        "LOADED",
    ]);
    for e in &state.endpoints {
        t.row(vec![
            e.url.clone(),
            e.kind.clone(),
            or_dash(&e.server_version),
            health(e),
            drain_state(e.draining).to_owned(),
            circuit(e.circuit_open, e.circuit_half_open).to_owned(),
            e.in_flight.to_string(),
            e.max_concurrent.to_string(),
            list_or_dash(&e.advertised_models),
            list_or_dash(&e.loaded_models),
        ]);
    }
    t.write(out)
}

/// The models table: one row per model × endpoint serving it.
pub fn models(out: &mut dyn Write, models: &ModelsView) -> io::Result<()> {
    if models.models.is_empty() {
        return writeln!(out, "no models advertised by any endpoint");
    }
    let mut t = Table::new(&[
        "MODEL",
        "IN-FLIGHT",
        "ENDPOINT",
        "KIND",
        "AS",
        "LOADED",
        "EP-IN-FLIGHT",
        "STATE",
    ]);
    for m in &models.models {
        for e in &m.endpoints {
            let state = match (e.healthy, e.draining) {
                (_, true) => "draining",
                (true, false) => "ok",
                (false, false) => "down",
            };
            t.row(vec![
                m.model.clone(),
                m.in_flight.to_string(),
                e.url.clone(),
                e.kind.clone(),
                or_dash(&e.advertised_as),
                yes_no(e.loaded).to_owned(),
                e.in_flight.to_string(),
                state.to_owned(),
            ]);
        }
    }
    t.write(out)
}

/// The usage table with a totals row.
pub fn usage(out: &mut dyn Write, usage: &UsageView) -> io::Result<()> {
    let mut t = Table::new(&[
        "ENDPOINT",
        "MODEL",
        "IN-FLIGHT",
        "REQUESTS",
        "PROMPT-TOKENS",
        "COMPLETION-TOKENS",
    ]);
    for r in &usage.rows {
        t.row(vec![
            r.endpoint.clone(),
            r.model.clone(),
            r.in_flight.to_string(),
            r.requests.to_string(),
            r.prompt_tokens.to_string(),
            r.completion_tokens.to_string(),
        ]);
    }
    let totals = &usage.totals;
    t.row(vec![
        "TOTAL".to_owned(),
        String::new(),
        totals.in_flight.to_string(),
        totals.requests.to_string(),
        totals.prompt_tokens.to_string(),
        totals.completion_tokens.to_string(),
    ]);
    t.write(out)
}

/// The sessions table.
pub fn sessions(out: &mut dyn Write, sessions: &SessionsView) -> io::Result<()> {
    if sessions.sessions.is_empty() {
        return writeln!(out, "no sidecar sessions");
    }
    let mut t = Table::new(&["ID", "NAME", "LEASES", "LAST-KEEPALIVE", "EXPIRES-IN"]);
    for s in &sessions.sessions {
        t.row(vec![
            // As the sidecars and the control plane log it.
            format!("{:016x}", s.id),
            s.name.clone(),
            s.leases.to_string(),
            format!("{} ago", duration_ms(s.last_keepalive_ms_ago)),
            duration_ms(s.expires_in_ms),
        ]);
    }
    t.write(out)
}

/// The affinity count and sample.
pub fn affinity(out: &mut dyn Write, affinity: &AffinityView) -> io::Result<()> {
    let shown = affinity.entries.len();
    if shown == 0 {
        return writeln!(out, "affinity entries: {}", affinity.total);
    }
    writeln!(
        out,
        "affinity entries: {} (showing {shown})",
        affinity.total
    )?;
    let mut t = Table::new(&["KEY", "ENDPOINT", "MODEL", "EXPIRES-IN"]);
    for e in &affinity.entries {
        t.row(vec![
            e.key.clone(),
            e.endpoint.clone(),
            e.model.clone(),
            duration_ms(e.expires_in_ms),
        ]);
    }
    t.write(out)
}

/// What a decision reason means, for humans.
pub fn explain_reason(reason: DecisionReason) -> &'static str {
    match reason {
        DecisionReason::Affinity => "the conversation's previous endpoint, still loaded and free",
        DecisionReason::LoadedFree => "model loaded there and a slot free; least in-flight",
        DecisionReason::FreeSlot => "not loaded anywhere with a free slot; a free slot here",
        DecisionReason::Saturated => "every candidate saturated; least utilization (would queue)",
    }
}

/// A dry-run choice, as `key: value` lines.
pub fn choice(out: &mut dyn Write, c: &ChoiceView) -> io::Result<()> {
    let lines = [
        ("model", c.model.clone()),
        ("endpoint", c.endpoint.clone()),
        ("kind", c.endpoint_kind.clone()),
        ("backend model", c.backend_model.clone()),
        ("tracking model", c.tracking_model.clone()),
        (
            "reason",
            format!("{} ({})", c.reason.as_str(), explain_reason(c.reason)),
        ),
    ];
    for (k, v) in lines {
        writeln!(out, "{:<16}{v}", format!("{k}:"))?;
    }
    Ok(())
}

/// The result of `drain` / `undrain`.
pub fn drain(out: &mut dyn Write, d: &DrainView) -> io::Result<()> {
    let e = &d.endpoint;
    if e.draining {
        writeln!(
            out,
            "{} is draining: no new requests; {} in flight (limit {} per model)",
            e.url, e.in_flight, e.max_concurrent
        )
    } else {
        writeln!(
            out,
            "{} is active: receiving requests; {} in flight (limit {} per model)",
            e.url, e.in_flight, e.max_concurrent
        )
    }
}

/// One `watch` frame: a summary line, the endpoints, then the usage rows.
pub fn watch_frame(out: &mut dyn Write, state: &StateView) -> io::Result<()> {
    writeln!(
        out,
        "version {}  sessions {}  leases {}  in-flight {}  affinity entries {}",
        state.version, state.sessions, state.leases, state.in_flight, state.affinity_entries
    )?;
    writeln!(out)?;
    endpoints(out, state)?;
    writeln!(out)?;
    usage(out, &UsageView::from(state))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use switchyard_proto::v1;

    use super::*;
    use crate::view::tests::sample_state;

    fn text(f: impl FnOnce(&mut dyn Write) -> io::Result<()>) -> String {
        let mut buf = Vec::new();
        f(&mut buf).unwrap();
        String::from_utf8(buf).unwrap()
    }

    fn state() -> StateView {
        StateView::try_from(sample_state()).unwrap()
    }

    #[test]
    fn table_aligns_columns_without_trailing_spaces() {
        let mut t = Table::new(&["A", "LONG-HEADER", "C"]);
        t.row(vec!["wide-cell".into(), "x".into(), "last".into()]);
        t.row(vec!["y".into(), "z".into(), String::new()]);
        let out = text(|o| t.write(o));
        assert_eq!(
            out,
            "A          LONG-HEADER  C\n\
             wide-cell  x            last\n\
             y          z\n"
        );
    }

    #[test]
    fn health_tells_failed_completions_from_missing_models() {
        let mut e = state().endpoints.remove(0);
        e.failing_models = vec!["llama3".into(), "qwen3".into()];
        e.missing_models = vec!["qwen3".into()];
        assert_eq!(health(&e), "ok (failing: llama3) (missing: qwen3)");
        e.failing_models = vec!["qwen3".into()];
        assert_eq!(health(&e), "ok (missing: qwen3)");
    }

    #[test]
    fn circuit_names_each_breaker_state() {
        assert_eq!(circuit(false, false), "closed");
        assert_eq!(circuit(true, false), "open");
        assert_eq!(circuit(false, true), "half-open");
        assert_eq!(circuit(true, true), "trial");
    }

    #[test]
    fn endpoints_table_shows_every_column() {
        let out = text(|o| endpoints(o, &state()));
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines.len(), 3, "{out}");
        assert!(lines[0].starts_with("URL") && lines[0].contains("CIRCUIT"));
        let ollama = lines[1];
        for want in [
            "http://10.0.0.5:11434",
            "ollama",
            " ok ",
            "active",
            "closed",
            "llama3:latest,qwen3:8b",
        ] {
            assert!(ollama.contains(want), "{want:?} missing in {ollama:?}");
        }
        // In flight over all models, and the limit, which is per model.
        let cell = |line: &str, header: &str| -> String {
            let at = lines[0].find(header).unwrap();
            line[at..].split_whitespace().next().unwrap().to_owned()
        };
        assert_eq!(
            (cell(ollama, "IN-FLIGHT"), cell(ollama, "LIMIT/MODEL")),
            ("2".to_owned(), "4".to_owned())
        );
        // The version Ollama reported; a dash where none is known.
        assert_eq!(cell(ollama, "VERSION"), "0.5.7");
        let vllm = lines[2];
        for want in [
            "openai",
            "down: connection refused (failing: llama3)",
            "draining",
        ] {
            assert!(vllm.contains(want), "{want:?} missing in {vllm:?}");
        }
        assert_eq!(cell(ollama, "CIRCUIT"), "closed");
        assert_eq!(cell(vllm, "CIRCUIT"), "half-open");
        assert_eq!(
            (cell(vllm, "IN-FLIGHT"), cell(vllm, "LIMIT/MODEL")),
            ("0".to_owned(), "8".to_owned())
        );
        assert_eq!(cell(vllm, "VERSION"), "-");
        // No loaded models: a dash, not an empty cell.
        assert!(vllm.trim_end().ends_with('-'), "{vllm:?}");
    }

    #[test]
    fn empty_listings_say_so() {
        let empty = StateView::try_from(v1::ClusterState::default()).unwrap();
        assert_eq!(text(|o| endpoints(o, &empty)), "no endpoints configured\n");
        assert_eq!(
            text(|o| models(o, &ModelsView::from(&empty))),
            "no models advertised by any endpoint\n"
        );
        assert_eq!(
            text(|o| sessions(o, &SessionsView { sessions: vec![] })),
            "no sidecar sessions\n"
        );
        let u = text(|o| usage(o, &UsageView::from(&empty)));
        assert!(u.lines().nth(1).unwrap().starts_with("TOTAL"), "{u}");
    }

    #[test]
    fn models_table_has_a_row_per_endpoint() {
        let out = text(|o| models(o, &ModelsView::from(&state())));
        let rows: Vec<&str> = out.lines().skip(1).collect();
        assert_eq!(rows.len(), 3, "{out}");
        assert!(rows[0].starts_with("llama3:latest") && rows[0].contains("yes"));
        assert!(rows[1].contains("https://vllm.internal/v1") && rows[1].contains("draining"));
        assert!(rows[2].starts_with("qwen3:8b") && rows[2].contains("no"));
    }

    #[test]
    fn usage_table_ends_with_totals() {
        let out = text(|o| usage(o, &UsageView::from(&state())));
        let last = out.lines().last().unwrap();
        let cells: Vec<&str> = last.split_whitespace().collect();
        assert_eq!(cells, ["TOTAL", "2", "4", "105", "46"]);
    }

    #[test]
    fn sessions_and_affinity_tables() {
        let s = SessionsView::from(v1::ListSessionsResponse {
            sessions: vec![v1::SessionInfo {
                session_id: 9,
                name: "ingress-a".into(),
                leases: 3,
                last_keepalive_ms_ago: 1_250,
                expires_in_ms: 8_750,
            }],
        });
        let out = text(|o| sessions(o, &s));
        let row = out.lines().nth(1).unwrap();
        let cells: Vec<&str> = row.split_whitespace().collect();
        assert_eq!(
            cells,
            ["0000000000000009", "ingress-a", "3", "1.2s", "ago", "8.7s"]
        );

        let a = AffinityView::from(v1::ListAffinityResponse {
            total: 40,
            entries: vec![v1::AffinityEntry {
                key: "k1".into(),
                endpoint: "http://a:1".into(),
                model: "m:latest".into(),
                expires_in_ms: 61_000,
            }],
        });
        let out = text(|o| affinity(o, &a));
        assert!(
            out.starts_with("affinity entries: 40 (showing 1)\n"),
            "{out}"
        );
        assert!(out.contains("k1") && out.contains("1m01s"), "{out}");
    }

    #[test]
    fn choice_lines() {
        let c = ChoiceView {
            model: "llama3".into(),
            endpoint: "http://a:1".into(),
            endpoint_kind: "ollama".into(),
            backend_model: "llama3:latest".into(),
            tracking_model: "llama3:latest".into(),
            reason: DecisionReason::LoadedFree,
        };
        let out = text(|o| choice(o, &c));
        assert!(out.contains("endpoint:       http://a:1\n"), "{out}");
        assert!(out.contains("backend model:  llama3:latest\n"), "{out}");
        assert!(out.contains("reason:         loaded_free ("), "{out}");
    }

    #[test]
    fn drain_message_says_the_new_state() {
        let mut e = state().endpoints[0].clone();
        e.draining = true;
        let out = text(|o| {
            drain(
                o,
                &DrainView {
                    endpoint: e.clone(),
                },
            )
        });
        assert!(
            out.starts_with("http://10.0.0.5:11434 is draining"),
            "{out}"
        );
        assert!(out.contains("in flight (limit 4 per model)"), "{out}");
        e.draining = false;
        let out = text(|o| drain(o, &DrainView { endpoint: e }));
        assert!(out.contains("is active"), "{out}");
    }

    #[test]
    fn durations() {
        assert_eq!(duration_ms(0), "0ms");
        assert_eq!(duration_ms(999), "999ms");
        assert_eq!(duration_ms(1_999), "1.9s");
        assert_eq!(duration_ms(59_999), "59.9s");
        assert_eq!(duration_ms(60_000), "1m00s");
        assert_eq!(duration_ms(3_599_999), "59m59s");
        assert_eq!(duration_ms(3_600_000 * 2 + 7 * 60_000), "2h07m");
        assert_eq!(duration_ms(NEVER_MS - 60_000), "8759h59m");
        assert_eq!(duration_ms(876_000 * 3_600_000), "never");
    }

    #[test]
    fn json_field_names_are_stable() {
        let s = state();
        let v = serde_json::to_value(&s).unwrap();
        let keys = |v: &serde_json::Value| {
            let mut k: Vec<String> = v.as_object().unwrap().keys().cloned().collect();
            k.sort();
            k
        };
        assert_eq!(
            keys(&v),
            [
                "affinity_entries",
                "conversation_affinity",
                "endpoints",
                "in_flight",
                "leases",
                "priority_routing",
                "sessions",
                "version"
            ]
        );
        assert_eq!(
            keys(&v["endpoints"][0]),
            [
                "advertised_models",
                "circuit_half_open",
                "circuit_open",
                "draining",
                "failing_models",
                "health_detail",
                "healthy",
                "in_flight",
                "kind",
                "last_probe_ok_unix_ms",
                "loaded_models",
                "max_concurrent",
                "missing_models",
                "priority",
                "server_version",
                "url",
                "usage"
            ]
        );
        let mut line = Vec::new();
        json_line(&mut line, &s).unwrap();
        let line = String::from_utf8(line).unwrap();
        assert_eq!(line.matches('\n').count(), 1);
        let back: StateView = serde_json::from_str(&line).unwrap();
        assert_eq!(back, s);
    }

    #[test]
    fn watch_frame_has_summary_endpoints_and_usage() {
        let out = text(|o| watch_frame(o, &state()));
        assert!(
            out.starts_with("version 7  sessions 1  leases 2  in-flight 2"),
            "{out}"
        );
        assert!(out.contains("URL") && out.contains("TOTAL"), "{out}");
    }
}
