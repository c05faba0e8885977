//! What can go wrong at run time, classified once so `main` can turn every
//! failure into one clear line and exit code 1 (usage errors never get here:
//! clap reports them and exits 2).
//!
//! Invariant: every message about the control plane names the address that
//! was tried, so an operator can tell a wrong `--control-plane` from a down
//! server.

use std::{error::Error as _, io, time::Duration};

/// A run-time failure of a command.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// The control plane could not be reached (connect failed or timed out,
    /// or the connection broke).
    #[error("cannot reach control plane at {addr}: {cause}")]
    Unreachable {
        /// Address tried.
        addr: String,
        /// Root cause in a few words ("connection refused").
        cause: String,
    },
    /// The control plane did not answer within the call deadline.
    #[error("control plane at {addr} did not answer within {}s", deadline.as_secs_f64())]
    Deadline {
        /// Address tried.
        addr: String,
        /// The deadline.
        deadline: Duration,
    },
    /// An unknown model or endpoint: the server's message, verbatim.
    #[error("{message}")]
    NotFound {
        /// The server's message.
        message: String,
    },
    /// What answered is an HTTP server, not a gRPC one (tonic maps its
    /// status to a gRPC code: "grpc-status header missing, mapped from
    /// HTTP status code 404").
    #[error(
        "{addr} answered plain HTTP, not gRPC ({message}): is it the control plane's gRPC \
         address (its --listen), not its metrics port or a sidecar?"
    )]
    NotGrpc {
        /// Address tried.
        addr: String,
        /// tonic's message.
        message: String,
    },
    /// Any other gRPC error status: the server's message first.
    #[error("{message} ({code:?} from control plane at {addr})")]
    Status {
        /// Address tried.
        addr: String,
        /// gRPC status code.
        code: tonic::Code,
        /// The server's message.
        message: String,
    },
    /// The watch stream broke (as opposed to ending normally).
    #[error("watch stream from control plane at {addr} broke: {message}")]
    StreamBroken {
        /// Address watched.
        addr: String,
        /// What happened.
        message: String,
    },
    /// The server sent a message this CLI cannot interpret.
    #[error("invalid response from control plane: field `{field}`: {problem}")]
    InvalidResponse {
        /// Field path in the response.
        field: String,
        /// What is wrong with it.
        problem: String,
    },
    /// Writing the output failed.
    #[error("cannot write output: {0}")]
    Output(#[from] io::Error),
    /// Serializing JSON output failed.
    #[error("cannot encode JSON output: {0}")]
    Json(#[from] serde_json::Error),
}

impl CliError {
    /// True when the failure is only that stdout was closed early
    /// (`switchyard watch | head`): not worth an error message.
    pub fn is_broken_pipe(&self) -> bool {
        match self {
            Self::Output(e) => e.kind() == io::ErrorKind::BrokenPipe,
            Self::Json(e) => e.io_error_kind() == Some(io::ErrorKind::BrokenPipe),
            _ => false,
        }
    }

    /// Classifies a failed connection attempt.
    pub fn connect(addr: &str, err: &tonic::transport::Error) -> Self {
        Self::Unreachable {
            addr: addr.to_owned(),
            cause: root_cause(err),
        }
    }

    /// Classifies a failed call.
    pub fn status(addr: &str, status: tonic::Status, deadline: Duration) -> Self {
        match status.code() {
            tonic::Code::NotFound => Self::NotFound {
                message: status.message().to_owned(),
            },
            tonic::Code::DeadlineExceeded => Self::Deadline {
                addr: addr.to_owned(),
                deadline,
            },
            // A connection that breaks (or cannot be re-established) after
            // the first connect surfaces as UNAVAILABLE with a transport
            // source error.
            tonic::Code::Unavailable | tonic::Code::Unknown if status.source().is_some() => {
                Self::Unreachable {
                    addr: addr.to_owned(),
                    cause: root_cause(&status),
                }
            }
            // Plain HTTP: an answer without gRPC's status header, or a body
            // read as gRPC frames (a JSON error's `{` is flag 123).
            _ if status.message().starts_with("grpc-status header missing")
                || status.message().contains("invalid compression flag") =>
            {
                Self::NotGrpc {
                    addr: addr.to_owned(),
                    message: status.message().to_owned(),
                }
            }
            code => Self::Status {
                addr: addr.to_owned(),
                code,
                message: status.message().to_owned(),
            },
        }
    }
}

/// The innermost cause of an error chain, in a few words: `io::Error`s that
/// mean "nobody there" get a plain phrase; anything else its own message.
fn root_cause(err: &(dyn std::error::Error + 'static)) -> String {
    let mut current: &(dyn std::error::Error + 'static) = err;
    let mut io_kind = None;
    loop {
        if let Some(io) = current.downcast_ref::<io::Error>() {
            io_kind = Some(io.kind());
        }
        match current.source() {
            Some(next) => current = next,
            None => break,
        }
    }
    match io_kind {
        Some(io::ErrorKind::ConnectionRefused) => "connection refused".to_owned(),
        Some(io::ErrorKind::ConnectionReset) => "connection reset".to_owned(),
        Some(io::ErrorKind::TimedOut) => "connection timed out".to_owned(),
        Some(io::ErrorKind::HostUnreachable) => "host unreachable".to_owned(),
        Some(io::ErrorKind::NetworkUnreachable) => "network unreachable".to_owned(),
        _ => {
            let text = current.to_string();
            // tonic's connect timeout is an opaque "timed out" error.
            if text.is_empty() {
                err.to_string()
            } else {
                text
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    #[test]
    fn not_found_is_the_servers_message() {
        let e = CliError::status(
            "http://cp:1",
            tonic::Status::not_found("model \"x\" not found; available models: a, b"),
            Duration::from_secs(1),
        );
        assert_eq!(
            e.to_string(),
            "model \"x\" not found; available models: a, b"
        );
    }

    #[test]
    fn other_statuses_name_the_address() {
        let e = CliError::status(
            "http://cp:1",
            tonic::Status::invalid_argument("model is empty"),
            Duration::from_secs(1),
        );
        let text = e.to_string();
        assert!(
            text.contains("http://cp:1") && text.contains("model is empty"),
            "{text}"
        );
        let e = CliError::status(
            "http://cp:1",
            tonic::Status::deadline_exceeded("late"),
            Duration::from_secs(10),
        );
        assert_eq!(
            e.to_string(),
            "control plane at http://cp:1 did not answer within 10s"
        );
    }

    #[test]
    fn a_plain_http_server_is_named_as_not_grpc() {
        let e = CliError::status(
            "http://cp:9090",
            tonic::Status::unimplemented(
                "grpc-status header missing, mapped from HTTP status code 404",
            ),
            Duration::from_secs(1),
        );
        let text = e.to_string();
        assert!(
            text.starts_with("http://cp:9090 answered plain HTTP, not gRPC")
                && text.contains("metrics port"),
            "{text}"
        );
    }

    #[test]
    fn a_json_error_body_is_named_as_not_grpc() {
        // What a sidecar's port answers (401 with a JSON error) reads as.
        let e = CliError::status(
            "http://sidecar:12434",
            tonic::Status::internal(
                "protocol error: received message with invalid compression flag: 123 \
                 (valid flags are 0 and 1) while receiving response with status: \
                 401 Unauthorized",
            ),
            Duration::from_secs(1),
        );
        let text = e.to_string();
        assert!(
            text.starts_with("http://sidecar:12434 answered plain HTTP, not gRPC")
                && text.contains("a sidecar?"),
            "{text}"
        );
    }

    #[test]
    fn root_cause_of_refused_connection() {
        #[derive(Debug, thiserror::Error)]
        #[error("transport error")]
        struct Outer(#[source] io::Error);
        let err = Outer(io::Error::from(io::ErrorKind::ConnectionRefused));
        assert_eq!(root_cause(&err), "connection refused");
    }

    #[test]
    fn broken_pipe_is_recognised() {
        let e = CliError::Output(io::Error::from(io::ErrorKind::BrokenPipe));
        assert!(e.is_broken_pipe());
        let e = CliError::NotFound {
            message: "x".into(),
        };
        assert!(!e.is_broken_pipe());
    }
}
