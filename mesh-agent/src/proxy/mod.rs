//! Data path: outbound capture listener, inbound HBONE, connection pool, upstream connects.

pub mod body_end;
pub mod connect;
pub mod hbone;
pub mod http;
pub mod outbound;
pub mod owned_upstream;
pub mod reply_routing;
pub mod sniff;
pub mod upstream;
