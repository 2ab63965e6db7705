//! Guest programs compiled from C by `build.rs`. See `guests/README.md`.
