//! The built-in dashboard: static pages embedded in the binary and served
//! at `/`, so viewing it needs no network beyond this service. The page
//! reads only the public HTTP API (`/v1/sql`, `/v1/reports/*`,
//! `/v1/alerts`) with the key it is signed in with, so a consumer sees
//! exactly what its SQL would. Sources: `dashboards/web/` (the chart
//! library, Apache ECharts 5.6.0, is vendored there with its license).

use axum::Router;
use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;

const INDEX: &str = include_str!("../../dashboards/web/index.html");
const APP: &str = include_str!("../../dashboards/web/app.js");
const STYLE: &str = include_str!("../../dashboards/web/style.css");
const ECHARTS: &str = include_str!("../../dashboards/web/vendor/echarts/echarts.common.min.js");
const ECHARTS_LICENSE: &str = include_str!("../../dashboards/web/vendor/echarts/LICENSE");

/// Scripts and styles only from this origin; data only from this API.
const POLICY: &str = "default-src 'none'; script-src 'self'; style-src 'self' 'unsafe-inline'; \
                      img-src 'self' data:; connect-src 'self'; form-action 'none'; \
                      frame-ancestors 'none'; base-uri 'none'";

fn asset(kind: &'static str, body: &'static str) -> Response {
    let mut r = ([(header::CONTENT_TYPE, kind)], body).into_response();
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(POLICY),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    // The assets change only with the binary; the page is small.
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    r
}

/// `/` and its assets.
pub fn routes<S: Clone + Send + Sync + 'static>() -> Router<S> {
    Router::new()
        .route(
            "/",
            get(|| async { asset("text/html; charset=utf-8", INDEX) }),
        )
        .route(
            "/assets/app.js",
            get(|| async { asset("text/javascript; charset=utf-8", APP) }),
        )
        .route(
            "/assets/style.css",
            get(|| async { asset("text/css; charset=utf-8", STYLE) }),
        )
        .route(
            "/assets/echarts.min.js",
            get(|| async { asset("text/javascript; charset=utf-8", ECHARTS) }),
        )
        .route(
            "/assets/echarts-LICENSE.txt",
            get(|| async { asset("text/plain; charset=utf-8", ECHARTS_LICENSE) }),
        )
}
