//! The operators' HTTP API (`[api] listen`, docs/API.md): the fleet tests and run-now
//! over HTTPS with JSON, for what `tests` and `run-now` do on the command line.
//!
//! Invariants: there is no API unless `[api]` is configured, and never in insecure mode.
//! Its listener is its own (not the metrics one), TLS 1.3 with `[server]`'s certificate
//! (reloaded with it, `tls.rs`), and every connection presents a client certificate of the
//! fleet CA allowing client auth, or the handshake fails. Every request is then checked for
//! the operator role (`identity::operator_of`): an agent's certificate gets 403 before any
//! handler runs. The operator's name (the certificate's CN) is what each change records as
//! `created_by`. Handshakes run off the accept loop, at most `MAX_HANDSHAKES` at once and
//! each within `HANDSHAKE_TIMEOUT`. Errors are JSON `{"error": ..}`, with `line` and `col`
//! when they point into a submitted file.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::connect_info::{ConnectInfo, Connected};
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Path, RawQuery, Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::serve::IncomingStream;
use axum::Router;
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, Semaphore};
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

use crate::fleet::{self, FleetError, Selection};
use crate::identity::{self, Operator};
use crate::pg::Target;
use crate::runs::{self, RunRequest, RunTest};
use crate::tls::ServerTls;

/// TLS handshakes in progress at most; operators are few, scanners are not.
const MAX_HANDSHAKES: usize = 64;
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest request body: a fleet tests file of a few thousand tests fits.
pub const MAX_BODY_BYTES: usize = 4 << 20;

/// Binds the API's listener (before the collector starts taking agents, so a taken port
/// fails the start).
pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr).await
}

/// What the handlers share.
#[derive(Clone)]
struct Api {
    target: Target,
    /// Agents unheard of for longer are stale (`[fleet] stale_after`).
    stale_after: Duration,
}

/// Serves the API on `listener` until `shutdown`.
pub async fn serve(
    listener: TcpListener,
    tls: Arc<ServerTls>,
    target: Target,
    stale_after: Duration,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let app = router(Api {
        target,
        stale_after,
    });
    let listener = ApiListener::start(listener, tls, shutdown.clone())?;
    axum::serve(
        listener,
        app.into_make_service_with_connect_info::<Caller>(),
    )
    .with_graceful_shutdown(async move { shutdown.cancelled().await })
    .await
}

fn router(api: Api) -> Router {
    Router::new()
        .route("/api/v1/tests", get(tests_current).post(tests_apply))
        .route("/api/v1/tests/versions", get(tests_versions))
        .route("/api/v1/tests/diff", post(tests_diff))
        .route("/api/v1/tests/rollback", post(tests_rollback))
        .route("/api/v1/runs", post(runs_create))
        .route("/api/v1/runs/{id}", get(runs_get))
        .route("/api/v1/agents", get(agents_list))
        .route("/api/v1/results", get(results_export))
        .route("/api/v1/agents/{id}", axum::routing::delete(agents_retire))
        .fallback(|| async { error(StatusCode::NOT_FOUND, "no such endpoint (docs/API.md)") })
        .method_not_allowed_fallback(|| async {
            error(
                StatusCode::METHOD_NOT_ALLOWED,
                "method not allowed here (docs/API.md)",
            )
        })
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .layer(middleware::from_fn(refuse_declared_oversize))
        .layer(middleware::from_fn(require_operator))
        .with_state(api)
}

// ---------------------------------------------------------------------------------------
// The listener: TLS connections, handshaken off the accept loop

/// TLS connections accepted and handshaken in the background.
struct ApiListener {
    local: SocketAddr,
    connections: mpsc::Receiver<(TlsStream<TcpStream>, SocketAddr)>,
}

impl ApiListener {
    fn start(
        listener: TcpListener,
        tls: Arc<ServerTls>,
        shutdown: CancellationToken,
    ) -> std::io::Result<ApiListener> {
        let local = listener.local_addr()?;
        let (tx, rx) = mpsc::channel(16);
        let permits = Arc::new(Semaphore::new(MAX_HANDSHAKES));
        tokio::spawn(async move {
            loop {
                let (tcp, peer) = tokio::select! {
                    _ = shutdown.cancelled() => return,
                    accepted = listener.accept() => match accepted {
                        Ok(a) => a,
                        Err(e) => {
                            // Out of file descriptors, say: wait instead of spinning.
                            tracing::warn!("api: accept failed: {e}");
                            tokio::time::sleep(Duration::from_millis(100)).await;
                            continue;
                        }
                    },
                };
                let _ = tcp.set_nodelay(true);
                let acceptor = TlsAcceptor::from(tls.api_config());
                let (tx, permits, shutdown) = (tx.clone(), permits.clone(), shutdown.clone());
                tokio::spawn(async move {
                    let _permit = tokio::select! {
                        _ = shutdown.cancelled() => return,
                        p = permits.acquire_owned() => p.expect("the semaphore is never closed"),
                    };
                    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                        Ok(Ok(stream)) => {
                            let _ = tx.send((stream, peer)).await;
                        }
                        Ok(Err(e)) => {
                            let reason = crate::tls::classify(&e);
                            if reason == "bad_client_cert" || reason == "no_client_cert" {
                                tracing::info!(%peer, reason, "api: tls handshake refused: {e}");
                            } else {
                                tracing::debug!(%peer, reason, "api: tls handshake failed: {e}");
                            }
                        }
                        Err(_) => {
                            tracing::debug!(%peer, "api: no tls handshake within {HANDSHAKE_TIMEOUT:?}")
                        }
                    }
                });
            }
        });
        Ok(ApiListener {
            local,
            connections: rx,
        })
    }
}

impl axum::serve::Listener for ApiListener {
    type Io = TlsStream<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.connections.recv().await {
            Some(c) => c,
            // The accept task ended (shutdown): serve's graceful shutdown ends us.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        Ok(self.local)
    }
}

/// Who is on a connection: its address and its certificate's operator role.
#[derive(Clone, Debug)]
struct Caller {
    addr: SocketAddr,
    operator: Operator,
}

impl Connected<IncomingStream<'_, ApiListener>> for Caller {
    fn connect_info(stream: IncomingStream<'_, ApiListener>) -> Caller {
        let (_, conn) = stream.io().get_ref();
        let operator = conn
            .peer_certificates()
            .and_then(|c| c.first())
            .map_or(Operator::None, |leaf| identity::operator_of(leaf.as_ref()));
        Caller {
            addr: *stream.remote_addr(),
            operator,
        }
    }
}

/// The operator's name, for handlers (set by `require_operator`).
#[derive(Clone, Debug)]
struct OperatorName(String);

/// 403 for any certificate without the operator role, before routing.
async fn require_operator(
    ConnectInfo(caller): ConnectInfo<Caller>,
    mut request: Request,
    next: Next,
) -> Response {
    match caller.operator {
        Operator::Named(name) => {
            tracing::debug!(operator = %name, addr = %caller.addr, method = %request.method(), path = %request.uri().path(), "api request");
            request.extensions_mut().insert(OperatorName(name));
            next.run(request).await
        }
        Operator::None => {
            tracing::info!(addr = %caller.addr, path = %request.uri().path(), "api: refused a certificate without the operator role");
            error(
                StatusCode::FORBIDDEN,
                "this client certificate has no operator role (an agent's certificate?); use one from `edgeprobe-collector cert issue --operator NAME`",
            )
        }
        Operator::Inconsistent(why) => {
            tracing::warn!(addr = %caller.addr, "api: refused an inconsistent operator certificate: {why}");
            error(
                StatusCode::FORBIDDEN,
                &format!("not a valid operator certificate: {why}"),
            )
        }
    }
}

// ---------------------------------------------------------------------------------------
// Responses

/// An error answer: its status and `{"error": message}`, with `line`/`col` when it points
/// into the submitted text.
#[derive(Debug)]
struct ApiError {
    status: StatusCode,
    message: String,
    at: Option<(usize, usize)>,
}

impl ApiError {
    fn new(status: StatusCode, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            message: message.into(),
            at: None,
        }
    }

    fn bad_request(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, message)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = match self.at {
            Some((line, col)) => json!({ "error": self.message, "line": line, "col": col }),
            None => json!({ "error": self.message }),
        };
        ok(self.status, &body)
    }
}

type Answer = Result<Response, ApiError>;

fn error(status: StatusCode, message: &str) -> Response {
    ApiError::new(status, message).into_response()
}

fn ok(status: StatusCode, value: &Value) -> Response {
    let mut text = serde_json::to_string_pretty(value).unwrap_or_else(|_| "{}".into());
    text.push('\n');
    (status, [(header::CONTENT_TYPE, "application/json")], text).into_response()
}

/// The query parameters of a request, checked against those its endpoint takes: an
/// unknown one (a typo such as `dryrun=true`) is 400, never silently ignored.
struct Params(Vec<(String, String)>);

impl Params {
    fn parse(query: &Option<String>, allowed: &[&str]) -> Result<Params, ApiError> {
        let decode = |s: &str| {
            percent_encoding::percent_decode_str(&s.replace('+', " "))
                .decode_utf8()
                .map(|c| c.into_owned())
                .map_err(|_| ApiError::bad_request("the query is not UTF-8"))
        };
        let mut pairs = Vec::new();
        for pair in query.as_deref().unwrap_or("").split('&') {
            if pair.is_empty() {
                continue;
            }
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            let key = decode(key)?;
            if !allowed.contains(&key.as_str()) {
                let takes = match allowed {
                    [] => "takes no parameters".to_string(),
                    _ => format!("takes {}", allowed.join(", ")),
                };
                return Err(ApiError::bad_request(format!(
                    "unknown query parameter `{key}`: this endpoint {takes} (docs/API.md)"
                )));
            }
            pairs.push((key, decode(value)?));
        }
        Ok(Params(pairs))
    }

    /// The last value of `name`.
    fn get(&self, name: &str) -> Option<&str> {
        self.0
            .iter()
            .rev()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    /// Every value of `name`, in order.
    fn all<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a str> + 'a {
        self.0
            .iter()
            .filter(move |(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    /// A boolean (`?dry_run=true`, `?dry_run=1`, `?dry_run`).
    fn flag(&self, name: &str) -> Result<bool, ApiError> {
        match self.get(name) {
            None => Ok(false),
            Some("true" | "1" | "yes" | "") => Ok(true),
            Some("false" | "0" | "no") => Ok(false),
            Some(other) => Err(ApiError::bad_request(format!(
                "{name}={other}: use true or false"
            ))),
        }
    }

    /// A duration (`30s`, `24h`, `7d`).
    fn duration(&self, name: &str) -> Result<Option<Duration>, ApiError> {
        self.get(name)
            .map(|v| {
                edgeprobe_proto::testdef::parse_duration(v)
                    .map_err(|e| ApiError::bad_request(format!("{name}={v}: {e}")))
            })
            .transpose()
    }

    /// `LABEL=VALUE` pairs of a repeatable parameter.
    fn pairs(&self, name: &str) -> Result<BTreeMap<String, String>, ApiError> {
        self.all(name)
            .map(|v| match v.split_once('=') {
                Some((k, v)) if !k.trim().is_empty() => {
                    Ok((k.trim().to_string(), v.trim().to_string()))
                }
                _ => Err(ApiError::bad_request(format!(
                    "{name}={v}: use LABEL=VALUE"
                ))),
            })
            .collect()
    }
}

/// A body whose declared length is over `MAX_BODY_BYTES` is refused before it is read,
/// so before hyper answers `100 Continue`: the client reads a clean 413 instead of a
/// connection reset in the middle of its upload. An undeclared (chunked) body is still
/// cut at the limit by `DefaultBodyLimit`.
async fn refuse_declared_oversize(request: Request, next: middleware::Next) -> Response {
    let declared = request
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > MAX_BODY_BYTES as u64) {
        return ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("the body is over {MAX_BODY_BYTES} bytes"),
        )
        .into_response();
    }
    next.run(request).await
}

/// The body, or the reason it could not be read (over `MAX_BODY_BYTES`: 413) as JSON.
fn body_of(body: Result<Bytes, BytesRejection>) -> Result<Bytes, ApiError> {
    body.map_err(|e| match e.status() {
        StatusCode::PAYLOAD_TOO_LARGE => ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("the body is over {MAX_BODY_BYTES} bytes"),
        ),
        status => ApiError::new(status, e.body_text()),
    })
}

fn body_text(body: &Bytes) -> Result<&str, ApiError> {
    std::str::from_utf8(body).map_err(|_| ApiError::bad_request("the body is not UTF-8 text"))
}

fn body_json<T: serde::de::DeserializeOwned>(body: &Bytes) -> Result<T, ApiError> {
    serde_json::from_slice(body).map_err(|e| ApiError {
        status: StatusCode::BAD_REQUEST,
        message: format!("the body is not the JSON expected: {e}"),
        at: Some((e.line(), e.column())),
    })
}

async fn db(api: &Api) -> Result<tokio_postgres::Client, ApiError> {
    api.target.connect().await.map_err(|e| {
        tracing::warn!("api: database unavailable: {}", crate::pg::describe(&e));
        ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "database unavailable")
    })
}

/// A library error as an answer. `origin` is what the submitted text was called, so a
/// located message (`origin:line:col: reason`) becomes 422 with `line` and `col`.
fn fleet_error(e: FleetError, origin: &str) -> ApiError {
    match e {
        FleetError::Invalid(message) => {
            let at = message
                .strip_prefix(origin)
                .and_then(|rest| rest.strip_prefix(':'))
                .and_then(|rest| {
                    let mut parts = rest.splitn(3, ':');
                    let line = parts.next()?.parse().ok()?;
                    let col = parts.next()?.parse().ok()?;
                    Some((line, col, parts.next()?.trim_start().to_string()))
                });
            match at {
                Some((line, col, reason)) => ApiError {
                    status: StatusCode::UNPROCESSABLE_ENTITY,
                    message: reason,
                    at: Some((line, col)),
                },
                None => ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, message),
            }
        }
        FleetError::NotFound(message) => ApiError::new(StatusCode::NOT_FOUND, message),
        FleetError::Db(message) => {
            tracing::warn!("api: database: {message}");
            ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("database: {message}"),
            )
        }
    }
}

/// What a submitted file is called in `fleet_versions.origin` and in located errors.
const ORIGIN: &str = "api";

fn to_json<T: serde::Serialize>(value: &T) -> Value {
    serde_json::to_value(value).unwrap_or(Value::Null)
}

/// `GET /api/v1/tests[?stale_after=D]`: the current set, its version and where the
/// agents stand.
async fn tests_current(State(api): State<Api>, RawQuery(query): RawQuery) -> Answer {
    let params = Params::parse(&query, &["stale_after"])?;
    let stale_after = params.duration("stale_after")?.unwrap_or(api.stale_after);
    let client = db(&api).await?;
    let listing = fleet::list(&client, stale_after)
        .await
        .map_err(|e| fleet_error(e, ORIGIN))?;
    Ok(ok(StatusCode::OK, &to_json(&listing)))
}

/// `GET /api/v1/tests/versions`: every version, newest first.
async fn tests_versions(State(api): State<Api>, RawQuery(query): RawQuery) -> Answer {
    Params::parse(&query, &[])?;
    let client = db(&api).await?;
    let versions = fleet::versions(&client)
        .await
        .map_err(|e| fleet_error(e, ORIGIN))?;
    Ok(ok(
        StatusCode::OK,
        &json!({ "versions": to_json(&versions) }),
    ))
}

/// `POST /api/v1/tests[?dry_run=true][&force=true]`: the body is a fleet tests file.
async fn tests_apply(
    State(api): State<Api>,
    axum::Extension(OperatorName(operator)): axum::Extension<OperatorName>,
    RawQuery(query): RawQuery,
    body: Result<Bytes, BytesRejection>,
) -> Answer {
    let params = Params::parse(&query, &["dry_run", "force"])?;
    let body = body_of(body)?;
    let dry_run = params.flag("dry_run")?;
    let force = params.flag("force")?;
    let text = body_text(&body)?;
    let mut client = db(&api).await?;
    let applied = fleet::apply(&mut client, text, ORIGIN, &operator, dry_run, force)
        .await
        .map_err(|e| fleet_error(e, ORIGIN))?;
    if let Some(version) = applied.version {
        tracing::info!(%operator, version, "api: fleet tests applied");
    }
    let status = if applied.version.is_some() {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok(ok(status, &to_json(&applied)))
}

/// `POST /api/v1/tests/diff`: the body is a fleet tests file; nothing changes.
async fn tests_diff(
    State(api): State<Api>,
    RawQuery(query): RawQuery,
    body: Result<Bytes, BytesRejection>,
) -> Answer {
    Params::parse(&query, &[])?;
    let body = body_of(body)?;
    let text = body_text(&body)?;
    let client = db(&api).await?;
    let diff = fleet::diff(&client, text, ORIGIN)
        .await
        .map_err(|e| fleet_error(e, ORIGIN))?;
    Ok(ok(StatusCode::OK, &to_json(&diff)))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RollbackBody {
    version: i64,
    /// A new version even when `version` holds the current tests.
    #[serde(default)]
    force: bool,
}

/// `POST /api/v1/tests/rollback {"version": N}`: a new version with N's tests.
async fn tests_rollback(
    State(api): State<Api>,
    axum::Extension(OperatorName(operator)): axum::Extension<OperatorName>,
    RawQuery(query): RawQuery,
    body: Result<Bytes, BytesRejection>,
) -> Answer {
    Params::parse(&query, &[])?;
    let body = body_of(body)?;
    let RollbackBody { version, force } = body_json(&body)?;
    let mut client = db(&api).await?;
    let applied = fleet::rollback(&mut client, version, &operator, force)
        .await
        .map_err(|e| fleet_error(e, ORIGIN))?;
    if let Some(new) = applied.version {
        tracing::info!(%operator, to = version, version = new, "api: fleet tests rolled back");
    }
    let status = if applied.version.is_some() {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok(ok(status, &to_json(&applied)))
}

/// The body of `POST /api/v1/runs`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RunBody {
    select: Option<BTreeMap<String, String>>,
    agents: Option<Vec<String>>,
    test: Option<String>,
    kind: Option<String>,
    target: Option<String>,
    #[serde(default)]
    options: BTreeMap<String, Value>,
    name: Option<String>,
    /// How long the request waits for agents (`"30s"`, default 30 s).
    expires: Option<String>,
}

impl RunBody {
    fn request(self) -> Result<RunRequest, ApiError> {
        let invalid = |m: &str| ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, m);
        let selection = match (self.select, self.agents) {
            (Some(select), None) => Selection {
                select,
                agents: None,
            },
            (None, Some(agents)) => Selection {
                select: BTreeMap::new(),
                agents: Some(agents),
            },
            (Some(_), Some(_)) => return Err(invalid("give `select` or `agents`, not both")),
            (None, None) => {
                return Err(invalid(
                    "give `select` (labels; {} for every agent) or `agents` (ids)",
                ))
            }
        };
        let test = match (self.test, self.kind, self.target) {
            (Some(test), None, None) => {
                if !self.options.is_empty() || self.name.is_some() {
                    return Err(invalid(
                        "`options` and `name` go with an ad-hoc test (`kind`, `target`), not with `test`",
                    ));
                }
                RunTest::Named(test)
            }
            (None, Some(kind), Some(target)) => {
                let mut options = Vec::with_capacity(self.options.len());
                for (key, value) in self.options {
                    let value = match value {
                        Value::String(s) => s,
                        Value::Number(n) if n.is_i64() || n.is_u64() => n.to_string(),
                        Value::Bool(b) => b.to_string(),
                        other => {
                            return Err(invalid(&format!(
                                "option `{key}`: {other} is not a string, an integer or a boolean"
                            )))
                        }
                    };
                    options.push((key, value));
                }
                RunTest::Adhoc {
                    kind,
                    target,
                    options,
                    name: self.name,
                }
            }
            (None, None, None) => {
                return Err(invalid(
                    "give `test` (a name) or `kind` and `target` (an ad-hoc test)",
                ))
            }
            _ => {
                return Err(invalid(
                    "give either `test` alone or both `kind` and `target`",
                ))
            }
        };
        let expires = match &self.expires {
            None => runs::DEFAULT_EXPIRES,
            Some(e) => edgeprobe_proto::testdef::parse_duration(e)
                .map_err(|err| invalid(&format!("expires `{e}`: {err}")))?,
        };
        Ok(RunRequest {
            selection,
            test,
            expires,
        })
    }
}

/// `POST /api/v1/runs`: asks the selected agents to run a test now; 202 with the run id.
async fn runs_create(
    State(api): State<Api>,
    axum::Extension(OperatorName(operator)): axum::Extension<OperatorName>,
    RawQuery(query): RawQuery,
    body: Result<Bytes, BytesRejection>,
) -> Answer {
    Params::parse(&query, &[])?;
    let body = body_of(body)?;
    let request = body_json::<RunBody>(&body)?.request()?;
    let mut client = db(&api).await?;
    let created = runs::create(&mut client, &request, &operator)
        .await
        .map_err(|e| fleet_error(e, "run-now"))?;
    tracing::info!(%operator, run_id = created.run_id, test = %created.test, agents = created.agents.len(), "api: run-now");
    let mut answer = to_json(&created);
    if let Value::Object(map) = &mut answer {
        map.insert(
            "timeout_seconds".into(),
            json!(created.timeout.as_secs_f64()),
        );
        map.insert(
            "dispatch_window_seconds".into(),
            json!(runs::DISPATCH_WINDOW.as_secs_f64()),
        );
        map.insert(
            "status".into(),
            json!(format!("/api/v1/runs/{}", created.run_id)),
        );
    }
    Ok(ok(StatusCode::ACCEPTED, &answer))
}

/// `GET /api/v1/runs/{id}`: each agent's state, the results so far and the summary.
async fn runs_get(
    State(api): State<Api>,
    Path(id): Path<String>,
    RawQuery(query): RawQuery,
) -> Answer {
    Params::parse(&query, &[])?;
    let run_id: i64 = id
        .parse()
        .map_err(|_| ApiError::new(StatusCode::NOT_FOUND, format!("no run {id}")))?;
    let client = db(&api).await?;
    let status = runs::status(&client, run_id)
        .await
        .map_err(|e| fleet_error(e, "run-now"))?;
    let summary = status.summary();
    let mut answer = to_json(&status);
    if let Value::Object(map) = &mut answer {
        map.insert("finished".into(), json!(summary.finished()));
        map.insert("summary".into(), to_json(&summary));
    }
    Ok(ok(StatusCode::OK, &answer))
}

/// `GET /api/v1/agents[?select=LABEL=VALUE...][&stale_after=D]`: every known agent with its
/// state, as `edgeprobe-collector agents --json`.
async fn agents_list(State(api): State<Api>, RawQuery(query): RawQuery) -> Answer {
    let params = Params::parse(&query, &["select", "stale_after"])?;
    let select = params.pairs("select")?;
    let stale_after = params.duration("stale_after")?.unwrap_or(api.stale_after);
    let client = db(&api).await?;
    let list = crate::agents::list(&client, &select, stale_after)
        .await
        .map_err(|e| fleet_error(e, ORIGIN))?;
    Ok(ok(StatusCode::OK, &json!({ "agents": to_json(&list) })))
}

/// `DELETE /api/v1/agents/{id}[?force=true]`: retires an agent that is gone (its results
/// stay); 422 while it is online unless forced.
async fn agents_retire(
    State(api): State<Api>,
    axum::Extension(OperatorName(operator)): axum::Extension<OperatorName>,
    Path(id): Path<String>,
    RawQuery(query): RawQuery,
) -> Answer {
    let params = Params::parse(&query, &["force"])?;
    let force = params.flag("force")?;
    let client = db(&api).await?;
    let retired = crate::agents::retire(&client, &id, force)
        .await
        .map_err(|e| fleet_error(e, ORIGIN))?;
    tracing::info!(%operator, agent_id = %id, "api: agent retired");
    Ok(ok(StatusCode::OK, &to_json(&retired)))
}

/// `GET /api/v1/results[?agent=ID...][&test=NAME][&since=D][&format=json|csv]`: results
/// oldest first, streamed from a server-side cursor as the client reads (the body is
/// chunked; the collector holds one batch at a time, whatever the size of the export).
async fn results_export(State(api): State<Api>, RawQuery(query): RawQuery) -> Answer {
    use crate::results::{self, Format};
    let params = Params::parse(&query, &["agent", "test", "since", "format"])?;
    let filter = results::Filter {
        agents: params.all("agent").map(String::from).collect(),
        test: params.get("test").map(String::from),
        since: params
            .duration("since")?
            .unwrap_or(Duration::from_secs(3600)),
    };
    let format = match params.get("format") {
        None => Format::Json,
        Some(f) => match Format::parse(f) {
            Some(Format::Table) | None => {
                return Err(ApiError::bad_request(format!(
                    "format={f}: use json or csv"
                )))
            }
            Some(f) => f,
        },
    };
    let mut client = db(&api).await?;
    // Checked before the answer starts, so an old schema is still an error status; a
    // database failure later cuts the body (the client sees an incomplete transfer).
    fleet::check_schema(&client)
        .await
        .map_err(|e| fleet_error(e, ORIGIN))?;
    // A few batches in flight at most: the client's reading paces the cursor.
    let (tx, rx) = mpsc::channel::<Result<Bytes, std::io::Error>>(4);
    tokio::spawn(async move {
        let mut rows = 0u64;
        let mut chunk = results::head(format);
        let mut cursor = match results::Cursor::open(&mut client, &filter).await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!("api: results export failed: {e}");
                let _ = tx.send(Err(std::io::Error::other(e.to_string()))).await;
                return;
            }
        };
        loop {
            let batch = match cursor.next().await {
                Ok(Some(batch)) => batch,
                Ok(None) => break,
                Err(e) => {
                    tracing::warn!("api: results export cut: {e}");
                    let _ = tx.send(Err(std::io::Error::other(e.to_string()))).await;
                    return;
                }
            };
            for row in &batch {
                chunk.push_str(&results::line(format, row, rows));
                rows += 1;
            }
            if tx
                .send(Ok(Bytes::from(std::mem::take(&mut chunk))))
                .await
                .is_err()
            {
                return; // the client went away
            }
        }
        chunk.push_str(results::tail(format, rows));
        let _ = tx.send(Ok(Bytes::from(chunk))).await;
    });
    let stream = tokio_stream::wrappers::ReceiverStream::new(rx);
    Ok((
        StatusCode::OK,
        [(header::CONTENT_TYPE, format.content_type())],
        axum::body::Body::from_stream(stream),
    )
        .into_response())
}
