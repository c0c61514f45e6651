//! The SQLite data directory belongs to one server, and what it holds is readable by its
//! owner only.

use std::os::unix::fs::PermissionsExt;
use std::process::Command;

use crate::harness::{Backend, TestServer};

/// A second server on the same data directory refuses to start and names the first;
/// once the first stops, it starts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_server_on_one_data_dir_refuses_to_start() {
    let mut s = TestServer::start(Backend::Sqlite).await;
    let clock = s.clock.clone();
    let err = match keywarden_server::start(s.config.clone(), clock.clone()).await {
        Ok(second) => {
            second.shutdown().await;
            panic!("a second server started on the same data directory");
        }
        Err(e) => e.to_string(),
    };
    let first = s.server.as_ref().expect("running").addr;
    assert!(err.contains("in use by another keywarden server"), "{err}");
    assert!(
        err.contains(&format!("pid {}", std::process::id())),
        "{err}"
    );
    assert!(
        err.contains(&first.to_string()),
        "names the holder's address: {err}"
    );
    // A restart (stop, then start) takes the lock again.
    s.restart().await;
    s.stop().await;
}

/// The real binary: `serve` on a data directory another `serve` holds exits 2 with the
/// message, and does not listen.
#[test]
fn serve_exits_when_the_data_dir_is_held() {
    let dir = tempfile::tempdir().unwrap();
    let mut first = crate::process::serve_with(dir.path(), &[]);
    let second = Command::new(assert_cmd::cargo::cargo_bin("keywarden"))
        .args(["serve", "--listen", "127.0.0.1:0"])
        .env("KEYWARDEN_DATA_DIR", dir.path())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Bounded: a second server that does start must fail the test, not hang it. The
    // exit is waited for on a thread of its own, which says when it comes.
    let pid = second.id().to_string();
    let (exited, exit) = std::sync::mpsc::channel();
    std::thread::spawn(move || exited.send(second.wait_with_output()));
    let out = match exit.recv_timeout(std::time::Duration::from_secs(20)) {
        Ok(out) => out.unwrap(),
        Err(_) => {
            let _ = Command::new("kill").args(["-KILL", &pid]).status();
            panic!("a second serve on the same data directory kept running");
        }
    };
    let _ = first.child.kill();
    let _ = first.child.wait();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("in use by another keywarden server"),
        "{stderr}"
    );
    assert!(
        stderr.contains(&format!("pid {}", first.child.id())),
        "{stderr}"
    );
    assert!(!String::from_utf8_lossy(&out.stdout).contains("listening"));
}

fn mode(path: &std::path::Path) -> u32 {
    std::fs::metadata(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .permissions()
        .mode()
        & 0o777
}

/// With the data directory already there (as a deployment makes it), the database and
/// its WAL files are created 0600; existing ones that others could read are tightened.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn database_files_are_private() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    std::fs::create_dir(&data).unwrap();
    std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o755)).unwrap();
    let mut s = TestServer::start_with(Backend::Sqlite, |c| c.data_dir = data.clone()).await;
    s.create_key(crate::harness::key_body("k")).await;
    for name in [
        "keywarden.db",
        "keywarden.db-wal",
        "keywarden.db-shm",
        "serve.lock",
        "pepper",
        "admin-token",
    ] {
        assert_eq!(mode(&data.join(name)), 0o600, "{name}");
    }
    // A database made readable by others (an old install, a restore) is tightened.
    for name in ["keywarden.db", "keywarden.db-wal", "keywarden.db-shm"] {
        std::fs::set_permissions(data.join(name), std::fs::Permissions::from_mode(0o644)).unwrap();
    }
    s.restart().await;
    for name in ["keywarden.db", "keywarden.db-wal", "keywarden.db-shm"] {
        assert_eq!(mode(&data.join(name)), 0o600, "after restart: {name}");
    }
    s.stop().await;
}

/// Two servers with their own data directories but one SQLite database (given with
/// `--database-url sqlite://…`): the second refuses too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shared_sqlite_file_outside_the_data_dirs_is_locked_too() {
    let shared = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", shared.path().join("kw.db").display());
    let u = url.clone();
    let s = TestServer::start_with(Backend::Sqlite, |c| c.database_url = Some(u)).await;
    let other = tempfile::tempdir().unwrap();
    let mut config = s.config.clone();
    config.data_dir = other.path().join("data");
    config.database_url = Some(url);
    match keywarden_server::start(config, s.clock.clone()).await {
        Ok(second) => {
            second.shutdown().await;
            panic!("a second server started on the same SQLite file");
        }
        Err(e) => assert!(
            e.to_string().contains("in use by another keywarden server"),
            "{e}"
        ),
    }
    s.stop().await;
}
