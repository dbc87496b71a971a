//! Data path: outbound capture listener, inbound HBONE, connection pool, byte copy.

pub mod hbone;
