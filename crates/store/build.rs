//! `sqlx::migrate!` embeds the migration files at compile time, but on stable Rust it
//! cannot tell cargo to watch them: without this, a new migration is not built in until
//! something else in the crate changes.
fn main() {
    println!("cargo:rerun-if-changed=migrations");
}
