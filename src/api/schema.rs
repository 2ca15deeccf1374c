//! Schema fragments of the OpenAPI document that derive macros cannot infer from a Rust
//! type: the shapes the validators in `crate::dag` accept (ids, durations, instants,
//! URLs, cron expressions, IANA timezones), each built from the validator's own
//! constants. Referenced with `#[schema(schema_with = ...)]` and `#[param(schema_with = ...)]`.

use utoipa::openapi::schema::{
    AnyOfBuilder, ArrayBuilder, KnownFormat, Object, ObjectBuilder, Schema, SchemaFormat,
    SchemaType, Type,
};
use utoipa::openapi::RefOr;

use crate::dag::{
    DURATION_PATTERN, ID_PATTERN, MAX_DURATION_LEN, MAX_ID_LEN, MAX_TASKS, MAX_URL_LEN,
};

/// Every IANA timezone name this build knows (the same table `parse_timezone` reads).
pub fn timezone_names() -> impl Iterator<Item = &'static str> {
    chrono_tz::TZ_VARIANTS.iter().map(|tz| tz.name())
}

fn string(nullable: bool) -> ObjectBuilder {
    let ty = if nullable {
        SchemaType::from_iter([Type::String, Type::Null])
    } else {
        SchemaType::Type(Type::String)
    };
    ObjectBuilder::new().schema_type(ty)
}

fn id_builder() -> ObjectBuilder {
    string(false)
        .min_length(Some(1))
        .max_length(Some(MAX_ID_LEN))
        .pattern(Some(ID_PATTERN))
}

/// A DAG, task or run-filter id: 1-128 of `[A-Za-z0-9_.-]`, not `.` or `..`.
pub fn id() -> Object {
    id_builder()
        .description(Some(
            "1 to 128 letters, digits, '_', '-' or '.' (not '.' or '..')",
        ))
        .examples([serde_json::json!("sales_gdp")])
        .build()
}

/// A list of ids (`depends_on`).
pub fn id_list() -> ArrayBuilder {
    ArrayBuilder::new()
        .items(id_builder())
        .max_items(Some(MAX_TASKS))
}

/// A run id as the server mints them.
pub fn run_id() -> Object {
    string(false)
        .pattern(Some("^run_[0-9]+$"))
        .examples([serde_json::json!("run_9")])
        .build()
}

/// A duration such as `30s`, `5m`, `1h30m`, `250ms`, `2d` (null allowed: the default).
pub fn duration() -> Object {
    string(true)
        .pattern(Some(DURATION_PATTERN))
        .max_length(Some(MAX_DURATION_LEN))
        .description(Some(
            "a duration: numbers with units ms, s, m, h, d, e.g. 30s, 5m, 1h30m; at most \
             366d (400 beyond)",
        ))
        .examples([serde_json::json!("1h30m")])
        .build()
}

/// A date (`2025-10-01`, midnight in the DAG's timezone) or an RFC 3339 time.
pub fn instant() -> RefOr<Schema> {
    instant_of(true, "2025-10-01")
}

/// [`instant`] for the end of a range (`to`, `end_date`): its example is later than the
/// start's, so a client (or a fuzzer) that sends the examples sends a valid range.
pub fn instant_end() -> RefOr<Schema> {
    instant_of(true, "2025-10-04")
}

/// [`instant`] where null is not accepted (query parameters, required fields).
pub fn instant_required() -> RefOr<Schema> {
    instant_of(false, "2025-10-01")
}

/// [`instant_required`] for the end of a range.
pub fn instant_end_required() -> RefOr<Schema> {
    instant_of(false, "2025-10-04")
}

fn instant_of(nullable: bool, example: &str) -> RefOr<Schema> {
    let mut any = AnyOfBuilder::new()
        .item(
            string(false)
                .format(Some(SchemaFormat::KnownFormat(KnownFormat::Date)))
                .build(),
        )
        .item(
            string(false)
                .format(Some(SchemaFormat::KnownFormat(KnownFormat::DateTime)))
                .build(),
        );
    if nullable {
        any = any.item(ObjectBuilder::new().schema_type(Type::Null).build());
    }
    let any: Schema = any.description(Some(
        "a date (2025-10-01: midnight in the DAG's timezone) or an RFC 3339 time (2025-10-01T02:00:00Z)",
    ))
    .examples([serde_json::json!(example)])
    .build()
    .into();
    RefOr::T(any)
}

/// An `http://` or `https://` URL of at most 2048 characters.
pub fn url() -> Object {
    string(true)
        // A host is required. The server also refuses what does not parse as a URL; a
        // templated one (`{{ }}`, spaces and all) is parsed when it is rendered.
        .pattern(Some(r"^https?://[^/?#]+([/?#][\s\S]*)?$"))
        .max_length(Some(MAX_URL_LEN))
        .examples([serde_json::json!("https://example.com/hook")])
        .build()
}

/// A cron expression: 5 fields, 6 with seconds first, or an `@` macro
/// ([`crate::schedule::pattern`]). The fields' ranges are checked by the server (400
/// `invalid_request`).
pub fn cron() -> Object {
    string(true)
        .pattern(Some(crate::schedule::pattern()))
        .examples([serde_json::json!("0 2 * * *")])
        .build()
}

/// An IANA timezone name.
pub fn timezone() -> Object {
    string(true)
        .enum_values(Some(
            timezone_names()
                .map(serde_json::Value::from)
                .chain([serde_json::Value::Null]),
        ))
        .default(Some(serde_json::json!("UTC")))
        .examples([serde_json::json!("Europe/Paris")])
        .build()
}

/// The task kinds.
pub fn task_kind() -> Object {
    string(false)
        .enum_values(Some(["shell", "http", "noop"]))
        .build()
}

/// An http task's method, in any case.
pub fn http_method() -> Object {
    let any_case = |m: &str| -> String {
        m.chars()
            .map(|c| format!("[{}{}]", c.to_ascii_uppercase(), c.to_ascii_lowercase()))
            .collect()
    };
    let alternatives: Vec<String> = ["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD"]
        .iter()
        .map(|m| any_case(m))
        .collect();
    string(true)
        .pattern(Some(format!("^({})$", alternatives.join("|"))))
        .default(Some(serde_json::json!("GET")))
        .description(Some("GET, POST, PUT, PATCH, DELETE or HEAD, in any case"))
        .build()
}

/// A list cursor: the hex `next_cursor` of a previous page (empty: the first page).
pub fn cursor() -> Object {
    string(false)
        .pattern(Some("^([0-9A-Fa-f]{2})*$"))
        .description(Some(
            "The `next_cursor` of the previous page; empty or absent: the first page",
        ))
        .build()
}
