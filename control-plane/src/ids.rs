//! Identifier newtypes. Lease ids are unique across control-plane restarts
//! (a random epoch in the high bits), so leases re-registered by sidecars
//! after a restart never collide with new ones.

use std::fmt;

use serde::{Deserialize, Serialize};

/// One reservation of one request slot.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct LeaseId(pub u64);

/// One sidecar process's registration with the control plane.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct SessionId(pub u64);

impl fmt::Display for LeaseId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}

impl fmt::Display for SessionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}

/// Allocates ids as `epoch << 32 | counter`, with a random 32-bit epoch per
/// allocator: unique within a process, and across restarts with
/// overwhelming probability.
#[derive(Debug)]
pub struct IdAllocator {
    epoch: u64,
    next: std::sync::atomic::AtomicU64,
}

impl IdAllocator {
    /// A new allocator with a random epoch. `tag` sets the top bit so that
    /// two allocators in one process (e.g. leases a sidecar grants itself in
    /// degraded mode vs. the control plane's) never collide.
    pub fn new(tag: bool) -> Self {
        let epoch =
            u64::from(rand::random::<u32>() & 0x7fff_ffff) | if tag { 0x8000_0000 } else { 0 };
        Self {
            epoch: epoch << 32,
            next: std::sync::atomic::AtomicU64::new(1),
        }
    }

    /// The next id (never 0).
    pub fn next(&self) -> u64 {
        let n = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed) & 0xffff_ffff;
        self.epoch | n.max(1)
    }
}
