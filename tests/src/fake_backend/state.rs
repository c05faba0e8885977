//! The fake's shared state: models, knobs, counters, the gate and the request
//! recorder.
//!
//! Every lock here is a short synchronous `parking_lot` lock, never held
//! across `.await`. Changes a test may wait for (request start and end,
//! cancellation, gate waiting count) call `events.notify_waiters()` after the
//! lock is released, so [`super::FakeControl::wait_until`] re-checks without
//! polling.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use axum::http::HeaderValue;
use axum::http::request::Parts;
use bytes::Bytes;
use parking_lot::{Mutex, RwLock};
use serde_json::Value;
use tokio::sync::Notify;

use super::handlers::Route;
use super::{
    FailureMode, FakeConfig, FakeError, FakeMode, ReasoningField, RecordedRequest, ReplyScript,
};

/// One advertised model.
#[derive(Clone, Debug)]
pub(super) struct ModelEntry {
    pub(super) name: String,
    pub(super) loaded: bool,
}

/// Failures to inject on inference routes: a one-shot budget first, then the
/// persistent mode.
#[derive(Debug, Default)]
pub(super) struct Failures {
    pub(super) persistent: FailureMode,
    pub(super) one_shot: Option<(usize, FailureMode)>,
}

impl Failures {
    fn take(&mut self) -> FailureMode {
        if let Some((n, mode)) = self.one_shot.as_mut() {
            let mode = *mode;
            *n -= 1;
            if *n == 0 {
                self.one_shot = None;
            }
            return mode;
        }
        self.persistent
    }
}

/// A stored Responses API answer.
#[derive(Clone, Debug)]
pub(super) struct StoredResponse {
    /// The response object as the final answer carried it.
    pub(super) object: Value,
    /// The request's input as items (`input_items`), in request order.
    pub(super) input_items: Vec<Value>,
}

pub(super) struct Shared {
    pub(super) mode: FakeMode,
    pub(super) label: HeaderValue,
    pub(super) reasoning_field: ReasoningField,
    pub(super) api_key: RwLock<Option<String>>,
    pub(super) models: RwLock<Vec<ModelEntry>>,
    delay_ns: AtomicU64,
    chunk_delay_ns: AtomicU64,
    /// How long a stream's body stays open after its last chunk.
    end_delay_ns: AtomicU64,
    /// The generated reply for the current chunk count, and the script that
    /// overrides it; kept as `Arc`s so a request clones a pointer, not text.
    generated: RwLock<Arc<ReplyScript>>,
    custom: RwLock<Option<Arc<ReplyScript>>>,
    pub(super) failures: Mutex<Failures>,
    pub(super) probe_failure: Mutex<FailureMode>,
    pub(super) gate: Gate,
    pub(super) stats: Stats,
    pub(super) recorder: Mutex<VecDeque<RecordedRequest>>,
    record_capacity: usize,
    pub(super) events: Arc<Notify>,
    ids: AtomicU64,
    pub(super) embedding_dims: AtomicUsize,
    pub(super) prompt_tokens: u64,
    pub(super) context_length: u64,
    load_on_request: AtomicBool,
    /// Blobs stored by `POST /api/blobs/{digest}`: digest (`sha256:` form)
    /// → the bytes received.
    pub(super) blobs: Mutex<HashMap<String, Bytes>>,
    /// The Responses API answers given (unless `store: false`), by id, as
    /// a backend that stores responses keeps them: a request continuing one
    /// that is not here (`previous_response_id`) is refused, as OpenAI and
    /// vLLM do; `GET`/`DELETE /v1/responses/{id}`, `input_items` and
    /// `cancel` serve them (see `stored.rs`).
    responses: Mutex<HashMap<String, StoredResponse>>,
    /// Makes response ids unique across fakes, as real ones are.
    instance: u64,
}

impl Shared {
    pub(super) fn new(config: &FakeConfig) -> Result<Shared, FakeError> {
        let label = HeaderValue::from_str(&config.label)
            .map_err(|_| FakeError::BadLabel(config.label.clone()))?;
        let models = config
            .models
            .iter()
            .map(|name| ModelEntry {
                name: name.clone(),
                loaded: config.loaded.contains(name),
            })
            .collect();
        let events = Arc::new(Notify::new());
        Ok(Shared {
            mode: config.mode,
            label,
            reasoning_field: config.reasoning_field.unwrap_or(match config.mode {
                FakeMode::Ollama | FakeMode::OpenAi => ReasoningField::Reasoning,
                FakeMode::LlamaServer => ReasoningField::ReasoningContent,
            }),
            api_key: RwLock::new(config.api_key.clone()),
            models: RwLock::new(models),
            delay_ns: AtomicU64::new(duration_ns(config.delay)),
            chunk_delay_ns: AtomicU64::new(duration_ns(config.chunk_delay)),
            end_delay_ns: AtomicU64::new(0),
            generated: RwLock::new(Arc::new(ReplyScript::generated(config.chunks))),
            custom: RwLock::new(config.reply.clone().map(Arc::new)),
            failures: Mutex::new(Failures::default()),
            probe_failure: Mutex::new(FailureMode::None),
            gate: Gate::new(events.clone()),
            stats: Stats::default(),
            recorder: Mutex::new(VecDeque::with_capacity(config.record_capacity.min(4096))),
            record_capacity: config.record_capacity,
            events,
            ids: AtomicU64::new(1),
            embedding_dims: AtomicUsize::new(config.embedding_dims),
            prompt_tokens: config.prompt_tokens,
            context_length: config.context_length,
            load_on_request: AtomicBool::new(config.load_on_request),
            blobs: Mutex::new(HashMap::new()),
            responses: Mutex::new(HashMap::new()),
            instance: {
                use std::hash::{BuildHasher, Hasher};
                let mut h = std::collections::hash_map::RandomState::new().build_hasher();
                h.write_u64(u64::from(std::process::id()));
                h.finish()
            },
        })
    }

    // ---- models -------------------------------------------------------

    pub(super) fn set_models<'a>(&self, names: impl Iterator<Item = &'a str>) {
        let mut models = self.models.write();
        let next = names
            .map(|name| ModelEntry {
                name: name.to_owned(),
                loaded: models.iter().any(|m| m.name == name && m.loaded),
            })
            .collect();
        *models = next;
    }

    /// Advertise `name` (unless a name it resolves to already is).
    pub(super) fn add_model(&self, name: &str) {
        let mut models = self.models.write();
        if resolve_index(self.mode, &models, name).is_none() {
            models.push(ModelEntry {
                name: name.to_owned(),
                loaded: false,
            });
        }
    }

    /// Stop advertising the model `name` refers to; whether there was one.
    pub(super) fn remove_model(&self, name: &str) -> bool {
        let mut models = self.models.write();
        match resolve_index(self.mode, &models, name) {
            Some(i) => {
                models.remove(i);
                true
            }
            None => false,
        }
    }

    pub(super) fn set_loaded(&self, name: &str, loaded: bool) -> bool {
        let mut models = self.models.write();
        match resolve_index(self.mode, &models, name) {
            Some(i) => {
                models[i].loaded = loaded;
                true
            }
            None => false,
        }
    }

    /// The advertised name a request's model name refers to.
    pub(super) fn resolve(&self, name: &str) -> Option<String> {
        let models = self.models.read();
        resolve_index(self.mode, &models, name).map(|i| models[i].name.clone())
    }

    /// The key statistics are kept under: the advertised name when the name
    /// resolves, else the name as given.
    pub(super) fn stats_key(&self, name: &str) -> String {
        self.resolve(name).unwrap_or_else(|| name.to_owned())
    }

    pub(super) fn note_served(&self, resolved: &str) {
        if self.load_on_request.load(Ordering::Relaxed) {
            self.set_loaded(resolved, true);
        }
    }

    // ---- knobs --------------------------------------------------------

    pub(super) fn delay(&self) -> Duration {
        Duration::from_nanos(self.delay_ns.load(Ordering::Relaxed))
    }

    pub(super) fn chunk_delay(&self) -> Duration {
        Duration::from_nanos(self.chunk_delay_ns.load(Ordering::Relaxed))
    }

    pub(super) fn set_delay(&self, d: Duration) {
        self.delay_ns.store(duration_ns(d), Ordering::Relaxed);
    }

    pub(super) fn end_delay(&self) -> Duration {
        Duration::from_nanos(self.end_delay_ns.load(Ordering::Relaxed))
    }

    pub(super) fn set_end_delay(&self, d: Duration) {
        self.end_delay_ns.store(duration_ns(d), Ordering::Relaxed);
    }

    pub(super) fn set_chunk_delay(&self, d: Duration) {
        self.chunk_delay_ns.store(duration_ns(d), Ordering::Relaxed);
    }

    pub(super) fn set_chunks(&self, n: usize) {
        *self.generated.write() = Arc::new(ReplyScript::generated(n));
    }

    pub(super) fn set_reply(&self, script: Option<ReplyScript>) {
        *self.custom.write() = script.map(Arc::new);
    }

    pub(super) fn effective_reply(&self) -> Arc<ReplyScript> {
        if let Some(custom) = self.custom.read().as_ref() {
            return custom.clone();
        }
        self.generated.read().clone()
    }

    pub(super) fn take_failure(&self) -> FailureMode {
        self.failures.lock().take()
    }

    pub(super) fn next_id(&self) -> u64 {
        self.ids.fetch_add(1, Ordering::Relaxed)
    }

    /// The id of Responses API answer `n` (unique across fakes).
    pub(super) fn response_id(&self, n: u64) -> String {
        format!("resp_{:016x}{n}", self.instance)
    }

    /// Stores a Responses API answer under its id.
    pub(super) fn store_response(&self, id: String, stored: StoredResponse) {
        self.responses.lock().insert(id, stored);
    }

    /// Whether this fake stores the answer with id `id`.
    pub(super) fn has_response(&self, id: &str) -> bool {
        self.responses.lock().contains_key(id)
    }

    /// The stored answer with id `id`.
    pub(super) fn stored_response(&self, id: &str) -> Option<StoredResponse> {
        self.responses.lock().get(id).cloned()
    }

    /// Forgets the stored answer with id `id`; whether it was there.
    pub(super) fn delete_response(&self, id: &str) -> bool {
        self.responses.lock().remove(id).is_some()
    }

    /// `true` when the request carries the configured key (or none is needed).
    pub(super) fn authorized(&self, parts: &Parts) -> bool {
        let key = self.api_key.read();
        let Some(key) = key.as_deref() else {
            return true;
        };
        parts
            .headers
            .get(axum::http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .is_some_and(|token| token == key)
    }

    // ---- recording ----------------------------------------------------

    /// Count and (if enabled) record a request.
    pub(super) fn note_request(&self, route: Option<Route>, parts: &Parts, body: &Bytes) {
        self.stats.count(route);
        if self.record_capacity > 0 {
            let record = RecordedRequest {
                method: parts.method.clone(),
                path: parts.uri.path().to_owned(),
                query: parts.uri.query().map(str::to_owned),
                headers: parts.headers.clone(),
                body: body.clone(),
                at: Instant::now(),
            };
            let mut recorder = self.recorder.lock();
            if recorder.len() >= self.record_capacity {
                recorder.pop_front();
            }
            recorder.push_back(record);
        }
        self.events.notify_waiters();
    }
}

fn duration_ns(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

/// Find the advertised model a request name refers to: an exact match first;
/// in Ollama mode a name without a tag also matches `name:latest`, and
/// `name:latest` matches a bare `name`.
fn resolve_index(mode: FakeMode, models: &[ModelEntry], name: &str) -> Option<usize> {
    if let Some(i) = models.iter().position(|m| m.name == name) {
        return Some(i);
    }
    if mode != FakeMode::Ollama {
        return None;
    }
    if let Some(base) = name.strip_suffix(":latest") {
        return models.iter().position(|m| m.name == base);
    }
    if !name.contains(':') {
        return models
            .iter()
            .position(|m| m.name.strip_suffix(":latest") == Some(name));
    }
    None
}

// ---- statistics -------------------------------------------------------

#[derive(Debug, Default, Clone, Copy)]
struct ModelStats {
    current: usize,
    peak: usize,
    total: u64,
}

#[derive(Default)]
pub(super) struct Stats {
    route_counts: [AtomicU64; Route::COUNT],
    total: AtomicU64,
    in_flight: AtomicUsize,
    peak: AtomicUsize,
    cancelled: AtomicU64,
    completed: AtomicU64,
    per_model: Mutex<HashMap<String, ModelStats>>,
}

impl Stats {
    fn count(&self, route: Option<Route>) {
        self.total.fetch_add(1, Ordering::Relaxed);
        if let Some(route) = route {
            self.route_counts[route.index()].fetch_add(1, Ordering::Relaxed);
        }
    }

    pub(super) fn route_count(&self, path: &str) -> u64 {
        Route::from_path(path).map_or(0, |r| self.route_counts[r.index()].load(Ordering::Relaxed))
    }

    pub(super) fn total(&self) -> u64 {
        self.total.load(Ordering::Relaxed)
    }

    pub(super) fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::SeqCst)
    }

    pub(super) fn peak(&self) -> usize {
        self.peak.load(Ordering::SeqCst)
    }

    pub(super) fn cancelled(&self) -> u64 {
        self.cancelled.load(Ordering::SeqCst)
    }

    pub(super) fn completed(&self) -> u64 {
        self.completed.load(Ordering::SeqCst)
    }

    /// (current, peak, total) for a model key.
    pub(super) fn model(&self, key: &str) -> (usize, usize, u64) {
        self.per_model
            .lock()
            .get(key)
            .map_or((0, 0, 0), |m| (m.current, m.peak, m.total))
    }

    fn enter(&self, key: &str) {
        let now = self.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        self.peak.fetch_max(now, Ordering::SeqCst);
        let mut per_model = self.per_model.lock();
        // Look up by &str first so a known model costs no allocation.
        let entry = match per_model.get_mut(key) {
            Some(e) => e,
            None => per_model.entry(key.to_owned()).or_default(),
        };
        entry.current += 1;
        entry.total += 1;
        entry.peak = entry.peak.max(entry.current);
    }

    fn exit(&self, key: &str, cancelled: bool) {
        if cancelled {
            self.cancelled.fetch_add(1, Ordering::SeqCst);
        } else {
            self.completed.fetch_add(1, Ordering::SeqCst);
        }
        if let Some(e) = self.per_model.lock().get_mut(key) {
            e.current = e.current.saturating_sub(1);
        }
        self.in_flight.fetch_sub(1, Ordering::SeqCst);
    }

    pub(super) fn reset(&self) {
        for c in &self.route_counts {
            c.store(0, Ordering::Relaxed);
        }
        self.total.store(0, Ordering::Relaxed);
        self.cancelled.store(0, Ordering::SeqCst);
        self.completed.store(0, Ordering::SeqCst);
        self.peak.store(self.in_flight(), Ordering::SeqCst);
        for m in self.per_model.lock().values_mut() {
            m.peak = m.current;
            m.total = 0;
        }
    }
}

/// Counts one inference request in flight from creation to drop. Dropped
/// without [`RequestGuard::complete`], the request counts as cancelled by its
/// client (the handler future or the response body was dropped by hyper).
pub(super) struct RequestGuard {
    shared: Arc<Shared>,
    key: String,
    completed: bool,
}

impl RequestGuard {
    pub(super) fn new(shared: Arc<Shared>, key: String) -> RequestGuard {
        shared.stats.enter(&key);
        shared.events.notify_waiters();
        RequestGuard {
            shared,
            key,
            completed: false,
        }
    }

    /// The server has finished this response (normally or with an injected
    /// failure); the drop will not count a cancellation.
    pub(super) fn complete(&mut self) {
        self.completed = true;
    }
}

impl Drop for RequestGuard {
    fn drop(&mut self) {
        self.shared.stats.exit(&self.key, !self.completed);
        self.shared.events.notify_waiters();
    }
}

// ---- gate ---------------------------------------------------------------

#[derive(Debug, Default)]
struct GateState {
    held: bool,
    /// Requests waiting at the gate (released ones included until they wake).
    waiting: usize,
    /// Releases granted but not yet taken; never more than `waiting`.
    permits: usize,
}

/// Holds inference requests while `held`; releases them by count.
pub(super) struct Gate {
    state: Mutex<GateState>,
    wake: Notify,
    events: Arc<Notify>,
}

impl Gate {
    fn new(events: Arc<Notify>) -> Gate {
        Gate {
            state: Mutex::new(GateState::default()),
            wake: Notify::new(),
            events,
        }
    }

    pub(super) fn set_held(&self, held: bool) {
        {
            let mut s = self.state.lock();
            s.held = held;
            if !held {
                // Release everyone waiting now, as permits, so a quick
                // `hold(false)` then `hold(true)` cannot re-hold requests
                // that have not woken up yet.
                s.permits = s.waiting;
            }
        }
        self.wake.notify_waiters();
        self.events.notify_waiters();
    }

    pub(super) fn release(&self, n: usize) -> usize {
        let released = {
            let mut s = self.state.lock();
            let free = s.waiting - s.permits;
            let r = n.min(free);
            s.permits += r;
            r
        };
        self.wake.notify_waiters();
        self.events.notify_waiters();
        released
    }

    pub(super) fn waiting(&self) -> usize {
        let s = self.state.lock();
        s.waiting - s.permits
    }

    /// Wait until the gate lets this request through. Cancel-safe: a request
    /// dropped while waiting leaves the counts consistent.
    pub(super) async fn pass(&self) {
        {
            let mut s = self.state.lock();
            if !s.held {
                return;
            }
            s.waiting += 1;
        }
        self.events.notify_waiters();
        let mut ticket = WaitTicket {
            gate: self,
            passed: false,
        };
        loop {
            let woken = self.wake.notified();
            tokio::pin!(woken);
            woken.as_mut().enable();
            {
                let mut s = self.state.lock();
                if !s.held || s.permits > 0 {
                    s.permits = s.permits.saturating_sub(1);
                    s.waiting -= 1;
                    ticket.passed = true;
                }
            }
            if ticket.passed {
                self.events.notify_waiters();
                return;
            }
            woken.await;
        }
    }
}

struct WaitTicket<'a> {
    gate: &'a Gate,
    passed: bool,
}

impl Drop for WaitTicket<'_> {
    fn drop(&mut self) {
        if self.passed {
            return;
        }
        {
            let mut s = self.gate.state.lock();
            s.waiting -= 1;
            // A release granted to this request goes unused; keep the
            // invariant permits <= waiting.
            s.permits = s.permits.min(s.waiting);
        }
        self.gate.events.notify_waiters();
    }
}
