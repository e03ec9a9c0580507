//! From a parsed command line to the command that runs it.

use super::{
    BudgetsCommand, Cli, Command, KeysCommand, Output, StoreCommand, accounts, cluster, commands,
    dev, logs, monitor, new, schema, serve, traffic, vars,
};

/// Runs a parsed command line.
pub fn run(cli: Cli) -> anyhow::Result<()> {
    let output = cli.output;
    if output == Output::Csv && !matches!(cli.command, Command::Usage { .. }) {
        anyhow::bail!("--output csv is for kiln usage; use table or json here");
    }
    match cli.command {
        Command::Serve {
            listen,
            data_dir,
            blobs,
            database,
            node_id,
            tls_cert,
            tls_key,
            config,
            insecure,
            access_log,
        } => serve::run(
            crate::config::Overrides {
                listen,
                data_dir,
                blobs,
                database,
                node_id,
                tls_cert,
                tls_key,
            },
            config,
            insecure,
            access_log,
        ),
        Command::New {
            name,
            template,
            dir,
        } => new::new(&name, template, dir.as_deref(), output),
        Command::Dev {
            dir,
            server,
            api_key,
            listen,
        } => dev::dev(dev::DevArgs {
            dir,
            server,
            api_key,
            listen,
        }),
        Command::Build { dir, embed_models } => commands::build(&dir, embed_models, output),
        Command::Deploy {
            path,
            name,
            sign,
            dry_run,
            server,
        } => commands::deploy(
            &server.client()?,
            &path,
            commands::DeployArgs {
                name,
                sign: sign.as_deref(),
                dry_run,
            },
            output,
        ),
        Command::Invoke {
            name,
            path,
            method,
            headers,
            data,
            include,
            server,
        } => commands::invoke(
            &server.client()?,
            &commands::InvokeArgs {
                name,
                path,
                method,
                headers,
                data,
                include,
            },
            output,
        ),
        Command::Functions { server } => commands::functions(&server.client()?, output),
        Command::Nodes { server } => cluster::nodes(&server.client()?, output),
        Command::Store {
            command:
                StoreCommand::Copy {
                    from,
                    to,
                    data_dir,
                    blobs_from,
                    blobs_to,
                },
        } => cluster::store_copy(
            &cluster::CopyArgs {
                from,
                to,
                data_dir,
                blobs_from,
                blobs_to,
            },
            output,
        ),
        Command::Versions { name, server } => commands::versions(&server.client()?, &name, output),
        Command::Delete { name, yes, server } => {
            commands::delete(&server.client()?, &name, yes, output)
        }
        Command::Usage {
            function,
            tenant,
            since,
            until,
            group_by,
            server,
        } => {
            let filters = [
                ("function", function),
                ("tenant", tenant),
                ("since", since),
                ("until", until),
                ("group_by", group_by),
            ];
            accounts::usage(&server.client()?, &filters, output)
        }
        Command::Keys { command } => match command {
            KeysCommand::Create {
                tenant,
                scopes,
                rate,
                server,
            } => {
                accounts::keys_create(&server.client()?, &tenant, &scopes, rate.as_deref(), output)
            }
            KeysCommand::List { server } => accounts::keys_list(&server.client()?, output),
            KeysCommand::Revoke { id, server } => {
                accounts::keys_revoke(&server.client()?, &id, output)
            }
        },
        Command::Audit {
            since,
            until,
            tenant,
            action,
            limit,
            server,
        } => {
            let filters = [
                ("since", since),
                ("until", until),
                ("tenant", tenant),
                ("action", action),
                ("limit", limit.map(|l| l.to_string())),
            ];
            accounts::audit(&server.client()?, &filters, output)
        }
        Command::Budgets { command } => match command {
            BudgetsCommand::Set {
                tenant,
                monthly,
                alert_at,
                hard,
                server,
            } => accounts::budgets_set(
                &server.client()?,
                &tenant,
                serde_json::json!({"monthly": monthly, "alert_at": alert_at, "hard": hard}),
                output,
            ),
            BudgetsCommand::List { server } => accounts::budgets_list(&server.client()?, output),
            BudgetsCommand::Delete { tenant, server } => {
                accounts::budgets_delete(&server.client()?, &tenant, output)
            }
        },
        Command::Keygen { out } => accounts::keygen(&out, output),
        Command::Completions { shell } => {
            use clap::CommandFactory;
            clap_complete::generate(shell, &mut Cli::command(), "kiln", &mut std::io::stdout());
            Ok(())
        }
        Command::Traffic {
            name,
            weights,
            sticky,
            shadow,
            alias,
            server,
        } => traffic::traffic(
            &server.client()?,
            &name,
            &weights,
            traffic::Extras {
                sticky,
                shadow,
                alias,
            },
            output,
        ),
        Command::Promote {
            name,
            from,
            to,
            reason,
            server,
        } => traffic::promote(&server.client()?, &name, &from, &to, reason, output),
        Command::Rollout {
            name,
            to,
            steps,
            interval,
            min_requests,
            max_error_rate,
            max_p99_ratio,
            max_drift,
            min_labels,
            max_accuracy_drop,
            pause,
            resume,
            abort,
            reason,
            server,
        } => {
            let client = server.client()?;
            match (to, pause, resume, abort) {
                (Some(to), ..) => {
                    let body = serde_json::json!({
                        "to": to,
                        "steps": steps,
                        "interval": interval,
                        "min_requests": min_requests,
                        "max_error_rate": max_error_rate,
                        "max_p99_ratio": max_p99_ratio,
                        "max_drift": max_drift,
                        "min_labels": min_labels,
                        "max_accuracy_drop": max_accuracy_drop,
                    });
                    traffic::rollout_start(&client, &name, body, output)
                }
                (None, true, ..) => {
                    traffic::rollout_control(&client, &name, "pause", reason, output)
                }
                (None, _, true, _) => {
                    traffic::rollout_control(&client, &name, "resume", reason, output)
                }
                (None, _, _, true) => {
                    traffic::rollout_control(&client, &name, "abort", reason, output)
                }
                _ => traffic::rollout_show(&client, &name, output),
            }
        }
        Command::Drift {
            name,
            version,
            window,
            set_reference,
            server,
        } => monitor::drift(
            &server.client()?,
            &name,
            version,
            window.as_deref(),
            set_reference.as_deref(),
            output,
        ),
        Command::Logs {
            name,
            version,
            since,
            request_id,
            follow,
            server,
        } => logs::logs(
            &server.client()?,
            &name,
            &logs::LogsArgs {
                version,
                since: since.as_deref(),
                request_id: request_id.as_deref(),
                follow,
            },
            output,
        ),
        Command::Quality {
            name,
            version,
            window,
            server,
        } => monitor::quality(&server.client()?, &name, version, window.as_deref(), output),
        Command::Vars { command } => vars::run(command, output),
        Command::Schema { command } => schema::run(command, output),
        Command::History { name, server } => traffic::history(&server.client()?, &name, output),
        Command::Rollback {
            name,
            reason,
            alias,
            server,
        } => traffic::rollback(&server.client()?, &name, reason, alias, output),
    }
}
