//! The `kiln` command line: `serve` runs the server; the other commands are thin clients of
//! the HTTP API (`--server`, or `KILN_SERVER`).

mod client;
mod commands;
mod serve;

use std::path::PathBuf;

use clap::{Parser, Subcommand, ValueEnum};

pub use client::Client;

/// Default server URL for client commands.
pub const DEFAULT_SERVER: &str = "http://127.0.0.1:8080";

/// Kiln: serverless WebAssembly functions for AI inference.
#[derive(Debug, Parser)]
#[command(name = "kiln", version, about)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

/// Output format of listing commands.
#[derive(Debug, Clone, Copy, Default, ValueEnum)]
pub enum Output {
    /// A human-readable table.
    #[default]
    Table,
    /// JSON, as the API returns it.
    Json,
}

/// Output format of `kiln usage`.
#[derive(Debug, Clone, Copy, Default, ValueEnum)]
pub enum UsageOutput {
    /// Totals (per group) as a table.
    #[default]
    Table,
    /// The API's JSON answer.
    Json,
    /// Every record of the window, as CSV.
    Csv,
}

/// Where client commands send their requests.
#[derive(Debug, Clone, clap::Args)]
pub struct ServerArg {
    /// URL of the Kiln server.
    #[arg(long, env = "KILN_SERVER", default_value = DEFAULT_SERVER)]
    pub server: String,
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
        /// TOML configuration file; flags and KILN_* variables override it.
        #[arg(long)]
        config: Option<PathBuf>,
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
        #[command(flatten)]
        server: ServerArg,
    },
    /// Call a function and print its response body.
    Invoke {
        /// Function name, optionally pinned: NAME or NAME@VERSION.
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
        #[arg(long, value_enum, default_value_t)]
        output: Output,
        #[command(flatten)]
        server: ServerArg,
    },
    /// List the versions of a function.
    Versions {
        name: String,
        #[arg(long, value_enum, default_value_t)]
        output: Output,
        #[command(flatten)]
        server: ServerArg,
    },
    /// Delete a function and all its versions.
    Delete {
        name: String,
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
        /// Window start: RFC 3339 (2026-11-27T10:00:00Z) or unix milliseconds.
        #[arg(long)]
        since: Option<String>,
        /// Window end (exclusive), same forms.
        #[arg(long)]
        until: Option<String>,
        /// function, version, tenant, hour or day.
        #[arg(long)]
        group_by: Option<String>,
        #[arg(long, value_enum, default_value_t)]
        output: UsageOutput,
        #[command(flatten)]
        server: ServerArg,
    },
}

/// Runs a parsed command line.
pub fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Serve {
            listen,
            data_dir,
            config,
        } => serve::run(listen, data_dir, config),
        Command::Build { dir, embed_models } => commands::build(&dir, embed_models),
        Command::Deploy { path, name, server } => {
            commands::deploy(&Client::new(&server.server), &path, name)
        }
        Command::Invoke {
            name,
            path,
            method,
            headers,
            data,
            include,
            server,
        } => commands::invoke(
            &Client::new(&server.server),
            &commands::InvokeArgs {
                name,
                path,
                method,
                headers,
                data,
                include,
            },
        ),
        Command::Functions { output, server } => {
            commands::functions(&Client::new(&server.server), output)
        }
        Command::Versions {
            name,
            output,
            server,
        } => commands::versions(&Client::new(&server.server), &name, output),
        Command::Delete { name, server } => commands::delete(&Client::new(&server.server), &name),
        Command::Usage {
            function,
            tenant,
            since,
            until,
            group_by,
            output,
            server,
        } => {
            let filters = [
                ("function", function),
                ("tenant", tenant),
                ("since", since),
                ("until", until),
                ("group_by", group_by),
            ];
            commands::usage(&Client::new(&server.server), &filters, output)
        }
    }
}
