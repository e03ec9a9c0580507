//! The `kiln` command line: `serve` runs the server; the other commands are thin clients of
//! the HTTP API (`--server`, or `KILN_SERVER`).

mod accounts;
mod client;
mod cluster;
mod commands;
mod dev;
mod dispatch;
mod logs;
mod monitor;
mod new;
mod schema;
mod serve;
mod traffic;
mod vars;

use std::path::PathBuf;

use clap::{Parser, Subcommand, ValueEnum};

pub use client::{ApiFailure, Client, Connect};
pub use dispatch::run;

/// Default server URL for client commands.
pub const DEFAULT_SERVER: &str = "http://127.0.0.1:8080";

/// Kiln: serverless WebAssembly functions for AI inference.
#[derive(Debug, Parser)]
#[command(name = "kiln", version, about)]
pub struct Cli {
    /// How client commands print their answers, errors included.
    #[arg(long, short = 'o', global = true, value_enum, default_value_t)]
    pub output: Output,
    /// How log lines are written to stderr: text, or JSON lines (one object per event,
    /// its fields at the top level: request_id, function, version, status, ...).
    #[arg(
        long,
        global = true,
        value_enum,
        default_value_t,
        env = "KILN_LOG_FORMAT"
    )]
    pub log_format: LogFormat,
    #[command(subcommand)]
    pub command: Command,
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// For people: time, level, target, message and fields on one line.
    #[default]
    Text,
    /// For collectors: one JSON object per line.
    Json,
}

/// How a client command prints what it got.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, ValueEnum)]
pub enum Output {
    /// Tables and sentences for people.
    #[default]
    Table,
    /// The API's JSON answer on stdout (lists: every page's items in one array); an error
    /// as `{"error":{"code","message"}}` on stdout, with a failing exit status.
    Json,
    /// `kiln usage` only: every record of the window, as CSV.
    Csv,
}

/// An error whose answer is already on stdout (`kiln invoke --output json` printed the
/// failing response): the command fails without printing more.
#[derive(Debug, thiserror::Error)]
#[error("the function answered with an error status")]
pub struct Printed;

impl Output {
    /// Prints `v` as JSON, or runs `human` to print it for people.
    pub(crate) fn show(
        self,
        v: &serde_json::Value,
        human: impl FnOnce() -> anyhow::Result<()>,
    ) -> anyhow::Result<()> {
        match self {
            Output::Json => {
                println!("{}", serde_json::to_string_pretty(v)?);
                Ok(())
            }
            _ => human(),
        }
    }
}

/// Where client commands send their requests, and with which key.
#[derive(Debug, Clone, clap::Args)]
pub struct ServerArg {
    /// URL of the Kiln server.
    #[arg(long, env = "KILN_SERVER", default_value = DEFAULT_SERVER)]
    pub server: String,
    /// API key, sent as `authorization: Bearer`.
    #[arg(long, env = "KILN_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// PEM certificate of a private CA to trust for https, instead of the public roots.
    #[arg(long, env = "KILN_CA_CERT")]
    pub ca_cert: Option<PathBuf>,
    /// Send the API key over plain http to a host beyond loopback (anyone on the path can
    /// read and reuse it).
    #[arg(long)]
    pub allow_http: bool,
    /// Longest wait to connect and for each read or write, e.g. 30s, 2m (0: none); a
    /// deploy waits for its compile regardless.
    #[arg(long, env = "KILN_TIMEOUT", default_value = "30s")]
    pub timeout: String,
}

impl ServerArg {
    /// A client of the server, carrying the key.
    pub fn client(&self) -> anyhow::Result<Client> {
        let timeout = humantime::parse_duration(&self.timeout)
            .map_err(|e| anyhow::anyhow!("--timeout {:?}: {e}", self.timeout))?;
        let connect = Connect {
            ca_cert: self.ca_cert.clone(),
            allow_http: self.allow_http,
            timeout: (!timeout.is_zero()).then_some(timeout),
        };
        Client::new(&self.server, self.api_key.as_deref(), &connect)
    }
}

/// `kiln store ...`.
#[derive(Debug, Subcommand)]
pub enum StoreCommand {
    /// Copy a single-node installation (the data dir's SQLite files and blob folder) into
    /// a cluster's PostgreSQL database and bucket: functions, versions, policies, history,
    /// rollouts, keys, audit log, usage and blobs. Running it again changes nothing. Stop
    /// the single node first.
    Copy {
        /// The source database: sqlite (the files of --data-dir).
        #[arg(long)]
        from: String,
        /// The target database: postgres://user[:password]@host[:port]/dbname.
        #[arg(long, hide_env_values = true)]
        to: String,
        /// The single node's data dir [default: ./.kiln].
        #[arg(long, env = "KILN_DATA_DIR")]
        data_dir: Option<PathBuf>,
        /// Where the blobs are: the data dir's blobs/ folder [default], or another folder.
        #[arg(long, requires = "blobs_to")]
        blobs_from: Option<String>,
        /// The cluster's bucket: s3://bucket[/prefix]?endpoint=http://host:port&region=R
        /// (credentials from AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY). Without it, blobs
        /// are not copied.
        #[arg(long)]
        blobs_to: Option<String>,
    },
}

/// `kiln budgets ...`.
#[derive(Debug, Subcommand)]
pub enum BudgetsCommand {
    /// Set a tenant's monthly budget (micro-units of the price plan's currency).
    Set {
        tenant: String,
        /// The budget per calendar month (UTC), in micro-units.
        #[arg(long)]
        monthly: u64,
        /// Percentages of the budget whose crossing raises a `budget.threshold` alert.
        #[arg(long, value_delimiter = ',', default_value = "50,80,100")]
        alert_at: Vec<u8>,
        /// Refuse the tenant's requests (429 budget.exhausted) once the budget is spent.
        #[arg(long)]
        hard: bool,
        #[command(flatten)]
        server: ServerArg,
    },
    /// List the budgets with the month's spend.
    List {
        #[command(flatten)]
        server: ServerArg,
    },
    /// Remove a tenant's budget.
    Delete {
        tenant: String,
        #[command(flatten)]
        server: ServerArg,
    },
}

/// `kiln keys ...`.
#[derive(Debug, Subcommand)]
pub enum KeysCommand {
    /// Create an API key; its secret is printed on the last line, this once.
    Create {
        /// The tenant the key acts for and bills.
        #[arg(long)]
        tenant: String,
        /// admin, deploy:PATTERN, invoke:PATTERN, usage:read, audit:read or metrics:read (repeatable;
        /// PATTERN matches function names, `*` for any run of characters).
        #[arg(long = "scope", required = true)]
        scopes: Vec<String>,
        /// Rate limit of the key: N/s, N/m or N/h (default: the server's).
        #[arg(long)]
        rate: Option<String>,
        #[command(flatten)]
        server: ServerArg,
    },
    /// List API keys (never their secrets).
    List {
        #[command(flatten)]
        server: ServerArg,
    },
    /// Revoke an API key; it is refused from the next request on.
    Revoke {
        id: String,
        #[command(flatten)]
        server: ServerArg,
    },
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the server: serve functions on /fn/{name}/ and the API on /v1/.
    Serve {
        /// Address to listen on [default: 127.0.0.1:8080].
        #[arg(long, env = "KILN_LISTEN")]
        listen: Option<String>,
        /// Data directory (database, blobs, compiled artifacts) [default: ./.kiln].
        #[arg(long, env = "KILN_DATA_DIR")]
        data_dir: Option<PathBuf>,
        /// Where blobs live: the data dir's blobs/ folder [default], or an S3-compatible
        /// bucket shared by a cluster's nodes,
        /// s3://bucket[/prefix]?endpoint=http://host:port&region=R (credentials from
        /// AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN).
        #[arg(long, env = "KILN_BLOBS_URL")]
        blobs: Option<String>,
        /// The database: sqlite [default: kiln.db, audit.db and usage.db in the data dir],
        /// or postgres://user[:password]@host[:port]/dbname, shared by a cluster's nodes.
        #[arg(long, env = "KILN_DATABASE_URL", hide_env_values = true)]
        database: Option<String>,
        /// This node's id [default: host name and a random suffix, kept in the data dir].
        #[arg(long, env = "KILN_NODE_ID")]
        node_id: Option<String>,
        /// PEM certificate chain to serve HTTPS with (HTTP/2 and HTTP/1.1 by ALPN); read
        /// again on SIGHUP [config: server.tls_cert].
        #[arg(long, env = "KILN_TLS_CERT")]
        tls_cert: Option<PathBuf>,
        /// PEM private key of --tls-cert [config: server.tls_key].
        #[arg(long, env = "KILN_TLS_KEY")]
        tls_key: Option<PathBuf>,
        /// TOML configuration file; flags and KILN_* variables override it.
        #[arg(long)]
        config: Option<PathBuf>,
        /// With no API keys at all, serve without authentication instead of refusing
        /// (any address) or making an admin key (loopback).
        #[arg(long)]
        insecure: bool,
        /// Log one line per request (target kiln::access) [config: server.access_log].
        #[arg(long, env = "KILN_ACCESS_LOG")]
        access_log: bool,
    },
    /// Make a new function directory from a template: sources, kiln.toml, Cargo.toml, the
    /// SDK and a test (tests/cases.jsonl, run by every deploy); `kiln build` works on it.
    New {
        /// The function's name (also its Rust crate's).
        name: String,
        #[arg(long, value_enum, default_value_t)]
        template: new::Template,
        /// Where to make it [default: ./NAME]; must not exist, or be empty.
        #[arg(long)]
        dir: Option<PathBuf>,
    },
    /// Build and deploy the function in DIR, stream its logs, and build and deploy again on
    /// every source change. Starts a server of its own (loopback, data in DIR/.kiln-dev) for
    /// as long as it runs, unless --server names one.
    Dev {
        /// Function directory (holding kiln.toml).
        #[arg(default_value = ".")]
        dir: PathBuf,
        /// Deploy every change to this server instead (never taken from KILN_SERVER: a
        /// shell set up for production must not get a version per saved file).
        #[arg(long)]
        server: Option<String>,
        /// API key for --server.
        #[arg(long, env = "KILN_API_KEY", hide_env_values = true)]
        api_key: Option<String>,
        /// Where a server of its own listens (loopback; port 0: any free one).
        #[arg(long, default_value = "127.0.0.1:0")]
        listen: String,
    },
    /// Build the function in DIR with the command its kiln.toml names.
    Build {
        /// Function directory (holding kiln.toml).
        #[arg(default_value = ".")]
        dir: PathBuf,
        /// Write each [models.<name>] into a custom section of the built component, so the
        /// .wasm alone is the whole deployable.
        #[arg(long)]
        embed_models: bool,
    },
    /// Deploy a function directory (kiln.toml) or a bare .wasm component.
    Deploy {
        /// Function directory or component file.
        #[arg(default_value = ".")]
        path: PathBuf,
        /// Function name (default: the manifest's name, or the file's stem).
        #[arg(long)]
        name: Option<String>,
        /// Sign the version manifest with this secret key file (from `kiln keygen`).
        #[arg(long, value_name = "KEYFILE")]
        sign: Option<PathBuf>,
        /// Compile, load the models and run the `[validate]` cases, but deploy nothing.
        #[arg(long)]
        dry_run: bool,
        #[command(flatten)]
        server: ServerArg,
    },
    /// Call a function and print its response body.
    Invoke {
        /// Function name, optionally pinned or through an alias: NAME, NAME@VERSION or NAME:ALIAS.
        name: String,
        /// Path inside the function.
        #[arg(long, default_value = "/")]
        path: String,
        /// HTTP method (default: GET, or POST with --data).
        #[arg(short = 'X', long = "request")]
        method: Option<String>,
        /// Header, as 'name: value' (repeatable).
        #[arg(short = 'H', long = "header")]
        headers: Vec<String>,
        /// Request body: text, or @FILE to send a file.
        #[arg(long)]
        data: Option<String>,
        /// Print the status line and headers too.
        #[arg(short = 'i', long)]
        include: bool,
        #[command(flatten)]
        server: ServerArg,
    },
    /// List functions.
    Functions {
        #[command(flatten)]
        server: ServerArg,
    },
    /// List the versions of a function.
    Versions {
        name: String,
        #[command(flatten)]
        server: ServerArg,
    },
    /// Delete a function and all its versions; on a terminal, asks for its name first.
    Delete {
        name: String,
        /// Do not ask.
        #[arg(long, short = 'y')]
        yes: bool,
        #[command(flatten)]
        server: ServerArg,
    },
    /// Usage and cost from the ledger: totals for a window, optionally grouped.
    Usage {
        /// Only this function.
        #[arg(long)]
        function: Option<String>,
        /// Only this tenant.
        #[arg(long)]
        tenant: Option<String>,
        /// Window start: RFC 3339 with any offset (2026-11-27T10:00:00Z,
        /// 2026-11-27T11:00:00+01:00), a date, unix milliseconds, or a span back from now
        /// (30m, 1h, 7d).
        #[arg(long)]
        since: Option<String>,
        /// Window end (exclusive), same forms.
        #[arg(long)]
        until: Option<String>,
        /// function, version, tenant, hour or day.
        #[arg(long)]
        group_by: Option<String>,
        #[command(flatten)]
        server: ServerArg,
    },
    /// Show a function's traffic policy, or set it: `kiln traffic NAME 3=90 4=10`.
    Traffic {
        name: String,
        /// VERSION=PERCENT for each version with traffic (summing to 100); none: show.
        weights: Vec<String>,
        /// Keep each key on one version: header:NAME.
        #[arg(long)]
        sticky: Option<String>,
        /// Copy PERCENT of the requests to VERSION after the primary answers, and compare:
        /// VERSION:PERCENT.
        #[arg(long)]
        shadow: Option<String>,
        /// Show or set this alias's policy (`/fn/NAME:ALIAS/`) instead of the main one.
        #[arg(long)]
        alias: Option<String>,
        #[command(flatten)]
        server: ServerArg,
    },
    /// Copy one alias's traffic policy onto another at once (blue-green: promote the
    /// alias holding the new version); `default` is the main policy.
    Promote {
        name: String,
        #[arg(long)]
        from: String,
        #[arg(long)]
        to: String,
        /// Why (kept in the history).
        #[arg(long)]
        reason: Option<String>,
        #[command(flatten)]
        server: ServerArg,
    },
    /// Roll a version out step by step with health gates (`--to`), control the rollout in
    /// progress (`--pause`, `--resume`, `--abort`), or show it (no flags).
    Rollout {
        name: String,
        /// The candidate version; starts a rollout and returns once it is started.
        #[arg(long, conflicts_with_all = ["pause", "resume", "abort"])]
        to: Option<u32>,
        /// Candidate shares in percent, ascending (default 5,25,50,100).
        #[arg(long, value_delimiter = ',', requires = "to")]
        steps: Option<Vec<u8>>,
        /// Time each step runs before its gate (default 60s).
        #[arg(long, requires = "to")]
        interval: Option<String>,
        /// Candidate requests a step needs before it is judged.
        #[arg(long, requires = "to")]
        min_requests: Option<u64>,
        /// Highest candidate error rate, 0 to 1 (0.05: 5%).
        #[arg(long, requires = "to")]
        max_error_rate: Option<f64>,
        /// Highest candidate p99 / stable p99.
        #[arg(long, requires = "to")]
        max_p99_ratio: Option<f64>,
        /// Highest drift of the candidate's model inputs and predictions from the stable
        /// version's over a step (PSI per feature; label-free, can only abort).
        #[arg(long, requires = "to")]
        max_drift: Option<f64>,
        /// Labelled requests (feedback) each version needs before accuracies are compared.
        #[arg(long, requires = "to")]
        min_labels: Option<u64>,
        /// Largest accuracy drop of the candidate against the stable version (0.05: five points).
        #[arg(long, requires = "to")]
        max_accuracy_drop: Option<f64>,
        /// Hold the current weights.
        #[arg(long, conflicts_with_all = ["resume", "abort"])]
        pause: bool,
        /// Go on after a pause.
        #[arg(long, conflicts_with = "abort")]
        resume: bool,
        /// Stop and put all traffic back on the stable version.
        #[arg(long)]
        abort: bool,
        /// Why (kept in the history) for --pause, --resume, --abort.
        #[arg(long)]
        reason: Option<String>,
        #[command(flatten)]
        server: ServerArg,
    },
    /// Input and prediction drift of a version's monitored models against their references.
    Drift {
        name: String,
        /// The version (default: the function's latest).
        #[arg(long)]
        version: Option<u32>,
        /// How far back: 1m to 48h (default 15m).
        #[arg(long)]
        window: Option<String>,
        /// First make what the version saw over this window (1m to 48h, on every node)
        /// its reference: for a model shipped without one, or after accepting a shift.
        #[arg(long, value_name = "WINDOW")]
        set_reference: Option<String>,
        #[command(flatten)]
        server: ServerArg,
    },
    /// What the function's guests printed (stdout and stderr), with time, request id,
    /// version and stream; `--follow` streams new lines as they come.
    Logs {
        name: String,
        /// Only this version's lines.
        #[arg(long)]
        version: Option<u32>,
        /// From this long ago (e.g. 10m) or this time (RFC 3339); default: all kept.
        #[arg(long)]
        since: Option<String>,
        /// Only the lines of the request that answered with this `x-kiln-request-id`.
        #[arg(long)]
        request_id: Option<String>,
        /// Keep streaming new lines until interrupted.
        #[arg(long, short)]
        follow: bool,
        #[command(flatten)]
        server: ServerArg,
    },
    /// A version's predictions and their accuracy (mae, rmse) against posted feedback.
    Quality {
        name: String,
        /// The version (default: the function's latest).
        #[arg(long)]
        version: Option<u32>,
        /// How far back: 1m to 90d (default 24h).
        #[arg(long)]
        window: Option<String>,
        #[command(flatten)]
        server: ServerArg,
    },
    /// Put back the traffic policy in force before the current one (after a promote: the
    /// switch back).
    Rollback {
        name: String,
        /// Why (kept in the history).
        #[arg(long)]
        reason: Option<String>,
        /// Roll back this alias's policy instead of the main one.
        #[arg(long)]
        alias: Option<String>,
        #[command(flatten)]
        server: ServerArg,
    },
    /// A function's variables and secrets: what its guests read through wasi:config
    /// and as environment variables, per alias.
    Vars {
        #[command(subcommand)]
        command: vars::VarsCommand,
    },
    /// Traffic and variable changes, rollout steps and rollbacks of a function, newest first.
    History {
        name: String,
        #[command(flatten)]
        server: ServerArg,
    },
    /// Manage API keys (admin).
    Keys {
        #[command(subcommand)]
        command: KeysCommand,
    },
    /// Tenants' monthly cost budgets: alerts at thresholds, and a hard stop.
    Budgets {
        #[command(subcommand)]
        command: BudgetsCommand,
    },
    /// Read the audit log of control-plane actions, newest first.
    Audit {
        /// Window start: RFC 3339 with any offset, a date, unix milliseconds, or a span
        /// back from now (30m, 1h, 7d).
        #[arg(long)]
        since: Option<String>,
        /// Window end (exclusive).
        #[arg(long)]
        until: Option<String>,
        /// Only this tenant.
        #[arg(long)]
        tenant: Option<String>,
        /// Only this action (e.g. version.create, key.revoke).
        #[arg(long)]
        action: Option<String>,
        /// At most this many entries.
        #[arg(long)]
        limit: Option<u32>,
        #[command(flatten)]
        server: ServerArg,
    },
    /// Storage: move a single node's state into a cluster.
    Store {
        #[command(subcommand)]
        command: StoreCommand,
    },
    /// List the live nodes of the cluster (id, address, version, uptime, last heartbeat,
    /// in-flight requests, loaded versions); `*` marks the one that answered.
    Nodes {
        #[command(flatten)]
        server: ServerArg,
    },
    /// Make an Ed25519 key pair for signing bundles: writes the secret key to FILE
    /// (mode 0600) and prints the public key to trust on servers.
    Keygen {
        /// Where to write the secret key.
        #[arg(long, default_value = "kiln-signing.key")]
        out: PathBuf,
    },
    /// JSON Schemas of Kiln's files: `kiln schema manifest > kiln.schema.json`, for editors.
    Schema {
        #[command(subcommand)]
        command: schema::SchemaCommand,
    },
    /// Print a shell completion script: `kiln completions bash > /etc/bash_completion.d/kiln`.
    Completions { shell: clap_complete::Shell },
}
