//! The integration test binary: drives the real `volsnap` executable on real
//! directories. One binary with modules, so it links once.

// Tests build their fixtures with plain writes and renames; durability rules
// are for the repository code.
#![allow(clippy::disallowed_methods)]

mod support;

mod claims;
mod cli;
mod concurrency;
mod copy;
mod corruption;
mod crafted;
mod crash;
mod docker;
mod export;
mod fault_proxy;
mod faults;
mod garage;
mod gc;
mod growth;
mod hostile;
mod hostile_restore;
mod incremental;
mod limits;
mod live;
mod model;
mod roundtrip;
mod s3;
mod s3_gc;
mod s3_hosts;
mod sparse;
mod swap;
mod trust;
mod unreadable;
