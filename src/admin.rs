//! Admin: `/metrics`, `/healthz`, `/readyz` on their own listener, and nothing else.
//!
//! In: HTTP GETs from Prometheus or a load balancer probe. Out: the text
//! exposition, liveness, and readiness (503 until listeners are bound and the
//! policy is loaded, again while draining, and under `[admin]
//! require_ruleset` while the counters file does not show the transparent
//! ruleset loaded). It never proxies and serves only these three paths, so
//! it is safe to expose to the subnet's Prometheus.

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

use crate::gateway::Gateway;
use crate::ruleset;
use crate::spare::{Accepted, Spare};

fn reply(status: StatusCode, content_type: &str, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, content_type)
        .body(Full::new(body.into()))
        .expect("static response parts are valid")
}

fn route(req: &Request<Incoming>, gw: &Gateway) -> Response<Full<Bytes>> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return reply(StatusCode::METHOD_NOT_ALLOWED, "text/plain", "GET only\n");
    }
    match req.uri().path() {
        "/metrics" => {
            // Readiness as of this scrape, not of the last probe.
            let _ = readiness(gw);
            reply(
                StatusCode::OK,
                "text/plain; version=0.0.4",
                gw.metrics.render(),
            )
        }
        "/healthz" => reply(StatusCode::OK, "text/plain", "ok\n"),
        "/readyz" => match readiness(gw) {
            Ok(()) => reply(StatusCode::OK, "text/plain", "ready\n"),
            Err(why) => reply(
                StatusCode::SERVICE_UNAVAILABLE,
                "text/plain",
                format!("{why}\n"),
            ),
        },
        _ => reply(
            StatusCode::NOT_FOUND,
            "text/plain",
            "portcullis admin: /metrics, /healthz, /readyz\n",
        ),
    }
}

/// Ready, or why not (also set as `portcullis_ready`).
fn readiness(gw: &Gateway) -> Result<(), String> {
    let found = why_not_ready(gw);
    gw.metrics.ready.set(i64::from(found.is_ok()));
    found
}

/// Draining, starting, or (under `[admin] require_ruleset`) the ruleset
/// missing or its counters stale.
fn why_not_ready(gw: &Gateway) -> Result<(), String> {
    if gw.shutdown.is_stopping() {
        return Err("draining".into());
    }
    if !gw.ready.load(Ordering::Acquire) {
        return Err("starting".into());
    }
    if !gw.require_ruleset.load(Ordering::Acquire) {
        return Ok(());
    }
    let found = ruleset::loaded(std::time::SystemTime::now());
    // Log the flips only: a load balancer probes every few seconds.
    let was = gw.ruleset_seen.swap(found.is_ok(), Ordering::AcqRel);
    match &found {
        Err(why) if was => tracing::warn!(%why, "not ready: /readyz answers 503"),
        Ok(()) if !was => tracing::info!("ruleset loaded again: /readyz answers 200"),
        _ => {}
    }
    found.map_err(|why| why.to_string())
}

/// Admin connections served at a time; past it a connection is closed at
/// once (Prometheus and a load balancer probe need a handful).
const MAX_ADMIN_CONNECTIONS: usize = 64;

/// Serves the admin endpoints until the process cuts its tunnels (it stays
/// up while draining so probes can see 503 and Prometheus the last counts).
/// A spare descriptor keeps `/healthz` answering at the process's fd limit.
pub async fn serve(listener: TcpListener, gw: Arc<Gateway>) {
    let slots = Arc::new(Semaphore::new(MAX_ADMIN_CONNECTIONS));
    let mut spare = Spare::new();
    let cut = gw.shutdown.cutting();
    tokio::pin!(cut);
    loop {
        let accepted = tokio::select! {
            a = spare.accept(&listener, "admin") => a,
            () = &mut cut => return,
        };
        let stream = match accepted {
            Accepted::Client(stream, _) | Accepted::AtLimit(stream, _) => stream,
            Accepted::Retry => continue,
        };
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            continue;
        };
        let gw = gw.clone();
        tokio::spawn(async move {
            let svc = service_fn(|req| {
                let resp = route(&req, &gw);
                async move { Ok::<_, Infallible>(resp) }
            });
            let conn = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(std::time::Duration::from_secs(10))
                .serve_connection(TokioIo::new(stream), svc);
            if let Err(err) = conn.await {
                tracing::debug!(error = %err, "admin connection ended");
            }
            drop(permit);
        });
    }
}
