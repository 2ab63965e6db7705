//! Host capability probing for `enlighten host`.
