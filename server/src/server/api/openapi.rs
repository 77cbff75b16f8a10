//! `GET /api/v1/openapi.json`: the API's OpenAPI 3.1 document, generated from the code — the
//! request and response types' JSON Schemas are derived from the very structs the handlers
//! parse and serialise (schemars reads their serde attributes), and [`OPERATIONS`] lists each
//! route with its parameters and answers. The suite checks the running server against it with
//! schemathesis (tests/api.rs) and that every listed route is routed.

use std::collections::BTreeMap;

use axum::Json;
use schemars::generate::{SchemaGenerator, SchemaSettings};
use schemars::JsonSchema;
use serde_json::{json, Map, Value};

use super::{certs, exec, keys, services, tokens, traffic};
use crate::server::{db, platform};

/// `{"error": "..."}`: every failure.
#[derive(JsonSchema)]
#[allow(dead_code)]
struct ApiError {
    error: String,
}

#[derive(JsonSchema)]
#[allow(dead_code)]
struct Health {
    status: String,
}

#[derive(JsonSchema)]
#[allow(dead_code)]
struct ServiceList {
    services: Vec<services::View>,
}

#[derive(JsonSchema)]
#[allow(dead_code)]
struct DeployList {
    deploys: Vec<db::Deploy>,
}

#[derive(JsonSchema)]
#[allow(dead_code)]
struct InstanceList {
    instances: Vec<platform::InstanceView>,
}

/// One revision as `GET .../revisions` shows it.
#[derive(JsonSchema)]
#[allow(dead_code)]
struct RevisionItem {
    number: i64,
    image: String,
    image_id: String,
    port: u16,
    env: BTreeMap<String, String>,
    /// Names only.
    secrets: Vec<String>,
    health_path: Option<String>,
    volumes: Vec<platform::VolumeMount>,
    release_command: Option<String>,
    memory: Option<u64>,
    cpus: Option<f64>,
    created_at: String,
    /// When it first took traffic; null: never.
    served_at: Option<String>,
    serving: bool,
    percent: u32,
    tags: Vec<String>,
}

#[derive(JsonSchema)]
#[allow(dead_code)]
struct RevisionList {
    revisions: Vec<RevisionItem>,
}

#[derive(JsonSchema)]
#[allow(dead_code)]
struct TagView {
    revision: i64,
    url: String,
}

#[derive(JsonSchema)]
#[allow(dead_code)]
struct TrafficView {
    traffic: Vec<platform::TrafficView>,
    tags: BTreeMap<String, TagView>,
}

#[derive(JsonSchema)]
#[allow(dead_code)]
struct EnvView {
    env: BTreeMap<String, String>,
    /// Names only.
    secrets: Vec<String>,
}

#[derive(JsonSchema)]
#[allow(dead_code)]
struct DomainList {
    domains: Vec<String>,
}

#[derive(JsonSchema)]
#[allow(dead_code)]
struct TokenList {
    tokens: Vec<db::Token>,
}

/// A new token: shown this once.
#[derive(JsonSchema)]
#[allow(dead_code)]
struct CreatedToken {
    name: String,
    scope: String,
    service: Option<String>,
    created_at: String,
    token: String,
}

#[derive(JsonSchema)]
#[allow(dead_code)]
struct KeyList {
    keys: Vec<crate::server::git::keys::Key>,
}

type SchemaFn = fn(&mut SchemaGenerator) -> schemars::Schema;

fn of<T: JsonSchema>(g: &mut SchemaGenerator) -> schemars::Schema {
    g.subschema_for::<T>()
}

/// A path or query parameter.
struct Param {
    name: &'static str,
    query: bool,
    schema: fn() -> Value,
}

fn name_schema() -> Value {
    json!({"type": "string", "minLength": 1, "maxLength": 63})
}
fn int_schema() -> Value {
    json!({"type": "integer", "format": "int64"})
}
fn string_schema() -> Value {
    json!({"type": "string", "minLength": 1})
}
fn bool_string_schema() -> Value {
    json!({"type": "string", "enum": ["true", "false", "1", "0", "yes", "no", ""]})
}
fn limit_schema() -> Value {
    json!({"type": "integer", "minimum": 1, "maximum": 1000})
}
fn tail_schema() -> Value {
    json!({"type": "integer", "minimum": 0})
}

const NAME: Param = Param { name: "name", query: false, schema: name_schema };
const ID: Param = Param { name: "id", query: false, schema: int_schema };
const TAG: Param = Param { name: "tag", query: false, schema: string_schema };
const HOST: Param = Param { name: "host", query: false, schema: string_schema };
const WAIT: Param = Param { name: "wait", query: true, schema: bool_string_schema };
const LIMIT: Param = Param { name: "limit", query: true, schema: limit_schema };
const TAIL: Param = Param { name: "tail", query: true, schema: tail_schema };
const FOLLOW: Param = Param { name: "follow", query: true, schema: bool_string_schema };

/// One route of the API.
pub struct Operation {
    pub method: &'static str,
    /// Below `/api/v1`, with `{param}`s as the router has them.
    pub path: &'static str,
    pub id: &'static str,
    summary: &'static str,
    params: &'static [Param],
    body: Option<SchemaFn>,
    /// Success statuses and their bodies (None: no body); every operation may also answer
    /// 4XX with an [`ApiError`].
    ok: &'static [(u16, Option<SchemaFn>)],
    /// The response is a stream or an upgrade, not one JSON document.
    pub streams: bool,
    /// Needs no token.
    public: bool,
}

const fn op(
    method: &'static str,
    path: &'static str,
    id: &'static str,
    summary: &'static str,
    params: &'static [Param],
    body: Option<SchemaFn>,
    ok: &'static [(u16, Option<SchemaFn>)],
) -> Operation {
    Operation { method, path, id, summary, params, body, ok, streams: false, public: false }
}

/// Every route of `/api/v1`.
pub const OPERATIONS: &[Operation] = &[
    Operation {
        public: true,
        ..op("get", "/health", "health", "Is the server up (no token needed)", &[], None, &[(200, Some(of::<Health>))])
    },
    Operation {
        public: true,
        ..op("get", "/openapi.json", "openapi", "This document (no token needed)", &[], None, &[(200, None)])
    },
    op("get", "/services", "listServices", "All services, by name", &[], None, &[(200, Some(of::<ServiceList>))]),
    op(
        "post",
        "/services",
        "createService",
        "Create a service (and deploy `image`, if given)",
        &[],
        Some(of::<services::Create>),
        &[(201, Some(of::<services::View>))],
    ),
    op("get", "/services/{name}", "getService", "A service", &[NAME], None, &[(200, Some(of::<services::View>))]),
    op(
        "patch",
        "/services/{name}",
        "updateService",
        "Change what the next deploy uses",
        &[NAME],
        Some(of::<services::Settings>),
        &[(200, Some(of::<services::View>))],
    ),
    op("delete", "/services/{name}", "deleteService", "Delete a service", &[NAME], None, &[(204, None)]),
    op(
        "patch",
        "/services/{name}/https",
        "setHttps",
        "Change a service's HTTP to HTTPS redirect and HSTS",
        &[NAME],
        Some(of::<services::HttpsPatch>),
        &[(200, Some(of::<services::View>))],
    ),
    op(
        "get",
        "/certs",
        "listCerts",
        "The certificate of every name the proxy answers at (and uploaded ones)",
        &[],
        None,
        &[(200, Some(of::<Vec<crate::server::tls::CertStatus>>))],
    ),
    op(
        "get",
        "/certs/{host}",
        "getCert",
        "One name's certificate",
        &[HOST],
        None,
        &[(200, Some(of::<crate::server::tls::CertStatus>))],
    ),
    op(
        "put",
        "/certs/{host}",
        "uploadCert",
        "Serve your own certificate and key for a host",
        &[HOST],
        Some(of::<certs::Upload>),
        &[(200, Some(of::<crate::server::tls::CertStatus>))],
    ),
    op("delete", "/certs/{host}", "deleteCert", "Stop serving an uploaded certificate", &[HOST], None, &[(204, None)]),
    op(
        "patch",
        "/services/{name}/scaling",
        "setScaling",
        "Change how a service scales",
        &[NAME],
        Some(of::<crate::server::scaling::Patch>),
        &[(200, Some(of::<services::View>))],
    ),
    op(
        "post",
        "/services/{name}/deploys",
        "deploy",
        "Deploy an image (creating the service if needed); Accept: application/x-ndjson streams progress",
        &[NAME, WAIT],
        Some(of::<services::DeployRequest>),
        &[(200, Some(of::<db::Deploy>)), (202, Some(of::<db::Deploy>))],
    ),
    op(
        "get",
        "/services/{name}/deploys",
        "listDeploys",
        "A service's deploys, newest first",
        &[NAME, LIMIT],
        None,
        &[(200, Some(of::<DeployList>))],
    ),
    op(
        "get",
        "/services/{name}/deploys/{id}",
        "getDeploy",
        "A deploy",
        &[NAME, ID],
        None,
        &[(200, Some(of::<db::Deploy>))],
    ),
    Operation {
        streams: true,
        ..op(
            "post",
            "/services/{name}/builds",
            "createBuild",
            "Build the tar(.gz) build context in the body (berth.toml, Dockerfile) and deploy it; \
             answers an NDJSON stream of log lines and one result",
            &[NAME],
            None,
            &[(200, None)],
        )
    },
    op(
        "get",
        "/services/{name}/builds",
        "listBuilds",
        "A service's builds, newest first",
        &[NAME, LIMIT],
        None,
        &[(200, Some(of::<Vec<db::Build>>))],
    ),
    op(
        "get",
        "/services/{name}/builds/{id}",
        "getBuild",
        "A build",
        &[NAME, ID],
        None,
        &[(200, Some(of::<db::Build>))],
    ),
    op(
        "get",
        "/services/{name}/builds/{id}/log",
        "getBuildLog",
        "A build's output, as text",
        &[NAME, ID],
        None,
        &[(200, None)],
    ),
    op(
        "get",
        "/services/{name}/instances",
        "listInstances",
        "A service's instances",
        &[NAME],
        None,
        &[(200, Some(of::<InstanceList>))],
    ),
    op(
        "get",
        "/services/{name}/revisions",
        "listRevisions",
        "A service's revisions, newest first",
        &[NAME],
        None,
        &[(200, Some(of::<RevisionList>))],
    ),
    op(
        "post",
        "/services/{name}/rollback",
        "rollback",
        "Put an earlier revision back in service",
        &[NAME, WAIT],
        Some(of::<services::Rollback>),
        &[(200, Some(of::<db::Deploy>)), (202, Some(of::<db::Deploy>))],
    ),
    Operation {
        streams: true,
        ..op(
            "get",
            "/services/{name}/logs",
            "logs",
            "A service's logs as NDJSON lines (follow: a stream)",
            &[NAME, TAIL, FOLLOW],
            None,
            &[(200, None)],
        )
    },
    op(
        "get",
        "/services/{name}/env",
        "getEnv",
        "Variables and secret names",
        &[NAME],
        None,
        &[(200, Some(of::<EnvView>))],
    ),
    op(
        "post",
        "/services/{name}/env",
        "changeEnv",
        "Change variables or secrets: a new revision (answered as a deploy), or stored if not deployed",
        &[NAME, WAIT],
        Some(of::<services::Settings>),
        &[(200, None), (202, Some(of::<db::Deploy>))],
    ),
    op(
        "get",
        "/services/{name}/traffic",
        "getTraffic",
        "The traffic split and tags",
        &[NAME],
        None,
        &[(200, Some(of::<TrafficView>))],
    ),
    op(
        "put",
        "/services/{name}/traffic",
        "setTraffic",
        "Split the traffic between revisions",
        &[NAME],
        Some(of::<traffic::SetTraffic>),
        &[(200, Some(of::<TrafficView>))],
    ),
    op(
        "put",
        "/services/{name}/tags/{tag}",
        "setTag",
        "Point a tag at a revision",
        &[NAME, TAG],
        Some(of::<traffic::SetTag>),
        &[(200, Some(of::<TrafficView>))],
    ),
    op("delete", "/services/{name}/tags/{tag}", "deleteTag", "Remove a tag", &[NAME, TAG], None, &[(204, None)]),
    op(
        "get",
        "/services/{name}/domains",
        "listDomains",
        "Extra host names",
        &[NAME],
        None,
        &[(200, Some(of::<DomainList>))],
    ),
    op(
        "put",
        "/services/{name}/domains/{host}",
        "addDomain",
        "Answer at another host name",
        &[NAME, HOST],
        None,
        &[(200, Some(of::<DomainList>))],
    ),
    op(
        "delete",
        "/services/{name}/domains/{host}",
        "deleteDomain",
        "Stop answering at a host name",
        &[NAME, HOST],
        None,
        &[(204, None)],
    ),
    Operation {
        streams: true,
        ..op(
            "post",
            "/services/{name}/exec",
            "exec",
            "Run a command in an instance (Connection: Upgrade, Upgrade: berth-exec; see docs/SERVER.md)",
            &[NAME],
            Some(of::<exec::ExecRequest>),
            &[(101, None)],
        )
    },
    op(
        "get",
        "/tokens",
        "listTokens",
        "API tokens (never the tokens themselves)",
        &[],
        None,
        &[(200, Some(of::<TokenList>))],
    ),
    op(
        "post",
        "/tokens",
        "createToken",
        "Make a token: admin, or deploy-only for one service",
        &[],
        Some(of::<tokens::Create>),
        &[(201, Some(of::<CreatedToken>))],
    ),
    op("delete", "/tokens/{name}", "revokeToken", "Revoke a token", &[NAME], None, &[(204, None)]),
    op("get", "/keys", "listKeys", "SSH keys allowed to git push", &[], None, &[(200, Some(of::<KeyList>))]),
    op(
        "post",
        "/keys",
        "addKey",
        "Allow an SSH public key to git push (any service)",
        &[],
        Some(of::<keys::Add>),
        &[(201, Some(of::<crate::server::git::keys::Key>))],
    ),
    op("delete", "/keys/{name}", "removeKey", "Remove an SSH key", &[NAME], None, &[(204, None)]),
    op(
        "get",
        "/services/{name}/git",
        "getGit",
        "A service's deploy branch and git remotes",
        &[NAME],
        None,
        &[(200, Some(of::<keys::GitView>))],
    ),
    op(
        "put",
        "/services/{name}/git",
        "setGit",
        "Set the branch whose pushes deploy the service",
        &[NAME],
        Some(of::<keys::SetGit>),
        &[(200, Some(of::<keys::GitView>))],
    ),
];

fn status_text(code: u16) -> &'static str {
    match code {
        101 => "Switching Protocols",
        200 => "OK",
        201 => "Created",
        202 => "Accepted",
        204 => "No Content",
        _ => "Answer",
    }
}

/// The whole document.
pub fn document() -> Value {
    let mut settings = SchemaSettings::draft2020_12();
    settings.definitions_path = "/components/schemas".into();
    settings.meta_schema = None;
    let mut g = settings.into_generator();
    let error = g.subschema_for::<ApiError>().to_value();
    let mut paths: BTreeMap<String, Map<String, Value>> = BTreeMap::new();
    for o in OPERATIONS {
        let mut params = Vec::new();
        for p in o.params {
            params.push(json!({
                "name": p.name,
                "in": if p.query { "query" } else { "path" },
                "required": !p.query,
                "schema": (p.schema)(),
            }));
        }
        let mut responses = Map::new();
        for (code, schema) in o.ok {
            let mut r = json!({ "description": status_text(*code) });
            if let Some(f) = schema {
                r["content"] = json!({ "application/json": { "schema": f(&mut g).to_value() } });
            }
            responses.insert(code.to_string(), r);
        }
        responses.insert(
            "4XX".into(),
            json!({ "description": "Refused: the message says what was wrong",
                    "content": { "application/json": { "schema": error } } }),
        );
        let mut operation = json!({
            "operationId": o.id,
            "summary": o.summary,
            "parameters": params,
            "responses": responses,
        });
        if let Some(f) = o.body {
            operation["requestBody"] =
                json!({ "required": true, "content": { "application/json": { "schema": f(&mut g).to_value() } } });
        }
        if o.public {
            operation["security"] = json!([]);
        }
        paths.entry(format!("/api/v1{}", o.path)).or_default().insert(o.method.into(), operation);
    }
    let schemas = g.take_definitions(true);
    json!({
        "openapi": "3.1.0",
        "info": {
            "title": "Berth API",
            "version": env!("CARGO_PKG_VERSION"),
            "description": "Deploy and operate services on a Berth server. See docs/SERVER.md and docs/OPERATIONS.md.",
        },
        "servers": [{ "url": "/" }],
        "security": [{ "bearer": [] }],
        "paths": paths,
        "components": {
            "schemas": schemas,
            "securitySchemes": { "bearer": { "type": "http", "scheme": "bearer" } },
        },
    })
}

pub async fn serve() -> Json<Value> {
    Json(document())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_reference_resolves_and_every_operation_is_unique() {
        let doc = document();
        let text = doc.to_string();
        let schemas = doc["components"]["schemas"].as_object().unwrap();
        for part in text.split("\"$ref\":\"#/components/schemas/").skip(1) {
            let name = part.split('"').next().unwrap();
            assert!(schemas.contains_key(name), "dangling $ref {name}");
        }
        let mut ids: Vec<&str> = OPERATIONS.iter().map(|o| o.id).collect();
        ids.sort_unstable();
        ids.dedup();
        assert_eq!(ids.len(), OPERATIONS.len(), "operation ids are unique");
        let create = &schemas["CreateService"];
        assert!(create.to_string().contains("\"name\""), "{create}");
        assert!(doc["paths"]["/api/v1/services/{name}/traffic"]["put"]["requestBody"].is_object());
    }
}
