//! The API's documentation (issue 11) against a real node: `/openapi.json` is valid
//! OpenAPI 3.1 (checked with the official meta-schema, vendored in tests/fixtures), every
//! route the node serves is documented and every documented operation is served, the
//! spec's examples and the document's own examples validate against the documented
//! schemas, the schemas say what the validators accept, and `/docs` serves Swagger UI
//! with its assets from the binary.

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use common::{Cluster, BASE};
use proptest::prelude::*;
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};

const LONG: Duration = Duration::from_secs(60);

async fn up() -> Cluster {
    let mut c = Cluster::new(1, &[]);
    c.start_all();
    c.wait_leader(LONG).await;
    c.wait_ready(LONG).await;
    c
}

async fn served_document(c: &Cluster) -> Value {
    let (s, doc, _) = c
        .request(1, Method::GET, "/openapi.json", None, None, &[])
        .await;
    assert_eq!(s, StatusCode::OK, "{doc}");
    doc
}

fn meta_schema() -> Value {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/openapi-3.1-schema-2022-10-07.json"
    );
    let text = std::fs::read_to_string(path).expect("vendored OpenAPI 3.1 meta-schema");
    serde_json::from_str(&text).expect("meta-schema is JSON")
}

/// Errors of `instance` against the OpenAPI 3.1 meta-schema.
fn openapi_errors(instance: &Value) -> Vec<String> {
    let validator = jsonschema::draft202012::new(&meta_schema()).expect("meta-schema compiles");
    validator
        .iter_errors(instance)
        .map(|e| format!("{} at {}", e, e.instance_path()))
        .collect()
}

/// A validator for `schema`, a schema object of `doc` (its `$ref`s resolve in `doc`),
/// checking formats too.
fn schema_validator(doc: &Value, schema: &Value) -> jsonschema::Validator {
    let mut root = json!({"components": doc["components"].clone()});
    if let (Some(r), Some(s)) = (root.as_object_mut(), schema.as_object()) {
        r.extend(s.clone());
    } else {
        root = schema.clone();
    }
    jsonschema::options()
        .with_draft(jsonschema::Draft::Draft202012)
        .should_validate_formats(true)
        .build(&root)
        .unwrap_or_else(|e| panic!("schema compiles: {e}\n{schema}"))
}

fn assert_valid(doc: &Value, schema: &Value, instance: &Value, what: &str) {
    let v = schema_validator(doc, schema);
    let errors: Vec<String> = v.iter_errors(instance).map(|e| e.to_string()).collect();
    assert!(
        errors.is_empty(),
        "{what}: {instance} does not validate: {errors:?}"
    );
}

fn component(name: &str) -> Value {
    json!({"$ref": format!("#/components/schemas/{name}")})
}

fn request_schema(doc: &Value, path: &str, method: &str) -> Value {
    let s = &doc["paths"][format!("{BASE}{path}")][method]["requestBody"]["content"]
        ["application/json"]["schema"];
    assert!(s.is_object(), "{method} {path} documents its body");
    s.clone()
}

fn response_schema(doc: &Value, path: &str, method: &str, status: &str) -> Value {
    let s =
        &doc["paths"][path][method]["responses"][status]["content"]["application/json"]["schema"];
    assert!(s.is_object(), "{method} {path} documents its {status}");
    s.clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn served_document_is_valid_openapi_3_1() {
    let c = up().await;
    let doc = served_document(&c).await;
    assert_eq!(doc["openapi"], "3.1.0");
    let errors = openapi_errors(&doc);
    assert!(errors.is_empty(), "not valid OpenAPI 3.1: {errors:#?}");
    // The validator bites: documents that break the 3.1 rules are refused.
    for (what, broken) in [
        ("no info", {
            let mut d = doc.clone();
            d.as_object_mut().map(|o| o.remove("info"));
            d
        }),
        ("3.0 version", {
            let mut d = doc.clone();
            d["openapi"] = json!("3.0.3");
            d
        }),
        ("a parameter without `in`", {
            let mut d = doc.clone();
            d["paths"][format!("{BASE}/dags")]["get"]["parameters"][0]
                .as_object_mut()
                .map(|o| o.remove("in"));
            d
        }),
        ("a response without a description", {
            let mut d = doc.clone();
            d["paths"]["/healthz"]["get"]["responses"]["200"]
                .as_object_mut()
                .map(|o| o.remove("description"));
            d
        }),
    ] {
        assert!(
            !openapi_errors(&broken).is_empty(),
            "the meta-schema refuses a document with {what}"
        );
    }
    // Every schema in it is a valid JSON Schema 2020-12 schema.
    let mut schemas = 0;
    for (name, s) in doc["components"]["schemas"].as_object().unwrap() {
        let mut s = s.clone();
        s["$schema"] = json!("https://json-schema.org/draft/2020-12/schema");
        assert!(
            jsonschema::meta::is_valid(&s),
            "component {name} is a valid 2020-12 schema"
        );
        schemas += 1;
    }
    // Auth: a bearer JWT scheme, and every operation under the base path requires it.
    let scheme = &doc["components"]["securitySchemes"]["bearer"];
    assert_eq!(scheme["type"], "http");
    assert_eq!(scheme["scheme"], "bearer");
    assert_eq!(scheme["bearerFormat"], "JWT");
    let mut operations = 0;
    for (path, ops) in doc["paths"].as_object().unwrap() {
        for (method, op) in ops.as_object().unwrap() {
            operations += 1;
            let responses = op["responses"].as_object().unwrap();
            if path.starts_with(BASE) {
                let scopes = op["security"][0]["bearer"].as_array();
                assert!(
                    scopes.is_some_and(|s| s.len() == 1),
                    "{method} {path} requires a bearer token with one scope"
                );
                // 400: an `X-Request-Id` beyond 200 bytes, on every operation.
                for status in ["400", "401", "403", "413", "429", "500", "503"] {
                    assert!(
                        responses.contains_key(status),
                        "{method} {path} documents {status}"
                    );
                }
                if op.get("requestBody").is_some() {
                    for status in ["400", "415"] {
                        assert!(
                            responses.contains_key(status),
                            "{method} {path} documents {status}"
                        );
                    }
                }
            } else {
                assert!(op.get("security").is_none(), "{path} takes no token");
            }
        }
    }
    // Each error answer lists exactly the codes its status carries.
    let conflict = &doc["paths"][format!("{BASE}/runs/{{run_id}}/cancel")]["post"]["responses"]
        ["409"]["content"]["application/json"]["schema"]["properties"]["error"]["enum"];
    let conflict: BTreeSet<&str> = conflict
        .as_array()
        .expect("409 lists its codes")
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert_eq!(
        conflict,
        BTreeSet::from([
            "idempotency_key_reused",
            "invalid_state",
            "version_conflict"
        ])
    );
    println!(
        "FIGURE openapi: served document is valid OpenAPI 3.1 ({operations} operations, {schemas} schemas)"
    );
    c.assert_no_panics();
}

/// Every route the node serves, written down independently of the document.
fn routes() -> BTreeSet<(String, String)> {
    let base = [
        ("post", "/dags"),
        ("get", "/dags"),
        ("get", "/dags/{dag_id}"),
        ("delete", "/dags/{dag_id}"),
        ("post", "/dags/{dag_id}/plan"),
        ("post", "/dags/{dag_id}/pause"),
        ("post", "/dags/{dag_id}/unpause"),
        ("get", "/dags/{dag_id}/versions"),
        ("get", "/dags/{dag_id}/versions/{version}"),
        ("post", "/runs"),
        ("get", "/runs"),
        ("get", "/runs/{run_id}"),
        ("post", "/runs/{run_id}/cancel"),
        ("post", "/runs/{run_id}/retry"),
        (
            "get",
            "/runs/{run_id}/tasks/{task_id}/attempts/{attempt}/log",
        ),
        ("get", "/cluster/status"),
        ("post", "/cluster/members"),
        ("delete", "/cluster/members/{node_id}"),
        ("post", "/cluster/snapshot"),
    ]
    .map(|(m, p)| (m.to_string(), format!("{BASE}{p}")));
    let public = [
        ("get", "/healthz"),
        ("get", "/readyz"),
        ("get", "/metrics"),
        ("get", "/openapi.json"),
        ("get", "/docs"),
        ("get", "/docs/{file}"),
    ]
    .map(|(m, p)| (m.to_string(), p.to_string()));
    base.into_iter().chain(public).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_route_is_documented_and_every_documented_operation_served() {
    let c = up().await;
    let doc = served_document(&c).await;
    let documented: BTreeSet<(String, String)> = doc["paths"]
        .as_object()
        .unwrap()
        .iter()
        .flat_map(|(path, ops)| {
            ops.as_object()
                .unwrap()
                .keys()
                .map(move |m| (m.clone(), path.clone()))
        })
        .collect();
    let served = routes();
    let undocumented: Vec<_> = served.difference(&documented).collect();
    let unknown: Vec<_> = documented.difference(&served).collect();
    assert!(
        undocumented.is_empty(),
        "served, not documented: {undocumented:?}"
    );
    assert!(
        unknown.is_empty(),
        "documented, not in the route list: {unknown:?}"
    );
    for spec_path in ["/dags", "/runs", "/runs/{run_id}"] {
        assert!(
            documented
                .iter()
                .any(|(_, p)| *p == format!("{BASE}{spec_path}")),
            "the spec's {spec_path} is documented"
        );
    }
    // Each documented operation is served at its path; every other method there is 405.
    let t = c.admin_token();
    let paths: BTreeSet<&String> = documented.iter().map(|(_, p)| p).collect();
    let mut probes = 0;
    for path in paths {
        let concrete = path
            .split('/')
            .map(|seg| match seg {
                "{run_id}" => "run_1",
                "{file}" => "index.css",
                s if s.starts_with('{') => "1",
                s => s,
            })
            .collect::<Vec<_>>()
            .join("/");
        for method in ["get", "post", "put", "patch", "delete"] {
            let m = Method::from_bytes(method.to_uppercase().as_bytes()).unwrap();
            let body = Some(("application/json", b"{}".to_vec()));
            let (s, v) = raw(&c, m, &concrete, &t, body).await;
            probes += 1;
            let no_route = v["message"]
                .as_str()
                .is_some_and(|m| m.starts_with("no route"));
            assert!(!no_route, "{method} {path}: {v}");
            if documented.contains(&(method.to_string(), path.clone())) {
                assert_ne!(
                    s,
                    StatusCode::METHOD_NOT_ALLOWED,
                    "{method} {path} is served: {v}"
                );
                assert!(
                    !s.is_server_error() || concrete.contains("cluster"),
                    "{method} {path}: {s} {v}"
                );
                let documented_statuses = doc["paths"][path.as_str()][method]["responses"]
                    .as_object()
                    .unwrap();
                assert!(
                    documented_statuses.contains_key(s.as_str()),
                    "{method} {path} answered {s}, which it does not document: {v}"
                );
            } else {
                assert_eq!(
                    s,
                    StatusCode::METHOD_NOT_ALLOWED,
                    "{method} {path} is not served: {v}"
                );
            }
        }
    }
    println!(
        "FIGURE openapi: {} documented operations = the {} served routes; {probes} method probes",
        documented.len(),
        served.len()
    );
    c.assert_no_panics();
}

async fn raw(
    c: &Cluster,
    method: Method,
    path: &str,
    token: &str,
    body: Option<(&str, Vec<u8>)>,
) -> (StatusCode, Value) {
    let mut req = c
        .http
        .request(method, format!("{}{}", c.api(1), path))
        .bearer_auth(token);
    if let Some((ctype, bytes)) = body {
        req = req.header("content-type", ctype).body(bytes);
    }
    let resp = req.send().await.expect("response");
    let status = resp.status();
    let text = resp.text().await.unwrap_or_default();
    (
        status,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    )
}

/// The examples of the spec (shared/spec/orchestrator-api.md), verbatim.
const SPEC_SUBMIT: &str = r#"{ "dag_id":"sales_gdp","schedule":"0 2 * * *","owner":"team-data"}"#;
const SPEC_SUBMITTED: &str = r#"{ "dag_id":"sales_gdp","status":"active"}"#;
const SPEC_TRIGGER: &str =
    r#"{ "dag_id":"sales_gdp","run_type":"backfill","from":"2025-10-01","to":"2025-10-04"}"#;
const SPEC_TRIGGERED: &str = r#"{ "run_id":"run_9","state":"queued"}"#;
const SPEC_RUN: &str =
    r#"{ "run_id":"run_9","state":"running","tasks":{"extract":"done","transform":"running"}}"#;

#[test]
fn spec_examples_and_the_documents_examples_validate_against_its_schemas() {
    let doc = orchestrator::api::document();
    let parse = |s: &str| -> Value { serde_json::from_str(s).expect("spec example is JSON") };
    // The spec's requests against the documented request bodies.
    assert_valid(
        &doc,
        &request_schema(&doc, "/dags", "post"),
        &parse(SPEC_SUBMIT),
        "spec submit",
    );
    assert_valid(
        &doc,
        &request_schema(&doc, "/runs", "post"),
        &parse(SPEC_TRIGGER),
        "spec trigger",
    );
    // The spec's answers against the documented answers.
    let ok = |p: &str, m: &str| response_schema(&doc, &format!("{BASE}{p}"), m, "200");
    assert_valid(
        &doc,
        &ok("/dags", "post"),
        &parse(SPEC_SUBMITTED),
        "spec submit answer",
    );
    assert_valid(
        &doc,
        &ok("/runs", "post"),
        &parse(SPEC_TRIGGERED),
        "spec trigger answer",
    );
    // The spec's run shows three fields of the answer; the document's example has them
    // with the same values, and validates as a whole below.
    let example = &doc["paths"][format!("{BASE}/runs/{{run_id}}")]["get"]["responses"]["200"]
        ["content"]["application/json"];
    let example = example
        .get("example")
        .or_else(|| {
            doc["components"]["schemas"]["RunOut"]
                .get("examples")
                .and_then(|e| e.get(0))
        })
        .or_else(|| doc["components"]["schemas"]["RunOut"].get("example"))
        .expect("the run answer has an example")
        .clone();
    for (k, v) in parse(SPEC_RUN).as_object().unwrap() {
        assert_eq!(&example[k], v, "the run example shows the spec's {k}");
    }
    assert_valid(&doc, &component("RunOut"), &example, "run example");
    // The spec's examples are the document's.
    let body_example = |p: &str| {
        doc["paths"][format!("{BASE}{p}")]["post"]["requestBody"]["content"]["application/json"]
            ["example"]
            .clone()
    };
    assert_eq!(body_example("/dags"), parse(SPEC_SUBMIT));
    assert_eq!(body_example("/runs"), parse(SPEC_TRIGGER));
    // Every example in the document validates against the schema it illustrates.
    let mut checked = 0;
    for (path, ops) in doc["paths"].as_object().unwrap() {
        for (method, op) in ops.as_object().unwrap() {
            let bodies = op["requestBody"]["content"]
                .as_object()
                .into_iter()
                .flatten();
            let answers = op["responses"]
                .as_object()
                .unwrap()
                .values()
                .filter_map(|r| r["content"].as_object())
                .flatten();
            for (media, m) in bodies.chain(answers) {
                if let (Some(ex), true) = (m.get("example"), media.contains("json")) {
                    assert_valid(&doc, &m["schema"], ex, &format!("{method} {path} example"));
                    checked += 1;
                }
            }
        }
    }
    for (name, s) in doc["components"]["schemas"].as_object().unwrap() {
        let examples = s
            .get("examples")
            .and_then(Value::as_array)
            .into_iter()
            .flatten();
        for ex in examples.chain(s.get("example")) {
            assert_valid(&doc, &component(name), ex, &format!("{name} example"));
            checked += 1;
        }
    }
    assert!(checked >= 10, "examples checked: {checked}");
    println!("FIGURE openapi: spec examples and {checked} document examples validate");
}

/// Whether `value` is valid for the documented body of `POST {BASE}{path}`.
fn schema_accepts(doc: &Value, path: &str, value: &Value) -> bool {
    schema_validator(doc, &request_schema(doc, path, "post")).is_valid(value)
}

#[test]
fn request_schemas_say_what_the_validators_accept() {
    let doc = orchestrator::api::document();
    let dag_ok = |v: &Value| {
        serde_json::from_value::<orchestrator::dag::DagInput>(v.clone())
            .ok()
            .is_some_and(|i| orchestrator::dag::validate(&i).is_ok())
    };
    // Bodies on both sides of each rule the schema states.
    let dags = [
        json!({"dag_id": "d"}),
        json!({"dag_id": ""}),
        json!({"dag_id": "."}),
        json!({"dag_id": ".."}),
        json!({"dag_id": "..."}),
        json!({"dag_id": "a b"}),
        json!({"dag_id": "x".repeat(128)}),
        json!({"dag_id": "x".repeat(129)}),
        json!({"dag_id": "d", "typo": 1}),
        json!({"dag_id": "d", "timezone": "Europe/Paris"}),
        json!({"dag_id": "d", "timezone": "Mars/Olympus"}),
        json!({"dag_id": "d", "timezone": null}),
        json!({"dag_id": "d", "max_active_runs": 0}),
        json!({"dag_id": "d", "max_active_runs": 10000}),
        json!({"dag_id": "d", "max_active_runs": 10001}),
        json!({"dag_id": "d", "owner": "é".repeat(256)}),
        json!({"dag_id": "d", "owner": "é".repeat(257)}),
        json!({"dag_id": "d", "sla": "1h30m"}),
        json!({"dag_id": "d", "sla": "90 minutes"}),
        json!({"dag_id": "d", "start_date": "2025-10-01"}),
        json!({"dag_id": "d", "start_date": "2025-10-01T02:00:00Z"}),
        json!({"dag_id": "d", "start_date": "yesterday"}),
        json!({"dag_id": "d", "webhook": "https://example.com/h"}),
        json!({"dag_id": "d", "webhook": "ftp://example.com/h"}),
        json!({"dag_id": "d", "version": -1}),
        json!({"dag_id": "d", "tasks": [{"task_id": "a", "kind": "noop"}]}),
        json!({"dag_id": "d", "tasks": [{"task_id": "a", "kind": "noop", "url": "http://x"}]}),
        json!({"dag_id": "d", "tasks": [{"task_id": "a", "kind": "noop", "command": null}]}),
        json!({"dag_id": "d", "tasks": [{"task_id": "a", "kind": "cron"}]}),
        json!({"dag_id": "d", "tasks": [{"task_id": "a", "kind": "shell", "command": "echo"}]}),
        json!({"dag_id": "d", "tasks": [{"task_id": "a", "kind": "shell"}]}),
        json!({"dag_id": "d", "tasks": [{"task_id": "a", "kind": "shell", "command": "  "}]}),
        json!({"dag_id": "d", "tasks": [{"task_id": "a", "kind": "http", "url": "http://x"}]}),
        json!({"dag_id": "d", "tasks": [{"task_id": "a", "kind": "http"}]}),
        json!({"dag_id": "d", "tasks": [{"task_id": "a", "kind": "http", "url": "http://x", "method": "patch"}]}),
        json!({"dag_id": "d", "tasks": [{"task_id": "a", "kind": "http", "url": "http://x", "method": "TRACE"}]}),
        json!({"dag_id": "d", "tasks": [{"task_id": "a", "kind": "http", "url": "http://x", "expect_status": 204}]}),
        json!({"dag_id": "d", "tasks": [{"task_id": "a", "kind": "http", "url": "http://x", "expect_status": 99}]}),
        json!({"dag_id": "d", "tasks": [{"task_id": "a", "kind": "noop", "expect_status": 99}]}),
        json!({"dag_id": "d", "tasks": [{"task_id": "a", "kind": "noop", "retries": 100}]}),
        json!({"dag_id": "d", "tasks": [{"task_id": "a", "kind": "noop", "retries": 101}]}),
        json!({"dag_id": "d", "tasks": [{"task_id": "a", "kind": "noop", "retry_delay": "5x"}]}),
    ];
    for body in &dags {
        assert_eq!(
            schema_accepts(&doc, "/dags", body),
            dag_ok(body),
            "schema and validator disagree on {body}"
        );
    }
    // Run requests: the window rules (the DAG lookup and `from < to` are the server's).
    let runs = [
        (json!({"dag_id": "d"}), true),
        (json!({"dag_id": "d", "run_type": "manual"}), true),
        (json!({"dag_id": "d", "run_type": "scheduled"}), false),
        (json!({"dag_id": "d", "run_type": "backfill"}), false),
        (
            json!({"dag_id": "d", "run_type": "backfill", "from": "2025-10-01"}),
            false,
        ),
        (
            json!({"dag_id": "d", "from": "2025-10-01", "to": "2025-10-04"}),
            true,
        ),
        (json!({"dag_id": "d", "to": "2025-10-04"}), false),
        (
            json!({"dag_id": "d", "from": "2025-10-01", "to": "soon"}),
            false,
        ),
        (json!({"dag_id": "d", "from": null, "to": null}), true),
        (json!({"dag_id": "bad id"}), false),
        (json!({"dag_id": "d", "extra": true}), false),
    ];
    for (body, valid) in &runs {
        assert_eq!(schema_accepts(&doc, "/runs", body), *valid, "{body}");
    }
    // `If-Match`: a header is never null (Schemathesis sent the text `null` when the
    // schema allowed null), and the server takes exactly what the pattern says.
    let if_match = doc["paths"][format!("{BASE}/dags")]["post"]["parameters"]
        .as_array()
        .and_then(|ps| ps.iter().find(|p| p["name"] == "If-Match"))
        .expect("POST /dags documents If-Match")
        .clone();
    assert_eq!(if_match["required"], false, "{if_match}");
    assert_eq!(if_match["schema"]["type"], "string", "{if_match}");
    let header = schema_validator(&doc, &if_match["schema"]);
    for (v, valid) in [
        ("7", true),
        ("\"7\"", true),
        ("+1", false),
        ("", false),
        ("null", false),
    ] {
        assert_eq!(header.is_valid(&json!(v)), valid, "If-Match {v:?}");
    }
    println!(
        "FIGURE openapi: {} DAG bodies and {} run bodies judged alike by schema and validator",
        dags.len(),
        runs.len()
    );
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 400, failure_persistence: None, ..ProptestConfig::default() })]

    /// The id schema accepts exactly what `check_id` accepts.
    #[test]
    fn id_schema_matches_check_id(id in prop_oneof![
        "[A-Za-z0-9_.-]{0,130}",
        "[.]{1,3}",
        "[a-z. /é]{0,8}",
        any::<String>(),
    ]) {
        let schema = serde_json::to_value(orchestrator::api::schema::id()).unwrap();
        let by_schema = jsonschema::is_valid(&schema, &json!(id));
        let by_check = orchestrator::dag::check_id("id", &id).is_ok();
        prop_assert_eq!(by_schema, by_check, "{:?}", id);
    }

    /// The duration schema accepts exactly what `parse_duration` parses (values too
    /// large to add up are the server's 400).
    #[test]
    fn duration_schema_matches_parse_duration(d in prop_oneof![
        "[0-9]{1,4}(ms|s|m|h|d)([0-9]{1,3}(ms|s|m|h|d)){0,2}",
        "[ 0-9a-z]{0,8}",
    ]) {
        let schema = serde_json::to_value(orchestrator::api::schema::duration()).unwrap();
        let by_schema = jsonschema::is_valid(&schema, &json!(d));
        let by_parse = orchestrator::dag::parse_duration("d", &d).is_ok();
        prop_assert_eq!(by_schema, by_parse, "{:?}", d);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn docs_page_and_its_assets_come_from_the_node() {
    let c = up().await;
    let resp = c
        .http
        .get(format!("{}/docs", c.api(1)))
        .send()
        .await
        .expect("GET /docs");
    assert_eq!(resp.status(), StatusCode::OK);
    let page_url = resp.url().clone();
    let ctype = resp
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    assert!(ctype.starts_with("text/html"), "{ctype}");
    let html = resp.text().await.expect("page");
    assert!(html.contains("swagger-ui"), "{html}");
    // Every script and stylesheet the page loads is relative: served by the node.
    let mut assets = Vec::new();
    for attr in ["src=\"", "href=\""] {
        for part in html.split(attr).skip(1) {
            let target = part.split('"').next().unwrap_or_default();
            if target.ends_with(".js") || target.ends_with(".css") {
                assert!(
                    !target.contains("://") && !target.starts_with("//"),
                    "asset {target} is not from a CDN"
                );
                assets.push(target.to_string());
            }
        }
    }
    assert!(
        assets.iter().any(|a| a.ends_with("swagger-ui-bundle.js"))
            && assets.iter().any(|a| a.ends_with("swagger-ui.css")),
        "the page loads Swagger UI's script and stylesheet: {assets:?}"
    );
    let mut bytes = 0;
    for asset in &assets {
        let url = page_url.join(asset).expect("asset URL");
        let r = c.http.get(url.clone()).send().await.expect("asset");
        assert_eq!(r.status(), StatusCode::OK, "{url}");
        let ctype = r
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string();
        let want = if asset.ends_with(".js") {
            "javascript"
        } else {
            "text/css"
        };
        assert!(ctype.contains(want), "{url}: {ctype}");
        let body = r.bytes().await.expect("asset body");
        assert!(!body.is_empty(), "{url} is empty");
        bytes += body.len();
        if asset.ends_with("swagger-initializer.js") {
            let js = String::from_utf8_lossy(&body);
            assert!(
                js.contains("/openapi.json"),
                "the UI shows this node's document: {js}"
            );
        }
    }
    println!(
        "FIGURE docs: /docs served with {} assets ({bytes} bytes) from the node",
        assets.len()
    );
    c.assert_no_panics();
}
