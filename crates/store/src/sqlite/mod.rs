//! What only the SQLite engine does: the usage log's sink and its fold, point reads of
//! keys through rusqlite on the calling thread, and the audit trail's bulk reader.

pub(crate) mod audit;
pub(crate) mod point_reads;
pub(crate) mod usage;
