//! Retention: which snapshots a policy keeps, and removing the others' records.
//!
//! Semantics follow restic's: each series is considered on its own, newest first;
//! `--keep-last N` keeps the N newest; `--keep-hourly/-daily/-weekly/-monthly/-yearly N`
//! keep the newest snapshot of each of the N most recent periods (natural UTC
//! boundaries, ISO weeks) that hold one; `--keep-within D` keeps everything within D of
//! the series' newest snapshot; `--keep-tag T` keeps every snapshot tagged T. A
//! snapshot kept by any rule is kept, and each rule it satisfied is reported.
//! A policy with no rule, or whose rules would keep nothing (every count 0), is refused
//! unless it says `keep_none`, as restic refuses "no policy was specified".
//!
//! Undo snapshots (tagged `pre-restore`) are outside those rules: they neither fill
//! nor satisfy a `--keep-last`/calendar/`--keep-within` rule, so they never displace a
//! real backup. They have their own lifetime (`Undos`): kept while they belong to one of
//! the `UNDO_RESTORES_KEPT` latest committed in-place restores of a target, or while an
//! in-place restore is in flight; otherwise forgotten by the next policy run. Only
//! `--keep-tag` (explicit) also keeps them.
//! Forgetting removes records only; the data goes when `gc` finds it unreferenced.

use std::collections::HashMap;

use crate::calendar;
use crate::error::{Error, Result};
use crate::id::Id;
use crate::repo::Repository;
use crate::snapshot::Listed;

/// A retention policy. One without rules, or whose rules keep nothing, is refused by
/// `plan` unless `keep_none` says that forgetting everything is meant.
#[derive(Clone, Debug, Default)]
pub struct Policy {
    pub last: Option<usize>,
    pub hourly: Option<usize>,
    pub daily: Option<usize>,
    pub weekly: Option<usize>,
    pub monthly: Option<usize>,
    pub yearly: Option<usize>,
    pub within_ns: Option<i64>,
    pub tags: Vec<String>,
    /// Forget every (ordinary) snapshot: the explicit way to ask for what an empty
    /// policy would do.
    pub keep_none: bool,
}

impl Policy {
    /// No rule was given (`keep_none` aside).
    pub fn is_empty(&self) -> bool {
        self.counts().iter().all(Option::is_none)
            && self.within_ns.is_none()
            && self.tags.is_empty()
    }

    /// No rule can keep anything: every count is absent or 0, no duration, no tag.
    pub fn keeps_nothing(&self) -> bool {
        self.counts().iter().all(|c| c.unwrap_or(0) == 0)
            && self.within_ns.is_none_or(|w| w <= 0)
            && self.tags.is_empty()
    }

    fn counts(&self) -> [Option<usize>; 6] {
        [
            self.last,
            self.hourly,
            self.daily,
            self.weekly,
            self.monthly,
            self.yearly,
        ]
    }

    /// Refuses a policy that would forget everything without saying so.
    fn check(&self) -> Result<()> {
        if self.keep_none {
            if !self.is_empty() {
                return Err(Error::Usage(
                    "--keep-none forgets every snapshot; it goes without --keep-* rules".into(),
                ));
            }
            return Ok(());
        }
        if self.is_empty() {
            return Err(Error::Usage(
                "no policy was specified: give --keep-last, --keep-daily, ... rules or \
                 snapshot ids, or --keep-none to forget every snapshot"
                    .into(),
            ));
        }
        if self.keeps_nothing() {
            return Err(Error::Usage(
                "the policy would keep nothing (every --keep-* rule is 0); pass --keep-none \
                 to forget every snapshot"
                    .into(),
            ));
        }
        Ok(())
    }
}

/// What keeps undo snapshots alive, gathered by `live::undo_lifetime` (after the
/// snapshots were listed, so an undo snapshot taken meanwhile is not in the list).
#[derive(Clone, Debug, Default)]
pub struct Undos {
    /// Undo snapshot → why it is kept ("undo of the latest in-place restore of /srv/x").
    pub kept: HashMap<Id, String>,
    /// An in-place restore is in flight or unsettled: its undo snapshot may not be in
    /// a restore record yet, so every undo snapshot is kept.
    pub restore_in_flight: bool,
}

/// The decision for one snapshot.
#[derive(Clone, Debug)]
pub struct Decision {
    pub listed: Listed,
    pub keep: bool,
    /// Why it is kept ("last 3", "daily 2026-11-22", "within 7d", "tag prod"),
    /// or why it goes ("no rule keeps it", "asked for").
    pub reasons: Vec<String>,
}

/// Parses a duration like `90d`, `2w`, `1y6m`, `36h`: y = 365 days, m = 30 days,
/// w = 7 days, d = 1 day, h = 1 hour.
pub fn parse_duration(s: &str) -> Option<i64> {
    let mut total: i64 = 0;
    let mut num = String::new();
    for c in s.chars() {
        if c.is_ascii_digit() {
            num.push(c);
            continue;
        }
        let n: i64 = num.parse().ok()?;
        num.clear();
        let hours = match c {
            'y' => 365 * 24,
            'm' => 30 * 24,
            'w' => 7 * 24,
            'd' => 24,
            'h' => 1,
            _ => return None,
        };
        total = total.checked_add(n.checked_mul(hours)?.checked_mul(3_600_000_000_000)?)?;
    }
    (num.is_empty() && total > 0).then_some(total)
}

type Bucket = fn(i64) -> String;

fn hourly(ns: i64) -> String {
    let c = calendar::civil(ns);
    format!("{:04}-{:02}-{:02} {:02}h", c.year, c.month, c.day, c.hour)
}
fn daily(ns: i64) -> String {
    let c = calendar::civil(ns);
    format!("{:04}-{:02}-{:02}", c.year, c.month, c.day)
}
fn weekly(ns: i64) -> String {
    let (y, w) = calendar::iso_week(ns);
    format!("{y:04}-W{w:02}")
}
fn monthly(ns: i64) -> String {
    let c = calendar::civil(ns);
    format!("{:04}-{:02}", c.year, c.month)
}
fn yearly(ns: i64) -> String {
    format!("{:04}", calendar::civil(ns).year)
}

/// Applies `policy` to every series (or only `series`). Snapshots of other series are
/// not in the result.
pub fn plan(
    all: &[Listed],
    policy: &Policy,
    series: Option<&str>,
    undos: &Undos,
) -> Result<Vec<Decision>> {
    policy.check()?;
    let mut names: Vec<&str> = all.iter().map(|l| l.snapshot.series.as_str()).collect();
    names.sort_unstable();
    names.dedup();
    let mut out = Vec::new();
    for name in names.into_iter().filter(|n| series.is_none_or(|s| s == *n)) {
        let (undo, mut snaps): (Vec<&Listed>, Vec<&Listed>) = all
            .iter()
            .filter(|l| l.snapshot.series == name)
            .partition(|l| l.snapshot.is_undo());
        out.extend(undo.into_iter().map(|l| undo_decision(l, policy, undos)));
        // Newest first.
        snaps.sort_by(|a, b| {
            (b.snapshot.time_ns, b.snapshot.version).cmp(&(a.snapshot.time_ns, a.snapshot.version))
        });
        let mut reasons: Vec<Vec<String>> = vec![Vec::new(); snaps.len()];
        if let Some(n) = policy.last {
            for r in reasons.iter_mut().take(n) {
                r.push(format!("last {n}"));
            }
        }
        let rules: [(&str, Option<usize>, Bucket); 5] = [
            ("hourly", policy.hourly, hourly),
            ("daily", policy.daily, daily),
            ("weekly", policy.weekly, weekly),
            ("monthly", policy.monthly, monthly),
            ("yearly", policy.yearly, yearly),
        ];
        for (rule, count, bucket) in rules {
            let Some(n) = count else { continue };
            let mut last: Option<String> = None;
            let mut kept = 0;
            for (i, s) in snaps.iter().enumerate() {
                if kept == n {
                    break;
                }
                let b = bucket(s.snapshot.time_ns);
                if last.as_ref() != Some(&b) {
                    reasons[i].push(format!("{rule} {b}"));
                    last = Some(b);
                    kept += 1;
                }
            }
        }
        if let (Some(within), Some(newest)) = (policy.within_ns, snaps.first()) {
            let since = newest.snapshot.time_ns.saturating_sub(within);
            for (i, s) in snaps.iter().enumerate() {
                if s.snapshot.time_ns >= since {
                    reasons[i].push("within".into());
                }
            }
        }
        for (i, s) in snaps.iter().enumerate() {
            for t in &policy.tags {
                if s.snapshot.tags.contains(t) {
                    reasons[i].push(format!("tag {t}"));
                }
            }
        }
        for (s, r) in snaps.into_iter().zip(reasons) {
            let keep = !r.is_empty();
            let reasons = if keep {
                r
            } else {
                vec!["no rule keeps it".into()]
            };
            out.push(Decision {
                listed: s.clone(),
                keep,
                reasons,
            });
        }
    }
    Ok(out)
}

/// An undo snapshot's fate: its own lifetime (see `Undos`), or an explicit tag rule.
fn undo_decision(l: &Listed, policy: &Policy, undos: &Undos) -> Decision {
    let mut reasons: Vec<String> = Vec::new();
    if let Some(why) = undos.kept.get(&l.id) {
        reasons.push(why.clone());
    } else if undos.restore_in_flight {
        reasons.push("undo snapshot, an in-place restore is in flight".into());
    }
    for t in &policy.tags {
        if l.snapshot.tags.contains(t) {
            reasons.push(format!("tag {t}"));
        }
    }
    let keep = !reasons.is_empty();
    if !keep {
        reasons.push(format!(
            "undo snapshot of none of the {} latest in-place restores of its targets",
            crate::limits::UNDO_RESTORES_KEPT
        ));
    }
    Decision {
        listed: l.clone(),
        keep,
        reasons,
    }
}

/// Removes the records of `ids`: the record file first (durably), then its index row.
/// A crash between the two leaves a row whose file is gone, which listing drops.
pub fn remove(repo: &Repository, ids: &[Id]) -> Result<()> {
    // Version numbers are never handed out again, even once the index is rebuilt from
    // the records left.
    let mut highest: HashMap<String, u64> = HashMap::new();
    for id in ids {
        let Some(bytes) = repo.store.get(&crate::snapshot::record::record_key(id))? else {
            continue;
        };
        if let Ok(s) = crate::snapshot::record::Snapshot::decode(&bytes) {
            let v = highest.entry(s.series).or_default();
            *v = (*v).max(s.version);
        }
    }
    crate::snapshot::record::remember_forgotten(repo, &highest)?;
    for id in ids {
        repo.store
            .delete(&crate::snapshot::record::record_key(id))?;
        crate::crash::point("snapshot record removed");
    }
    for id in ids {
        repo.index.remove_snapshot(id)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::calendar::days_from_civil;
    use crate::snapshot::{Snapshot, Stats, UNDO_TAG};

    fn snap(version: u64, y: i64, m: u32, d: u32, h: i64, tags: &[&str]) -> Listed {
        let time_ns = (days_from_civil(y, m, d) * 86_400 + h * 3600) * 1_000_000_000;
        Listed {
            id: Id::of(&version.to_le_bytes()),
            snapshot: Snapshot {
                series: "s".into(),
                version,
                time_ns,
                hostname: String::new(),
                volumes: Vec::new(),
                tags: tags.iter().map(|t| t.to_string()).collect(),
                parent: None,
                stats: Stats::default(),
                incomplete: false,
                unreadable: Vec::new(),
                notes: Vec::new(),
                containers: Vec::new(),
            },
            guarded_by: None,
        }
    }

    fn kept(policy: &Policy, all: &[Listed]) -> Vec<u64> {
        kept_with(policy, all, &Undos::default())
    }

    fn kept_with(policy: &Policy, all: &[Listed], undos: &Undos) -> Vec<u64> {
        let mut v: Vec<u64> = plan(all, policy, None, undos)
            .unwrap()
            .into_iter()
            .filter(|d| d.keep)
            .map(|d| d.listed.snapshot.version)
            .collect();
        v.sort();
        v
    }

    fn history() -> Vec<Listed> {
        vec![
            snap(1, 2026, 10, 30, 10, &[]),
            snap(2, 2026, 11, 1, 9, &["prod"]),
            snap(3, 2026, 11, 1, 18, &[]),
            snap(4, 2026, 11, 2, 8, &[]), // Monday of ISO week 45
            snap(5, 2026, 11, 20, 7, &[]),
            snap(6, 2026, 11, 22, 3, &[]),
            snap(7, 2026, 11, 22, 15, &[]),
        ]
    }

    #[test]
    fn calendar_rules_keep_the_newest_of_each_period() {
        let all = history();
        let p = |f: fn(&mut Policy)| {
            let mut p = Policy::default();
            f(&mut p);
            p
        };
        assert_eq!(kept(&p(|p| p.last = Some(2)), &all), vec![6, 7]);
        assert_eq!(kept(&p(|p| p.daily = Some(3)), &all), vec![4, 5, 7]);
        assert_eq!(kept(&p(|p| p.weekly = Some(3)), &all), vec![3, 4, 7]);
        assert_eq!(kept(&p(|p| p.monthly = Some(5)), &all), vec![1, 7]);
        assert_eq!(kept(&p(|p| p.yearly = Some(1)), &all), vec![7]);
        assert_eq!(kept(&p(|p| p.hourly = Some(2)), &all), vec![6, 7]);
        assert_eq!(kept(&p(|p| p.tags = vec!["prod".into()]), &all), vec![2]);
        assert_eq!(
            kept(&p(|p| p.within_ns = parse_duration("3d")), &all),
            vec![5, 6, 7]
        );
        let both = p(|p| {
            p.last = Some(1);
            p.tags = vec!["prod".into()];
        });
        assert_eq!(kept(&both, &all), vec![2, 7]);
    }

    #[test]
    fn undo_snapshots_fill_no_rule_and_live_by_their_own() {
        let mut all = history();
        // The two newest are undo snapshots: one a restore record keeps, one not.
        all[5].snapshot.tags = vec![UNDO_TAG.into()];
        all[6].snapshot.tags = vec![UNDO_TAG.into()];
        let mut undos = Undos::default();
        undos.kept.insert(all[6].id, "undo of the latest".into());
        let p = Policy {
            last: Some(2),
            daily: Some(1),
            ..Policy::default()
        };
        let kept = |undos: &Undos| kept_with(&p, &all, undos);
        assert_eq!(kept(&undos), vec![4, 5, 7]);
        undos.restore_in_flight = true;
        assert_eq!(kept(&undos), vec![4, 5, 6, 7]);
    }

    #[test]
    fn an_empty_policy_is_refused_and_durations_parse() {
        let none = Undos::default();
        assert!(plan(&history(), &Policy::default(), None, &none).is_err());
        let zero = Policy {
            daily: Some(0),
            last: Some(0),
            ..Policy::default()
        };
        assert!(plan(&history(), &zero, None, &none).is_err());
        let all = Policy {
            keep_none: true,
            ..Policy::default()
        };
        assert!(
            plan(&history(), &all, None, &none)
                .unwrap()
                .iter()
                .all(|d| !d.keep)
        );
        assert_eq!(parse_duration("2d"), Some(2 * 86_400 * 1_000_000_000));
        assert_eq!(parse_duration("1y1m"), Some(395 * 86_400 * 1_000_000_000));
        assert_eq!(parse_duration("5"), None);
        assert_eq!(parse_duration("3x"), None);
        assert_eq!(parse_duration(""), None);
    }
}
