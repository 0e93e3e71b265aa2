//! `bucketly`: the command-line client. Every command is one call on
//! [`bucketly::Client`]; results are one JSON value on stdout, errors one line on
//! stderr with exit code 1.

use std::collections::VecDeque;
use std::io::BufRead;
use std::process::ExitCode;

use bucketly::client::{ClientError, PendingReply};
use bucketly::Client;
use clap::{Parser, Subcommand};

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
    },
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

/// SEND frames kept in flight while streaming stdin.
const SEND_WINDOW: usize = 64;
/// Bytes of events per SEND frame when streaming stdin (well under the server maximum).
const SEND_BATCH_BYTES: usize = 256 * 1024;

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
    }
    let print = |v: serde_json::Value| println!("{v}");
    match args.command {
        Cmd::Whoami => print(client.whoami().await.map_err(text)?),
        Cmd::User(cmd) => user(&client, cmd).await?,
        Cmd::Ping => {
            client.ping().await.map_err(text)?;
            println!("PONG");
        }
        Cmd::Create {
            bucket,
            handler,
            config,
        } => {
            let config = config
                .map(|c| {
                    serde_json::from_str(&c).map_err(|e| format!("--config is not valid JSON: {e}"))
                })
                .transpose()?;
            client
                .create(&bucket, &handler, config.as_ref())
                .await
                .map_err(text)?;
        }
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
        UserCmd::List => client.user_list().await.map(|v| println!("{v}")),
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

fn text(e: ClientError) -> String {
    e.to_string()
}

/// Streams stdin as batches of lines, keeping up to [`SEND_WINDOW`] frames in flight.
/// Lines lose their `\n` (and a `\r` before it); nothing else is changed.
async fn send_stdin(client: &Client, bucket: &str, batch: usize) -> Result<(), String> {
    let (tx, mut rx) = tokio::sync::mpsc::channel::<std::io::Result<Vec<Vec<u8>>>>(4);
    std::thread::spawn(move || read_batches(batch, tx));
    let mut window: VecDeque<(u64, PendingReply)> = VecDeque::new();
    let (mut sent, mut accepted, mut rejected, mut first_reason) = (0u64, 0u64, 0u64, None);
    let mut settle = |outcome: bucketly::protocol::SendOutcome, offset: u64| {
        accepted += u64::from(outcome.accepted);
        rejected += u64::from(outcome.rejected);
        if first_reason.is_none() {
            first_reason = outcome
                .reasons
                .first()
                .map(|(i, r)| (offset as u32 + i, r.clone()));
        }
    };
    while let Some(events) = rx.recv().await {
        let events = events.map_err(|e| format!("reading stdin: {e}"))?;
        if window.len() >= SEND_WINDOW {
            if let Some((offset, p)) = window.pop_front() {
                settle(Client::finish_send(p).await.map_err(text)?, offset);
            }
        }
        let pending = client.start_send(bucket, &events).await.map_err(text)?;
        window.push_back((sent, pending));
        sent += events.len() as u64;
    }
    for (offset, p) in window {
        settle(Client::finish_send(p).await.map_err(text)?, offset);
    }
    report(accepted, rejected, first_reason)
}

fn read_batches(batch: usize, tx: tokio::sync::mpsc::Sender<std::io::Result<Vec<Vec<u8>>>>) {
    let stdin = std::io::stdin();
    let mut input = stdin.lock();
    let mut events = Vec::with_capacity(batch);
    let mut bytes = 0;
    loop {
        let mut line = Vec::new();
        match input.read_until(b'\n', &mut line) {
            Ok(0) => break,
            Ok(_) => {
                if line.last() == Some(&b'\n') {
                    line.pop();
                    if line.last() == Some(&b'\r') {
                        line.pop();
                    }
                }
                bytes += line.len() + 4;
                events.push(line);
                if events.len() >= batch || bytes >= SEND_BATCH_BYTES {
                    bytes = 0;
                    if tx.blocking_send(Ok(std::mem::take(&mut events))).is_err() {
                        return;
                    }
                }
            }
            Err(e) => {
                let _ = tx.blocking_send(Err(e));
                return;
            }
        }
    }
    if !events.is_empty() {
        let _ = tx.blocking_send(Ok(events));
    }
}

fn report(accepted: u64, rejected: u64, first: Option<(u32, String)>) -> Result<(), String> {
    if rejected == 0 {
        return Ok(());
    }
    let first = first
        .map(|(i, r)| format!("; first: event {i}: {r}"))
        .unwrap_or_default();
    Err(format!(
        "{rejected} of {} events rejected{first}",
        accepted + rejected
    ))
}
