//! The web UI every node serves under `/ui/`: a hand-written single-page app (HTML, CSS,
//! vanilla JS in `assets/ui/`) compiled into the binary with `include_str!`, so a node
//! needs no files on disk and nothing is fetched from elsewhere. The page only talks to
//! the public REST API of the node that served it, with the token the user pasted (kept in
//! `sessionStorage`).
//!
//! Every UI response carries a strict Content-Security-Policy (scripts and styles from
//! this origin only, no inline script, no framing), `X-Content-Type-Options: nosniff`
//! and `Referrer-Policy: no-referrer`. The app renders tenant-controlled text (DAG ids,
//! owners, commands, logs) with `textContent` only; the policy is the second line.

use axum::http::{header, HeaderName, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::get;
use axum::Router;

use super::routes::ApiState;

/// Where the UI lives.
pub const PATH: &str = "/ui/";

/// The policy on every UI response: nothing but this origin, no inline script or style,
/// never inside a frame.
pub const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; script-src 'self'; \
     style-src 'self'; img-src 'self' data:; connect-src 'self'; base-uri 'none'; \
     form-action 'none'; frame-ancestors 'none'";

/// One embedded file: its bytes and content type.
struct Asset {
    body: &'static str,
    content_type: &'static str,
}

const INDEX: Asset = Asset {
    body: include_str!("../../assets/ui/index.html"),
    content_type: "text/html; charset=utf-8",
};
const APP_JS: Asset = Asset {
    body: include_str!("../../assets/ui/app.js"),
    content_type: "text/javascript; charset=utf-8",
};
const STYLE_CSS: Asset = Asset {
    body: include_str!("../../assets/ui/style.css"),
    content_type: "text/css; charset=utf-8",
};
const FAVICON: Asset = Asset {
    body: include_str!("../../assets/ui/favicon.svg"),
    content_type: "image/svg+xml",
};

/// The UI's routes: `/` and `/ui` redirect to `/ui/`, which serves the app's page; the
/// app's script, style sheet and icon sit beside it.
pub fn routes() -> Router<ApiState> {
    Router::new()
        .route("/", get(|| async { Redirect::to(PATH) }))
        .route("/ui", get(|| async { Redirect::to(PATH) }))
        .route("/ui/", get(|| async { serve(&INDEX) }))
        .route("/ui/app.js", get(|| async { serve(&APP_JS) }))
        .route("/ui/style.css", get(|| async { serve(&STYLE_CSS) }))
        .route("/ui/favicon.svg", get(|| async { serve(&FAVICON) }))
}

fn serve(asset: &Asset) -> Response {
    let mut resp = (StatusCode::OK, asset.body).into_response();
    let h = resp.headers_mut();
    for (name, value) in [
        (header::CONTENT_TYPE, asset.content_type),
        (header::CONTENT_SECURITY_POLICY, CONTENT_SECURITY_POLICY),
        (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        (header::X_FRAME_OPTIONS, "DENY"),
        (header::REFERRER_POLICY, "no-referrer"),
        // The assets change with the binary: revalidate instead of serving a stale app
        // after an upgrade.
        (header::CACHE_CONTROL, "no-cache"),
        (
            HeaderName::from_static("cross-origin-opener-policy"),
            "same-origin",
        ),
    ] {
        h.insert(name, HeaderValue::from_static(value));
    }
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_page_loads_only_external_scripts_and_styles() {
        // No inline script or style: the policy would block them.
        let page = INDEX.body;
        assert!(page.contains(r#"<script src="app.js""#));
        assert!(!page.contains("<script>"), "inline script in index.html");
        assert!(!page.contains("<style"), "inline style in index.html");
        assert!(!page.contains(" style="), "style attribute in index.html");
        assert!(!page.contains("http://") && !page.contains("https://"));
    }

    #[test]
    fn the_app_never_writes_html_from_strings() {
        for sink in [
            "innerHTML",
            "outerHTML",
            "insertAdjacentHTML",
            "document.write",
            "eval(",
            "new Function",
            "localStorage",
            "document.cookie",
        ] {
            assert!(!APP_JS.body.contains(sink), "app.js uses {sink}");
        }
        assert!(APP_JS.body.contains("sessionStorage"));
    }

    #[test]
    fn responses_carry_the_policy() {
        let resp = serve(&APP_JS);
        let h = resp.headers();
        assert_eq!(h[header::CONTENT_SECURITY_POLICY], CONTENT_SECURITY_POLICY);
        assert_eq!(h[header::X_CONTENT_TYPE_OPTIONS], "nosniff");
        assert!(CONTENT_SECURITY_POLICY.contains("frame-ancestors 'none'"));
        assert!(!CONTENT_SECURITY_POLICY.contains("unsafe"));
    }
}
