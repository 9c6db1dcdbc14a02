//! Snapshots: records and references, the files cache, and the create pipeline.

pub mod cache;
pub mod create;
pub mod record;
pub mod select;
mod source;

pub use create::{Options, Outcome, create};
pub use record::{Listed, Snapshot, Stats, UNDO_TAG, Unreadable, Volume, list_all, resolve};
