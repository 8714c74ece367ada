//! A voice-call MOS estimate from delay, jitter and loss: the ITU-T G.107 E-model
//! simplified for G.711 as Cole and Rosenbluth did ("Voice over IP performance monitoring",
//! ACM SIGCOMM CCR 31(2), 2001), with the R-to-MOS mapping of ITU-T G.107 Annex B:
//!
//! ```text
//! d  = one-way delay (ms) + 2 * jitter (ms) + 10 ms (codec)
//! Id = 0.024 d + 0.11 (d - 177.3) H(d - 177.3)           H: 0 below 0, else 1
//! Ie = 30 ln(1 + 15 e)                                   e: loss ratio (0..1)
//! R  = 93.2 - Id - Ie
//! MOS = 1 + 0.035 R + 7e-6 R (R - 60) (100 - R), 1 at R <= 0, 4.5 at R >= 100
//! ```
//!
//! The factor 2 on jitter stands for a de-jitter buffer of twice the jitter; 10 ms is
//! G.711's packetisation; `Ie` is Cole and Rosenbluth's fit for G.711 with packet loss
//! concealment under random loss.

use edgeprobe_proto::bounds::{MOS_MAX, MOS_MIN};

/// Codec delay added to the network's (G.711, 10 ms).
const CODEC_MS: f64 = 10.0;

/// The E-model's R factor for a one-way delay and jitter (seconds) and a loss ratio.
pub fn r_factor(one_way_delay: f64, jitter: f64, loss: f64) -> f64 {
    let d = one_way_delay.max(0.0) * 1e3 + 2.0 * jitter.max(0.0) * 1e3 + CODEC_MS;
    let id = 0.024 * d + if d > 177.3 { 0.11 * (d - 177.3) } else { 0.0 };
    let ie = 30.0 * (1.0 + 15.0 * loss.clamp(0.0, 1.0)).ln();
    93.2 - id - ie
}

/// MOS (1 to 4.5) of an R factor, ITU-T G.107 Annex B.
pub fn mos_of_r(r: f64) -> f64 {
    if r <= 0.0 {
        return MOS_MIN;
    }
    if r >= 100.0 {
        return MOS_MAX;
    }
    (1.0 + 0.035 * r + 7e-6 * r * (r - 60.0) * (100.0 - r)).clamp(MOS_MIN, MOS_MAX)
}

/// The MOS estimate of a call over a path with this one-way delay, jitter (seconds) and
/// loss ratio.
pub fn mos(one_way_delay: f64, jitter: f64, loss: f64) -> f64 {
    mos_of_r(r_factor(one_way_delay, jitter, loss))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_points() {
        // A perfect LAN: R = 93.2 - 0.24 = 92.96, MOS about 4.4 (G.711's ceiling).
        let lan = mos(0.0, 0.0, 0.0);
        assert!((lan - 4.40).abs() < 0.01, "{lan}");
        // R = 93.2 - 0.024*160 = 89.36 at 150 ms one way: still "satisfied" (R > 80).
        assert!((r_factor(0.150, 0.0, 0.0) - 89.36).abs() < 1e-9);
        // Beyond 177.3 ms the second term bites: 300 ms -> Id = 7.44 + 14.597.
        let r = r_factor(0.290, 0.0, 0.0);
        assert!((r - (93.2 - 0.024 * 300.0 - 0.11 * (300.0 - 177.3))).abs() < 1e-9);
        // 1 % loss: Ie = 30 ln 1.15 = 4.19.
        let r = r_factor(0.0, 0.0, 0.01);
        assert!((r - (93.2 - 0.24 - 30.0 * 1.15f64.ln())).abs() < 1e-9);
        // Losing everything is the floor.
        assert_eq!(mos(2.0, 0.5, 1.0), MOS_MIN);
        // Monotonic: worse paths never score better.
        assert!(mos(0.05, 0.005, 0.0) > mos(0.05, 0.005, 0.03));
        assert!(mos(0.05, 0.005, 0.0) > mos(0.25, 0.005, 0.0));
        assert_eq!(mos_of_r(120.0), MOS_MAX);
    }
}
