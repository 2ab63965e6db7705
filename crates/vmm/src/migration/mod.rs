//! Snapshot, restore and migration: the stream format ([`format`]) and the machine's state capture and
//! restore ([`vm`]). See `docs/migration.md`.

pub mod format;
pub mod snapshot;
pub mod vm;
