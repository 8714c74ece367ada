//! Time you can trust: the wall clock, the kernel's boot-time clock and what vouches for
//! the wall clock in this boot.
//!
//! Every result records its wall-clock start, CLOCK_BOOTTIME at the same moment and the
//! boot it belongs to (`/proc/sys/kernel/random/boot_id`). The boot-time clock counts from
//! boot, never jumps and is not touched by settimeofday, so within one boot
//! `trusted start = base + boottime`, where `base = trusted unix time - boottime` is
//! constant. `Clock` holds that base once something vouches for it:
//! - the kernel says its clock is synchronised (adjtimex: not TIME_ERROR and no
//!   STA_UNSYNC): base = wall - boottime, checked again every few seconds;
//! - a collector's welcome: base = collector time + rtt/2 - boottime (the kernel's word
//!   wins when both exist).
//!
//! Invariants:
//! - A result is `clock_unsynced` when the kernel says unsynchronised and no base agrees
//!   with the local wall clock within `AGREE`. Such a result from this boot, once a base
//!   is known, gets `started_at = base + boottime` and `clock_corrected` (or, when its
//!   wall time agreed with the base after all, just loses the flag). Results of another
//!   boot cannot be corrected and stay flagged.
//! - The boot-time clock is read through rustix, which calls the vDSO directly: libfaketime
//!   (used by the tests) fakes the wall clock but not this one, as on a real box without
//!   a real-time clock.
//!
//! Unsafe code: `kernel_synchronised` calls `libc::adjtimex` (read-only, `modes = 0`)
//! because no dependency offers a safe wrapper for it (rustix has none). The crate root
//! (`lib.rs`) lists the agent's other unsafe code.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use edgeprobe_proto::v1 as pb;

/// Two clocks closer than this agree.
pub const AGREE: Duration = Duration::from_secs(1);

/// The kernel's boot-time clock (CLOCK_BOOTTIME, counts suspend too), nanoseconds.
pub fn boottime_nanos() -> i64 {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::Boottime);
    t.tv_sec
        .saturating_mul(1_000_000_000)
        .saturating_add(t.tv_nsec)
}

/// The wall clock and the boot-time clock read at (almost) the same moment.
pub fn now() -> (SystemTime, i64) {
    let wall = SystemTime::now();
    (wall, boottime_nanos())
}

/// The id of the running boot, read once; empty where the kernel does not offer it.
pub fn boot_id() -> &'static str {
    static BOOT_ID: OnceLock<String> = OnceLock::new();
    BOOT_ID.get_or_init(|| {
        std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
            .map(|s| s.trim().to_string())
            .unwrap_or_default()
    })
}

/// True when the kernel says its clock is synchronised (an NTP daemon disciplines it).
pub fn kernel_synchronised() -> bool {
    kernel_time_status().synchronised
}

/// What the kernel says of its clock (adjtimex, read only).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct KernelTimeStatus {
    /// Not TIME_ERROR and no STA_UNSYNC.
    pub synchronised: bool,
    /// The estimated error (`esterror`) an NTP daemon set.
    pub estimated_error: Duration,
    /// The maximum error (`maxerror`), which the kernel grows while nobody disciplines it.
    pub maximum_error: Duration,
}

/// The kernel's clock state: synchronised or not, with its error estimates (used as the
/// error estimate of STAMP timestamps, RFC 8762 section 4.2.1).
#[allow(unsafe_code)]
pub fn kernel_time_status() -> KernelTimeStatus {
    // SAFETY: `timex` is a plain C struct for which all-zero bytes are a valid value;
    // with `modes = 0` adjtimex only reads the kernel's state into the struct we own and
    // pass by a valid, exclusive pointer for the duration of the call.
    let (state, tx) = unsafe {
        let mut tx: libc::timex = std::mem::zeroed();
        let state = libc::adjtimex(&mut tx);
        (state, tx)
    };
    let micros = |v: libc::c_long| Duration::from_micros(u64::try_from(v).unwrap_or(0));
    KernelTimeStatus {
        synchronised: state >= 0 && state != libc::TIME_ERROR && tx.status & libc::STA_UNSYNC == 0,
        estimated_error: micros(tx.esterror),
        maximum_error: micros(tx.maxerror),
    }
}

/// Unix nanoseconds of a wall-clock time (negative before 1970).
pub fn unix_nanos(t: SystemTime) -> i64 {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_nanos()).unwrap_or(i64::MAX),
        Err(e) => -i64::try_from(e.duration().as_nanos()).unwrap_or(i64::MAX),
    }
}

/// Where the trusted base came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Source {
    Kernel,
    Collector,
}

#[derive(Debug, Clone, Copy)]
struct Base {
    /// Trusted unix nanoseconds minus boot-time nanoseconds.
    nanos: i64,
    source: Source,
}

/// The trusted time mapping of this boot; cheap to clone, shared by recorder and uplink.
#[derive(Clone)]
pub struct Clock {
    inner: Arc<Inner>,
}

struct Inner {
    base: Mutex<Option<Base>>,
    /// The kernel's last answer, so recording a result costs no syscall beyond the clocks.
    kernel_synced: AtomicBool,
    /// The wall clock was last found off the collector's (warned once until it agrees).
    warned: AtomicBool,
    /// The buffer may hold results of this boot that are flagged but not corrected.
    dirty: AtomicBool,
    boot_id: String,
}

impl Default for Clock {
    fn default() -> Self {
        Clock::new()
    }
}

impl Clock {
    /// Asks the kernel once. The buffer may hold flagged results of this boot from before
    /// a restart, so a first correction pass is due as soon as a base is known.
    pub fn new() -> Clock {
        let clock = Clock {
            inner: Arc::new(Inner {
                base: Mutex::new(None),
                kernel_synced: AtomicBool::new(false),
                warned: AtomicBool::new(false),
                dirty: AtomicBool::new(true),
                boot_id: boot_id().to_string(),
            }),
        };
        clock.check_kernel();
        clock
    }

    /// Asks the kernel whether its clock is synchronised; when it is, its clock becomes
    /// the base. Returns true when a base is known afterwards.
    pub fn check_kernel(&self) -> bool {
        let synced = kernel_synchronised();
        self.inner.kernel_synced.store(synced, Ordering::Relaxed);
        let mut base = self.inner.base.lock().unwrap();
        if synced {
            let (wall, boot) = now();
            let first = !matches!(
                *base,
                Some(Base {
                    source: Source::Kernel,
                    ..
                })
            );
            *base = Some(Base {
                nanos: unix_nanos(wall).saturating_sub(boot),
                source: Source::Kernel,
            });
            if first {
                tracing::info!("the kernel clock is synchronised");
            }
        }
        base.is_some()
    }

    /// A collector's welcome: its clock read `collector_unix_nanos` when it answered,
    /// `rtt` after our hello left. 0 (an older collector) tells nothing.
    pub fn observe_collector(&self, collector_unix_nanos: i64, rtt: Duration) {
        if collector_unix_nanos == 0 {
            return;
        }
        let (wall, boot) = now();
        let half = i64::try_from(rtt.as_nanos() / 2).unwrap_or(i64::MAX);
        let trusted_now = collector_unix_nanos.saturating_add(half);
        let offset = unix_nanos(wall).saturating_sub(trusted_now);
        let mut base = self.inner.base.lock().unwrap();
        if self.inner.kernel_synced.load(Ordering::Relaxed) {
            if offset.unsigned_abs() > AGREE.as_nanos() as u64 {
                tracing::debug!(
                    "the collector's clock is {} ours; trusting the synchronised kernel clock",
                    describe_offset(-offset)
                );
            }
            return;
        }
        *base = Some(Base {
            nanos: trusted_now.saturating_sub(boot),
            source: Source::Collector,
        });
        drop(base);
        if offset.unsigned_abs() > AGREE.as_nanos() as u64 {
            if !self.inner.warned.swap(true, Ordering::Relaxed) {
                tracing::warn!(
                    offset_seconds = offset as f64 / 1e9,
                    "wall clock is {} the collector's; results are corrected from the boot-time clock",
                    describe_offset(offset)
                );
            }
        } else if self.inner.warned.swap(false, Ordering::Relaxed) {
            tracing::info!("wall clock agrees with the collector's again");
        }
    }

    /// The trusted base (unix nanos - boottime nanos), when something vouches for one.
    pub fn base(&self) -> Option<i64> {
        self.inner.base.lock().unwrap().map(|b| b.nanos)
    }

    pub fn boot_id(&self) -> &str {
        &self.inner.boot_id
    }

    /// Whether a result taken at wall time `wall` and boot time `boot` cannot vouch for its
    /// start time: the kernel says unsynchronised and no base agrees with `wall`.
    pub fn unsynced(&self, wall: i64, boot: i64) -> bool {
        if self.inner.kernel_synced.load(Ordering::Relaxed) {
            return false;
        }
        match self.base() {
            Some(base) => !agrees(wall.saturating_sub(boot), base),
            None => true,
        }
    }

    /// Stamps a fresh result (its `started_at_unix_nanos` and `boottime_nanos` set) with
    /// the boot id and the sync flag, and corrects it at once when a base is known.
    pub fn stamp(&self, r: &mut pb::Result) {
        r.boot_id = self.inner.boot_id.clone();
        r.clock_unsynced = self.unsynced(r.started_at_unix_nanos, r.boottime_nanos);
        if r.clock_unsynced && !self.correct(r) {
            // Recorded before anything vouched for the clock: correct it in the buffer
            // once something does.
            self.inner.dirty.store(true, Ordering::Relaxed);
        }
    }

    /// Corrects a flagged result of this boot from the trusted base; true when it changed.
    pub fn correct(&self, r: &mut pb::Result) -> bool {
        if !r.clock_unsynced || r.boot_id.is_empty() || r.boot_id != self.inner.boot_id {
            return false;
        }
        let Some(base) = self.base() else {
            return false;
        };
        let trusted = base.saturating_add(r.boottime_nanos);
        r.clock_unsynced = false;
        if !agrees(r.started_at_unix_nanos, trusted) {
            r.started_at_unix_nanos = trusted;
            r.clock_corrected = true;
        }
        true
    }

    /// Takes the "flagged results may be buffered" mark when a base is known to correct
    /// them; the caller runs a correction pass and calls `mark_dirty` if it fails.
    pub fn take_dirty(&self) -> bool {
        self.base().is_some() && self.inner.dirty.swap(false, Ordering::Relaxed)
    }

    pub fn mark_dirty(&self) {
        self.inner.dirty.store(true, Ordering::Relaxed);
    }
}

fn agrees(a: i64, b: i64) -> bool {
    a.abs_diff(b) <= AGREE.as_nanos() as u64
}

/// "7.2 years behind" / "3.0 hours ahead of" for a wall-clock offset in nanoseconds
/// (positive: ahead).
pub fn describe_offset(offset_nanos: i64) -> String {
    let secs = offset_nanos.unsigned_abs() as f64 / 1e9;
    let (value, unit) = if secs >= 365.25 * 86_400.0 {
        (secs / (365.25 * 86_400.0), "years")
    } else if secs >= 86_400.0 {
        (secs / 86_400.0, "days")
    } else if secs >= 3_600.0 {
        (secs / 3_600.0, "hours")
    } else if secs >= 60.0 {
        (secs / 60.0, "minutes")
    } else {
        (secs, "seconds")
    };
    let direction = if offset_nanos < 0 {
        "behind"
    } else {
        "ahead of"
    };
    format!("{value:.1} {unit} {direction}")
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEC: i64 = 1_000_000_000;

    fn result(started: i64, boot: i64, boot_id: &str) -> pb::Result {
        pb::Result {
            started_at_unix_nanos: started,
            boottime_nanos: boot,
            boot_id: boot_id.into(),
            clock_unsynced: true,
            ..Default::default()
        }
    }

    /// A clock whose kernel is (or is taken as) unsynchronised, as on this build machine.
    fn unsynced_clock() -> Clock {
        let c = Clock::new();
        c.inner.kernel_synced.store(false, Ordering::Relaxed);
        *c.inner.base.lock().unwrap() = None;
        c
    }

    #[test]
    fn clocks_are_readable() {
        let (wall, boot) = now();
        assert!(boot > 0);
        assert!(unix_nanos(wall) > 1_577_836_800 * SEC);
        assert_eq!(unix_nanos(UNIX_EPOCH - Duration::from_secs(2)), -2 * SEC);
        // Whatever the kernel says, asking must not fail or panic.
        let _ = kernel_synchronised();
    }

    #[test]
    fn collector_base_corrects_results_of_this_boot_only() {
        let c = unsynced_clock();
        let boot_id = c.boot_id().to_string();
        let mut r = result(5 * SEC, 100 * SEC, &boot_id);
        assert!(!c.correct(&mut r), "no base yet");
        assert!(c.unsynced(5 * SEC, 100 * SEC));

        // The collector says it is 2025; our wall clock says 1970.
        let collector = 1_750_000_000 * SEC;
        c.observe_collector(collector, Duration::ZERO);
        let base = c.base().unwrap();
        let (_, boot_now) = now();
        assert!((base + boot_now - collector).abs() < SEC);

        assert!(c.correct(&mut r));
        assert!(r.clock_corrected && !r.clock_unsynced);
        assert_eq!(r.started_at_unix_nanos, base + 100 * SEC);
        assert!(!c.correct(&mut r), "idempotent");

        let mut other = result(5 * SEC, 100 * SEC, "another-boot");
        assert!(!c.correct(&mut other));
        assert!(other.clock_unsynced && !other.clock_corrected);
    }

    #[test]
    fn a_right_wall_clock_is_vouched_for_not_rewritten() {
        let c = unsynced_clock();
        let (wall, boot) = now();
        let wall = unix_nanos(wall);
        c.observe_collector(wall, Duration::ZERO);
        assert!(!c.unsynced(wall, boot));
        let mut r = result(wall - 10 * SEC, boot - 10 * SEC, c.boot_id());
        assert!(c.correct(&mut r));
        assert!(!r.clock_unsynced && !r.clock_corrected);
        assert_eq!(r.started_at_unix_nanos, wall - 10 * SEC);
    }

    #[test]
    fn stamp_corrects_at_once_when_a_base_is_known() {
        let c = unsynced_clock();
        let (_, boot) = now();
        let mut r = pb::Result {
            started_at_unix_nanos: 0,
            boottime_nanos: boot,
            ..Default::default()
        };
        c.stamp(&mut r);
        assert!(r.clock_unsynced && !r.clock_corrected);
        assert!(!c.take_dirty(), "nothing to correct with before a base");
        let collector = 1_750_000_000 * SEC;
        c.observe_collector(collector, Duration::ZERO);
        assert!(c.take_dirty());
        assert!(!c.take_dirty());
        let mut r = pb::Result {
            started_at_unix_nanos: 0,
            boottime_nanos: boot,
            ..Default::default()
        };
        c.stamp(&mut r);
        assert!(!r.clock_unsynced && r.clock_corrected);
        assert!((r.started_at_unix_nanos - collector).abs() < 60 * SEC);
        assert!(!c.take_dirty());
    }

    #[test]
    fn offsets_read_like_people_say_them() {
        assert_eq!(
            describe_offset(-(7.2 * 365.25 * 86_400.0 * 1e9) as i64),
            "7.2 years behind"
        );
        assert_eq!(describe_offset(3 * 86_400 * SEC), "3.0 days ahead of");
        assert_eq!(describe_offset(-2 * SEC), "2.0 seconds behind");
    }
}
