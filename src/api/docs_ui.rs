//! Browsable API docs at `/docs`: Swagger UI on this node's `/openapi.json`. Its files
//! come from the Swagger UI release zip that the `utoipa-swagger-ui-vendored` crate
//! carries inside the binary (nothing is fetched at build time, nothing from a CDN); they
//! are unpacked once, on the first request, and kept in memory.

use std::collections::HashMap;
use std::io::{Cursor, Read};
use std::sync::OnceLock;

use axum::extract::Path;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use utoipa::IntoParams;

use super::error::{ApiError, ErrorBody};

/// Where the page lives; its assets are under `/docs/`.
pub const DOCS_PATH: &str = "/docs";

/// The files of Swagger UI's `dist/` the page needs (not the source maps, nor the ES
/// module bundles).
const ASSETS: [&str; 7] = [
    "index.html",
    "index.css",
    "swagger-ui.css",
    "swagger-ui-bundle.js",
    "swagger-ui-standalone-preset.js",
    "favicon-32x32.png",
    "favicon-16x16.png",
];

/// The policy on the page and its files: nothing from anywhere but this node (Swagger
/// UI's validator badge, on by default for any host but localhost, would send the
/// document's address to validator.swagger.io). Swagger UI sets inline styles.
pub const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; script-src 'self'; \
     style-src 'self' 'unsafe-inline'; img-src 'self' data:; font-src 'self' data:; \
     connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

/// Points the UI at this node's document (replaces the release's petstore example), with
/// the validator off.
const INITIALIZER: &str = r##"window.onload = function() {
  window.ui = SwaggerUIBundle({
    url: "/openapi.json",
    dom_id: "#swagger-ui",
    deepLinking: true,
    presets: [SwaggerUIBundle.presets.apis, SwaggerUIStandalonePreset],
    plugins: [SwaggerUIBundle.plugins.DownloadUrl],
    layout: "StandaloneLayout",
    validatorUrl: null
  });
};
"##;

#[derive(Debug, thiserror::Error)]
enum Error {
    #[error("the vendored Swagger UI archive cannot be read: {0}")]
    Zip(#[from] zip::result::ZipError),
    #[error("the vendored Swagger UI archive cannot be read: {0}")]
    Io(#[from] std::io::Error),
    #[error("the vendored Swagger UI archive lacks dist/{0}")]
    Missing(&'static str),
}

type Files = HashMap<&'static str, Vec<u8>>;

fn unpack(archive: &[u8]) -> Result<Files, Error> {
    let mut zip = zip::ZipArchive::new(Cursor::new(archive))?;
    let mut files = Files::new();
    for i in 0..zip.len() {
        let mut entry = zip.by_index(i)?;
        let Some((_, name)) = entry.name().split_once("/dist/") else {
            continue;
        };
        let Some(wanted) = ASSETS.iter().find(|a| **a == name) else {
            continue;
        };
        let mut bytes = Vec::new();
        entry.read_to_end(&mut bytes)?;
        files.insert(wanted, bytes);
    }
    if let Some(missing) = ASSETS.iter().find(|a| !files.contains_key(*a)) {
        return Err(Error::Missing(missing));
    }
    // The page lives at /docs (no trailing slash): make its links absolute.
    if let Some(page) = files.get_mut("index.html") {
        let html = String::from_utf8_lossy(page)
            .replace("\"./", &format!("\"{DOCS_PATH}/"))
            .replace(
                "href=\"index.css\"",
                &format!("href=\"{DOCS_PATH}/index.css\""),
            );
        *page = html.into_bytes();
    }
    files.insert("swagger-initializer.js", INITIALIZER.as_bytes().to_vec());
    Ok(files)
}

fn files() -> Result<&'static Files, ApiError> {
    static FILES: OnceLock<Result<Files, String>> = OnceLock::new();
    FILES
        .get_or_init(|| {
            unpack(utoipa_swagger_ui_vendored::SWAGGER_UI_VENDORED).map_err(|e| e.to_string())
        })
        .as_ref()
        .map_err(|e| ApiError::Internal(e.clone()))
}

fn content_type(name: &str) -> &'static str {
    match name.rsplit_once('.').map(|(_, ext)| ext) {
        Some("html") => "text/html; charset=utf-8",
        Some("css") => "text/css; charset=utf-8",
        Some("js") => "text/javascript; charset=utf-8",
        Some("png") => "image/png",
        _ => "application/octet-stream",
    }
}

fn serve_file(name: &str) -> Result<Response, ApiError> {
    let (name, bytes) = files()?
        .get_key_value(name)
        .ok_or_else(|| ApiError::NotFound(format!("no file {DOCS_PATH}/{name}")))?;
    Ok((
        [
            (header::CONTENT_TYPE, content_type(name)),
            (header::CACHE_CONTROL, "public, max-age=3600"),
            (header::CONTENT_SECURITY_POLICY, CONTENT_SECURITY_POLICY),
        ],
        bytes.clone(),
    )
        .into_response())
}

/// `GET /docs`.
#[utoipa::path(
    get,
    path = "/docs",
    tag = "health",
    operation_id = "docs",
    summary = "Browsable API docs",
    description = "Swagger UI on this node's `/openapi.json`; its assets are served by the node from the binary. No token.",
    responses((status = 200, description = "The page.", body = String, content_type = "text/html; charset=utf-8")),
)]
pub async fn page() -> Result<Response, ApiError> {
    serve_file("index.html")
}

/// The `{file}` of an asset path.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Path)]
pub struct AssetPath {
    /// One of the page's files.
    #[param(schema_with = asset_names)]
    pub file: String,
}

fn asset_names() -> utoipa::openapi::schema::Object {
    utoipa::openapi::schema::ObjectBuilder::new()
        .schema_type(utoipa::openapi::schema::Type::String)
        .enum_values(Some(
            ASSETS
                .iter()
                .copied()
                .chain(["swagger-initializer.js"])
                .collect::<Vec<_>>(),
        ))
        .build()
}

/// `GET /docs/{file}`.
#[utoipa::path(
    get,
    path = "/docs/{file}",
    tag = "health",
    operation_id = "docs_asset",
    summary = "A file of the API docs page",
    description = "Swagger UI's scripts, stylesheets and icons. No token.",
    params(AssetPath),
    responses(
        (status = 200, description = "The file.", content(
            (String = "text/javascript; charset=utf-8"),
            (String = "text/css; charset=utf-8"),
            (String = "text/html; charset=utf-8"),
            (String = "image/png"),
        )),
        (status = 404, description = "No such file.", body = ErrorBody),
    ),
)]
pub async fn asset(Path(AssetPath { file }): Path<AssetPath>) -> Result<Response, ApiError> {
    serve_file(&file)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_vendored_release_has_every_file_and_the_page_links_them_under_docs() {
        let files = unpack(utoipa_swagger_ui_vendored::SWAGGER_UI_VENDORED).unwrap();
        let page = String::from_utf8_lossy(&files["index.html"]);
        for asset in [
            "swagger-ui.css",
            "index.css",
            "swagger-ui-bundle.js",
            "swagger-initializer.js",
        ] {
            assert!(
                page.contains(&format!("\"/docs/{asset}\"")),
                "{asset}: {page}"
            );
        }
        assert!(!page.contains("\"./"), "{page}");
        assert!(files["swagger-ui-bundle.js"].len() > 100_000);
    }
}
