//! The two migration sets must build the same schema: one set of queries serves both
//! backends, so a column or index that one side forgot shows up only in production on
//! that side. Tables, columns (type family and nullability), primary keys, unique
//! constraints and indexes are compared as sets of plain-text facts; what differs on
//! purpose is listed in [`ALLOWED`] with its reason, and an entry that no longer differs
//! fails the test too, so the list cannot rot.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::collections::BTreeSet;

use keywarden_store::Store;
use rusqlite::{Connection, OpenFlags};
use sqlx::Connection as _;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Side {
    Sqlite,
    Postgres,
}

struct Allowed {
    only_on: Side,
    fact: &'static str,
    why: &'static str,
}

const KEY_RATES: &str = "several nodes share a rate-limited key's GCRA cell; SQLite serves \
    one node, which keeps the cell in memory";

const ALLOWED: &[Allowed] = &[
    Allowed {
        only_on: Side::Postgres,
        fact: "index usage_events_key on usage_events (key_id, seq)",
        why: "SQLite's usage log is append-only and read per key through its prev_seq chain; \
              an index there would cost a random b-tree write per event",
    },
    Allowed {
        only_on: Side::Postgres,
        fact: "table key_rates",
        why: KEY_RATES,
    },
    Allowed {
        only_on: Side::Postgres,
        fact: "column key_rates.key_id: text, not null",
        why: KEY_RATES,
    },
    Allowed {
        only_on: Side::Postgres,
        fact: "column key_rates.tat: integer, not null",
        why: KEY_RATES,
    },
    Allowed {
        only_on: Side::Postgres,
        fact: "primary key key_rates (key_id)",
        why: KEY_RATES,
    },
];

/// Tables that belong to the tooling, not to keywarden.
const NOT_OURS: &[&str] = &["_sqlx_migrations"];

/// The type family both backends can be compared on: SQLite's declared types, by its
/// affinity rules, and PostgreSQL's `data_type`.
fn family(declared: &str) -> String {
    let t = declared.to_ascii_lowercase();
    let f = if t.contains("bool") {
        "bool"
    } else if t.contains("int") {
        "integer"
    } else if t.contains("char") || t.contains("clob") || t.contains("text") {
        "text"
    } else if t.contains("real") || t.contains("floa") || t.contains("doub") || t == "numeric" {
        "real"
    } else if t.contains("blob") || t == "bytea" || t.is_empty() {
        "blob"
    } else {
        return format!("other ({t})");
    };
    f.to_owned()
}

fn column_fact(table: &str, column: &str, declared: &str, not_null: bool) -> String {
    let null = if not_null { "not null" } else { "null" };
    format!("column {table}.{column}: {}, {null}", family(declared))
}

fn index_fact(name: &str, unique: bool, table: &str, columns: &[String]) -> String {
    let kind = if unique { "unique index" } else { "index" };
    format!("{kind} {name} on {table} ({})", columns.join(", "))
}

fn sqlite_facts(path: &std::path::Path) -> BTreeSet<String> {
    let conn = Connection::open_with_flags(path, OpenFlags::SQLITE_OPEN_READ_ONLY).unwrap();
    let tables: Vec<String> = conn
        .prepare(
            "SELECT name FROM sqlite_schema WHERE type = 'table' AND name NOT LIKE 'sqlite_%' \
             ORDER BY name",
        )
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    let mut facts = BTreeSet::new();
    for table in tables.iter().filter(|t| !NOT_OURS.contains(&t.as_str())) {
        facts.insert(format!("table {table}"));
        let mut pk: Vec<(i64, String)> = Vec::new();
        let mut stmt = conn
            .prepare(r#"SELECT name, type, "notnull", pk FROM pragma_table_info(?1)"#)
            .unwrap();
        let mut rows = stmt.query([table]).unwrap();
        while let Some(r) = rows.next().unwrap() {
            let (name, declared, not_null, pk_at): (String, String, bool, i64) = (
                r.get(0).unwrap(),
                r.get(1).unwrap(),
                r.get(2).unwrap(),
                r.get(3).unwrap(),
            );
            // SQLite lets a primary key that is not an INTEGER rowid hold NULL (a legacy
            // quirk PostgreSQL does not share); keywarden never writes one, so a key
            // column counts as NOT NULL here as it does there.
            facts.insert(column_fact(table, &name, &declared, not_null || pk_at > 0));
            if pk_at > 0 {
                pk.push((pk_at, name));
            }
        }
        if !pk.is_empty() {
            pk.sort();
            let cols: Vec<String> = pk.into_iter().map(|(_, c)| c).collect();
            facts.insert(format!("primary key {table} ({})", cols.join(", ")));
        }
        let indexes: Vec<(String, bool, String)> = conn
            .prepare(r#"SELECT name, "unique", origin FROM pragma_index_list(?1)"#)
            .unwrap()
            .query_map([table], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        for (name, unique, origin) in indexes {
            let cols: Vec<String> = conn
                .prepare("SELECT name FROM pragma_index_info(?1) ORDER BY seqno")
                .unwrap()
                .query_map([&name], |r| r.get(0))
                .unwrap()
                .collect::<Result<_, _>>()
                .unwrap();
            match origin.as_str() {
                // Already a `primary key` fact, from the columns.
                "pk" => {}
                // A UNIQUE constraint: its index's name is SQLite's own invention.
                "u" => {
                    facts.insert(format!("unique {table} ({})", cols.join(", ")));
                }
                _ => {
                    facts.insert(index_fact(&name, unique, table, &cols));
                }
            }
        }
    }
    facts
}

async fn postgres_facts(schema: &str) -> Result<BTreeSet<String>, sqlx::Error> {
    let mut conn = sqlx::PgConnection::connect(&common::postgres_url()).await?;
    let mut facts = BTreeSet::new();
    let tables: Vec<(String,)> = sqlx::query_as(
        "SELECT table_name::text FROM information_schema.tables \
         WHERE table_schema = $1 AND table_type = 'BASE TABLE'",
    )
    .bind(schema)
    .fetch_all(&mut conn)
    .await?;
    let ours = |t: &str| !NOT_OURS.contains(&t);
    for (table,) in tables.iter().filter(|(t,)| ours(t)) {
        facts.insert(format!("table {table}"));
    }
    let columns: Vec<(String, String, String, String)> = sqlx::query_as(
        "SELECT table_name::text, column_name::text, data_type::text, is_nullable::text \
         FROM information_schema.columns WHERE table_schema = $1",
    )
    .bind(schema)
    .fetch_all(&mut conn)
    .await?;
    for (table, column, declared, nullable) in columns.iter().filter(|c| ours(&c.0)) {
        facts.insert(column_fact(table, column, declared, nullable == "NO"));
    }
    // Every index with its columns in key order, and whether a PRIMARY KEY or UNIQUE
    // constraint owns it (PostgreSQL names those itself, as SQLite does).
    let indexes: Vec<(String, String, bool, bool, bool, Vec<String>)> = sqlx::query_as(
        "SELECT t.relname::text, i.relname::text, ix.indisunique, ix.indisprimary, \
         EXISTS (SELECT 1 FROM pg_constraint c WHERE c.conrelid = ix.indrelid \
                 AND c.conindid = ix.indexrelid AND c.contype IN ('p', 'u')), \
         ARRAY(SELECT a.attname::text \
               FROM unnest(ix.indkey::int2[]) WITH ORDINALITY AS k(attnum, ord) \
               JOIN pg_attribute a ON a.attrelid = ix.indrelid AND a.attnum = k.attnum \
               ORDER BY k.ord) \
         FROM pg_index ix \
         JOIN pg_class i ON i.oid = ix.indexrelid \
         JOIN pg_class t ON t.oid = ix.indrelid \
         JOIN pg_namespace n ON n.oid = t.relnamespace \
         WHERE n.nspname = $1",
    )
    .bind(schema)
    .fetch_all(&mut conn)
    .await?;
    for (table, name, unique, primary, constraint, cols) in indexes.iter().filter(|i| ours(&i.0)) {
        facts.insert(match (primary, constraint) {
            (true, _) => format!("primary key {table} ({})", cols.join(", ")),
            (false, true) => format!("unique {table} ({})", cols.join(", ")),
            (false, false) => index_fact(name, *unique, table, cols),
        });
    }
    conn.close().await?;
    Ok(facts)
}

/// A readable verdict: every unexplained difference, and every allowed one that is gone.
fn compare(sqlite: &BTreeSet<String>, postgres: &BTreeSet<String>) -> Result<(), String> {
    let allowed =
        |side: Side, fact: &str| ALLOWED.iter().any(|a| a.only_on == side && a.fact == fact);
    let mut report = String::new();
    for (side, here, there) in [
        (Side::Sqlite, sqlite, postgres),
        (Side::Postgres, postgres, sqlite),
    ] {
        for fact in here.difference(there).filter(|f| !allowed(side, f)) {
            report.push_str(&format!("  only on {side:?}: {fact}\n"));
        }
    }
    for a in ALLOWED {
        let (here, there) = match a.only_on {
            Side::Sqlite => (sqlite, postgres),
            Side::Postgres => (postgres, sqlite),
        };
        if here.contains(a.fact) && !there.contains(a.fact) {
            eprintln!("allowed, only on {:?}: {} ({})", a.only_on, a.fact, a.why);
        } else {
            report.push_str(&format!(
                "  allowed as only on {:?}, but no longer is (drop it from ALLOWED): {}\n",
                a.only_on, a.fact
            ));
        }
    }
    if report.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "the SQLite and PostgreSQL migrations build different schemas:\n{report}"
        ))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrations_build_the_same_schema_on_both_backends() {
    if !common::postgres_reachable() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("schema.db");
    let sqlite = Store::connect(&format!("sqlite://{}", path.display()))
        .await
        .unwrap();
    sqlite.close().await;
    drop(sqlite);
    let s = sqlite_facts(&path);
    let schema = common::PgSchema::create().await.unwrap();
    let verdict = async {
        let pg = Store::connect(&schema.url)
            .await
            .map_err(|e| format!("connect postgres: {e}"))?;
        pg.close().await;
        let p = postgres_facts(&schema.name)
            .await
            .map_err(|e| format!("read the PostgreSQL schema: {e}"))?;
        // Two empty sets would agree: make sure both sides were read at all.
        for (side, facts) in [("SQLite", &s), ("PostgreSQL", &p)] {
            if !facts.contains("table keys") || !facts.contains("column keys.id: text, not null") {
                return Err(format!("read no keywarden schema from {side}: {facts:#?}"));
            }
        }
        compare(&s, &p)
    }
    .await;
    schema.drop().await;
    if let Err(report) = verdict {
        panic!("{report}");
    }
}
