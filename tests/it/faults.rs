//! Real faults, not simulated ones: a full disk (a small tmpfs filled with `dd`) under
//! SQLite, a commit that fails on PostgreSQL, terminated database connections. Whatever
//! breaks, a capped key never answers VALID for a use that was not durably spent, and
//! writes recover by themselves once the fault is gone.

use std::path::{Path, PathBuf};

use reqwest::StatusCode;
use serde_json::{json, Value};

use crate::harness::{eventually, key_body, Backend, TestServer, WAIT};

/// A tmpfs of `mb` megabytes mounted on a fresh directory; unmounted on drop. Mounting
/// needs root: CI runs as root, and there a failure to mount fails the test.
pub struct Tmpfs {
    dir: tempfile::TempDir,
}

impl Tmpfs {
    pub fn mount(mb: u32) -> Option<Self> {
        let dir = tempfile::tempdir().expect("tempdir");
        let out = std::process::Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={mb}m,mode=0700"),
                "tmpfs",
            ])
            .arg(dir.path())
            .output()
            .expect("run mount");
        if out.status.success() {
            return Some(Self { dir });
        }
        let why = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(
            std::env::var_os("CI").is_none(),
            "CI must be able to mount a tmpfs (run as root): {why}"
        );
        eprintln!("SKIPPED: cannot mount a tmpfs here ({why})");
        None
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    fn filler(&self) -> PathBuf {
        self.dir.path().join("filler")
    }

    /// Fills every free byte, as `dd if=/dev/zero` does until the device is full.
    pub fn fill(&self) {
        let out = std::process::Command::new("dd")
            .arg("if=/dev/zero")
            .arg(format!("of={}", self.filler().display()))
            .args(["bs=64k"])
            .output()
            .expect("run dd");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("No space left on device"),
            "dd should stop on a full device: {err}"
        );
    }

    pub fn free(&self) {
        std::fs::remove_file(self.filler()).expect("remove the filler");
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(self.dir.path())
            .status();
    }
}

async fn capped_key(s: &TestServer, name: &str, max_uses: u64) -> (String, String) {
    let mut body = key_body(name);
    body["max_uses"] = json!(max_uses);
    s.create_key(body).await
}

/// One verify: the code on 200, or the error code on 503. Any other status fails.
async fn verify_or_unavailable(s: &TestServer, secret: &str) -> String {
    let (status, v) = s.post("/v1/verify", json!({ "key": secret })).await;
    match status {
        StatusCode::OK => v["code"].as_str().expect("code").to_owned(),
        StatusCode::SERVICE_UNAVAILABLE => {
            assert_eq!(v["error"]["code"], "STORE_UNAVAILABLE", "{v}");
            "503".to_owned()
        }
        other => panic!("verify answered {other}: {v}"),
    }
}

async fn stored_uses(s: &TestServer, id: &str) -> u64 {
    let (status, v) = s.get(&format!("/v1/keys/{id}")).await;
    assert_eq!(status, StatusCode::OK, "{v}");
    v["uses"].as_u64().expect("uses")
}

/// Waits (bounded) until an audited write goes through again; returns its answer.
async fn revoke_when_writable(s: &TestServer, id: &str) -> (StatusCode, Value) {
    let path = format!("/v1/keys/{id}/revoke");
    eventually(WAIT, "an audited write to go through again", || async {
        let (status, v) = s.post(&path, json!({ "reason": "after the fault" })).await;
        if status == StatusCode::SERVICE_UNAVAILABLE {
            Err(v)
        } else {
            Ok((status, v))
        }
    })
    .await
}

/// Verifies a capped key through a full disk and after it recovers: never more VALID
/// answers than uses, every VALID counted in the store, and writes work again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_disk_never_spends_a_cap_it_cannot_commit() {
    let Some(disk) = Tmpfs::mount(24) else { return };
    let data = disk.path().join("data");
    let s = TestServer::start_with(Backend::Sqlite, |c| c.data_dir = data.clone()).await;
    let (one_id, one) = capped_key(&s, "one-time", 1).await;
    let (five_id, five) = capped_key(&s, "five-uses", 5).await;
    let (other_id, _) = s.create_key(key_body("revoke-me")).await;

    disk.fill();
    let mut valid_one = 0;
    let mut valid_five = 0;
    let mut refused = 0;
    for _ in 0..6 {
        for (secret, valid) in [(&one, &mut valid_one), (&five, &mut valid_five)] {
            match verify_or_unavailable(&s, secret).await.as_str() {
                "VALID" => *valid += 1,
                "503" => refused += 1,
                "USAGE_EXHAUSTED" => {}
                other => panic!("unexpected code {other}"),
            }
        }
    }
    assert!(
        refused > 0,
        "the full disk must refuse spends it cannot commit (VALID: {valid_one} one-time, {valid_five} capped at 5)"
    );
    assert!(
        valid_one <= 1,
        "one-time key answered VALID {valid_one} times"
    );
    assert!(
        valid_five <= 5,
        "5-use key answered VALID {valid_five} times"
    );

    disk.free();
    let (status, v) = revoke_when_writable(&s, &other_id).await;
    assert_eq!(
        status,
        StatusCode::OK,
        "writes must recover after the disk does: {v}"
    );
    for _ in 0..6 {
        for (secret, valid) in [(&one, &mut valid_one), (&five, &mut valid_five)] {
            match verify_or_unavailable(&s, secret).await.as_str() {
                "VALID" => *valid += 1,
                "USAGE_EXHAUSTED" => {}
                other => panic!("after recovery: unexpected {other}"),
            }
        }
    }
    assert_eq!(valid_one, 1, "a one-time key is valid exactly once");
    assert_eq!(valid_five, 5, "a 5-use key is valid exactly five times");
    assert_eq!(stored_uses(&s, &one_id).await, 1);
    assert_eq!(stored_uses(&s, &five_id).await, 5);
    s.stop().await;
}

/// `chattr +i` on the database and its WAL files (an immutable file refuses writes even
/// through descriptors already open): the same promise as the full disk.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn immutable_database_files_never_spend_a_cap() {
    let s = TestServer::start(Backend::Sqlite).await;
    let (one_id, one) = capped_key(&s, "one-time", 1).await;
    let (other_id, _) = s.create_key(key_body("revoke-me")).await;
    let data = s.config.data_dir.clone();
    let files: Vec<String> = ["keywarden.db", "keywarden.db-wal", "keywarden.db-shm"]
        .iter()
        .map(|f| data.join(f).display().to_string())
        .filter(|f| Path::new(f).exists())
        .collect();
    let chattr = |flag: &str| {
        let out = std::process::Command::new("chattr")
            .arg(flag)
            .args(&files)
            .output()
            .expect("run chattr");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (ok, why) = chattr("+i");
    if !ok {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI must be able to chattr +i (root, a file system with attributes): {why}"
        );
        eprintln!("SKIPPED: chattr +i failed here ({why})");
        s.stop().await;
        return;
    }
    let mut valid = 0;
    let mut refused = 0;
    for _ in 0..5 {
        match verify_or_unavailable(&s, &one).await.as_str() {
            "VALID" => valid += 1,
            "503" => refused += 1,
            other => panic!("unexpected {other}"),
        }
    }
    let (ok, why) = chattr("-i");
    assert!(ok, "{why}");
    assert!(
        refused > 0,
        "immutable files must refuse the spend (VALID {valid} times)"
    );
    assert!(valid <= 1, "one-time key answered VALID {valid} times");
    let (status, v) = revoke_when_writable(&s, &other_id).await;
    assert_eq!(status, StatusCode::OK, "writes recover: {v}");
    for _ in 0..3 {
        if verify_or_unavailable(&s, &one).await == "VALID" {
            valid += 1;
        }
    }
    assert_eq!(valid, 1, "a one-time key is valid exactly once");
    assert_eq!(stored_uses(&s, &one_id).await, 1);
    s.stop().await;
}

/// PostgreSQL: a spend whose COMMIT fails (a deferred constraint trigger raises at
/// commit) answers 503, and is not counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_failed_commit_never_answers_valid() {
    let Some(b) = crate::harness::postgres_or_skip() else {
        return;
    };
    let s = TestServer::start(b).await;
    let (id, secret) = capped_key(&s, "one-time", 1).await;
    s.sql(&[
        "CREATE FUNCTION kw_fail_commit() RETURNS trigger LANGUAGE plpgsql AS \
         $$ BEGIN RAISE EXCEPTION 'commit refused by the test'; END $$",
        "CREATE CONSTRAINT TRIGGER kw_fail_commit AFTER UPDATE ON keys \
         DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION kw_fail_commit()",
    ])
    .await;
    for _ in 0..3 {
        assert_eq!(verify_or_unavailable(&s, &secret).await, "503");
    }
    s.sql(&["DROP TRIGGER kw_fail_commit ON keys"]).await;
    assert_eq!(stored_uses(&s, &id).await, 0);
    assert_eq!(verify_or_unavailable(&s, &secret).await, "VALID");
    assert_eq!(verify_or_unavailable(&s, &secret).await, "USAGE_EXHAUSTED");
    s.stop().await;
}

/// PostgreSQL: every server connection terminated (`pg_terminate_backend`); the next
/// writes and verifies recover by themselves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_terminated_connections_recover() {
    let Some(b) = crate::harness::postgres_or_skip() else {
        return;
    };
    // Only this server's connections are terminated: other tests share the database.
    let app = format!("kw_faults_{}", std::process::id());
    let s = TestServer::start_with(b, |c| {
        let url = c.database_url.take().expect("a PostgreSQL url");
        c.database_url = Some(format!("{url}&application_name={app}"));
    })
    .await;
    let (id, secret) = capped_key(&s, "capped", 3).await;
    let (other_id, _) = s.create_key(key_body("revoke-me")).await;
    assert_eq!(verify_or_unavailable(&s, &secret).await, "VALID");
    let terminate = format!(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
         WHERE application_name = '{app}' AND pid <> pg_backend_pid()"
    );
    s.sql(&[&terminate]).await;
    let (status, v) = revoke_when_writable(&s, &other_id).await;
    assert_eq!(status, StatusCode::OK, "{v}");
    let mut codes = Vec::new();
    for _ in 0..3 {
        codes.push(verify_or_unavailable(&s, &secret).await);
    }
    let valid = codes.iter().filter(|c| *c == "VALID").count();
    assert!(valid <= 2, "{codes:?}");
    assert_eq!(stored_uses(&s, &id).await, 1 + valid as u64);
    s.stop().await;
}
