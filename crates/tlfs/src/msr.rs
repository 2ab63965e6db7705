//! Synthetic MSR indexes and MSR value layouts.
