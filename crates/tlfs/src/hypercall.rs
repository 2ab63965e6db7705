//! Hypercall codes, the control word, result value and status codes.
