//! Policy: kernel deny-list compiler and inbound authorization.

pub mod deny;
