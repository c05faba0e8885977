//! `Route` over a real tonic server on 127.0.0.1:0: answers matched by
//! correlation id, errors identical to the unary calls with the stream left
//! open, many callers multiplexed on one [`RouteClient`], leases surviving a
//! closed stream until their session ends, and shutdown ending the stream.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use futures::StreamExt;
use tokio::{net::TcpListener, task::JoinHandle};
use tokio_stream::wrappers::ReceiverStream;

use super::*;
use crate::{
    api::{ModelItems, ProbeReport},
    config::Config,
    control_plane::ControlPlane,
    server,
};

const BACKEND: &str = "http://a:11434";

/// A control plane whose one endpoint advertises and has loaded `m:latest`,
/// served over gRPC (no probing: discovery is applied directly).
struct Served {
    cp: ControlPlane,
    channel: Channel,
    shutdown: CancellationToken,
    server: JoinHandle<Result<(), server::ServeError>>,
}

async fn served() -> Served {
    served_with("max_concurrent_connections: 1000\n").await
}

/// [`served`] with `extra` config lines (which set the limit).
async fn served_with(extra: &str) -> Served {
    let yaml = format!("endpoints: [\"{BACKEND}\"]\n{extra}");
    let cp = ControlPlane::new(Arc::new(Config::from_yaml(&yaml, &|_| None).unwrap()));
    cp.apply_probe(
        0,
        ProbeReport::Ok {
            advertised: vec!["m:latest".to_owned()],
            loaded: vec!["m:latest".to_owned()],
            items: ModelItems::default(),
        },
        Instant::now(),
    );
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let shutdown = CancellationToken::new();
    let server = tokio::spawn(server::serve(cp.clone(), listener, shutdown.clone()));
    let channel = Channel::from_shared(url).unwrap().connect().await.unwrap();
    Served {
        cp,
        channel,
        shutdown,
        server,
    }
}

impl Served {
    fn routing(&self) -> RoutingClient<Channel> {
        RoutingClient::new(self.channel.clone())
    }

    async fn session(&self) -> u64 {
        self.routing()
            .open_session(v1::OpenSessionRequest {
                name: "route-test".to_owned(),
                open_token: 0,
            })
            .await
            .unwrap()
            .into_inner()
            .session_id
    }

    async fn stop(self) {
        self.shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(10), self.server)
            .await
            .expect("server stops")
            .unwrap()
            .unwrap();
    }
}

/// A raw `Route` stream: the request sender and the answer stream.
async fn raw_stream(
    s: &Served,
) -> (
    mpsc::Sender<v1::RouteRequest>,
    tonic::Streaming<v1::RouteResponse>,
) {
    let (tx, rx) = mpsc::channel(64);
    let answers = s
        .routing()
        .route(ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    (tx, answers)
}

fn choose(session: u64, model: &str) -> v1::ChooseRequest {
    v1::ChooseRequest {
        model: model.to_owned(),
        reserve: session != 0,
        session_id: session,
        request_kind: v1::RequestKind::Chat as i32,
        ..Default::default()
    }
}

fn release(lease_id: u64) -> v1::ReleaseRequest {
    v1::ReleaseRequest {
        lease_id,
        outcome: v1::Outcome::Ok as i32,
        prompt_tokens: 1,
        completion_tokens: 2,
        model_missing: false,
    }
}

fn request(correlation_id: u64, op: Option<Op>) -> v1::RouteRequest {
    v1::RouteRequest {
        correlation_id,
        op,
        releases: Vec::new(),
    }
}

async fn next_answer(answers: &mut tonic::Streaming<v1::RouteResponse>) -> v1::RouteResponse {
    tokio::time::timeout(Duration::from_secs(10), answers.next())
        .await
        .expect("an answer in time")
        .expect("stream open")
        .expect("no stream error")
}

fn error_of(answer: &v1::RouteResponse) -> Status {
    match &answer.result {
        Some(Answer::Error(e)) => status_from_route_error(e.clone()),
        other => panic!("expected an error result, got {other:?}"),
    }
}

#[tokio::test]
async fn choose_and_release_answer_by_correlation_id_and_errors_keep_the_stream_open() {
    let s = served().await;
    let session = s.session().await;
    let (tx, mut answers) = raw_stream(&s).await;

    // A batch sent at once: one good choose, then four bad requests.
    let mut empty_model = choose(session, "");
    empty_model.model.clear();
    let batch = [
        request(7, Some(Op::Choose(choose(session, "m")))),
        request(8, Some(Op::Choose(empty_model.clone()))),
        request(9, Some(Op::Choose(choose(session, "nope")))),
        request(10, None),
        request(11, Some(Op::Choose(choose(999, "m")))),
    ];
    for r in batch {
        tx.send(r).await.unwrap();
    }

    let first = next_answer(&mut answers).await;
    assert_eq!(first.correlation_id, 7);
    let Some(Answer::Choice(choice)) = first.result else {
        panic!("expected a choice: {first:?}");
    };
    assert_eq!(choice.endpoint, BACKEND);
    assert_eq!(choice.backend_model, "m:latest");
    assert_ne!(choice.lease_id, 0);
    assert_eq!(s.cp.stats().leases_active, 1);

    // Each error is what the unary call answers: same code, same message.
    let mut unary = s.routing();
    let invalid = next_answer(&mut answers).await;
    assert_eq!(invalid.correlation_id, 8);
    let want = unary.choose_endpoint(empty_model).await.unwrap_err();
    assert_eq!(error_of(&invalid).code(), Code::InvalidArgument);
    assert_eq!(error_of(&invalid).message(), "model: must not be empty");
    assert_eq!(error_of(&invalid).message(), want.message());

    let unknown = next_answer(&mut answers).await;
    assert_eq!(unknown.correlation_id, 9);
    let want = unary
        .choose_endpoint(choose(session, "nope"))
        .await
        .unwrap_err();
    assert_eq!(error_of(&unknown).code(), Code::NotFound);
    assert_eq!(error_of(&unknown).code(), want.code());
    assert_eq!(error_of(&unknown).message(), want.message());
    assert!(error_of(&unknown).message().contains("m:latest"));

    let no_op = next_answer(&mut answers).await;
    assert_eq!(no_op.correlation_id, 10);
    assert_eq!(error_of(&no_op).code(), Code::InvalidArgument);
    assert!(error_of(&no_op).message().starts_with("op:"), "{no_op:?}");

    let no_session = next_answer(&mut answers).await;
    assert_eq!(no_session.correlation_id, 11);
    assert_eq!(error_of(&no_session).code(), Code::FailedPrecondition);
    assert_eq!(error_of(&no_session).message(), "unknown session 999");

    // The stream is still open: release works, twice is idempotent, and a
    // bad outcome is rejected like the unary call rejects it.
    tx.send(request(12, Some(Op::Release(release(choice.lease_id)))))
        .await
        .unwrap();
    let released = next_answer(&mut answers).await;
    assert_eq!(released.correlation_id, 12);
    assert_eq!(
        released.result,
        Some(Answer::Released(v1::ReleaseResponse { released: true }))
    );
    assert_eq!(s.cp.stats().leases_active, 0);
    tx.send(request(13, Some(Op::Release(release(choice.lease_id)))))
        .await
        .unwrap();
    assert_eq!(
        next_answer(&mut answers).await.result,
        Some(Answer::Released(v1::ReleaseResponse { released: false }))
    );
    let mut bad_outcome = release(5);
    bad_outcome.outcome = 42;
    tx.send(request(14, Some(Op::Release(bad_outcome))))
        .await
        .unwrap();
    let bad = next_answer(&mut answers).await;
    assert_eq!(bad.correlation_id, 14);
    let want = unary.release(bad_outcome).await.unwrap_err();
    assert_eq!(error_of(&bad).code(), Code::InvalidArgument);
    assert_eq!(error_of(&bad).message(), want.message());

    // Ending our side ends the answers cleanly.
    drop(tx);
    let end = tokio::time::timeout(Duration::from_secs(10), answers.next())
        .await
        .expect("stream ends");
    assert!(end.is_none(), "{end:?}");
    s.stop().await;
}

#[tokio::test]
async fn many_callers_share_one_route_client() {
    let s = served().await;
    let session = s.session().await;
    let client = Arc::new(RouteClient::open(s.routing()).await.unwrap());
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..32 {
        let client = client.clone();
        tasks.spawn(async move {
            let mut leases = Vec::new();
            for _ in 0..25 {
                let choice = client.choose(choose(session, "m")).await.unwrap();
                leases.push(choice.lease_id);
                let r = client.release(release(choice.lease_id)).await.unwrap();
                assert!(r.released);
            }
            leases
        });
    }
    let mut all = Vec::new();
    while let Some(leases) = tasks.join_next().await {
        all.extend(leases.unwrap());
    }
    all.sort_unstable();
    all.dedup();
    assert_eq!(all.len(), 32 * 25, "every caller got its own lease");
    let stats = s.cp.stats();
    assert_eq!(stats.leases_granted, 32 * 25);
    assert_eq!(stats.leases_active, 0);

    // Routing errors come back as the unary statuses, and the client stays
    // usable after them.
    let e = client.choose(choose(session, "nope")).await.unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
    assert_eq!(
        crate::grpc::convert::choose_error_from_status(&e, "nope"),
        Some(crate::decision::ChooseError::ModelNotFound {
            model: "nope".to_owned(),
            available: vec!["m:latest".to_owned()],
        })
    );
    let e = client
        .release(v1::ReleaseRequest::default())
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().starts_with("lease_id:"), "{e:?}");
    assert!(client.choose(choose(0, "m")).await.is_ok());
    assert!(!client.is_closed());
    s.stop().await;
}

#[tokio::test]
async fn a_closed_stream_keeps_its_leases_until_the_session_ends() {
    let s = served().await;
    let session = s.session().await;
    let (tx, mut answers) = raw_stream(&s).await;
    tx.send(request(1, Some(Op::Choose(choose(session, "m")))))
        .await
        .unwrap();
    let Some(Answer::Choice(choice)) = next_answer(&mut answers).await.result else {
        panic!("expected a choice");
    };

    // Close the stream and wait until the server has finished it.
    drop(tx);
    let end = tokio::time::timeout(Duration::from_secs(10), answers.next())
        .await
        .expect("stream ends");
    assert!(end.is_none(), "{end:?}");

    // The lease belongs to the session, not the stream: still counted.
    assert_eq!(s.cp.stats().leases_active, 1);
    let sessions = s.cp.sessions(Instant::now());
    assert_eq!(sessions.len(), 1);
    assert_eq!(sessions[0].leases, 1);

    // The session's expiry reclaims it; a later release is a no-op.
    let ttl = s.cp.config().sessions.ttl;
    let reclaimed =
        s.cp.expire_sessions(Instant::now() + ttl + Duration::from_secs(1));
    assert_eq!(reclaimed, 1);
    assert_eq!(s.cp.stats().leases_active, 0);
    assert_eq!(s.cp.stats().leases_expired, 1);
    let client = RouteClient::open(s.routing()).await.unwrap();
    let r = client.release(release(choice.lease_id)).await.unwrap();
    assert!(!r.released);
    s.stop().await;
}

#[tokio::test]
async fn shutdown_ends_open_streams_with_unavailable() {
    let s = served().await;
    let (tx, mut answers) = raw_stream(&s).await;
    let client = RouteClient::open(s.routing()).await.unwrap();
    assert!(client.choose(choose(0, "m")).await.is_ok());

    s.shutdown.cancel();
    let end = tokio::time::timeout(Duration::from_secs(10), answers.next())
        .await
        .expect("stream ends at shutdown")
        .expect("with a status")
        .unwrap_err();
    assert_eq!(end.code(), Code::Unavailable);
    assert_eq!(end.message(), SHUTTING_DOWN);

    // The multiplexing client fails its callers with that status.
    let e = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match client.choose(choose(0, "m")).await {
                Ok(_) => tokio::task::yield_now().await,
                Err(e) => return e,
            }
        }
    })
    .await
    .expect("client sees the end");
    assert_eq!(e.code(), Code::Unavailable, "{e:?}");
    assert!(client.is_closed());
    drop(tx);
    tokio::time::timeout(Duration::from_secs(10), s.server)
        .await
        .expect("server stops")
        .unwrap()
        .unwrap();
}

#[test]
fn route_errors_carry_the_unary_status() {
    for status in [
        Status::not_found("model x: available models: a"),
        Status::invalid_argument("op: must be set"),
        Status::failed_precondition("unknown session 3"),
        Status::unavailable("no endpoint available for m: all draining"),
    ] {
        let back = status_from_route_error(route_error_from_status(&status));
        assert_eq!(back.code(), status.code());
        assert_eq!(back.message(), status.message());
    }
    let odd = status_from_route_error(v1::RouteError {
        code: 1234,
        message: "?".to_owned(),
    });
    assert_eq!(odd.code(), Code::Unknown);
}

#[tokio::test]
async fn a_stream_that_never_runs_dry_still_ends_at_shutdown() {
    let yaml = format!("endpoints: [\"{BACKEND}\"]\n");
    let cp = ControlPlane::new(Arc::new(Config::from_yaml(&yaml, &|_| None).unwrap()));
    let shutdown = CancellationToken::new();
    let service = RoutingService::new(cp, shutdown.clone());
    // Always ready: release answers `released = false` for unknown leases.
    let flood = futures::stream::repeat_with(|| Ok(request(1, Some(Op::Release(release(9))))));
    let mut stream = RouteStream::new(service, flood, &shutdown);
    for _ in 0..1000 {
        assert!(stream.next().await.unwrap().is_ok());
    }
    shutdown.cancel();
    let mut answered = 0;
    let end = loop {
        match stream.next().await.unwrap() {
            Ok(_) => answered += 1,
            Err(status) => break status,
        }
    };
    assert!(
        answered < SHUTDOWN_CHECK_EVERY,
        "{answered} answers after shutdown"
    );
    assert_eq!(end.code(), Code::Unavailable);
    assert!(stream.next().await.is_none());
}

/// Takes `n` leases on `session` through `client`.
async fn take_leases(client: &RouteClient, session: u64, n: usize) -> Vec<u64> {
    let mut leases = Vec::new();
    for _ in 0..n {
        leases.push(client.choose(choose(session, "m")).await.unwrap().lease_id);
    }
    leases
}

/// A client whose coalesced releases wait for a request to ride on: its
/// linger outlasts any test.
async fn parked_client(s: &Served) -> RouteClient {
    RouteClient::open_with_linger(s.routing(), Duration::from_secs(3600))
        .await
        .unwrap()
}

#[tokio::test]
async fn coalesced_releases_apply_before_the_choose_they_ride_on() {
    let s = served().await;
    let session = s.session().await;
    // A linger far longer than the test: releases can only leave with a
    // choose.
    let client = parked_client(&s).await;
    let leases = take_leases(&client, session, 3).await;
    assert_eq!(s.cp.stats().leases_active, 3);
    let acks: Vec<_> = leases
        .iter()
        .map(|&l| tokio::spawn(client.queue_release(release(l), false)))
        .collect();
    // Nothing written yet: still counted.
    tokio::task::yield_now().await;
    assert_eq!(s.cp.stats().leases_active, 3);
    client.choose(choose(session, "m")).await.unwrap();
    for ack in acks {
        tokio::time::timeout(Duration::from_secs(10), ack)
            .await
            .expect("acknowledged with the choose")
            .unwrap()
            .unwrap();
    }
    // The three released, the new choose counted.
    let stats = s.cp.stats();
    assert_eq!((stats.leases_active, stats.leases_granted), (1, 4));
    assert!(client.coalescing());
    s.stop().await;
}

/// A release reporting a backend failure (a health signal), or one queued
/// as urgent (it frees a slot a choice may be waiting for:
/// `Choice::at_limit`), leaves at once, taking the queued ones along.
#[tokio::test]
async fn failure_and_urgent_releases_leave_at_once_with_those_queued() {
    for by_flag in [false, true] {
        let s = served().await;
        let session = s.session().await;
        let client = parked_client(&s).await;
        let leases = take_leases(&client, session, 2).await;
        let ok = tokio::spawn(client.queue_release(release(leases[0]), false));
        // An ordinary release waits for a ride (the linger outlasts the test).
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(s.cp.stats().leases_active, 2);
        let last = if by_flag {
            release(leases[1])
        } else {
            v1::ReleaseRequest {
                outcome: v1::Outcome::BackendError as i32,
                ..release(leases[1])
            }
        };
        let acks = async {
            client.queue_release(last, by_flag).await.unwrap();
            ok.await.unwrap().unwrap();
        };
        tokio::time::timeout(Duration::from_secs(10), acks)
            .await
            .expect("sent without waiting for the linger");
        assert_eq!(s.cp.stats().leases_active, 0);
        s.stop().await;
    }
}

#[tokio::test]
async fn coalesced_releases_leave_alone_after_the_linger() {
    let s = served().await;
    let session = s.session().await;
    let client = RouteClient::open_with_linger(s.routing(), Duration::from_millis(5))
        .await
        .unwrap();
    let leases = take_leases(&client, session, 50).await;
    let acks: Vec<_> = leases
        .iter()
        .map(|&l| client.queue_release(release(l), false))
        .collect();
    for ack in acks {
        tokio::time::timeout(Duration::from_secs(10), ack)
            .await
            .expect("flushed after the linger")
            .unwrap();
    }
    assert_eq!(s.cp.stats().leases_active, 0);
    // Releasing again is idempotent and still acknowledged.
    client
        .queue_release(release(leases[0]), false)
        .await
        .unwrap();
    s.stop().await;
}

#[tokio::test]
async fn coalesced_releases_fail_when_the_stream_ends_never_silently() {
    let s = served().await;
    let session = s.session().await;
    let client = parked_client(&s).await;
    let leases = take_leases(&client, session, 2).await;
    let acks: Vec<_> = leases
        .iter()
        .map(|&l| client.queue_release(release(l), false))
        .collect();
    // Ending the stream: the queued releases are failed, never dropped
    // silently, and the leases are still counted.
    s.shutdown.cancel();
    for ack in acks {
        let e = tokio::time::timeout(Duration::from_secs(10), ack)
            .await
            .expect("failed when the stream ends")
            .unwrap_err();
        assert_eq!(e.code(), Code::Unavailable, "{e:?}");
    }
    assert!(client.is_closed());
    assert_eq!(s.cp.stats().leases_active, 2);
    let e = client
        .queue_release(release(leases[0]), false)
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unavailable);
    s.stop().await;
}

#[tokio::test]
async fn releases_only_requests_and_malformed_entries_on_a_raw_stream() {
    let s = served().await;
    let session = s.session().await;
    let client = RouteClient::open(s.routing()).await.unwrap();
    let leases = take_leases(&client, session, 2).await;
    let (tx, mut answers) = raw_stream(&s).await;
    let mut carried = request(1, None);
    carried.releases = vec![release(leases[0]), release(0), release(leases[1])];
    tx.send(carried).await.unwrap();
    let answer = next_answer(&mut answers).await;
    assert_eq!(answer.correlation_id, 1);
    assert_eq!(answer.result, None, "a releases-only request has no result");
    assert_eq!(answer.releases_applied, 2, "the malformed entry is skipped");
    assert_eq!(s.cp.stats().leases_active, 0);
    // A plain request reports none applied (what old servers always say).
    tx.send(request(2, Some(Op::Release(release(leases[0])))))
        .await
        .unwrap();
    assert_eq!(next_answer(&mut answers).await.releases_applied, 0);
    s.stop().await;
}

#[test]
fn releases_an_old_server_ignored_are_failed_for_resending() {
    let shared = ClientShared::default();
    let (done, mut acked) = oneshot::channel();
    settle_releases(&shared, vec![ReleaseDone::Future(done)], 1);
    acked.try_recv().unwrap().unwrap();

    let (done, mut acked) = oneshot::channel();
    settle_releases(&shared, vec![ReleaseDone::Future(done)], 0);
    let e = acked.try_recv().unwrap().unwrap_err();
    assert_eq!(e.code(), Code::Unavailable);
    assert!(shared.no_coalescing.load(Ordering::Relaxed));

    let (a, mut acked_a) = oneshot::channel();
    let (b, _acked_b) = oneshot::channel();
    settle_releases(
        &shared,
        vec![ReleaseDone::Future(a), ReleaseDone::Future(b)],
        1,
    );
    assert_eq!(
        acked_a.try_recv().unwrap().unwrap_err().code(),
        Code::InvalidArgument
    );
}

/// What a [`ReleaseListener`] heard: lease, tag, and the outcome's code.
type Heard = (u64, u64, Result<(), Code>);

/// A listener that forwards every report to a channel.
struct Recorder(mpsc::UnboundedSender<Heard>);

impl ReleaseListener for Recorder {
    fn settled(&self, release: v1::ReleaseRequest, tag: u64, result: Result<(), &Status>) {
        let _ = self
            .0
            .send((release.lease_id, tag, result.map_err(Status::code)));
    }
}

fn recorder() -> (Arc<Recorder>, mpsc::UnboundedReceiver<Heard>) {
    let (tx, rx) = mpsc::unbounded_channel();
    (Arc::new(Recorder(tx)), rx)
}

/// Queues a release of each of `leases` for `listener`, all with `tag`.
fn queue_all(client: &RouteClient, leases: &[u64], listener: &Arc<Recorder>, tag: u64) {
    for &lease in leases {
        client
            .queue_release_to(release(lease), false, listener, tag)
            .unwrap();
    }
}

/// The next `n` reports, sorted by lease.
async fn heard(rx: &mut mpsc::UnboundedReceiver<Heard>, n: usize) -> Vec<Heard> {
    let mut out = Vec::new();
    for _ in 0..n {
        let report = tokio::time::timeout(Duration::from_secs(10), rx.recv())
            .await
            .expect("a report in time")
            .expect("listener alive");
        out.push(report);
    }
    out.sort_unstable_by_key(|&(lease, tag, _)| (lease, tag));
    out
}

#[tokio::test]
async fn listener_releases_are_applied_and_reported_once() {
    let s = served().await;
    let session = s.session().await;
    let client = RouteClient::open_with_linger(s.routing(), Duration::from_millis(5))
        .await
        .unwrap();
    let (listener, mut rx) = recorder();
    let mut leases = take_leases(&client, session, 20).await;
    for (tag, &lease) in leases.iter().enumerate() {
        client
            .queue_release_to(release(lease), false, &listener, tag as u64)
            .unwrap();
    }
    let reports = heard(&mut rx, leases.len()).await;
    leases.sort_unstable();
    for (report, lease) in reports.iter().zip(&leases) {
        assert_eq!((report.0, report.2), (*lease, Ok(())));
    }
    assert_eq!(s.cp.stats().leases_active, 0);

    // Riding on a choose: applied before it, reported with its answer.
    let more = take_leases(&client, session, 2).await;
    let slow = parked_client(&s).await;
    queue_all(&slow, &more, &listener, 7);
    tokio::task::yield_now().await;
    assert_eq!(s.cp.stats().leases_active, 2, "nothing written yet");
    slow.start_choose(choose(session, "m")).await.unwrap();
    let reports = heard(&mut rx, 2).await;
    assert!(
        reports.iter().all(|r| r.1 == 7 && r.2 == Ok(())),
        "{reports:?}"
    );
    assert_eq!(s.cp.stats().leases_active, 1, "only the new choose counted");
    assert!(rx.try_recv().is_err(), "each release reported once");
    s.stop().await;
}

#[tokio::test]
async fn listener_hears_unavailable_when_the_stream_dies() {
    let s = served().await;
    let session = s.session().await;
    let client = parked_client(&s).await;
    let (listener, mut rx) = recorder();
    let leases = take_leases(&client, session, 2).await;
    queue_all(&client, &leases, &listener, 1);
    // The server goes away before anything carried them.
    s.shutdown.cancel();
    for report in heard(&mut rx, 2).await {
        assert_eq!(report.2, Err(Code::Unavailable), "{report:?}");
    }
    assert!(client.is_closed());
    assert_eq!(
        client.queue_release_to(release(leases[0]), false, &listener, 1),
        Err(NotQueued::Closed)
    );
    assert!(rx.try_recv().is_err(), "a refused release is not reported");
    let stats = s.cp.stats();
    assert_eq!((stats.leases_active, stats.leases_released), (2, 0));
    s.stop().await;
}

#[tokio::test]
async fn listener_releases_fail_over_to_a_new_stream_exactly_once() {
    let s = served().await;
    let session = s.session().await;
    let client = parked_client(&s).await;
    let (listener, mut rx) = recorder();
    let leases = take_leases(&client, session, 3).await;
    queue_all(&client, &leases, &listener, 2);
    // The client goes away with the releases unsent: each is reported
    // UNAVAILABLE (to be sent again), none is applied.
    drop(client);
    let failed = heard(&mut rx, 3).await;
    assert!(
        failed.iter().all(|r| r.2 == Err(Code::Unavailable)),
        "{failed:?}"
    );
    assert_eq!(s.cp.stats().leases_active, 3);

    let fresh = RouteClient::open_with_linger(s.routing(), Duration::from_millis(5))
        .await
        .unwrap();
    let failed: Vec<u64> = failed.iter().map(|&(lease, _, _)| lease).collect();
    queue_all(&fresh, &failed, &listener, 3);
    let applied = heard(&mut rx, 3).await;
    assert!(
        applied.iter().all(|r| r.1 == 3 && r.2 == Ok(())),
        "{applied:?}"
    );
    let stats = s.cp.stats();
    assert_eq!((stats.leases_active, stats.leases_released), (0, 3));
    s.stop().await;
}

#[tokio::test]
async fn listener_hears_invalid_argument_for_a_message_with_malformed_entries() {
    let s = served().await;
    let session = s.session().await;
    let client = parked_client(&s).await;
    let (listener, mut rx) = recorder();
    let lease = take_leases(&client, session, 1).await[0];
    queue_all(&client, &[lease], &listener, 4);
    queue_all(&client, &[0], &listener, 5);
    client.choose(choose(0, "m")).await.unwrap();
    let reports = heard(&mut rx, 2).await;
    assert_eq!(
        reports,
        vec![
            (0, 5, Err(Code::InvalidArgument)),
            (lease, 4, Err(Code::InvalidArgument)),
        ]
    );
    // The well-formed one was applied all the same.
    assert_eq!(s.cp.stats().leases_active, 0);
    assert!(client.coalescing(), "a partial apply is not an old server");
    // Once the server showed it ignores them, none is queued any more.
    client.shared.no_coalescing.store(true, Ordering::Relaxed);
    assert_eq!(
        client.queue_release_to(release(lease), false, &listener, 6),
        Err(NotQueued::NotCoalescing)
    );
    assert!(rx.try_recv().is_err(), "a refused release is not reported");
    s.stop().await;
}

#[test]
fn listener_notices_report_exactly_once_even_when_dropped() {
    let shared = ClientShared::default();
    let (listener, mut rx) = recorder();
    let notice = |tag| {
        ReleaseDone::Listener(Notice {
            listener: Some(listener.clone()),
            release: release(tag),
            tag,
        })
    };
    settle_releases(&shared, vec![notice(1)], 0);
    assert_eq!(rx.try_recv().unwrap(), (1, 1, Err(Code::Unavailable)));
    assert!(shared.no_coalescing.load(Ordering::Relaxed));
    // A notice dropped unsettled reports, once.
    drop(notice(2));
    assert_eq!(rx.try_recv().unwrap(), (2, 2, Err(Code::Unavailable)));
    notice(3).settle(Ok(()));
    assert_eq!(rx.try_recv().unwrap(), (3, 3, Ok(())));
    assert!(rx.try_recv().is_err());
}

/// `CLIENT_QUEUE + extra` chooses started without yielding (one-thread
/// runtime): the writer cannot drain the queue meanwhile, so the last ones
/// find it full and wait for room.
fn overfill(client: &RouteClient, extra: usize) -> Vec<ChooseInFlight> {
    let calls: Vec<ChooseInFlight> = (0..CLIENT_QUEUE + extra)
        .map(|_| client.start_choose(choose(0, "m")))
        .collect();
    assert!(calls.iter().any(waits_for_room), "the queue never filled");
    calls
}

fn waits_for_room(call: &ChooseInFlight) -> bool {
    matches!(call.state, CallState::Sending(_))
}

#[tokio::test]
async fn chooses_wait_for_room_when_the_send_queue_is_full() {
    let s = served().await;
    let client = RouteClient::open(s.routing()).await.unwrap();
    let calls = overfill(&client, 50);
    let answers = tokio::time::timeout(Duration::from_secs(30), futures::future::join_all(calls))
        .await
        .expect("every choose answered");
    for answer in answers {
        assert_eq!(answer.unwrap().endpoint, BACKEND);
    }
    s.stop().await;
}

#[tokio::test]
async fn a_choose_dropped_while_waiting_for_room_leaves_no_waiter() {
    let s = served().await;
    let client = RouteClient::open(s.routing()).await.unwrap();
    // Fill the queue, then give up on the ones still waiting for room.
    let mut calls = overfill(&client, 20);
    let waiting = calls.iter().filter(|c| waits_for_room(c)).count();
    let registered = client.shared.pending.lock().waiters.len();
    assert_eq!(registered, CLIENT_QUEUE + 20);
    calls.retain(|c| !waits_for_room(c));
    assert_eq!(
        client.shared.pending.lock().waiters.len(),
        registered - waiting,
        "dropped unsent chooses are forgotten"
    );
    let answers = tokio::time::timeout(Duration::from_secs(30), futures::future::join_all(calls))
        .await
        .expect("every sent choose answered");
    assert!(answers.iter().all(Result::is_ok));
    assert_eq!(client.shared.pending.lock().waiters.len(), 0);
    s.stop().await;
}

fn lease_of(answer: &v1::RouteResponse) -> u64 {
    match &answer.result {
        Some(Answer::Choice(c)) => c.lease_id,
        other => panic!("expected a choice, got {other:?}"),
    }
}

/// A choose that finds the endpoint full is held without holding up the
/// stream: the release sent after it is answered first, and the held
/// choose then gets the slot it freed (not a `saturated` placement).
#[tokio::test]
async fn a_held_choose_lets_the_release_behind_it_through_and_takes_its_slot() {
    let s = served_with("max_concurrent_connections: 1\nsaturated_hold: 1s\n").await;
    let session = s.session().await;
    let (tx, mut answers) = raw_stream(&s).await;
    tx.send(request(1, Some(Op::Choose(choose(session, "m")))))
        .await
        .unwrap();
    let first = lease_of(&next_answer(&mut answers).await);
    tx.send(request(2, Some(Op::Choose(choose(session, "m")))))
        .await
        .unwrap();
    tx.send(request(3, Some(Op::Release(release(first)))))
        .await
        .unwrap();
    let released = next_answer(&mut answers).await;
    assert_eq!(released.correlation_id, 3, "{released:?}");
    let held = next_answer(&mut answers).await;
    assert_eq!(held.correlation_id, 2, "{held:?}");
    let Some(Answer::Choice(choice)) = &held.result else {
        panic!("{held:?}");
    };
    assert_eq!(choice.reason, v1::DecisionReason::LoadedFree as i32);
    assert_eq!(s.cp.state().leases, 1);
    // The client ends its side while a choose is held: it is answered
    // (saturated, after the hold), then the stream ends.
    tx.send(request(4, Some(Op::Choose(choose(session, "m")))))
        .await
        .unwrap();
    drop(tx);
    let last = next_answer(&mut answers).await;
    assert_eq!(last.correlation_id, 4);
    let Some(Answer::Choice(choice)) = &last.result else {
        panic!("{last:?}");
    };
    assert_eq!(choice.reason, v1::DecisionReason::Saturated as i32);
    assert!(answers.next().await.is_none(), "the stream ends after it");
    s.stop().await;
}

/// A choose held when its stream goes away takes no lease for good: one
/// granted at the end of the hold, with nobody to answer, is released.
#[tokio::test]
async fn a_choose_held_when_its_stream_goes_away_leaves_no_lease() {
    let s = served_with("max_concurrent_connections: 1\nsaturated_hold: 100ms\n").await;
    let session = s.session().await;
    let (tx, mut answers) = raw_stream(&s).await;
    tx.send(request(1, Some(Op::Choose(choose(session, "m")))))
        .await
        .unwrap();
    lease_of(&next_answer(&mut answers).await);
    tx.send(request(2, Some(Op::Choose(choose(session, "m")))))
        .await
        .unwrap();
    // Held now (the first lease keeps the endpoint full); the client goes.
    tokio::time::sleep(Duration::from_millis(20)).await;
    drop((tx, answers));
    let saturated = |cp: &ControlPlane| {
        cp.stats()
            .decisions_for(crate::decision::DecisionReason::Saturated)
    };
    let deadline = Instant::now() + Duration::from_secs(5);
    while saturated(&s.cp) == 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(saturated(&s.cp), 1, "the held choose was decided");
    let deadline = Instant::now() + Duration::from_secs(5);
    while s.cp.state().leases > 1 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(s.cp.state().leases, 1, "only the delivered lease is held");
    s.stop().await;
}
