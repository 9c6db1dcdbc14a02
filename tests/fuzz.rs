//! Fuzzing every decoder of bytes read back from disk, on stable Rust, as part of
//! `cargo test` (the targets are `volsnap::fuzz::TARGETS`, which the cargo-fuzz target
//! in `fuzz/` runs too).
//!
//! For each target, in order:
//! 1. every input in `tests/fuzz_corpus/<target>/` (inputs that once found a bug);
//! 2. every seed (a valid encoding), which must decode;
//! 3. systematic mutations of every seed: each of the 8 bits flipped, the input cut,
//!    a byte deleted, a byte inserted, and huge lengths written (u32::MAX and u64::MAX
//!    as varints and as little-endian integers), at every position (at most
//!    `POSITIONS_MAX` positions spread over a longer seed);
//! 4. `VOLSNAP_FUZZ_ITERS` (default 2000) random cases: a seed (or random bytes) with a
//!    few random mutations, each case from its own generator derived from
//!    `VOLSNAP_FUZZ_SEED`, the target and the case number, so one case replays alone.
//!
//! Every input must decode or fail without a panic, without allocating more than
//! `bound(len)` (a thread-local measure of the decoder's peak live bytes and largest
//! request, by the `alloc_meter` global allocator), and within `TIME_MAX`. A failure
//! prints the seed, the case and the command that replays it, and saves the input (to
//! copy into the corpus).
//!
//! Environment: `VOLSNAP_FUZZ_ITERS` (random cases per target and round),
//! `VOLSNAP_FUZZ_SEED` (the first round's seed), `VOLSNAP_FUZZ_TARGET` (comma-separated
//! target names), `VOLSNAP_FUZZ_CASE` (replay one random case), `VOLSNAP_FUZZ_SECONDS`
//! (a soak: rounds of random cases with seeds SEED, SEED+1, ... until the time is up),
//! `VOLSNAP_FUZZ_EXPORT=DIR` (write the seeds and the corpus as inputs of the
//! cargo-fuzz target, the first byte picking the decoder, and do nothing else).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use volsnap::fuzz::{TARGETS, Target};

#[global_allocator]
static ALLOC: alloc_meter::Meter = alloc_meter::Meter;

const DEFAULT_SEED: u64 = 0x766f_6c73_6e61_7001;
const DEFAULT_ITERS: u64 = 10_000;
/// Positions of one seed the systematic mutations visit at most.
const POSITIONS_MAX: usize = 4096;
/// The longest one input may take (libFuzzer's default `-timeout` is 20 minutes; a
/// decoder here takes microseconds, so this only catches work that grows faster than
/// its input, with a wide margin for a loaded machine).
const TIME_MAX: Duration = Duration::from_secs(10);
/// Failing inputs of one target after which it stops (each is reported).
const FAILURES_MAX: usize = 3;

/// The most memory decoding `len` bytes may take: a fixed allowance (serde reserves up
/// to 1 MiB per sequence it starts; a blob's first decompression room is up to 1 MiB
/// over 64 times its stored bytes) plus 64 bytes per input byte. A 10-byte input gets
/// 16 MiB, never gigabytes.
fn bound(len: usize) -> usize {
    (16 << 20) + 64 * len
}

/// splitmix64: small, fast and good enough to pick mutations.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A number in `0..n` (`n` > 0).
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    fn byte(&mut self) -> u8 {
        self.next() as u8
    }
}

/// The generator of random case `case` of `target` in the round of `seed`.
fn case_rng(seed: u64, target: &str, case: u64) -> Rng {
    let mut h = seed;
    for b in target.bytes() {
        h = (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
    }
    let mut rng = Rng(h ^ case.wrapping_mul(0xd6e8_feb8_6659_fd93));
    rng.next();
    rng
}

/// Huge lengths as they appear in the formats: postcard varints and LE integers.
const HUGE: [&[u8]; 5] = [
    &[0xff, 0xff, 0xff, 0xff, 0x0f], // u32::MAX varint
    &[0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01], // u64::MAX varint
    &[0x80, 0x80, 0x80, 0x80, 0x08], // 2^31 varint
    &[0xff, 0xff, 0xff, 0xff],       // u32::MAX LE
    &[0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff], // u64::MAX LE
];

fn overwrite(input: &mut Vec<u8>, at: usize, with: &[u8]) {
    if input.len() < at + with.len() {
        input.resize(at + with.len(), 0);
    }
    input[at..at + with.len()].copy_from_slice(with);
}

/// The systematic mutations of `seed`, each with a description.
fn systematic(seed: &[u8]) -> Vec<(String, Vec<u8>)> {
    let step = seed.len().div_ceil(POSITIONS_MAX).max(1);
    let mut out = Vec::new();
    for at in (0..seed.len()).step_by(step) {
        for bit in 0..8 {
            let mut m = seed.to_vec();
            m[at] ^= 1 << bit;
            out.push((format!("bit {bit} of byte {at} flipped"), m));
        }
        out.push((format!("cut to {at} bytes"), seed[..at].to_vec()));
        let mut m = seed.to_vec();
        m.remove(at);
        out.push((format!("byte {at} deleted"), m));
        let mut m = seed.to_vec();
        m.insert(at, 0xff);
        out.push((format!("0xff inserted at {at}"), m));
        for (n, huge) in HUGE.iter().enumerate() {
            let mut m = seed.to_vec();
            overwrite(&mut m, at, huge);
            out.push((format!("huge length {n} written at {at}"), m));
        }
        let mut m = seed.to_vec();
        m.splice(at..at, HUGE[1].iter().copied());
        out.push((format!("u64::MAX varint inserted at {at}"), m));
    }
    out
}

/// A random case: a seed (or random bytes) with one to five random mutations.
fn random_case(rng: &mut Rng, seeds: &[Vec<u8>]) -> Vec<u8> {
    let mut input = if rng.below(10) == 0 {
        let len = rng.below(300);
        (0..len).map(|_| rng.byte()).collect()
    } else {
        seeds[rng.below(seeds.len())].clone()
    };
    for _ in 0..=rng.below(5) {
        let len = input.len();
        let at = rng.below(len + 1);
        match rng.below(10) {
            0 | 1 if len > 0 => {
                let at = rng.below(len);
                input[at] ^= 1 << rng.below(8);
            }
            2 if len > 0 => {
                let at = rng.below(len);
                input[at] = [0, 1, 0x7f, 0x80, 0xff, rng.byte()][rng.below(6)];
            }
            3 => {
                let n = 1 + rng.below(8);
                let bytes: Vec<u8> = (0..n).map(|_| rng.byte()).collect();
                input.splice(at..at, bytes);
            }
            4 => {
                let end = (at + 1 + rng.below(16)).min(len);
                input.drain(at.min(end)..end);
            }
            5 => input.truncate(at),
            6 => {
                let huge = HUGE[rng.below(HUGE.len())];
                if rng.below(2) == 0 {
                    overwrite(&mut input, at, huge);
                } else {
                    input.splice(at..at, huge.iter().copied());
                }
            }
            7 if len > 0 => {
                // A copy of one part of the input somewhere else.
                let from = rng.below(len);
                let n = 1 + rng.below((len - from).min(64));
                let part = input[from..from + n].to_vec();
                input.splice(at..at, part);
            }
            8 => {
                // The start of this input and the end of another seed.
                let other = &seeds[rng.below(seeds.len())];
                let from = rng.below(other.len() + 1);
                input.truncate(at);
                input.extend_from_slice(&other[from..]);
            }
            _ => {
                let n = rng.below(8);
                input.resize(len + n, rng.byte());
            }
        }
    }
    input
}

/// How one input went.
enum Outcome {
    Decoded(bool),
    Panicked(String),
    TooMuchMemory(alloc_meter::Usage),
    TooSlow(Duration),
}

thread_local! {
    static PANIC_MESSAGE: std::cell::RefCell<String> = const { std::cell::RefCell::new(String::new()) };
}

fn run_one(target: &Target, input: &[u8]) -> (Outcome, alloc_meter::Usage) {
    let started = Instant::now();
    let (result, usage) = alloc_meter::measure(|| {
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| (target.run)(input)))
    });
    let took = started.elapsed();
    let outcome = match result {
        Err(_) => Outcome::Panicked(PANIC_MESSAGE.with(|m| m.borrow().clone())),
        Ok(_)
            if usage.peak_bytes > bound(input.len())
                || usage.largest_request > bound(input.len()) =>
        {
            Outcome::TooMuchMemory(usage)
        }
        Ok(_) if took > TIME_MAX => Outcome::TooSlow(took),
        Ok(decoded) => Outcome::Decoded(decoded),
    };
    (outcome, usage)
}

#[derive(Default)]
struct Stats {
    cases: u64,
    decoded: u64,
    elapsed: Duration,
    peak_bytes: usize,
    peak_input_len: usize,
    slowest: Duration,
    failures: usize,
}

/// Runs inputs of one target and records what went wrong.
struct Fuzz<'a> {
    target: &'a Target,
    stats: Stats,
    reports: Vec<String>,
    save_dir: PathBuf,
}

impl Fuzz<'_> {
    /// Whether this target has failed often enough to move on.
    fn done(&self) -> bool {
        self.stats.failures >= FAILURES_MAX
    }

    fn report(&mut self, report: String) {
        eprintln!("{report}");
        self.reports.push(report);
    }

    /// Runs one input (`what` names it, `replay` is the command that runs it again).
    fn check(&mut self, input: &[u8], what: &str, replay: &str) {
        let target = self.target;
        alloc_meter::note(target.name, input.len() as u64, self.stats.cases);
        let started = Instant::now();
        let (outcome, usage) = run_one(target, input);
        let stats = &mut self.stats;
        let took = started.elapsed();
        stats.elapsed += took;
        stats.slowest = stats.slowest.max(took);
        stats.cases += 1;
        if usage.peak_bytes > stats.peak_bytes {
            stats.peak_bytes = usage.peak_bytes;
            stats.peak_input_len = input.len();
        }
        let why = match outcome {
            Outcome::Decoded(decoded) => {
                stats.decoded += u64::from(decoded);
                return;
            }
            Outcome::Panicked(message) => format!("panicked: {message}"),
            Outcome::TooSlow(took) => format!(
                "took {:.1} s for {} input bytes; the limit is {} s",
                took.as_secs_f64(),
                input.len(),
                TIME_MAX.as_secs()
            ),
            Outcome::TooMuchMemory(u) => format!(
                "allocated {} bytes at peak (largest request {}) for {} input bytes; the bound is {}",
                u.peak_bytes,
                u.largest_request,
                input.len(),
                bound(input.len())
            ),
        };
        stats.failures += 1;
        let saved = self
            .save_dir
            .join(format!("{}-{:016x}.bin", target.name, fnv(input)));
        let _ = std::fs::create_dir_all(&self.save_dir);
        #[allow(clippy::disallowed_methods)] // an input to look at, not repository data
        let written = std::fs::write(&saved, input);
        let saved_note = match written {
            Ok(()) => format!("input saved to {}", saved.display()),
            Err(e) => format!("input not saved: {e}"),
        };
        // Printed at once, so a soak stopped early still tells what it found.
        self.report(format!(
            "fuzz: {} {what}: {why}\n  {saved_note} (to keep as tests/fuzz_corpus/{}/NAME.bin)\n  replay: {replay}",
            target.name, target.name
        ));
    }

    /// `VOLSNAP_FUZZ_ITERS` random cases (or only `only_case`) of the round of `seed`.
    fn random(&mut self, seeds: &[Vec<u8>], seed: u64, iters: u64, only_case: Option<u64>) {
        let name = self.target.name;
        let cases = only_case.map_or(0..iters, |c| c..c + 1);
        for case in cases {
            let input = random_case(&mut case_rng(seed, name, case), seeds);
            let what = format!("seed {seed:#x} case {case}");
            let replay = format!(
                "VOLSNAP_FUZZ_SEED={seed:#x} VOLSNAP_FUZZ_TARGET={name} VOLSNAP_FUZZ_CASE={case} cargo test --test fuzz"
            );
            self.check(&input, &what, &replay);
            if self.done() {
                return;
            }
        }
    }

    /// The corpus, the seeds and the systematic mutations of the seeds.
    fn fixed(&mut self, seeds: &[Vec<u8>]) {
        let name = self.target.name;
        let replay = format!("VOLSNAP_FUZZ_TARGET={name} cargo test --test fuzz");
        for (path, input) in corpus(name) {
            self.check(&input, &format!("corpus input {}", path.display()), &replay);
        }
        for (n, seed) in seeds.iter().enumerate() {
            if !matches!(run_one(self.target, seed).0, Outcome::Decoded(true)) {
                self.stats.failures += 1;
                self.report(format!(
                    "fuzz: {name} seed {n} ({} bytes) does not decode: the seed generator is wrong",
                    seed.len()
                ));
            }
        }
        for (n, seed) in seeds.iter().enumerate() {
            for (what, input) in systematic(seed) {
                self.check(&input, &format!("seed {n}, {what}"), &replay);
                if self.done() {
                    return;
                }
            }
        }
    }
}

fn fnv(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

fn env_u64(name: &str) -> Option<u64> {
    let v = std::env::var(name).ok()?;
    let v = v.trim();
    let parsed = match v.strip_prefix("0x") {
        Some(hex) => u64::from_str_radix(hex, 16),
        None => v.parse(),
    };
    Some(parsed.unwrap_or_else(|_| panic!("{name}={v} is not a number")))
}

fn corpus(target: &str) -> Vec<(PathBuf, Vec<u8>)> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fuzz_corpus")
        .join(target);
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return Vec::new();
    };
    let mut out: Vec<_> = entries
        .map(|e| e.expect("read the corpus").path())
        .filter(|p| p.extension().is_some_and(|e| e == "bin"))
        .map(|p| {
            let bytes = std::fs::read(&p).expect("read a corpus input");
            (p, bytes)
        })
        .collect();
    out.sort();
    out
}

/// Writes every seed and corpus input as an input of the cargo-fuzz target (the first
/// byte picks the decoder, as `volsnap::fuzz::any` reads it): a starting corpus.
fn export(dir: &Path) {
    std::fs::create_dir_all(dir).expect("create the export directory");
    let mut n = 0;
    for (pick, target) in TARGETS.iter().enumerate() {
        let corpus = corpus(target.name).into_iter().map(|(_, bytes)| bytes);
        for input in (target.seeds)().into_iter().chain(corpus) {
            let mut bytes = vec![pick as u8];
            bytes.extend_from_slice(&input);
            let path = dir.join(format!("{}-{:016x}", target.name, fnv(&bytes)));
            #[allow(clippy::disallowed_methods)] // a fuzzer's corpus, not repository data
            std::fs::write(&path, &bytes).expect("write a corpus input");
            n += 1;
        }
    }
    println!("fuzz: {n} inputs written to {}", dir.display());
}

fn main() {
    std::panic::set_hook(Box::new(|info| {
        let location = info
            .location()
            .map_or(String::new(), |l| format!(" at {}:{}", l.file(), l.line()));
        let payload = info
            .payload()
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| info.payload().downcast_ref::<String>().cloned())
            .unwrap_or_default();
        PANIC_MESSAGE.with(|m| *m.borrow_mut() = format!("{payload}{location}"));
    }));
    // `cargo test` hands every test binary its arguments: `--list`, and name filters.
    // This binary is one test, `fuzz`, and skips its work under any other filter, so
    // `cargo test NAME` stays quick.
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.iter().any(|a| a == "--list") {
        println!("fuzz: test");
        return;
    }
    let filters: Vec<&String> = args.iter().filter(|a| !a.starts_with('-')).collect();
    if !filters.is_empty() && !filters.iter().any(|f| "fuzz".contains(f.as_str())) {
        println!("test result: ok. 0 passed; 0 failed; 0 ignored; 0 measured; 1 filtered out");
        return;
    }

    if let Some(dir) = std::env::var_os("VOLSNAP_FUZZ_EXPORT") {
        export(Path::new(&dir));
        return;
    }
    let base_seed = env_u64("VOLSNAP_FUZZ_SEED").unwrap_or(DEFAULT_SEED);
    let iters = env_u64("VOLSNAP_FUZZ_ITERS").unwrap_or(DEFAULT_ITERS);
    let only_case = env_u64("VOLSNAP_FUZZ_CASE");
    let soak = env_u64("VOLSNAP_FUZZ_SECONDS").map(Duration::from_secs);
    let wanted: Option<Vec<String>> = std::env::var("VOLSNAP_FUZZ_TARGET")
        .ok()
        .map(|v| v.split(',').map(|s| s.trim().to_string()).collect());
    let save_dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("fuzz-failures");
    let mut fuzzers: Vec<(Fuzz, Vec<Vec<u8>>)> = TARGETS
        .iter()
        .filter(|t| {
            wanted
                .as_ref()
                .is_none_or(|w| w.iter().any(|n| n == t.name))
        })
        .map(|target| {
            let fuzz = Fuzz {
                target,
                stats: Stats::default(),
                reports: Vec::new(),
                save_dir: save_dir.clone(),
            };
            (fuzz, (target.seeds)())
        })
        .collect();
    assert!(!fuzzers.is_empty(), "VOLSNAP_FUZZ_TARGET names no target");

    let started = Instant::now();
    for (fuzz, seeds) in &mut fuzzers {
        if only_case.is_none() {
            fuzz.fixed(seeds);
        }
        if !fuzz.done() {
            fuzz.random(seeds, base_seed, iters, only_case);
        }
    }
    // A soak: rounds of random cases, each with the next seed, until the time is up.
    let mut seed = base_seed;
    while let Some(limit) = soak.filter(|_| only_case.is_none()) {
        if started.elapsed() >= limit || fuzzers.iter().all(|(f, _)| f.done()) {
            break;
        }
        seed = seed.wrapping_add(1);
        println!("fuzz: soak round, VOLSNAP_FUZZ_SEED={seed:#x}");
        for (fuzz, seeds) in fuzzers.iter_mut().filter(|(f, _)| !f.done()) {
            fuzz.random(seeds, seed, iters, None);
        }
    }

    println!(
        "{:<15} {:>6} {:>9} {:>9} {:>10} {:>9} {:>12}",
        "fuzz target", "seeds", "inputs", "decoded", "inputs/s", "slowest", "peak bytes"
    );
    for (fuzz, seeds) in &fuzzers {
        let s = &fuzz.stats;
        println!(
            "{:<15} {:>6} {:>9} {:>9} {:>10.0} {:>7}us {:>12} (input of {} bytes)",
            fuzz.target.name,
            seeds.iter().map(Vec::len).sum::<usize>(),
            s.cases,
            s.decoded,
            s.cases as f64 / s.elapsed.as_secs_f64().max(1e-9),
            s.slowest.as_micros(),
            s.peak_bytes,
            s.peak_input_len
        );
    }
    let total: u64 = fuzzers.iter().map(|(f, _)| f.stats.cases).sum();
    println!(
        "fuzz: {total} inputs in {:.1} s (first seed {base_seed:#x}, last seed {seed:#x})",
        started.elapsed().as_secs_f64()
    );
    if fuzzers.iter().all(|(f, _)| f.reports.is_empty()) {
        println!("test result: ok. 1 passed; 0 failed; 0 ignored; 0 measured; 0 filtered out");
    } else {
        let failures: usize = fuzzers.iter().map(|(f, _)| f.stats.failures).sum();
        println!(
            "test result: FAILED. 0 passed; 1 failed; 0 ignored; 0 measured; 0 filtered out ({failures} failing inputs)"
        );
        std::process::exit(1);
    }
}
