//! Version numbers of a series that never collide across hosts, on a store without
//! conditional writes.
//!
//! To take version v of series s, a host PUTs the claim `versions/<hex of s>/<v 020>-<host>`
//! and then LISTs `versions/<hex of s>/` from `<v 020>` on. If its claim is the only one
//! for v and none is higher, v is its own (and the claim stays forever). Otherwise it
//! deletes its claim and tries above the highest claim it saw, after a short randomized
//! backoff.
//!
//! Safety (PUT and LIST linearizable, as S3 and Garage give): if hosts A and B both won
//! v, each LIST showed only its own claim, so A's LIST ended before B's PUT took effect
//! and B's before A's; but A's PUT precedes A's LIST and B's PUT precedes B's LIST: a
//! cycle. A winner never deletes its claim, so a later claimant always sees it. A claim
//! left by a host that died is a gap in the numbers, never a duplicate. Host clocks are
//! never read.
//!
//! A local repository needs none of this: the index's counter (one redb file shared by
//! every process, incremented in a write transaction) is already atomic.

use crate::error::{Error, Result};
use crate::repo::Repository;

/// Claims given up before a reservation fails (each costs a PUT, a LIST and a DELETE).
const ATTEMPTS_MAX: u32 = 200;

/// Reserves the next version of `series`, above `floor` (the highest version forgotten
/// in it) and above the local counter; on an object store also above every claim in the
/// store, and claimed there (see the module comment).
pub fn reserve(repo: &Repository, series: &str, floor: u64) -> Result<u64> {
    let mut v = repo.index.reserve_version(series, floor)?;
    if repo.store.is_local() {
        return Ok(v);
    }
    let host = crate::repo::sync::host_id(repo)?;
    let hex: String = series.bytes().map(|b| format!("{b:02x}")).collect();
    let dir = format!("versions/{hex}/");
    for attempt in 0..ATTEMPTS_MAX {
        let mine = format!("{dir}{v:020}-{host}");
        repo.store.put(&mine, host.as_bytes(), None)?;
        crate::crash::point("version claimed");
        let mut contested = false;
        let mut highest = v;
        for object in repo.store.list_after(&dir, &format!("{dir}{v:020}"))? {
            let Some((number, who)) = object
                .key
                .strip_prefix(&dir)
                .and_then(|name| name.split_once('-'))
            else {
                continue;
            };
            let Ok(n) = number.parse::<u64>() else {
                continue;
            };
            if n > v || (n == v && who != host) {
                contested = true;
            }
            highest = highest.max(n);
        }
        if !contested {
            return Ok(v);
        }
        repo.store.delete(&mine)?;
        backoff(attempt);
        v = repo.index.reserve_version(series, highest)?;
    }
    Err(Error::Busy(format!(
        "could not reserve a version of series {series:?} in {}: other hosts took every \
         number tried ({ATTEMPTS_MAX} attempts); run the snapshot again",
        repo.location
    )))
}

/// Sleeps a random time, growing with the attempt (up to about 0.3 s), so hosts that
/// contend for one number spread apart. Not a synchronisation point: the claims decide.
fn backoff(attempt: u32) {
    let mut seed = [0u8; 8];
    let _ = std::fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut seed));
    let cap_ms = 5u64 << attempt.min(6);
    let ms = u64::from_le_bytes(seed) % (cap_ms + 1);
    std::thread::sleep(std::time::Duration::from_millis(ms));
}
