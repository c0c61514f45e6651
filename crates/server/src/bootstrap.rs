//! First start: data directory, pepper file and the bootstrap admin token.

use std::fs;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;

use keywarden_core::audit_chain::CheckpointSigner;
use keywarden_core::hashing::{KeyHasher, Pepper};
use keywarden_core::key_format::{self, PlainKey, ADMIN_ENV};
use keywarden_core::model::{Actor, AuditEntry, TokenRecord};
use keywarden_core::role::Role;
use keywarden_store::Store;
use time::OffsetDateTime;

#[derive(Debug, thiserror::Error)]
pub enum BootstrapError {
    #[error("data directory {path}: {source}")]
    DataDir {
        path: String,
        source: std::io::Error,
    },
    #[error("pepper file {path}: {source}")]
    PepperIo {
        path: String,
        source: std::io::Error,
    },
    #[error("pepper: {0}")]
    Pepper(#[from] keywarden_core::hashing::PepperError),
    #[error("key prefix: {0}")]
    Prefix(#[from] key_format::FormatError),
    #[error("store: {0}")]
    Store(#[from] keywarden_store::StoreError),
    #[error("audit signing key {path}: {source}")]
    SigningKeyIo {
        path: String,
        source: std::io::Error,
    },
    #[error("audit signing key {0}: expected 64 hex characters (an Ed25519 seed)")]
    SigningKeyInvalid(String),
    #[error(
        "{path} is in use by another keywarden server ({holder}); stop it, or give this \
         one its own --data-dir (and database)"
    )]
    DataDirInUse { path: String, holder: String },
    #[error("lock file {path}: {source}")]
    LockFile {
        path: String,
        source: std::io::Error,
    },
    #[error("database file {path}: {source}")]
    DatabaseFile {
        path: String,
        source: std::io::Error,
    },
    #[error("admin token file {path}: {source}")]
    TokenFile {
        path: String,
        source: std::io::Error,
    },
}

pub fn ensure_data_dir(dir: &Path) -> Result<(), BootstrapError> {
    let err = |source| BootstrapError::DataDir {
        path: dir.display().to_string(),
        source,
    };
    if !dir.exists() {
        fs::create_dir_all(dir).map_err(err)?;
        fs::set_permissions(dir, fs::Permissions::from_mode(0o700)).map_err(err)?;
    }
    Ok(())
}

/// An exclusive lock on `<data-dir>/serve.lock`, held for the server's life. Two servers
/// on one SQLite database would each trust their own cache and run their own enforcer
/// and dispatcher, so the second must not start. The file names the holder (pid, and the
/// listen address once bound) for the message the second one prints.
#[derive(Debug)]
pub struct DataDirLock {
    file: fs::File,
    path: std::path::PathBuf,
}

pub const LOCK_FILE: &str = "serve.lock";

/// Where `serve` records the URL it listens on, for CLI commands run with the same data
/// directory and no `--server`.
pub const LISTEN_FILE: &str = "listen";

/// Records `http://ADDR` in `<data-dir>/listen`; an unspecified address (0.0.0.0, ::) is
/// recorded as loopback with the same port, which is where a local CLI reaches it.
pub fn record_listen(dir: &Path, addr: std::net::SocketAddr) -> Result<(), BootstrapError> {
    let mut addr = addr;
    if addr.ip().is_unspecified() {
        addr.set_ip(if addr.is_ipv4() {
            std::net::Ipv4Addr::LOCALHOST.into()
        } else {
            std::net::Ipv6Addr::LOCALHOST.into()
        });
    }
    let path = dir.join(LISTEN_FILE);
    write_private(&path, format!("http://{addr}\n").as_bytes()).map_err(|source| {
        BootstrapError::LockFile {
            path: path.display().to_string(),
            source,
        }
    })
}

pub fn lock_data_dir(dir: &Path) -> Result<DataDirLock, BootstrapError> {
    lock_at(dir, dir.join(LOCK_FILE))
}

/// The same lock beside a SQLite database kept outside the data directory
/// (`--database-url sqlite://…`), so that servers with different data directories cannot
/// share that database either.
pub fn lock_database(db: &Path) -> Result<DataDirLock, BootstrapError> {
    let mut name = db.as_os_str().to_owned();
    name.push(".serve.lock");
    lock_at(db, std::path::PathBuf::from(name))
}

fn lock_at(dir: &Path, path: std::path::PathBuf) -> Result<DataDirLock, BootstrapError> {
    let io = |source| BootstrapError::LockFile {
        path: path.display().to_string(),
        source,
    };
    let file = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(&path)
        .map_err(io)?;
    // flock(2), the lock `File::try_lock` takes on Unix, through rustix while the MSRV
    // predates that method. Released when the file is closed, so also when the process
    // dies.
    match rustix::fs::flock(&file, rustix::fs::FlockOperation::NonBlockingLockExclusive) {
        Ok(()) => {}
        Err(e) if e == rustix::io::Errno::WOULDBLOCK => {
            let holder = fs::read_to_string(&path).unwrap_or_default();
            let holder = holder.trim();
            return Err(BootstrapError::DataDirInUse {
                path: dir.display().to_string(),
                holder: if holder.is_empty() {
                    "holder unknown".to_owned()
                } else {
                    holder.to_owned()
                },
            });
        }
        Err(e) => return Err(io(e.into())),
    }
    let lock = DataDirLock {
        file,
        path: path.clone(),
    };
    lock.record(None).map_err(io)?;
    Ok(lock)
}

impl DataDirLock {
    /// Writes who holds the lock: `pid N` and, once known, `listening on ADDR`.
    pub fn record(&self, listen: Option<std::net::SocketAddr>) -> std::io::Result<()> {
        let mut text = format!("pid {}", std::process::id());
        if let Some(addr) = listen {
            text.push_str(&format!(", listening on {addr}"));
        }
        text.push('\n');
        let mut f = &self.file;
        f.set_len(0)?;
        std::io::Seek::seek(&mut f, std::io::SeekFrom::Start(0))?;
        f.write_all(text.as_bytes())?;
        f.sync_data()
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// Creates the SQLite database file 0600 before SQLite does (it would follow the umask,
/// usually 0644), and tightens an existing one and its `-wal`/`-shm` files: they hold
/// key hashes, owners and webhook URLs that may carry tokens. SQLite gives the `-wal`
/// and `-shm` files it creates the database file's mode.
pub fn protect_database_file(db: &Path) -> Result<(), BootstrapError> {
    let err = |source| BootstrapError::DatabaseFile {
        path: db.display().to_string(),
        source,
    };
    if !db.exists() {
        fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(db)
            .map_err(err)?;
    }
    for suffix in ["", "-wal", "-shm"] {
        let mut name = db.as_os_str().to_owned();
        name.push(suffix);
        let path = std::path::PathBuf::from(name);
        let Ok(meta) = fs::metadata(&path) else {
            continue;
        };
        let mode = meta.permissions().mode();
        if mode & 0o077 != 0 {
            fs::set_permissions(&path, fs::Permissions::from_mode(mode & 0o700)).map_err(err)?;
            tracing::warn!(path = %path.display(), was = format!("{:o}", mode & 0o777), "database file was readable by others; made it 0600");
        }
    }
    Ok(())
}

/// Loads the peppers from `inline` (environment) or `<data-dir>/pepper`, creating the file
/// with a fresh random pepper (mode 0600) on first start.
pub fn load_hasher(data_dir: &Path, inline: Option<&str>) -> Result<KeyHasher, BootstrapError> {
    if let Some(text) = inline {
        return Ok(KeyHasher::new(&Pepper::parse_file(text)?)?);
    }
    let path = data_dir.join("pepper");
    let io = |source| BootstrapError::PepperIo {
        path: path.display().to_string(),
        source,
    };
    if !path.exists() {
        let pepper = Pepper::generate(&mut rand::rngs::OsRng, 1);
        let text = format!(
            "# keywarden pepper: keys are stored as HMAC-SHA256(pepper, key). Losing this file\n\
             # invalidates every key; keep a backup apart from the database. Add a line\n\
             # v<N+1>:<64 hex> to rotate; the highest version hashes new keys.\n{}\n",
            *pepper.to_line()
        );
        write_private(&path, text.as_bytes()).map_err(io)?;
    }
    let mode = fs::metadata(&path).map_err(io)?.permissions().mode();
    if mode & 0o077 != 0 {
        tracing::warn!(path = %path.display(), mode = format!("{mode:o}"), "pepper file is readable by others; chmod 600 it");
    }
    let text = zeroize::Zeroizing::new(fs::read_to_string(&path).map_err(io)?);
    Ok(KeyHasher::new(&Pepper::parse_file(&text)?)?)
}

/// Loads the audit checkpoint signing key from `inline` (environment) or
/// `<data-dir>/audit-signing.key`, creating the file (mode 0600) on first start.
pub fn load_signer(
    data_dir: &Path,
    inline: Option<&str>,
) -> Result<CheckpointSigner, BootstrapError> {
    if let Some(text) = inline {
        return CheckpointSigner::from_seed_hex(text)
            .ok_or_else(|| BootstrapError::SigningKeyInvalid("from the environment".into()));
    }
    let path = data_dir.join("audit-signing.key");
    let io = |source| BootstrapError::SigningKeyIo {
        path: path.display().to_string(),
        source,
    };
    if !path.exists() {
        let signer = CheckpointSigner::generate(&mut rand::rngs::OsRng);
        let text = zeroize::Zeroizing::new(format!(
            "# keywarden audit checkpoint signing key (Ed25519 seed). Public key:\n# {}\n{}\n",
            signer.public_key(),
            *signer.seed_hex()
        ));
        write_private(&path, text.as_bytes()).map_err(io)?;
    }
    let text = zeroize::Zeroizing::new(fs::read_to_string(&path).map_err(io)?);
    let seed = text
        .lines()
        .find(|l| !l.trim().is_empty() && !l.starts_with('#'))
        .unwrap_or("");
    CheckpointSigner::from_seed_hex(seed)
        .ok_or_else(|| BootstrapError::SigningKeyInvalid(path.display().to_string()))
}

fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    fs::rename(&tmp, path)
}

/// What an admin token is for; see [`new_token`].
pub struct TokenSpec<'a> {
    pub name: &'a str,
    pub role: Role,
    pub environments: Option<Vec<String>>,
    pub created_by: &'a str,
    pub expires_at: Option<OffsetDateTime>,
    pub owner: Option<String>,
}

/// A new admin token: the record to store and the secret to hand out once.
pub fn new_token(
    hasher: &KeyHasher,
    prefix: &str,
    spec: TokenSpec<'_>,
    now: OffsetDateTime,
) -> Result<(TokenRecord, PlainKey), key_format::FormatError> {
    let TokenSpec {
        name,
        role,
        environments,
        created_by,
        expires_at,
        owner,
    } = spec;
    let parsed = key_format::generate(&mut rand::rngs::OsRng, prefix, ADMIN_ENV)?;
    let record = TokenRecord {
        id: parsed.id.clone(),
        hash: hasher.hash(&parsed.plain),
        hint: parsed.plain.hint(),
        name: name.to_owned(),
        owner,
        role,
        environments,
        created_at: now,
        created_by: created_by.to_owned(),
        expires_at,
        revoked_at: None,
        last_used_at: None,
    };
    Ok((record, parsed.plain))
}

/// When no usable admin token exists, makes one, writes it to `<data-dir>/admin-token`
/// (0600) and returns it so the caller can print it once.
pub async fn bootstrap_admin(
    store: &Store,
    hasher: &KeyHasher,
    prefix: &str,
    data_dir: &Path,
    now: OffsetDateTime,
) -> Result<Option<PlainKey>, BootstrapError> {
    if store.count_usable_tokens(now).await? > 0 {
        return Ok(None);
    }
    let (record, secret) = new_token(
        hasher,
        prefix,
        TokenSpec {
            name: "bootstrap",
            role: Role::Admin,
            environments: None,
            created_by: "system:bootstrap",
            expires_at: None,
            owner: None,
        },
        now,
    )?;
    let path = data_dir.join("admin-token");
    write_private(&path, format!("{}\n", secret.expose()).as_bytes()).map_err(|source| {
        BootstrapError::TokenFile {
            path: path.display().to_string(),
            source,
        }
    })?;
    let audit = AuditEntry {
        time: now,
        actor: Actor {
            id: "system:bootstrap".to_owned(),
            name: "bootstrap".to_owned(),
            ..Actor::default()
        },
        action: "token.created".to_owned(),
        target: format!("token:{}", record.id),
        reason: Some("first start: no usable admin token".to_owned()),
        details: serde_json::json!({"role": "admin", "name": "bootstrap"}).to_string(),
    };
    store.insert_token(&record, &audit).await?;
    tracing::info!(token_id = %record.id, path = %path.display(), "created bootstrap admin token");
    Ok(Some(secret))
}
