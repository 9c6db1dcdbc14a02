//! A global allocator over the system's that measures, per thread, what a closure
//! allocates: its peak of live bytes and its largest single request. The fuzz harness
//! uses it to prove a decoder never reserves memory its input does not justify.
//!
//! Its own crate because the main crate forbids `unsafe` code, and a `GlobalAlloc`
//! cannot be written without it.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::io::Write;

/// Install with `#[global_allocator] static A: alloc_meter::Meter = alloc_meter::Meter;`.
#[derive(Debug)]
pub struct Meter;

/// What a measured closure allocated.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Usage {
    /// Most bytes it held live at once (allocated during the closure, not yet freed).
    pub peak_bytes: usize,
    /// Its largest single allocation or reallocation request.
    pub largest_request: usize,
}

/// A request this large is reported on stderr, with the note of the thread, before it
/// goes to the system allocator (which may fail and abort the process): so an abort
/// still tells which input caused it.
const LOUD_REQUEST: usize = 1 << 30;

thread_local! {
    // Const-initialized `Cell`s of plain values: no lazy initialization and no
    // destructor, so an allocator may touch them.
    static LIVE: Cell<isize> = const { Cell::new(0) };
    static PEAK: Cell<isize> = const { Cell::new(0) };
    static LARGEST: Cell<usize> = const { Cell::new(0) };
    static NOTE: Cell<(&'static str, u64, u64)> = const { Cell::new(("", 0, 0)) };
}

fn grew(by: usize, request: usize) {
    let _ = LIVE.try_with(|live| {
        let now = live.get().saturating_add(by as isize);
        live.set(now);
        let _ = PEAK.try_with(|p| p.set(p.get().max(now)));
    });
    let _ = LARGEST.try_with(|l| l.set(l.get().max(request)));
    if request >= LOUD_REQUEST {
        let (what, a, b) = NOTE.try_with(Cell::get).unwrap_or(("", 0, 0));
        // Formatting integers into stderr allocates nothing.
        let _ = writeln!(
            std::io::stderr(),
            "alloc-meter: a request of {request} bytes while running {what} {a} {b}"
        );
    }
}

fn shrank(by: usize) {
    let _ = LIVE.try_with(|live| live.set(live.get().saturating_sub(by as isize)));
}

// SAFETY: every call is forwarded to `System` unchanged; the bookkeeping touches only
// thread-local cells and never allocates.
unsafe impl GlobalAlloc for Meter {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        grew(layout.size(), layout.size());
        // SAFETY: the caller's contract is `System`'s.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        grew(layout.size(), layout.size());
        // SAFETY: as above.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        shrank(layout.size());
        // SAFETY: as above.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if new_size >= layout.size() {
            grew(new_size - layout.size(), new_size);
        } else {
            shrank(layout.size() - new_size);
        }
        // SAFETY: as above.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

/// Runs `f` on this thread and measures what it allocates (on this thread; memory it
/// frees that was allocated before counts as nothing).
pub fn measure<R>(f: impl FnOnce() -> R) -> (R, Usage) {
    let start = LIVE.with(Cell::get);
    let (outer_peak, outer_largest) = (PEAK.with(Cell::get), LARGEST.with(Cell::get));
    PEAK.with(|p| p.set(start));
    LARGEST.with(|l| l.set(0));
    let out = f();
    let usage = Usage {
        peak_bytes: (PEAK.with(Cell::get) - start).max(0) as usize,
        largest_request: LARGEST.with(Cell::get),
    };
    PEAK.with(|p| p.set(outer_peak.max(start + usage.peak_bytes as isize)));
    LARGEST.with(|l| l.set(outer_largest.max(usage.largest_request)));
    (out, usage)
}

/// Names what this thread is running, for the report of a huge request: a label and
/// two numbers (the fuzz harness passes the target, the seed and the case).
pub fn note(what: &'static str, a: u64, b: u64) {
    NOTE.with(|n| n.set((what, a, b)));
}
