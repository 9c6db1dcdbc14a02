//! volsnap: content-addressed, deduplicating snapshots of container data volumes.
//!
//! A repository holds packs of compressed, content-addressed chunks and trees, an
//! index (redb) derived from them, and one immutable record per snapshot. The library
//! does all the work and never prints; the `volsnap` binary parses arguments, calls one
//! function per command and renders the result.
//!
//! ```no_run
//! use std::path::PathBuf;
//! use volsnap::{progress::Progress, repo::{Config, Repository}, snapshot};
//!
//! // Creates /var/lib/volsnap (not its parents) unless a repository is there already.
//! let (repo, _created) = Repository::init(&PathBuf::from("/var/lib/volsnap"), Config::default())?;
//! let outcome = snapshot::create(
//!     &repo,
//!     &[PathBuf::from("/srv/app/data")],
//!     &snapshot::Options { series: Some("app".into()), ..Default::default() },
//!     &Progress::default(),
//! )?;
//! println!("snapshot {} is {}@{}", outcome.listed.id.short(), outcome.listed.snapshot.series, outcome.listed.snapshot.version);
//! # Ok::<(), volsnap::Error>(())
//! ```

pub mod calendar;
pub mod check;
pub mod chunker;
pub mod copy;
pub mod crash;
pub mod docker;
pub mod error;
pub mod export;
pub mod fsutil;
#[doc(hidden)]
pub mod fuzz;
pub mod gc;
pub mod id;
pub mod index;
pub mod inspect;
pub mod limits;
pub mod live;
pub mod pack;
pub mod progress;
pub mod repo;
pub mod restore;
pub mod snapshot;
pub mod store;
pub mod tree;
pub mod walk;

pub use error::{Error, Result};
pub use id::Id;
