//! The control plane on its own, over gRPC, against real fake model servers:
//! discovery picks up a model added at runtime within one probe interval, an
//! endpoint that stops answering is excluded, the leases of a session that
//! stops keeping alive are reclaimed, a second release never goes negative,
//! and `WatchUsage` delivers the initial snapshot and each change.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use switchyard_control_plane::{endpoint::EndpointKind, server::RunningControlPlane};
use switchyard_proto::v1::{
    self, ChooseRequest, GetStateRequest, OpenSessionRequest, Outcome, ReleaseRequest, RequestKind,
    WatchUsageRequest, cluster_client::ClusterClient, routing_client::RoutingClient,
};
use switchyard_system_tests::{
    cluster::{endpoint_url, ollama_fake},
    config::{EndpointEntry, TestConfig},
    wait::wait_for_async,
};
use switchyard_tests::fake_backend::{FakeBackend, FakeConfig};
use tonic::transport::Channel;

async fn start(fakes: &[&FakeBackend], tweak: impl FnOnce(&mut TestConfig)) -> RunningControlPlane {
    let mut config = TestConfig::new();
    for fake in fakes {
        config.endpoint(EndpointEntry {
            url: endpoint_url(fake),
            kind: EndpointKind::Ollama,
            max_concurrent: Some(4),
            api_key: None,
        });
    }
    tweak(&mut config);
    RunningControlPlane::start(config.build()).await.unwrap()
}

async fn clients(cp: &RunningControlPlane) -> (RoutingClient<Channel>, ClusterClient<Channel>) {
    let channel = Channel::from_shared(cp.url())
        .unwrap()
        .connect()
        .await
        .unwrap();
    (
        RoutingClient::new(channel.clone()),
        ClusterClient::new(channel),
    )
}

async fn state(cluster: &mut ClusterClient<Channel>) -> v1::ClusterState {
    cluster
        .get_state(GetStateRequest {})
        .await
        .unwrap()
        .into_inner()
}

async fn wait_state(
    cluster: &ClusterClient<Channel>,
    what: &str,
    pred: impl FnMut(&v1::ClusterState) -> bool,
) -> v1::ClusterState {
    wait_for_async(
        what,
        Duration::from_secs(5),
        || {
            let mut c = cluster.clone();
            async move { state(&mut c).await }
        },
        pred,
    )
    .await
}

async fn next_state(watch: &mut tonic::Streaming<v1::ClusterState>) -> v1::ClusterState {
    tokio::time::timeout(Duration::from_secs(5), watch.message())
        .await
        .expect("no WatchUsage message within 5 s")
        .unwrap()
        .expect("stream ended")
}

async fn open_session(routing: &mut RoutingClient<Channel>, name: &str) -> u64 {
    routing
        .open_session(OpenSessionRequest {
            name: name.into(),
            open_token: 0,
        })
        .await
        .unwrap()
        .into_inner()
        .session_id
}

/// A reserving choice for `model`; returns its lease id.
async fn reserve(routing: &mut RoutingClient<Channel>, model: &str, session: u64) -> u64 {
    routing
        .choose_endpoint(choose(model, session, true))
        .await
        .unwrap()
        .into_inner()
        .lease_id
}

fn in_flight(state: &v1::ClusterState) -> u32 {
    state.endpoints.iter().map(|e| e.in_flight).sum()
}

fn choose(model: &str, session: u64, reserve: bool) -> ChooseRequest {
    ChooseRequest {
        model: model.to_owned(),
        reserve,
        session_id: session,
        request_kind: RequestKind::Chat as i32,
        ..Default::default()
    }
}

#[tokio::test]
async fn discovery_picks_up_a_model_added_at_runtime_within_one_probe_interval() {
    let fake = FakeBackend::start(ollama_fake(&["a"])).await;
    let cp = start(&[&fake], |c| {
        c.set("probe_interval", "0.5");
    })
    .await;
    let (_, mut cluster) = clients(&cp).await;
    wait_state(&cluster, "model a advertised", |s| {
        s.endpoints[0]
            .advertised_models
            .iter()
            .any(|m| m.starts_with('a'))
    })
    .await;

    fake.set_models(&["a", "b"]);
    let added = Instant::now();
    wait_state(&cluster, "model b advertised", |s| {
        s.endpoints[0]
            .advertised_models
            .iter()
            .any(|m| m.starts_with('b'))
    })
    .await;
    let took = added.elapsed();
    // One interval (0.5 s) plus the probe itself; slack for a loaded debug build.
    assert!(
        took <= Duration::from_millis(1200),
        "model appeared after {took:?}"
    );
    let s = state(&mut cluster).await;
    assert!(s.endpoints[0].healthy);
    cp.shutdown().await.unwrap();
}

#[tokio::test]
async fn an_endpoint_that_stops_answering_is_excluded() {
    let a = FakeBackend::start(
        FakeConfig::new(switchyard_tests::fake_backend::FakeMode::Ollama)
            .models(&["m"])
            .all_loaded(),
    )
    .await;
    let b = FakeBackend::start(
        FakeConfig::new(switchyard_tests::fake_backend::FakeMode::Ollama)
            .models(&["m"])
            .all_loaded(),
    )
    .await;
    let cp = start(&[&a, &b], |_| {}).await;
    let (mut routing, mut cluster) = clients(&cp).await;
    wait_state(&cluster, "both healthy", |s| {
        s.endpoints.iter().all(|e| e.healthy)
    })
    .await;

    a.shutdown().await;
    let stopped = Instant::now();
    wait_state(&cluster, "endpoint a unhealthy", |s| {
        !s.endpoints[0].healthy
    })
    .await;
    let took = stopped.elapsed();
    assert!(took <= Duration::from_secs(2), "excluded after {took:?}");

    let dead = endpoint_url(&a);
    for _ in 0..20 {
        let choice = routing
            .choose_endpoint(choose("m", 0, false))
            .await
            .unwrap()
            .into_inner();
        assert_ne!(choice.endpoint, dead, "a dead endpoint was chosen");
    }
    let s = state(&mut cluster).await;
    assert!(
        !s.endpoints[0].health_detail.is_empty(),
        "unhealthy endpoint says why"
    );
    cp.shutdown().await.unwrap();
}

#[tokio::test]
async fn leases_of_a_session_that_stops_keeping_alive_are_reclaimed() {
    let fake = FakeBackend::start(ollama_fake(&["m"])).await;
    let cp = start(&[&fake], |c| {
        c.set("session_ttl", "1");
        c.set("keepalive_interval", "0.2");
    })
    .await;
    let (mut routing, mut cluster) = clients(&cp).await;
    wait_state(&cluster, "model advertised", |s| {
        !s.endpoints[0].advertised_models.is_empty()
    })
    .await;
    let session = routing
        .open_session(OpenSessionRequest {
            name: "silent".into(),
            open_token: 0,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(
        session.ttl_ms <= 15_000,
        "default-or-configured TTL must be at most 15 s"
    );
    for _ in 0..3 {
        routing
            .choose_endpoint(choose("m", session.session_id, true))
            .await
            .unwrap();
    }
    let s = state(&mut cluster).await;
    assert_eq!(in_flight(&s), 3);
    let silent_from = Instant::now();
    wait_state(&cluster, "leases reclaimed", |s| {
        in_flight(s) == 0 && s.leases == 0 && s.sessions == 0
    })
    .await;
    let took = silent_from.elapsed();
    assert!(
        took >= Duration::from_millis(900),
        "reclaimed before the TTL: {took:?}"
    );
    assert!(took <= Duration::from_secs(3), "reclaimed after {took:?}");
    // The session is gone: a keep-alive says so, so the sidecar re-opens.
    let known = routing
        .keep_alive(v1::KeepAliveRequest {
            session_id: session.session_id,
        })
        .await
        .unwrap()
        .into_inner()
        .known;
    assert!(!known);
    cp.shutdown().await.unwrap();
}

#[tokio::test]
async fn releasing_twice_never_goes_negative() {
    let fake = FakeBackend::start(ollama_fake(&["m"])).await;
    let cp = start(&[&fake], |_| {}).await;
    let (mut routing, mut cluster) = clients(&cp).await;
    wait_state(&cluster, "model advertised", |s| {
        !s.endpoints[0].advertised_models.is_empty()
    })
    .await;
    let session = open_session(&mut routing, "twice").await;
    let first = reserve(&mut routing, "m", session).await;
    let second = reserve(&mut routing, "m", session).await;
    let s = state(&mut cluster).await;
    assert_eq!(in_flight(&s), 2);
    let release = |lease_id| ReleaseRequest {
        lease_id,
        outcome: Outcome::Ok as i32,
        prompt_tokens: 5,
        completion_tokens: 7,
        model_missing: false,
    };
    assert!(
        routing
            .release(release(first))
            .await
            .unwrap()
            .into_inner()
            .released
    );
    for _ in 0..3 {
        assert!(
            !routing
                .release(release(first))
                .await
                .unwrap()
                .into_inner()
                .released
        );
    }
    let s = state(&mut cluster).await;
    assert_eq!(in_flight(&s), 1, "the other lease still counts");
    assert_eq!(s.leases, 1);
    let usage = &s.endpoints[0].usage;
    assert_eq!(
        usage.iter().map(|u| u.prompt_tokens).sum::<u64>(),
        5,
        "tokens counted once"
    );
    assert!(
        routing
            .release(release(second))
            .await
            .unwrap()
            .into_inner()
            .released
    );
    assert!(
        !routing
            .release(release(second))
            .await
            .unwrap()
            .into_inner()
            .released
    );
    let s = state(&mut cluster).await;
    assert_eq!((in_flight(&s), s.leases), (0, 0));
    cp.shutdown().await.unwrap();
}

#[tokio::test]
async fn watch_usage_delivers_the_initial_snapshot_and_each_change() {
    let fake = FakeBackend::start(ollama_fake(&["m"])).await;
    let cp = start(&[&fake], |_| {}).await;
    let (mut routing, mut cluster) = clients(&cp).await;
    wait_state(&cluster, "model advertised", |s| {
        !s.endpoints[0].advertised_models.is_empty()
    })
    .await;
    let mut watch = routing
        .watch_usage(WatchUsageRequest {})
        .await
        .unwrap()
        .into_inner();
    let initial = next_state(&mut watch).await;
    assert_eq!(
        initial.endpoints.len(),
        1,
        "the initial snapshot is the full state"
    );
    assert_eq!(in_flight(&initial), 0);
    let mut version = initial.version;

    let session = open_session(&mut routing, "watched").await;
    let lease = reserve(&mut routing, "m", session).await;
    // Each change arrives (later states may coalesce, never go back).
    let mut seen = next_state(&mut watch).await;
    while in_flight(&seen) != 1 {
        assert!(seen.version > version);
        version = seen.version;
        seen = next_state(&mut watch).await;
    }
    assert!(seen.version > version);
    version = seen.version;
    routing
        .release(ReleaseRequest {
            lease_id: lease,
            outcome: Outcome::Ok as i32,
            ..Default::default()
        })
        .await
        .unwrap();
    let mut seen = next_state(&mut watch).await;
    while in_flight(&seen) != 0 {
        assert!(seen.version > version);
        seen = next_state(&mut watch).await;
    }
    assert!(seen.version > version);
    let _ = &mut cluster;
    cp.shutdown().await.unwrap();
}
