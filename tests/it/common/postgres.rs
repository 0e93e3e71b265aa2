//! A throwaway PostgreSQL server for tests: its own data directory and loopback port,
//! trust authentication for the user `postgres`, stopped and removed at drop.
//!
//! Tests that need it start with `let Some(pg) = PgServer::start_or_skip().await else
//! { return };`: without PostgreSQL installed they print a SKIPPED line and pass,
//! unless `BUCKETLY_REQUIRE_PG=1` (as in CI), where they fail.

use std::path::{Path, PathBuf};
use std::process::Stdio;

/// Set to `1` to make a missing PostgreSQL a test failure instead of a skip.
pub const REQUIRE_ENV: &str = "BUCKETLY_REQUIRE_PG";

/// A running (or stopped) PostgreSQL server of one test.
pub struct PgServer {
    bin: PathBuf,
    /// Data directory, log file and socket directory live here.
    dir: tempfile::TempDir,
    port: u16,
    /// The user that runs the server when the tests run as root.
    owner: Option<(u32, u32)>,
    running: bool,
}

impl PgServer {
    /// `initdb` and a started server, or None (after a loud SKIPPED line) when
    /// PostgreSQL is not installed.
    ///
    /// # Panics
    /// When PostgreSQL is missing and [`REQUIRE_ENV`] is `1`, or it fails to start.
    pub async fn start_or_skip() -> Option<PgServer> {
        let Some(bin) = find_bin() else {
            if std::env::var(REQUIRE_ENV).as_deref() == Ok("1") {
                panic!(
                    "{REQUIRE_ENV}=1 but PostgreSQL was not found: no initdb and pg_ctl on PATH \
                     or under /usr/lib/postgresql/*/bin (install Debian's postgresql package)"
                );
            }
            eprintln!(
                "SKIPPED: PostgreSQL not found (install postgresql, e.g. `apt-get install \
                 postgresql`; set {REQUIRE_ENV}=1 to make this a failure)"
            );
            return None;
        };
        let dir = tempfile::tempdir().expect("tempdir");
        let owner = if unsafe { libc::geteuid() } == 0 {
            // PostgreSQL refuses to run as root.
            let owner = ["postgres", "nobody"]
                .iter()
                .find_map(|name| user_ids(name))
                .expect("as root, a `postgres` or `nobody` user to run PostgreSQL");
            chown(dir.path(), owner);
            Some(owner)
        } else {
            None
        };
        let mut pg = PgServer {
            bin,
            dir,
            port: free_port(),
            owner,
            running: false,
        };
        let data = pg.data();
        pg.run("initdb", |c| {
            c.arg("-D")
                .arg(&data)
                .args(["-U", "postgres", "--auth=trust", "--no-sync"])
                .args(["-E", "UTF8", "--locale=C"]);
        })
        .await
        .unwrap_or_else(|e| panic!("{e}"));
        // The port was free when picked; another test may have bound it since.
        for attempt in 1.. {
            match pg.try_start().await {
                Ok(()) => break,
                Err(e) if attempt == 3 => panic!("{e}"),
                Err(_) => pg.port = free_port(),
            }
        }
        Some(pg)
    }

    /// A libpq connection string for database `postgres`.
    pub fn config(&self) -> String {
        format!(
            "host=127.0.0.1 port={} user=postgres dbname=postgres connect_timeout=10",
            self.port
        )
    }

    /// A new connection, its connection task spawned.
    pub async fn connect(&self) -> tokio_postgres::Client {
        let (client, connection) = tokio_postgres::connect(&self.config(), tokio_postgres::NoTls)
            .await
            .expect("connect to the test PostgreSQL");
        tokio::spawn(async move {
            let _ = connection.await;
        });
        client
    }

    /// Whether the server was started and not stopped since.
    pub fn is_running(&self) -> bool {
        self.running
    }

    /// Starts the server; returns once it accepts connections (`pg_ctl -w`).
    pub async fn start(&mut self) {
        self.try_start().await.unwrap_or_else(|e| panic!("{e}"));
    }

    async fn try_start(&mut self) -> Result<(), String> {
        assert!(!self.running, "PostgreSQL is already running");
        let (data, log) = (self.data(), self.dir.path().join("postgres.log"));
        let options = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=off",
            self.port,
            self.dir.path().display()
        );
        self.run("pg_ctl start", |c| {
            c.arg("-D").arg(&data).arg("-l").arg(&log);
            c.args(["-w", "-t", "60", "-o", &options, "start"]);
        })
        .await?;
        self.running = true;
        Ok(())
    }

    /// Stops the server (fast shutdown: open connections are closed); returns once it
    /// has exited.
    pub async fn stop(&mut self) {
        assert!(self.running, "PostgreSQL is not running");
        let data = self.data();
        self.run("pg_ctl stop", |c| {
            c.arg("-D").arg(&data);
            c.args(["-w", "-t", "60", "-m", "fast", "stop"]);
        })
        .await
        .unwrap_or_else(|e| panic!("{e}"));
        self.running = false;
    }

    fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// Runs `initdb` or `pg_ctl` (the first word of `what`) as the server's owner; the
    /// error has its output and the server log.
    async fn run(
        &self,
        what: &str,
        args: impl FnOnce(&mut tokio::process::Command),
    ) -> Result<(), String> {
        let program = what.split(' ').next().unwrap_or(what);
        let mut cmd = tokio::process::Command::new(self.bin.join(program));
        args(&mut cmd);
        cmd.current_dir(self.dir.path())
            .stdin(Stdio::null())
            .kill_on_drop(true);
        if let Some((uid, gid)) = self.owner {
            cmd.uid(uid).gid(gid);
        }
        let out = cmd.output().await.map_err(|e| format!("{what}: {e}"))?;
        if out.status.success() {
            return Ok(());
        }
        let log = std::fs::read_to_string(self.dir.path().join("postgres.log"));
        Err(format!(
            "{what} failed ({}):\n{}{}\nserver log:\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            log.unwrap_or_default()
        ))
    }
}

impl Drop for PgServer {
    fn drop(&mut self) {
        if !self.running {
            return;
        }
        let mut cmd = std::process::Command::new(self.bin.join("pg_ctl"));
        cmd.arg("-D").arg(self.data());
        cmd.args(["-w", "-m", "immediate", "stop"])
            .current_dir(self.dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        if let Some((uid, gid)) = self.owner {
            std::os::unix::process::CommandExt::uid(&mut cmd, uid);
            std::os::unix::process::CommandExt::gid(&mut cmd, gid);
        }
        let _ = cmd.status();
    }
}

/// The directory holding `initdb` and `pg_ctl`: on PATH, else the newest
/// `/usr/lib/postgresql/VERSION/bin` (Debian keeps them off PATH).
pub fn find_bin() -> Option<PathBuf> {
    let has_both = |dir: &Path| dir.join("initdb").is_file() && dir.join("pg_ctl").is_file();
    let on_path = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .unwrap_or_default();
    if let Some(dir) = on_path.into_iter().find(|d| has_both(d)) {
        return Some(dir);
    }
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(|e| {
            let e = e.ok()?;
            let version = e.file_name().to_str()?.parse().ok()?;
            Some((version, e.path().join("bin")))
        })
        .filter(|(_, bin)| has_both(bin))
        .collect();
    versions.sort();
    versions.pop().map(|(_, bin)| bin)
}

/// A loopback port that was free a moment ago.
fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind a free port");
    listener.local_addr().expect("local addr").port()
}

/// The uid and gid of user `name`, if it exists.
fn user_ids(name: &str) -> Option<(u32, u32)> {
    let name = std::ffi::CString::new(name).ok()?;
    let mut record: libc::passwd = unsafe { std::mem::zeroed() };
    let mut buf = vec![0 as libc::c_char; 16 * 1024];
    let mut found: *mut libc::passwd = std::ptr::null_mut();
    // SAFETY: every pointer is valid for the call; getpwnam_r (unlike getpwnam) writes
    // only into `record` and `buf`, so concurrent tests cannot clobber it.
    let rc = unsafe {
        libc::getpwnam_r(
            name.as_ptr(),
            &mut record,
            buf.as_mut_ptr(),
            buf.len(),
            &mut found,
        )
    };
    (rc == 0 && !found.is_null()).then_some((record.pw_uid, record.pw_gid))
}

fn chown(path: &Path, (uid, gid): (u32, u32)) {
    std::os::unix::fs::chown(path, Some(uid), Some(gid)).expect("chown the PostgreSQL directory");
}
