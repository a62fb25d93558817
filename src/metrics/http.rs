//! The `/metrics` endpoint: a small HTTP/1 server beside the gRPC one, so a
//! scraper needs no gRPC and a busy blob port does not delay a scrape.

use std::net::SocketAddr;

use axum::Router;
use axum::http::header::CONTENT_TYPE;
use axum::response::IntoResponse;
use axum::routing::get;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::info;

use super::Metrics;
use crate::error::Result;

/// The OpenMetrics text format, which `prometheus_client` writes.
const CONTENT: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Binds `addr` and serves `GET /metrics` until `shutdown` fires. Returns
/// the bound address (useful with port 0) once listening; the server runs
/// on a spawned task.
pub async fn serve_metrics(
    addr: SocketAddr,
    metrics: Metrics,
    shutdown: CancellationToken,
) -> Result<SocketAddr> {
    let listener = TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    let app = Router::new().route(
        "/metrics",
        get(move || {
            let metrics = metrics.clone();
            async move { ([(CONTENT_TYPE, CONTENT)], metrics.encode()).into_response() }
        }),
    );
    info!(%bound, "serving metrics at /metrics");
    tokio::spawn(async move {
        let served = axum::serve(listener, app)
            .with_graceful_shutdown(shutdown.cancelled_owned())
            .await;
        if let Err(e) = served {
            tracing::warn!(error = %e, "metrics server failed");
        }
    });
    Ok(bound)
}
