//! Logging setup shared by the Switchyard binaries: `tracing` events to
//! stderr, as human-readable text or one JSON object per line, filtered by
//! `RUST_LOG` (default `info`).
//!
//! Secrets never reach the logs through here: configuration is never logged
//! whole, and [`Secret`](crate::config::Secret) prints as `***`.

use tracing_subscriber::EnvFilter;

/// Log line format.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line (for log collectors).
    Json,
}

/// The filter from `RUST_LOG`, or `info` when it is unset or invalid.
fn filter() -> EnvFilter {
    EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"))
}

/// Installs the global subscriber. Call once, early in `main`. A second call
/// (tests, an embedding binary that set up its own) leaves the first
/// subscriber in place.
pub fn init(format: LogFormat) {
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter())
        .with_writer(std::io::stderr);
    // `try_init` fails only when a global subscriber is already set; keeping
    // that one is the right outcome, so the error carries nothing to act on.
    let _already_set = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn init_twice_is_harmless() {
        init(LogFormat::Json);
        init(LogFormat::Text);
        tracing::info!("still logging");
    }
}
