//! A QEMU Machine Protocol (QMP) server.
#![forbid(unsafe_code)]
