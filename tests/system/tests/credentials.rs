//! An endpoint configured with credentials in its URL
//! (`http://user:pass@host:port`), through a real standalone sidecar
//! process: probes, a chat and a model pull reach the backend at host:port
//! with the credentials as `Authorization: Basic`, and the password shows
//! nowhere: not in the `Host` header, the sidecar's logs (debug level) or
//! its `/metrics`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use serde_json::json;
use switchyard_control_plane::endpoint::EndpointKind;
use switchyard_system_tests::{
    FakeBackend, TestConfig,
    client::{chat_ok, get},
    config::EndpointEntry,
    ollama_fake,
    process::ChildProcess,
};

const USER: &str = "alice";
const PASSWORD: &str = "CredPw999";
/// base64("alice:CredPw999")
const BASIC: &str = "Basic YWxpY2U6Q3JlZFB3OTk5";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_url_with_credentials_is_routed_with_basic_auth_and_never_shown() {
    let http = reqwest::Client::builder().no_proxy().build().unwrap();
    let fake = FakeBackend::start(ollama_fake(&["m:latest"])).await;
    let bare = fake.url();
    let mut config = TestConfig::new();
    config.endpoint(EndpointEntry {
        url: bare.replacen("http://", &format!("http://{USER}:{PASSWORD}@"), 1),
        kind: EndpointKind::Ollama,
        max_concurrent: Some(2),
        api_key: None,
    });
    let sidecar = ChildProcess::sidecar_standalone_with(
        &config,
        Vec::new(),
        vec![(
            "RUST_LOG".to_owned(),
            "info,switchyard_sidecar=debug,switchyard_control_plane=debug".to_owned(),
        )],
    )
    .await;
    let base = sidecar.url();

    // Probed with the credentials: the model is listed; then a chat.
    chat_ok(&http, &base, || sidecar.logs()).await;

    // Model management fans out through the same client.
    let pulled = http
        .post(format!("{base}/api/pull"))
        .json(&json!({"model": "m:latest", "stream": false}))
        .send()
        .await
        .unwrap();
    let status = pulled.status();
    let text = pulled.text().await.unwrap();
    assert_eq!(status, 200, "{text}\n--- logs ---\n{}", sidecar.logs());

    let host = bare.strip_prefix("http://").unwrap();
    let requests = fake.requests();
    for path in ["/api/tags", "/api/ps", "/api/chat", "/api/pull"] {
        let seen: Vec<_> = requests.iter().filter(|r| r.path == path).collect();
        assert!(!seen.is_empty(), "no {path} request reached the backend");
        for req in seen {
            assert_eq!(req.header("authorization"), Some(BASIC), "{path}");
            assert_eq!(req.header("host"), Some(host), "{path}");
        }
    }

    let metrics = get(&http, &format!("{base}/metrics")).await;
    assert_eq!(metrics.status, 200);
    assert!(
        metrics.text.contains(&format!("endpoint=\"{bare}\"")),
        "{}",
        metrics.text
    );
    let logs = sidecar.logs();
    assert!(
        logs.contains(&format!("endpoint={bare}")),
        "the logs name the endpoint without credentials:\n{logs}"
    );
    for (what, text) in [("/metrics", &metrics.text), ("logs", &logs)] {
        assert!(!text.contains(PASSWORD), "password in the {what}:\n{text}");
        assert!(!text.contains(USER), "user in the {what}:\n{text}");
    }
}
