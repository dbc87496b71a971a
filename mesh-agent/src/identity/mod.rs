//! Workload identity: mesh CA, workload certificates, rotation, rustls configs.
