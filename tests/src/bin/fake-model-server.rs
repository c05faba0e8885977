//! `fake-model-server`: the fake model server of
//! `switchyard_tests::fake_backend` as a separate process, for benchmarks and
//! manual tests. Prints `LISTENING http://ADDR` as its first stdout line, then
//! serves until killed (or Ctrl-C). No request recording, no per-request
//! logging.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use switchyard_tests::fake_backend::{FakeBackend, FakeConfig, FakeMode};

/// Fake Ollama / OpenAI / llama-server model server.
#[derive(Debug, Parser)]
#[command(name = "fake-model-server", version)]
struct Args {
    /// Server to imitate: ollama, openai or llama-server.
    #[arg(long, env = "FAKE_MODE", default_value = "ollama")]
    mode: FakeMode,
    /// Address to listen on (port 0 picks a free port).
    #[arg(long, env = "FAKE_LISTEN", default_value = "127.0.0.1:0")]
    listen: SocketAddr,
    /// Advertised models, comma-separated.
    #[arg(
        long,
        env = "FAKE_MODELS",
        value_delimiter = ',',
        default_value = "llama3:latest"
    )]
    models: Vec<String>,
    /// Loaded models, comma-separated (default: none).
    #[arg(long, env = "FAKE_LOADED", value_delimiter = ',')]
    loaded: Vec<String>,
    /// Milliseconds before the first response byte.
    #[arg(long, env = "FAKE_DELAY_MS", default_value_t = 0)]
    delay_ms: u64,
    /// Milliseconds between stream chunks.
    #[arg(long, env = "FAKE_CHUNK_DELAY_MS", default_value_t = 0)]
    chunk_delay_ms: u64,
    /// Content chunks per reply.
    #[arg(long, env = "FAKE_CHUNKS", default_value_t = 8)]
    chunks: usize,
    /// Require `Authorization: Bearer KEY`.
    #[arg(long, env = "FAKE_API_KEY")]
    api_key: Option<String>,
    /// Serve no /v1/completions.
    #[arg(long)]
    no_completions: bool,
    /// Embedding vector length.
    #[arg(long, default_value_t = 8)]
    embedding_dims: usize,
    /// Value of the x-fake-backend response header.
    #[arg(long, default_value = "fake")]
    label: String,
}

impl Args {
    fn config(self) -> FakeConfig {
        let mut config = FakeConfig::new(self.mode)
            .listen(self.listen)
            .models(&self.models)
            .loaded(&self.loaded)
            .delay(Duration::from_millis(self.delay_ms))
            .chunk_delay(Duration::from_millis(self.chunk_delay_ms))
            .chunks(self.chunks)
            .embedding_dims(self.embedding_dims)
            .label(self.label)
            .record_capacity(0);
        config.api_key = self.api_key;
        config.no_completions = self.no_completions;
        config
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    let backend = match FakeBackend::try_start(args.config()).await {
        Ok(b) => b,
        Err(e) => {
            eprintln!("fake-model-server: {e}");
            return ExitCode::from(1);
        }
    };
    println!("LISTENING {}", backend.url());
    // Runs until the process is killed; Ctrl-C ends it cleanly.
    if let Err(e) = tokio::signal::ctrl_c().await {
        eprintln!("fake-model-server: cannot wait for Ctrl-C: {e}");
        std::future::pending::<()>().await;
    }
    backend.shutdown().await;
    ExitCode::SUCCESS
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    #[test]
    fn parses_the_documented_flags() {
        let args = Args::try_parse_from([
            "fake-model-server",
            "--mode",
            "llama-server",
            "--listen",
            "127.0.0.1:0",
            "--models",
            "a,b",
            "--loaded",
            "a",
            "--delay-ms",
            "5",
            "--chunks",
            "4",
            "--api-key",
            "k",
            "--no-completions",
        ])
        .unwrap();
        assert_eq!(args.mode, FakeMode::LlamaServer);
        assert_eq!(args.models, ["a", "b"]);
        assert_eq!(args.loaded, ["a"]);
        let config = args.config();
        assert_eq!(config.delay, Duration::from_millis(5));
        assert_eq!(config.chunks, 4);
        assert_eq!(config.api_key.as_deref(), Some("k"));
        assert!(config.no_completions);
        assert_eq!(config.record_capacity, 0);
    }

    #[test]
    fn rejects_an_unknown_mode() {
        assert!(Args::try_parse_from(["fake-model-server", "--mode", "vllm"]).is_err());
    }
}
