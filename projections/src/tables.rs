//! Writing folded rows to Postgres in bulk: one multi-row `INSERT … SELECT FROM
//! unnest(…)` per chunk of rows (every column bound as one array, encoded by
//! sqlx exactly as the incremental path binds it), binary `COPY` for the biggest
//! table (`messages`), and the key-wise rewrite of
//! the few rows a tail changed. The target table is named by the caller: the
//! live one, a rebuild's `<table>__next`, or verify's temporary scratch copy.

use sqlx::{AssertSqlSafe, PgConnection};
use uuid::Uuid;

use crate::{
    fold::Rows,
    projections::{
        Fold,
        assistants::AssistantRow,
        conversations::ConversationRow,
        messages::MessageRow,
        usage_daily::{UsageKey, UsageRow},
    },
};

/// Rows per INSERT statement: big enough that round trips do not count.
const CHUNK: usize = 20_000;

/// Write every row of `fold` into its tables named `<table><suffix>`.
pub async fn write_all(
    conn: &mut PgConnection,
    fold: &Fold,
    suffix: &str,
) -> Result<(), sqlx::Error> {
    write(conn, fold, suffix, None).await
}

/// Rewrite the rows the fold changed since `track_changes` (or the last call):
/// delete them by key, then insert those that still exist.
pub async fn write_changed(
    conn: &mut PgConnection,
    fold: &mut Fold,
    suffix: &str,
) -> Result<(), sqlx::Error> {
    let changed = Changed::take(fold);
    write(conn, fold, suffix, Some(changed)).await
}

/// Keys changed per table (in the order of `Fold::tables`).
enum Changed {
    Uuids(Vec<Vec<Uuid>>),
    Usage(Vec<UsageKey>, Vec<Uuid>),
}

impl Changed {
    fn take(fold: &mut Fold) -> Changed {
        match fold {
            Fold::Assistants(f) => Changed::Uuids(vec![
                f.assistants.take_changed(),
                f.conversations.take_changed(),
            ]),
            Fold::Conversations(f) => Changed::Uuids(vec![f.conversations.take_changed()]),
            Fold::Messages(f) => Changed::Uuids(vec![
                f.messages.take_changed(),
                f.conversations.take_changed(),
            ]),
            Fold::UsageDaily(f) => {
                Changed::Usage(f.usage.take_changed(), f.conversations.take_changed())
            }
            Fold::Cache(f) => Changed::Uuids(vec![f.conversations.take_changed()]),
        }
    }
}

/// Rows of `rows` restricted to `keys` (all of them when `keys` is None).
fn select<'a, K: Eq + std::hash::Hash + Clone, V>(
    rows: &'a Rows<K, V>,
    keys: Option<&'a [K]>,
) -> Vec<(&'a K, &'a V)> {
    match keys {
        None => rows.iter().collect(),
        Some(keys) => keys
            .iter()
            .filter_map(|k| rows.get(k).map(|v| (k, v)))
            .collect(),
    }
}

async fn write(
    conn: &mut PgConnection,
    fold: &Fold,
    suffix: &str,
    changed: Option<Changed>,
) -> Result<(), sqlx::Error> {
    let tables = fold.tables();
    let name = |i: usize| format!("{}{suffix}", tables[i].name);
    let uuids = |i: usize| match &changed {
        Some(Changed::Uuids(keys)) => Some(keys[i].as_slice()),
        Some(Changed::Usage(_, conversations)) if i == 1 => Some(conversations.as_slice()),
        _ => None,
    };
    // Keys that changed are deleted first; the rows that still exist go back in.
    if let Some(changed) = &changed {
        match changed {
            Changed::Uuids(keys) => {
                for (i, keys) in keys.iter().enumerate() {
                    delete_by_uuid(conn, &name(i), tables[i].key[0], keys).await?;
                }
            }
            Changed::Usage(usage, conversations) => {
                delete_usage(conn, &name(0), usage).await?;
                delete_by_uuid(conn, &name(1), "conversation_id", conversations).await?;
            }
        }
    }
    match fold {
        Fold::Assistants(f) => {
            insert_assistants(conn, &name(0), &select(&f.assistants, uuids(0))).await?;
            insert_links(
                conn,
                &name(1),
                "conversation_id, assistant_id",
                &select(&f.conversations, uuids(1)),
            )
            .await?;
        }
        Fold::Conversations(f) => {
            insert_conversations(conn, &name(0), &select(&f.conversations, uuids(0))).await?;
        }
        Fold::Messages(f) => {
            insert_messages(conn, &name(0), &select(&f.messages, uuids(0))).await?;
            insert_links(
                conn,
                &name(1),
                "conversation_id, owner_id",
                &select(&f.conversations, uuids(1)),
            )
            .await?;
        }
        Fold::UsageDaily(f) => {
            let usage_keys = match &changed {
                Some(Changed::Usage(keys, _)) => Some(keys.as_slice()),
                _ => None,
            };
            insert_usage(conn, &name(0), &select(&f.usage, usage_keys)).await?;
            let links = select(&f.conversations, uuids(1));
            for chunk in links.chunks(CHUNK) {
                let sql = format!(
                    "INSERT INTO {} (conversation_id, owner_id, assistant_id)
                     SELECT * FROM unnest($1::uuid[], $2::uuid[], $3::uuid[])",
                    name(1)
                );
                sqlx::query(AssertSqlSafe(sql))
                    .bind(chunk.iter().map(|(k, _)| **k).collect::<Vec<_>>())
                    .bind(chunk.iter().map(|(_, v)| v.0).collect::<Vec<_>>())
                    .bind(chunk.iter().map(|(_, v)| v.1).collect::<Vec<_>>())
                    .execute(&mut *conn)
                    .await?;
            }
        }
        Fold::Cache(f) => {
            insert_links(
                conn,
                &name(0),
                "conversation_id, assistant_id",
                &select(&f.conversations, uuids(0)),
            )
            .await?;
        }
    }
    Ok(())
}

async fn delete_by_uuid(
    conn: &mut PgConnection,
    table: &str,
    key: &str,
    keys: &[Uuid],
) -> Result<(), sqlx::Error> {
    if keys.is_empty() {
        return Ok(());
    }
    sqlx::query(AssertSqlSafe(format!(
        "DELETE FROM {table} WHERE {key} = ANY($1)"
    )))
    .bind(keys)
    .execute(&mut *conn)
    .await?;
    Ok(())
}

async fn delete_usage(
    conn: &mut PgConnection,
    table: &str,
    keys: &[UsageKey],
) -> Result<(), sqlx::Error> {
    if keys.is_empty() {
        return Ok(());
    }
    sqlx::query(AssertSqlSafe(format!(
        "DELETE FROM {table} u
         USING unnest($1::uuid[], $2::date[], $3::uuid[], $4::text[]) AS k(o, d, a, m)
         WHERE (u.owner_id, u.day, u.assistant_id, u.model) = (k.o, k.d, k.a, k.m)"
    )))
    .bind(keys.iter().map(|k| k.0).collect::<Vec<_>>())
    .bind(keys.iter().map(|k| k.1).collect::<Vec<_>>())
    .bind(keys.iter().map(|k| k.2).collect::<Vec<_>>())
    .bind(keys.iter().map(|k| k.3.as_str()).collect::<Vec<_>>())
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// A two-uuid lookup table (conversation → assistant or owner).
async fn insert_links(
    conn: &mut PgConnection,
    table: &str,
    columns: &str,
    rows: &[(&Uuid, &Uuid)],
) -> Result<(), sqlx::Error> {
    for chunk in rows.chunks(CHUNK) {
        let sql =
            format!("INSERT INTO {table} ({columns}) SELECT * FROM unnest($1::uuid[], $2::uuid[])");
        sqlx::query(AssertSqlSafe(sql))
            .bind(chunk.iter().map(|(k, _)| **k).collect::<Vec<_>>())
            .bind(chunk.iter().map(|(_, v)| **v).collect::<Vec<_>>())
            .execute(&mut *conn)
            .await?;
    }
    Ok(())
}

/// One array per column of `rows`.
macro_rules! column {
    ($chunk:expr, |$r:ident| $value:expr) => {
        $chunk.iter().map(|(_, $r)| $value).collect::<Vec<_>>()
    };
}

async fn insert_assistants(
    conn: &mut PgConnection,
    table: &str,
    rows: &[(&Uuid, &AssistantRow)],
) -> Result<(), sqlx::Error> {
    for chunk in rows.chunks(CHUNK) {
        let sql = format!(
            "INSERT INTO {table} (id, owner_id, name, role, instructions, model, temperature,
                 metadata, status, conversation_count, message_count, last_activity_at,
                 created_at, updated_at, version, last_tx, last_gp)
             SELECT * FROM unnest($1::uuid[], $2::uuid[], $3::text[], $4::text[], $5::text[],
                 $6::text[], $7::float8[], $8::jsonb[], $9::text[], $10::int8[], $11::int8[],
                 $12::timestamptz[], $13::timestamptz[], $14::timestamptz[], $15::int8[],
                 $16::int8[], $17::int8[])"
        );
        sqlx::query(AssertSqlSafe(sql))
            .bind(chunk.iter().map(|(k, _)| **k).collect::<Vec<_>>())
            .bind(column!(chunk, |r| r.owner_id))
            .bind(column!(chunk, |r| r.name.as_str()))
            .bind(column!(chunk, |r| r.role.as_str()))
            .bind(column!(chunk, |r| r.instructions.as_str()))
            .bind(column!(chunk, |r| r.model.as_str()))
            .bind(column!(chunk, |r| r.temperature))
            .bind(column!(chunk, |r| r.metadata.clone()))
            .bind(column!(chunk, |r| r.status.as_str()))
            .bind(column!(chunk, |r| r.conversation_count))
            .bind(column!(chunk, |r| r.message_count))
            .bind(column!(chunk, |r| r.last_activity_at))
            .bind(column!(chunk, |r| r.created_at))
            .bind(column!(chunk, |r| r.updated_at))
            .bind(column!(chunk, |r| r.version))
            .bind(column!(chunk, |r| r.last_tx))
            .bind(column!(chunk, |r| r.last_gp))
            .execute(&mut *conn)
            .await?;
    }
    Ok(())
}

async fn insert_conversations(
    conn: &mut PgConnection,
    table: &str,
    rows: &[(&Uuid, &ConversationRow)],
) -> Result<(), sqlx::Error> {
    for chunk in rows.chunks(CHUNK) {
        let sql = format!(
            "INSERT INTO {table} (id, owner_id, assistant_id, title, status, message_count,
                 last_message_at, prompt_tokens, completion_tokens, total_tokens, created_at,
                 updated_at, version, last_tx, last_gp)
             SELECT * FROM unnest($1::uuid[], $2::uuid[], $3::uuid[], $4::text[], $5::text[],
                 $6::int8[], $7::timestamptz[], $8::int8[], $9::int8[], $10::int8[],
                 $11::timestamptz[], $12::timestamptz[], $13::int8[], $14::int8[], $15::int8[])"
        );
        sqlx::query(AssertSqlSafe(sql))
            .bind(chunk.iter().map(|(k, _)| **k).collect::<Vec<_>>())
            .bind(column!(chunk, |r| r.owner_id))
            .bind(column!(chunk, |r| r.assistant_id))
            .bind(column!(chunk, |r| r.title.as_str()))
            .bind(column!(chunk, |r| r.status.as_str()))
            .bind(column!(chunk, |r| r.message_count))
            .bind(column!(chunk, |r| r.last_message_at))
            .bind(column!(chunk, |r| r.prompt_tokens))
            .bind(column!(chunk, |r| r.completion_tokens))
            .bind(column!(chunk, |r| r.total_tokens))
            .bind(column!(chunk, |r| r.created_at))
            .bind(column!(chunk, |r| r.updated_at))
            .bind(column!(chunk, |r| r.version))
            .bind(column!(chunk, |r| r.last_tx))
            .bind(column!(chunk, |r| r.last_gp))
            .execute(&mut *conn)
            .await?;
    }
    Ok(())
}

/// Messages are most of the rows: they go in with `COPY … (FORMAT binary)`,
/// each value encoded as Postgres' binary input expects it (and as sqlx binds
/// it on the incremental path), in buffers of a few MB.
async fn insert_messages(
    conn: &mut PgConnection,
    table: &str,
    rows: &[(&Uuid, &MessageRow)],
) -> Result<(), sqlx::Error> {
    if rows.is_empty() {
        return Ok(());
    }
    let mut copy = conn
        .copy_in_raw(&format!(
            "COPY {table} (id, conversation_id, owner_id, seq, role, content, status, reply_to,
                 model, finish_reason, prompt_tokens, completion_tokens, total_tokens, error,
                 created_at, updated_at) FROM STDIN (FORMAT binary)"
        ))
        .await?;
    let mut out = CopyBinary::new();
    for (id, r) in rows {
        out.row(16);
        out.uuid(id);
        out.uuid(&r.conversation_id);
        out.uuid(&r.owner_id);
        out.int8(Some(r.seq));
        out.text(Some(r.role));
        out.text(r.content.as_deref());
        out.text(Some(r.status));
        match &r.reply_to {
            Some(u) => out.uuid(u),
            None => out.null(),
        }
        out.text(r.model.as_deref());
        out.text(r.finish_reason.as_deref());
        out.int8(r.prompt_tokens);
        out.int8(r.completion_tokens);
        out.int8(r.total_tokens);
        out.text(r.error.as_deref());
        out.timestamptz(&r.created_at);
        out.timestamptz(&r.updated_at);
        if out.buf.len() >= COPY_BUFFER
            && let Err(e) = copy.send(std::mem::take(&mut out.buf)).await
        {
            let _ = copy.abort(e.to_string()).await;
            return Err(e);
        }
    }
    out.trailer();
    copy.send(out.buf).await?;
    copy.finish().await?;
    Ok(())
}

/// Bytes buffered before they are sent to a COPY.
const COPY_BUFFER: usize = 4 << 20;

/// Rows in the binary format of `COPY` (header, then per row a field count and
/// each field as length + bytes, -1 for NULL; a -1 field count ends the data).
struct CopyBinary {
    buf: Vec<u8>,
}

impl CopyBinary {
    fn new() -> CopyBinary {
        let mut buf = Vec::with_capacity(COPY_BUFFER + (64 << 10));
        buf.extend_from_slice(b"PGCOPY\n\xff\r\n\0");
        buf.extend_from_slice(&0i32.to_be_bytes()); // flags
        buf.extend_from_slice(&0i32.to_be_bytes()); // header extension length
        CopyBinary { buf }
    }

    fn row(&mut self, fields: i16) {
        self.buf.extend_from_slice(&fields.to_be_bytes());
    }

    fn null(&mut self) {
        self.buf.extend_from_slice(&(-1i32).to_be_bytes());
    }

    fn field(&mut self, bytes: &[u8]) {
        self.buf
            .extend_from_slice(&(bytes.len() as i32).to_be_bytes());
        self.buf.extend_from_slice(bytes);
    }

    fn uuid(&mut self, id: &Uuid) {
        self.field(id.as_bytes());
    }

    fn int8(&mut self, v: Option<i64>) {
        match v {
            Some(v) => self.field(&v.to_be_bytes()),
            None => self.null(),
        }
    }

    fn text(&mut self, v: Option<&str>) {
        match v {
            Some(v) => self.field(v.as_bytes()),
            None => self.null(),
        }
    }

    /// Microseconds since 2000-01-01 UTC, truncated as sqlx truncates them.
    fn timestamptz(&mut self, at: &chrono::DateTime<chrono::Utc>) {
        let epoch = chrono::NaiveDate::from_ymd_opt(2000, 1, 1)
            .and_then(|d| d.and_hms_opt(0, 0, 0))
            .expect("a valid date")
            .and_utc();
        let micros = (*at - epoch)
            .num_microseconds()
            // chrono's range (±262,000 years) is inside i64 microseconds (±292,000).
            .expect("every chrono timestamp fits in i64 microseconds");
        self.field(&micros.to_be_bytes());
    }

    fn trailer(&mut self) {
        self.buf.extend_from_slice(&(-1i16).to_be_bytes());
    }
}

async fn insert_usage(
    conn: &mut PgConnection,
    table: &str,
    rows: &[(&UsageKey, &UsageRow)],
) -> Result<(), sqlx::Error> {
    for chunk in rows.chunks(CHUNK) {
        let sql = format!(
            "INSERT INTO {table} (owner_id, day, assistant_id, model, messages, prompt_tokens,
                 completion_tokens, total_tokens)
             SELECT * FROM unnest($1::uuid[], $2::date[], $3::uuid[], $4::text[], $5::int8[],
                 $6::int8[], $7::int8[], $8::int8[])"
        );
        sqlx::query(AssertSqlSafe(sql))
            .bind(chunk.iter().map(|(k, _)| k.0).collect::<Vec<_>>())
            .bind(chunk.iter().map(|(k, _)| k.1).collect::<Vec<_>>())
            .bind(chunk.iter().map(|(k, _)| k.2).collect::<Vec<_>>())
            .bind(chunk.iter().map(|(k, _)| k.3.as_str()).collect::<Vec<_>>())
            .bind(column!(chunk, |r| r.messages))
            .bind(column!(chunk, |r| r.prompt_tokens))
            .bind(column!(chunk, |r| r.completion_tokens))
            .bind(column!(chunk, |r| r.total_tokens))
            .execute(&mut *conn)
            .await?;
    }
    Ok(())
}
