//! Token counts and llama.cpp timings read from OpenAI-shaped bodies and
//! stream chunks.
//!
//! `usage` is authoritative when present; llama-server `timings` are the
//! fallback. Values are always *assigned* from the latest object carrying
//! them, never summed, so a server that repeats usage (llama.cpp on the
//! finish chunk and again in the usage chunk, vLLM continuous usage) is not
//! counted twice.

use serde_json::Value;

use super::TokenCounts;

/// A JSON number as `u64` (floats rounded, negatives and junk ignored).
pub(crate) fn num_u64(v: Option<&Value>) -> Option<u64> {
    let v = v?;
    let n = match v.as_u64() {
        Some(n) => n,
        None => {
            let f = v.as_f64()?;
            // Checked finite and non-negative; `as` saturates.
            if !(f.is_finite() && f >= 0.0) {
                return None;
            }
            f.round() as u64
        }
    };
    // A count no model produces in one request is a broken (or hostile)
    // backend's: taken as absent, so it cannot pin the cluster's totals.
    (n <= MAX_TOKEN_COUNT).then_some(n)
}

/// The largest token count believed for one request (the control plane's
/// own cap on what a release reports).
pub(crate) const MAX_TOKEN_COUNT: u64 =
    switchyard_control_plane::outcome::TokenCounts::MAX_PER_REQUEST;

/// OpenAI `usage` (`prompt_tokens`, `completion_tokens`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Usage {
    pub(crate) prompt: Option<u64>,
    pub(crate) completion: Option<u64>,
}

impl Usage {
    /// The `usage` object of a body or chunk, when it is an object
    /// (chat and completions name the counts `prompt_tokens` and
    /// `completion_tokens`; the Responses API `input_tokens` and
    /// `output_tokens`).
    pub(crate) fn of(body: &Value) -> Option<Self> {
        let u = body.get("usage")?.as_object()?;
        Some(Self {
            prompt: num_u64(u.get("prompt_tokens")).or_else(|| num_u64(u.get("input_tokens"))),
            completion: num_u64(u.get("completion_tokens"))
                .or_else(|| num_u64(u.get("output_tokens"))),
        })
    }
}

/// llama-server `timings` (counts and milliseconds).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub(crate) struct Timings {
    pub(crate) prompt_n: Option<u64>,
    pub(crate) cache_n: Option<u64>,
    pub(crate) predicted_n: Option<u64>,
    pub(crate) prompt_ms: Option<f64>,
    pub(crate) predicted_ms: Option<f64>,
}

impl Timings {
    /// The `timings` object of a body or chunk, when it is an object.
    pub(crate) fn of(body: &Value) -> Option<Self> {
        let t = body.get("timings")?.as_object()?;
        Some(Self {
            prompt_n: num_u64(t.get("prompt_n")),
            cache_n: num_u64(t.get("cache_n")),
            predicted_n: num_u64(t.get("predicted_n")),
            prompt_ms: t.get("prompt_ms").and_then(Value::as_f64),
            predicted_ms: t.get("predicted_ms").and_then(Value::as_f64),
        })
    }
}

/// Counts from `usage`, falling back to `timings`.
///
/// The timings fallback for the prompt is `prompt_n + cache_n`: llama.cpp's
/// `usage.prompt_tokens` includes the tokens reused from the KV cache
/// (`248 = 12 + 236` in its docs), so the fallback reports the same quantity.
pub(crate) fn token_counts(usage: Option<Usage>, timings: Option<Timings>) -> TokenCounts {
    let u = usage.unwrap_or_default();
    let t = timings.unwrap_or_default();
    let timing_prompt = t.prompt_n.map(|n| n.saturating_add(t.cache_n.unwrap_or(0)));
    TokenCounts {
        prompt: u.prompt.or(timing_prompt).unwrap_or(0),
        completion: u.completion.or(t.predicted_n).unwrap_or(0),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use serde_json::json;

    use super::*;

    #[test]
    fn usage_wins_over_timings() {
        let body = json!({
            "timings": {"cache_n": 236, "prompt_n": 12, "prompt_ms": 30.9, "predicted_n": 35, "predicted_ms": 661.0},
            "usage": {"prompt_tokens": 248, "completion_tokens": 35, "total_tokens": 283}
        });
        let tc = token_counts(Usage::of(&body), Timings::of(&body));
        assert_eq!(
            tc,
            TokenCounts {
                prompt: 248,
                completion: 35
            }
        );
    }

    #[test]
    fn timings_fallback_includes_cache() {
        let body = json!({"timings": {"cache_n": 236, "prompt_n": 12, "predicted_n": 35}});
        let tc = token_counts(Usage::of(&body), Timings::of(&body));
        assert_eq!(
            tc,
            TokenCounts {
                prompt: 248,
                completion: 35
            }
        );
        assert_eq!(token_counts(None, None), TokenCounts::default());
    }

    #[test]
    fn num_u64_is_lenient() {
        assert_eq!(num_u64(Some(&json!(3.6))), Some(4));
        assert_eq!(
            num_u64(Some(&json!(MAX_TOKEN_COUNT))),
            Some(MAX_TOKEN_COUNT)
        );
        assert_eq!(num_u64(Some(&json!(u64::MAX))), None);
        assert_eq!(num_u64(Some(&json!(1e30))), None);
        assert_eq!(num_u64(Some(&json!(-1))), None);
        assert_eq!(num_u64(Some(&json!("3"))), None);
        assert_eq!(Usage::of(&json!({"usage": null})), None);
    }
}
