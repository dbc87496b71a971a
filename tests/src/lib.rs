//! Test topology harness: nodes and pods as network namespaces joined by veth pairs, one cgroup
//! v2 directory per pod, real processes inside them, and teardown even when a test panics.
//!
//! Address plan (per node `n`, pod `p`): node-side veth 10.n.p.1/24, pod eth0 10.n.p.2/24 with a
//! default route via 10.n.p.1, agent address 10.n.255.1/32 on the node's loopback.

pub mod ca_service;
pub mod capture;
pub mod cmd;
pub mod etcd;
pub mod http;
pub mod l7;
pub mod otlp;
pub mod prometheus;
pub mod registry;
pub mod topology;
pub mod two_nodes;

pub use topology::{AgentHandle, Attempt, Node, Pod, Sent, Topology};
