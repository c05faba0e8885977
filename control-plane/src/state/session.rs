//! Sidecar sessions: who owns which leases, and until when the session
//! lives without a keep-alive.
//!
//! Invariant: a lease id is in the lease set of exactly the session recorded
//! in its [`Lease`](super::lease::Lease); the owning [`State`](super::State)
//! keeps both sides in step.

use std::time::{Duration, Instant};

// Keyed by session and lease ids this process allocates.
use super::{FastMap, FastSet};

use crate::ids::{IdAllocator, LeaseId, SessionId};

/// One sidecar session.
#[derive(Debug)]
pub struct Session {
    /// Name the sidecar gave at open.
    pub name: String,
    /// Last keep-alive (or the open).
    pub last_keepalive: Instant,
    /// Expiry without a further keep-alive.
    pub deadline: Instant,
    /// Leases it holds.
    pub leases: FastSet<LeaseId>,
    /// The token it was opened with, if any (see [`SessionTable::open`]).
    pub open_token: Option<u64>,
}

/// All sessions.
#[derive(Debug)]
pub struct SessionTable {
    sessions: FastMap<SessionId, Session>,
    ids: IdAllocator,
    ttl: Duration,
}

impl SessionTable {
    /// An empty table whose sessions live `ttl` past each keep-alive.
    pub fn new(ttl: Duration) -> Self {
        Self {
            sessions: FastMap::default(),
            ids: IdAllocator::new(false),
            ttl,
        }
    }

    /// Opens a session, or, when a live session was opened with the same
    /// `open_token`, keeps that one alive and returns it (false: not new), so
    /// that an open retried after a timeout does not leave a second session.
    pub fn open(&mut self, name: &str, open_token: Option<u64>, now: Instant) -> (SessionId, bool) {
        if let Some(token) = open_token
            && let Some((&id, _)) = self
                .sessions
                .iter()
                .find(|(_, s)| s.open_token == Some(token) && s.deadline > now)
        {
            self.keep_alive(id, now);
            return (id, false);
        }
        let id = SessionId(self.ids.next());
        self.sessions.insert(
            id,
            Session {
                name: name.to_owned(),
                last_keepalive: now,
                deadline: now + self.ttl,
                leases: FastSet::default(),
                open_token,
            },
        );
        (id, true)
    }

    /// Extends a session's life; false if unknown.
    pub fn keep_alive(&mut self, id: SessionId, now: Instant) -> bool {
        match self.sessions.get_mut(&id) {
            Some(s) => {
                s.last_keepalive = now;
                s.deadline = s.deadline.max(now + self.ttl);
                true
            }
            None => false,
        }
    }

    /// True if the session is known.
    pub fn contains(&self, id: SessionId) -> bool {
        self.sessions.contains_key(&id)
    }

    /// Records that `id` holds `lease`.
    pub fn attach(&mut self, id: SessionId, lease: LeaseId) {
        if let Some(s) = self.sessions.get_mut(&id) {
            s.leases.insert(lease);
        }
    }

    /// Forgets that `id` holds `lease`.
    pub fn detach(&mut self, id: SessionId, lease: LeaseId) {
        if let Some(s) = self.sessions.get_mut(&id) {
            s.leases.remove(&lease);
        }
    }

    /// Removes a session, returning it.
    pub fn remove(&mut self, id: SessionId) -> Option<Session> {
        self.sessions.remove(&id)
    }

    /// Removes and returns every session whose deadline has passed.
    pub fn take_expired(&mut self, now: Instant) -> Vec<(SessionId, Session)> {
        let expired: Vec<SessionId> = self
            .sessions
            .iter()
            .filter(|(_, s)| s.deadline <= now)
            .map(|(id, _)| *id)
            .collect();
        expired
            .into_iter()
            .filter_map(|id| self.sessions.remove(&id).map(|s| (id, s)))
            .collect()
    }

    /// Live sessions.
    pub fn len(&self) -> usize {
        self.sessions.len()
    }

    /// True when there is no session.
    pub fn is_empty(&self) -> bool {
        self.sessions.is_empty()
    }

    /// All sessions.
    pub fn iter(&self) -> impl Iterator<Item = (&SessionId, &Session)> {
        self.sessions.iter()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    #[test]
    fn keep_alive_extends_and_expiry_removes() {
        let t0 = Instant::now();
        let mut t = SessionTable::new(Duration::from_secs(10));
        let (a, _) = t.open("a", None, t0);
        let (b, _) = t.open("b", None, t0);
        assert_ne!(a, b);
        assert!(t.keep_alive(a, t0 + Duration::from_secs(8)));
        assert!(!t.keep_alive(SessionId(12345), t0));
        let gone = t.take_expired(t0 + Duration::from_secs(10));
        assert_eq!(gone.len(), 1);
        assert_eq!(gone[0].0, b);
        assert!(t.contains(a) && !t.contains(b));
        assert!(t.take_expired(t0 + Duration::from_secs(17)).is_empty());
        assert_eq!(t.take_expired(t0 + Duration::from_secs(18)).len(), 1);
        assert!(t.is_empty());
    }

    #[test]
    fn an_open_retried_with_its_token_gets_the_same_live_session() {
        let t0 = Instant::now();
        let s = Duration::from_secs;
        let mut t = SessionTable::new(s(10));
        let (a, new) = t.open("a", Some(7), t0);
        assert!(new);
        // The retry finds it and extends it.
        assert_eq!(t.open("a", Some(7), t0 + s(9)), (a, false));
        assert_eq!(t.len(), 1);
        assert!(t.take_expired(t0 + s(10)).is_empty());
        // Another token, or none, is another session.
        let (b, new) = t.open("a", Some(8), t0 + s(9));
        assert!(new && b != a);
        let (c, new) = t.open("a", None, t0 + s(9));
        assert!(new && c != a && c != b);
        // No token matches a tokenless session.
        assert_ne!(t.open("a", None, t0 + s(9)).0, c);
        // Once expired, the token opens a new one.
        assert_eq!(t.take_expired(t0 + s(19)).len(), 4);
        let (d, new) = t.open("a", Some(7), t0 + s(20));
        assert!(new && d != a);
    }
}
