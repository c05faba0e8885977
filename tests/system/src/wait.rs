//! Bounded waiting. Tests wait for a *condition* (a probe reaching a backend,
//! usage returning to 0), polling every [`POLL`], and panic after the
//! deadline with what they waited for and the last value seen. A passing
//! test never sleeps for the full deadline.

use std::{fmt::Debug, future::Future, time::Duration};

use tokio::time::Instant;

/// Polling period of the wait helpers.
pub const POLL: Duration = Duration::from_millis(10);

/// Waits until `condition()` is true; panics after `timeout` naming `what`.
pub async fn wait_until(what: &str, timeout: Duration, condition: impl FnMut() -> bool) {
    wait_for(what, timeout, condition, |ok| *ok).await;
}

/// Polls `probe()` until `done(&value)`; returns that value. Panics after
/// `timeout` with `what` and the last value seen.
pub async fn wait_for<T: Debug>(
    what: &str,
    timeout: Duration,
    mut probe: impl FnMut() -> T,
    mut done: impl FnMut(&T) -> bool,
) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        let value = probe();
        if done(&value) {
            return value;
        }
        if Instant::now() >= deadline {
            panic!("timed out after {timeout:?} waiting for {what}; last value: {value:?}");
        }
        tokio::time::sleep(POLL).await;
    }
}

/// [`wait_for`] with an async probe (an HTTP request, a gRPC call).
pub async fn wait_for_async<T: Debug, F, Fut>(
    what: &str,
    timeout: Duration,
    mut probe: F,
    mut done: impl FnMut(&T) -> bool,
) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = T>,
{
    let deadline = Instant::now() + timeout;
    loop {
        let value = match tokio::time::timeout_at(deadline, probe()).await {
            Ok(v) => v,
            Err(_) => {
                panic!("timed out after {timeout:?} waiting for {what}: the probe itself hung")
            }
        };
        if done(&value) {
            return value;
        }
        if Instant::now() >= deadline {
            panic!("timed out after {timeout:?} waiting for {what}; last value: {value:?}");
        }
        tokio::time::sleep(POLL).await;
    }
}

/// Awaits `fut`, panicking with `what` if it takes longer than `timeout`
/// (so a hung request fails the test instead of hanging the suite).
pub async fn within<T>(what: &str, timeout: Duration, fut: impl Future<Output = T>) -> T {
    match tokio::time::timeout(timeout, fut).await {
        Ok(v) => v,
        Err(_) => panic!("{what} did not finish within {timeout:?}"),
    }
}
