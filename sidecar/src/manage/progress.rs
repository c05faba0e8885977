//! The merge of several endpoints' progress streams into one, and the
//! summary of a fan-out's failures: pure types, no I/O.
//!
//! Rules (see [`crate::manage`] for why):
//! - A line with a `digest` is aggregated per digest. A digest names the
//!   same bytes on every endpoint, so `total` is the layer's size as the
//!   endpoints report it: the Ollama CLI fixes a bar's total at the first
//!   line it sees for a digest, so the total must not grow as more
//!   endpoints start. `completed` is the average over the endpoints taking
//!   part (failed ones are left out; one that has not reported the digest
//!   yet counts 0, one that succeeded counts the whole layer, so a layer it
//!   already had does not hold the bar back), each at its highest value so
//!   far, and the emitted value never goes down: the bar reaches the total
//!   when every endpoint has the layer.
//! - A status-only line (`pulling manifest`, `writing manifest`, ...) is
//!   emitted the first time any endpoint sends it.
//! - `{"status":"success"}` from an endpoint marks it succeeded and is not
//!   emitted; an `{"error":..}` line marks it failed (500, as Ollama answers
//!   a failed non-streamed pull). An endpoint that ends without either failed.
//! - [`ProgressMerge::finish`] is a success only when every endpoint
//!   succeeded; otherwise one error naming each failed endpoint.

use std::collections::{BTreeMap, HashSet};

use http::StatusCode;
use serde_json::{Map, Value, json};

/// Why one endpoint failed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EndpointFailure {
    /// The status to answer for it: the backend's own, 500 for an error
    /// line in its stream, 502 when it could not be reached.
    pub status: StatusCode,
    /// What went wrong (the backend's error text when it sent one).
    pub message: String,
}

impl EndpointFailure {
    /// A failure with `status` and `message`.
    pub fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
        }
    }
}

/// How a fan-out ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Final {
    /// Every endpoint succeeded.
    Success,
    /// Some failed: the first failure's status, and every failure named.
    Failed {
        /// The status to answer.
        status: StatusCode,
        /// `<what> failed on N of M endpoint(s): <endpoint>: <message>; ...`.
        message: String,
    },
}

impl Final {
    /// The last NDJSON object of a merged stream.
    pub fn to_line(&self) -> Value {
        match self {
            Self::Success => json!({ "status": "success" }),
            Self::Failed { message, .. } => json!({ "error": message }),
        }
    }
}

/// [`summarize`] of endpoint `names` and each one's result (`None`: it
/// succeeded), in the same order.
pub fn summarize_results(
    what: &str,
    names: &[String],
    results: &[Option<EndpointFailure>],
) -> Final {
    summarize(
        what,
        names
            .iter()
            .map(String::as_str)
            .zip(results.iter().map(Option::as_ref)),
    )
}

/// The result of a fan-out from each endpoint's result, in endpoint order:
/// success when all succeeded, otherwise the first failure's status and a
/// message naming every failed endpoint. `what` says what ran
/// (`pull 'llama3'`).
pub fn summarize<'a>(
    what: &str,
    results: impl IntoIterator<Item = (&'a str, Option<&'a EndpointFailure>)>,
) -> Final {
    let mut total = 0usize;
    let mut failed: Vec<(&str, &EndpointFailure)> = Vec::new();
    for (endpoint, failure) in results {
        total += 1;
        if let Some(failure) = failure {
            failed.push((endpoint, failure));
        }
    }
    let Some(status) = failed.first().map(|(_, f)| f.status) else {
        return Final::Success;
    };
    let named = failed
        .iter()
        .map(|(endpoint, f)| format!("{endpoint}: {}", f.message))
        .collect::<Vec<_>>()
        .join("; ");
    Final::Failed {
        status,
        message: format!(
            "{what} failed on {} of {total} endpoint(s): {named}",
            failed.len()
        ),
    }
}

/// Where one endpoint stands.
#[derive(Clone, Debug, PartialEq, Eq)]
enum State {
    Running,
    Succeeded,
    Failed(EndpointFailure),
}

/// One endpoint's report for one digest.
#[derive(Clone, Copy, Debug, Default)]
struct Part {
    total: u64,
    /// Highest `completed` seen; `None` until it sent one.
    completed: Option<u64>,
}

/// Merges the progress lines of several endpoints into one stream.
#[derive(Debug)]
pub struct ProgressMerge {
    /// Endpoint names (for the final error), by index.
    names: Vec<String>,
    states: Vec<State>,
    /// Status-only lines already emitted.
    seen: HashSet<String>,
    /// Per digest, each endpoint's part (indexed like `names`).
    digests: BTreeMap<String, Vec<Option<Part>>>,
    /// Per digest, the `completed` last emitted (emitted values never go
    /// down).
    emitted: BTreeMap<String, u64>,
}

impl ProgressMerge {
    /// A merge over endpoints named `names` (indices are positions).
    pub fn new(names: Vec<String>) -> Self {
        let states = vec![State::Running; names.len()];
        Self {
            names,
            states,
            seen: HashSet::new(),
            digests: BTreeMap::new(),
            emitted: BTreeMap::new(),
        }
    }

    /// Takes one line from `endpoint`; returns the line to emit, if any.
    pub fn observe(&mut self, endpoint: usize, line: &Value) -> Option<Value> {
        if !matches!(self.states.get(endpoint), Some(State::Running)) {
            // Unknown endpoint, or one that already finished: ignored.
            return None;
        }
        let Value::Object(fields) = line else {
            self.fail(
                endpoint,
                EndpointFailure::new(StatusCode::BAD_GATEWAY, "sent a non-object progress line"),
            );
            return None;
        };
        if let Some(error) = fields.get("error") {
            let message = error
                .as_str()
                .map_or_else(|| error.to_string(), str::to_owned);
            self.fail(
                endpoint,
                EndpointFailure::new(StatusCode::INTERNAL_SERVER_ERROR, message),
            );
            return None;
        }
        let status = fields.get("status").and_then(Value::as_str)?;
        if status == "success" {
            self.set(endpoint, State::Succeeded);
            return None;
        }
        match fields.get("digest").and_then(Value::as_str) {
            Some(digest) => Some(self.digest_line(endpoint, status, digest, fields)),
            None => self
                .seen
                .insert(status.to_owned())
                .then(|| Value::Object(fields.clone())),
        }
    }

    /// Records `endpoint` as failed (unless it already finished).
    pub fn fail(&mut self, endpoint: usize, failure: EndpointFailure) {
        if matches!(self.states.get(endpoint), Some(State::Running)) {
            self.set(endpoint, State::Failed(failure));
        }
    }

    /// `endpoint`'s stream ended: without a success line it failed.
    pub fn end(&mut self, endpoint: usize) {
        self.fail(
            endpoint,
            EndpointFailure::new(
                StatusCode::BAD_GATEWAY,
                "its stream ended without reporting success",
            ),
        );
    }

    /// The result once every stream ended; endpoints still running count as
    /// failed (their stream never ended: cut off).
    pub fn finish(&self, what: &str) -> Final {
        let cut_off = EndpointFailure::new(StatusCode::BAD_GATEWAY, "did not finish");
        summarize(
            what,
            self.names
                .iter()
                .zip(&self.states)
                .map(|(name, state)| match state {
                    State::Succeeded => (name.as_str(), None),
                    State::Failed(f) => (name.as_str(), Some(f)),
                    State::Running => (name.as_str(), Some(&cut_off)),
                }),
        )
    }

    fn set(&mut self, endpoint: usize, state: State) {
        if let Some(slot) = self.states.get_mut(endpoint) {
            *slot = state;
        }
    }

    /// Records `endpoint`'s numbers for `digest` and returns the merged
    /// line: the layer's size, and the average progress over the endpoints
    /// taking part (see the module docs).
    fn digest_line(
        &mut self,
        endpoint: usize,
        status: &str,
        digest: &str,
        fields: &Map<String, Value>,
    ) -> Value {
        let count = self.names.len();
        let parts = self
            .digests
            .entry(digest.to_owned())
            .or_insert_with(|| vec![None; count]);
        if let Some(slot) = parts.get_mut(endpoint) {
            let part = slot.get_or_insert_with(Part::default);
            if let Some(total) = fields.get("total").and_then(Value::as_u64) {
                part.total = part.total.max(total);
            }
            if let Some(completed) = fields.get("completed").and_then(Value::as_u64) {
                part.completed = Some(part.completed.unwrap_or(0).max(completed));
            }
        }
        let total = parts.iter().flatten().map(|p| p.total).max().unwrap_or(0);
        let any_completed = parts.iter().flatten().any(|p| p.completed.is_some());
        let mut out = json!({ "status": status, "digest": digest, "total": total });
        if !any_completed {
            return out;
        }
        let mut sum = 0u64;
        let mut taking_part = 0u64;
        for (state, part) in self.states.iter().zip(parts.iter()) {
            let done = match state {
                State::Failed(_) => continue,
                State::Succeeded => total,
                State::Running => part.and_then(|p| p.completed).unwrap_or(0),
            };
            sum = sum.saturating_add(done.min(total));
            taking_part += 1;
        }
        let average = sum.checked_div(taking_part).unwrap_or(0);
        let emitted = self.emitted.entry(digest.to_owned()).or_insert(0);
        *emitted = (*emitted).max(average).min(total);
        if let Value::Object(out) = &mut out {
            out.insert("completed".into(), (*emitted).into());
        }
        out
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    fn merge(n: usize) -> ProgressMerge {
        ProgressMerge::new((0..n).map(|i| format!("http://ep{i}")).collect())
    }

    fn digest(d: &str, total: u64, completed: Option<u64>) -> Value {
        let mut v = json!({"status": format!("pulling {d}"), "digest": d, "total": total});
        if let Some(c) = completed {
            v["completed"] = c.into();
        }
        v
    }

    #[test]
    fn status_lines_are_emitted_once() {
        let mut m = merge(2);
        let manifest = json!({"status": "pulling manifest"});
        assert_eq!(m.observe(0, &manifest), Some(manifest.clone()));
        assert_eq!(m.observe(1, &manifest), None);
        let writing = json!({"status": "writing manifest"});
        assert_eq!(m.observe(1, &writing), Some(writing.clone()));
        assert_eq!(m.observe(0, &writing), None);
    }

    #[test]
    fn a_digest_is_the_layers_size_and_the_average_progress() {
        let mut m = merge(3);
        let line = m.observe(0, &digest("sha256:a", 100, None)).unwrap();
        assert_eq!(line["total"], 100);
        assert!(line.get("completed").is_none(), "{line}");
        assert_eq!(line["status"], "pulling sha256:a");
        // The total stays the layer's size as more endpoints start.
        let line = m.observe(1, &digest("sha256:a", 100, Some(60))).unwrap();
        assert_eq!(
            (line["total"].as_u64(), line["completed"].as_u64()),
            (Some(100), Some(20))
        );
        let line = m.observe(0, &digest("sha256:a", 100, Some(30))).unwrap();
        assert_eq!(
            (line["total"].as_u64(), line["completed"].as_u64()),
            (Some(100), Some(30))
        );
        // An endpoint that already had the layer succeeds without
        // reporting it: it counts as complete, not as 0.
        m.observe(2, &json!({"status": "success"}));
        let line = m.observe(1, &digest("sha256:a", 100, Some(90))).unwrap();
        assert_eq!(line["completed"], 73, "{line}");
        let line = m.observe(0, &digest("sha256:a", 100, Some(100))).unwrap();
        assert_eq!(line["completed"], 96, "{line}");
        let line = m.observe(1, &digest("sha256:a", 100, Some(100))).unwrap();
        assert_eq!(line["completed"], 100, "{line}");
        // Another digest is counted on its own.
        let line = m.observe(0, &digest("sha256:b", 5, Some(5))).unwrap();
        assert_eq!(
            (line["total"].as_u64(), line["completed"].as_u64()),
            (Some(5), Some(3))
        );
    }

    #[test]
    fn a_failed_endpoint_leaves_the_average_without_lowering_it() {
        let mut m = merge(2);
        m.observe(0, &digest("sha256:a", 100, Some(80)));
        m.fail(
            0,
            EndpointFailure::new(StatusCode::BAD_GATEWAY, "connection reset"),
        );
        // Now only endpoint 1 takes part: 10 %, but 40 % was already shown.
        let line = m.observe(1, &digest("sha256:a", 100, Some(10))).unwrap();
        assert_eq!(line["completed"], 40, "{line}");
        let line = m.observe(1, &digest("sha256:a", 100, Some(70))).unwrap();
        assert_eq!(line["completed"], 70, "{line}");
    }

    #[test]
    fn completed_never_goes_down() {
        let mut m = merge(2);
        let mut last = 0;
        let steps = [
            (0, 50),
            (1, 20),
            (0, 10),
            (1, 60),
            (0, 100),
            (1, 30),
            (1, 100),
        ];
        for (ep, completed) in steps {
            let line = m
                .observe(ep, &digest("sha256:a", 100, Some(completed)))
                .unwrap();
            let now = line["completed"].as_u64().unwrap();
            assert!(now >= last, "went from {last} to {now}");
            assert_eq!(line["total"], 100, "{line}");
            assert!(now <= 100, "{line}");
            last = now;
        }
        assert_eq!(last, 100);
    }

    #[test]
    fn success_only_when_every_endpoint_succeeded() {
        let success = json!({"status": "success"});
        let mut m = merge(2);
        assert_eq!(m.observe(0, &success), None, "success is not forwarded");
        m.end(0);
        assert!(
            matches!(m.finish("pull 'x'"), Final::Failed { .. }),
            "ep1 still running"
        );
        m.observe(1, &success);
        m.end(1);
        assert_eq!(m.finish("pull 'x'"), Final::Success);
        assert_eq!(Final::Success.to_line(), json!({"status": "success"}));
    }

    #[test]
    fn failures_name_every_failed_endpoint() {
        let mut m = merge(3);
        m.observe(0, &json!({"status": "success"}));
        m.end(0);
        m.observe(
            1,
            &json!({"error": "pull model manifest: file does not exist"}),
        );
        // Lines after an error are ignored.
        assert_eq!(m.observe(1, &json!({"status": "success"})), None);
        m.end(1);
        m.fail(
            2,
            EndpointFailure::new(StatusCode::BAD_GATEWAY, "unreachable: refused"),
        );
        m.end(2);
        let Final::Failed { status, message } = m.finish("pull 'x'") else {
            panic!("expected a failure");
        };
        assert_eq!(
            status,
            StatusCode::INTERNAL_SERVER_ERROR,
            "first failure's status"
        );
        assert!(
            message.starts_with("pull 'x' failed on 2 of 3 endpoint(s): "),
            "{message}"
        );
        assert!(
            message.contains("http://ep1: pull model manifest: file does not exist"),
            "{message}"
        );
        assert!(
            message.contains("http://ep2: unreachable: refused"),
            "{message}"
        );
        assert!(!message.contains("http://ep0"), "{message}");
        let line = m.finish("pull 'x'").to_line();
        assert_eq!(line["error"], message.as_str());
    }

    #[test]
    fn a_stream_ending_without_success_is_a_failure() {
        let mut m = merge(1);
        m.observe(0, &json!({"status": "pulling manifest"}));
        m.end(0);
        let Final::Failed { status, message } = m.finish("create 'x'") else {
            panic!("expected a failure");
        };
        assert_eq!(status, StatusCode::BAD_GATEWAY);
        assert!(
            message.contains("http://ep0: its stream ended without reporting success"),
            "{message}"
        );
    }

    #[test]
    fn summarize_keeps_endpoint_order_and_first_status() {
        let not_found = EndpointFailure::new(StatusCode::NOT_FOUND, "model 'x' not found");
        let down = EndpointFailure::new(StatusCode::BAD_GATEWAY, "unreachable");
        assert_eq!(
            summarize("delete 'x'", [("a", None), ("b", None)]),
            Final::Success
        );
        let f = summarize(
            "delete 'x'",
            [("a", Some(&not_found)), ("b", None), ("c", Some(&down))],
        );
        assert_eq!(
            f,
            Final::Failed {
                status: StatusCode::NOT_FOUND,
                message: "delete 'x' failed on 2 of 3 endpoint(s): a: model 'x' not found; c: unreachable"
                    .into(),
            }
        );
    }
}
