//! Snapshot, restore and migration: the stream format ([`format`]) and the machine's state capture and
//! restore ([`vm`]). See `docs/migration.md`.

// The stream is untrusted input: no unwrap/expect outside tests (issue 10).
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]

pub mod format;
pub mod snapshot;
pub mod vm;
