//! The parts of `cargo xtask` that must build on a fresh machine: toolchain setup, builds, fuzzing,
//! the image recipe and the command runner shared with `xtask-run`.

pub mod build;
pub mod fuzz;
pub mod image;
pub mod run_task;
pub mod setup;
pub mod sh;
