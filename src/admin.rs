//! Admin: `/metrics`, `/healthz`, `/readyz` on their own listener, and nothing else.
//!
//! In: HTTP GETs from Prometheus or a load balancer probe. Out: the text
//! exposition, liveness, and readiness (503 until listeners are bound and the
//! policy is loaded, and again while draining). It never proxies and serves
//! only these three paths, so it is safe to expose to the subnet's Prometheus.

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
        "/metrics" => reply(
            StatusCode::OK,
            "text/plain; version=0.0.4",
            gw.metrics.render(),
        ),
        "/healthz" => reply(StatusCode::OK, "text/plain", "ok\n"),
        "/readyz" => {
            if gw.shutdown.is_stopping() {
                reply(StatusCode::SERVICE_UNAVAILABLE, "text/plain", "draining\n")
            } else if !gw.ready.load(Ordering::Acquire) {
                reply(StatusCode::SERVICE_UNAVAILABLE, "text/plain", "starting\n")
            } else {
                reply(StatusCode::OK, "text/plain", "ready\n")
            }
        }
        _ => reply(
            StatusCode::NOT_FOUND,
            "text/plain",
            "portcullis admin: /metrics, /healthz, /readyz\n",
        ),
    }
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
