//! `bucketly`: the command-line client. Every command is one call on
//! [`bucketly::Client`]; results are one JSON value on stdout, errors one line on
//! stderr with exit code 1.

mod bench;
mod handler_test;
mod out;
mod send;

use std::process::ExitCode;

use bucketly::client::ClientError;
use bucketly::Client;
use clap::{Args as ClapArgs, Parser, Subcommand};

use out::{print_json, print_line};
use send::{report, send_stdin};

/// Command-line client for bucketlyd.
#[derive(Parser, Debug)]
#[command(name = "bucketly", version, about, long_about = None)]
struct Args {
    /// Server host.
    #[arg(
        long,
        env = "BUCKETLY_HOST",
        default_value = "127.0.0.1",
        global = true
    )]
    host: String,
    /// Server port.
    #[arg(long, env = "BUCKETLY_PORT", default_value_t = bucketly::config::DEFAULT_PORT, global = true)]
    port: u16,
    /// Connect over TLS.
    #[arg(long, env = "BUCKETLY_TLS")]
    tls: bool,
    /// CA certificate (PEM) to verify the server with; implies --tls. Default: system roots.
    #[arg(long, env = "BUCKETLY_CA", value_name = "FILE")]
    ca: Option<std::path::PathBuf>,
    /// User to log in as (before the command).
    #[arg(long, env = "BUCKETLY_USER")]
    user: Option<String>,
    /// Password to log in with (before the command; prompted for when missing and stdin
    /// is a terminal). After `user add` or `user passwd`, --password is the new password.
    #[arg(long, env = "BUCKETLY_PASSWORD", hide_env_values = true)]
    password: Option<String>,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Check that the server answers.
    Ping,
    /// Create a bucket.
    Create {
        /// Bucket name.
        bucket: String,
        /// Handler name (see `bucketly info`).
        #[arg(long)]
        handler: String,
        /// Handler config as JSON.
        #[arg(long)]
        config: Option<String>,
        /// Acknowledge sends and dumps only once they are on disk, and recover the
        /// state after a crash or restart.
        #[arg(long)]
        durable: bool,
        #[command(flatten)]
        options: OptionFlags,
    },
    /// Change a bucket's schedule and sinks; its aggregate and pending events stay.
    Alter {
        /// Bucket name.
        bucket: String,
        #[command(flatten)]
        options: OptionFlags,
        /// Remove an option (every, threshold, timeout, emit_empty, forward, exec,
        /// exec_timeout); repeatable.
        #[arg(long, value_name = "OPTION")]
        unset: Vec<String>,
    },
    /// Print a bucket's flush outputs as they happen, one JSON line each.
    Subscribe {
        /// Bucket name.
        bucket: String,
        /// Exit after this many outputs.
        #[arg(long)]
        count: Option<u64>,
    },
    /// Handlers: reload the server's files, or test a file locally.
    #[command(subcommand)]
    Handler(HandlerCmd),
    /// Drop a bucket and its state.
    Drop {
        /// Bucket name.
        bucket: String,
    },
    /// List buckets.
    List,
    /// Send events; with none given, each line of stdin is one event.
    Send {
        /// Bucket name.
        bucket: String,
        /// Events.
        events: Vec<String>,
        /// Events per SEND frame when reading stdin.
        #[arg(long, default_value_t = 1000)]
        batch: usize,
    },
    /// Show a bucket's aggregate.
    View {
        /// Bucket name.
        bucket: String,
        /// Argument for the handler's view.
        arg: Option<String>,
    },
    /// Show a bucket's aggregate and reset it.
    Dump {
        /// Bucket name.
        bucket: String,
    },
    /// Two-phase dump, first phase: print the bucket's pending take (making one from
    /// the aggregate, which is reset, if there is none) as JSON.
    Take {
        /// Bucket name.
        bucket: String,
    },
    /// Two-phase dump, second phase: forget take ID once its output is stored.
    Release {
        /// Bucket name.
        bucket: String,
        /// The take's id (the `id` that `take` printed).
        id: u64,
    },
    /// Server counters, or a bucket's.
    Info {
        /// Bucket name.
        bucket: Option<String>,
    },
    /// The logged-in user and their grants.
    Whoami,
    /// Manage users (admin; `passwd` for yourself too).
    #[command(subcommand)]
    User(UserCmd),
    /// Load generator: SEND throughput and latency percentiles (see benches/README.md).
    Bench(bench::BenchArgs),
}

/// Bucket options as flags (see PROTOCOL.md, CREATE options).
#[derive(ClapArgs, Debug, Default)]
struct OptionFlags {
    /// Flush every SECS seconds (fractions allowed).
    #[arg(long, value_name = "SECS")]
    every: Option<f64>,
    /// Flush once N events arrived since the last flush (needs --timeout).
    #[arg(long, value_name = "N")]
    threshold: Option<u64>,
    /// …or SECS after the first event not yet flushed.
    #[arg(long, value_name = "SECS")]
    timeout: Option<f64>,
    /// Flush and output even when no event arrived.
    #[arg(long)]
    emit_empty: bool,
    /// Send each output as an event into this bucket.
    #[arg(long, value_name = "BUCKET")]
    forward: Option<String>,
    /// Run this shell command at each flush (admin; daemon needs --allow-exec).
    #[arg(long, value_name = "COMMAND")]
    exec: Option<String>,
    /// Kill the exec command after SECS seconds (default 60).
    #[arg(long, value_name = "SECS")]
    exec_timeout: Option<f64>,
}

impl OptionFlags {
    fn to_json(&self) -> serde_json::Map<String, serde_json::Value> {
        let mut m = serde_json::Map::new();
        let mut put = |k: &str, v: Option<serde_json::Value>| {
            if let Some(v) = v {
                m.insert(k.to_owned(), v);
            }
        };
        put("every", self.every.map(Into::into));
        put("threshold", self.threshold.map(Into::into));
        put("timeout", self.timeout.map(Into::into));
        put("emit_empty", self.emit_empty.then_some(true.into()));
        put("forward", self.forward.clone().map(Into::into));
        put("exec", self.exec.clone().map(Into::into));
        put("exec_timeout", self.exec_timeout.map(Into::into));
        m
    }
}

#[derive(Subcommand, Debug)]
enum HandlerCmd {
    /// Read the handler files again (admin); buckets created afterwards use them.
    Reload,
    /// Run a handler file locally over a file of events (one per line), without a
    /// server, and print the view (default), the dump, or the flush outputs.
    Test(handler_test::TestArgs),
}

#[derive(Subcommand, Debug)]
enum UserCmd {
    /// Create a user (without grants).
    Add {
        /// User name.
        name: String,
        /// Its password (prompted for when missing and stdin is a terminal).
        #[arg(long = "password", id = "new_password")]
        new_password: Option<String>,
    },
    /// Delete a user; its connections are closed.
    Del {
        /// User name.
        name: String,
    },
    /// Change a password.
    Passwd {
        /// User name.
        name: String,
        /// The new password (prompted for when missing and stdin is a terminal).
        #[arg(long = "password", id = "new_password")]
        new_password: Option<String>,
    },
    /// List users and their grants.
    List,
    /// Allow PERMISSION (send, view, dump, subscribe, create, admin) on buckets matching PATTERN.
    Grant {
        /// User name.
        name: String,
        /// Permission.
        permission: String,
        /// Bucket-name glob.
        #[arg(default_value = "*")]
        pattern: String,
    },
    /// Remove a grant.
    Revoke {
        /// User name.
        name: String,
        /// Permission.
        permission: String,
        /// Bucket-name glob.
        #[arg(default_value = "*")]
        pattern: String,
    },
}

fn main() -> ExitCode {
    let args = Args::parse();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => return fail(&format!("cannot start the runtime: {e}")),
    };
    match runtime.block_on(run(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(msg) => fail(&msg),
    }
}

fn fail(msg: &str) -> ExitCode {
    eprintln!("bucketly: {msg}");
    ExitCode::FAILURE
}

async fn run(args: Args) -> Result<(), String> {
    if let Cmd::Handler(HandlerCmd::Test(test)) = &args.command {
        return handler_test::run(test);
    }
    let connected = if args.tls || args.ca.is_some() {
        Client::connect_tls(&args.host, args.port, args.ca.as_deref()).await
    } else {
        Client::connect((args.host.as_str(), args.port)).await
    };
    let client =
        connected.map_err(|e| format!("cannot connect to {}:{}: {e}", args.host, args.port))?;
    if !matches!(args.command, Cmd::Ping) {
        let user = args.user.ok_or(
            "log in with --user NAME (or BUCKETLY_USER) and --password (or BUCKETLY_PASSWORD)",
        )?;
        let password = secret(args.password, &format!("password for {user}: "))?;
        client.login(&user, &password).await.map_err(text)?;
        if let Cmd::Bench(bench_args) = args.command {
            let target = bench::Target {
                host: args.host,
                port: args.port,
                user,
                password,
            };
            return bench::run(&client, target, bench_args).await;
        }
    }
    let print = |v: serde_json::Value| print_json(&v);
    match args.command {
        Cmd::Whoami => print(client.whoami().await.map_err(text)?),
        Cmd::User(cmd) => user(&client, cmd).await?,
        Cmd::Bench(_) => {}
        Cmd::Ping => {
            client.ping().await.map_err(text)?;
            print_line("PONG");
        }
        Cmd::Create {
            bucket,
            handler,
            config,
            durable,
            options,
        } => {
            let config = config
                .map(|c| {
                    serde_json::from_str(&c).map_err(|e| format!("--config is not valid JSON: {e}"))
                })
                .transpose()?;
            let mut options = options.to_json();
            if durable {
                options.insert("durable".into(), true.into());
            }
            let options = serde_json::Value::Object(options);
            client
                .create_with(&bucket, &handler, config.as_ref(), &options)
                .await
                .map_err(text)?;
        }
        Cmd::Alter {
            bucket,
            options,
            unset,
        } => {
            let mut changes = options.to_json();
            for key in unset {
                changes.insert(key, serde_json::Value::Null);
            }
            if changes.is_empty() {
                return Err("nothing to change: give an option flag or --unset OPTION".into());
            }
            client
                .alter(&bucket, &serde_json::Value::Object(changes))
                .await
                .map_err(text)?;
        }
        Cmd::Subscribe { bucket, count } => subscribe(&client, &bucket, count).await?,
        Cmd::Handler(HandlerCmd::Reload) => print(client.reload().await.map_err(text)?),
        Cmd::Handler(HandlerCmd::Test(_)) => {}
        Cmd::Drop { bucket } => client.drop_bucket(&bucket).await.map_err(text)?,
        Cmd::List => print(client.list().await.map_err(text)?),
        Cmd::Send {
            bucket,
            events,
            batch,
        } if events.is_empty() => send_stdin(&client, &bucket, batch.max(1)).await?,
        Cmd::Send { bucket, events, .. } => {
            let outcome = client.send(&bucket, &events).await.map_err(text)?;
            report(
                outcome.accepted.into(),
                outcome.rejected.into(),
                outcome.reasons.first().cloned(),
            )?;
        }
        Cmd::View { bucket, arg } => print(
            client
                .view(&bucket, arg.as_deref().map(str::as_bytes))
                .await
                .map_err(text)?,
        ),
        Cmd::Dump { bucket } => print(client.dump(&bucket).await.map_err(text)?),
        Cmd::Take { bucket } => {
            let take = client.take(&bucket).await.map_err(text)?;
            print(serde_json::to_value(take).map_err(|e| e.to_string())?);
        }
        Cmd::Release { bucket, id } => client.release(&bucket, id).await.map_err(text)?,
        Cmd::Info { bucket } => print(client.info(bucket.as_deref()).await.map_err(text)?),
    }
    Ok(())
}

async fn user(client: &Client, cmd: UserCmd) -> Result<(), String> {
    match cmd {
        UserCmd::Add { name, new_password } => {
            let password = secret(new_password, &format!("new password for {name}: "))?;
            client.user_add(&name, &password).await
        }
        UserCmd::Del { name } => client.user_del(&name).await,
        UserCmd::Passwd { name, new_password } => {
            let password = secret(new_password, &format!("new password for {name}: "))?;
            client.user_passwd(&name, &password).await
        }
        UserCmd::List => client.user_list().await.map(|v| print_json(&v)),
        UserCmd::Grant {
            name,
            permission,
            pattern,
        } => client.user_grant(&name, &permission, &pattern).await,
        UserCmd::Revoke {
            name,
            permission,
            pattern,
        } => client.user_revoke(&name, &permission, &pattern).await,
    }
    .map_err(text)
}

/// `given`, or a password read from the terminal without echo.
fn secret(given: Option<String>, prompt: &str) -> Result<String, String> {
    if let Some(p) = given {
        return Ok(p);
    }
    if !std::io::IsTerminal::is_terminal(&std::io::stdin()) {
        return Err(
            "no password given: use --password or BUCKETLY_PASSWORD (stdin is not a terminal)"
                .into(),
        );
    }
    rpassword::prompt_password(prompt).map_err(|e| format!("cannot read the password: {e}"))
}

/// Prints each output as one line until `count` outputs, or fails when the
/// subscription ends.
async fn subscribe(client: &Client, bucket: &str, count: Option<u64>) -> Result<(), String> {
    let mut sub = client.subscribe(bucket).await.map_err(text)?;
    let mut seen = 0u64;
    while count.is_none_or(|n| seen < n) {
        match sub.next().await {
            Some(Ok(record)) => print_line(&String::from_utf8_lossy(&record)),
            Some(Err(e)) => return Err(format!("subscription ended: {e}")),
            None => return Err("subscription ended: connection closed".into()),
        }
        seen += 1;
    }
    Ok(())
}

fn text(e: ClientError) -> String {
    e.to_string()
}
