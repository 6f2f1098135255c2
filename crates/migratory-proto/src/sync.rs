//! The synchronisation arithmetic of MTCP (thesis 3.3.3, 4.2.3 step 4,
//! figs 3.8-3.10, 4.9, 4.10): from a session image and the client's
//! down-stream position `c`, where each stream resumes and how many of the
//! application's re-executed writes must be discarded.

use crate::control::SessionImage;
use crate::types::Pos;

/// Where the down stream resumes at the destination.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ResumePoint {
    /// `snd_max_seen = max(c, snd_una)`: the destination sends from here.
    pub snd_max_seen: Pos,
    /// `snd_bytes_discard`: bytes of the application's next writes that the
    /// client already has (fig 3.10, fig 4.9 scenario 2).
    pub discard: u64,
}

/// MTCP 4.2.3 step 4 (b)-(d): `snd_max_seen = max(c, snd_una)`; if it is
/// at or before the snapshot, the bytes `[snd_max_seen, snd_snap)` are
/// transferred and nothing is discarded (fig 4.9 scenario 1); else nothing
/// is transferred and `snd_max_seen - snd_snap` bytes are discarded
/// (scenario 2).
pub fn resume_point(snd_una: Pos, snd_snap: Pos, c: Pos) -> ResumePoint {
    let snd_max_seen = c.max(snd_una);
    ResumePoint {
        snd_max_seen,
        discard: snd_max_seen.saturating_sub(snd_snap),
    }
}

impl SessionImage {
    /// The image a destination needs for a client at `c`: down data cut to
    /// `[snd_max_seen, snd_snap)` (fig 3.9), up data kept whole as read log
    /// plus receive buffer (fig 4.10).
    pub fn trim_for(mut self, c: Pos) -> (SessionImage, ResumePoint) {
        let rp = resume_point(self.down_base, self.down_snap, c);
        let from = (rp.snd_max_seen - self.down_base).min(self.down_data.len() as u64) as usize;
        let to = self
            .down_snap
            .saturating_sub(self.down_base)
            .min(self.down_data.len() as u64) as usize;
        self.down_data = if from < to {
            self.down_data.slice(from..to)
        } else {
            bytes::Bytes::new()
        };
        self.down_base = rp.snd_max_seen;
        (self, rp)
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use super::*;
    use crate::types::{Secret, SessionId};

    fn image(down_base: Pos, down: &'static [u8], down_snap: Pos) -> SessionImage {
        SessionImage {
            session: SessionId(1),
            secret: Secret([0; 32]),
            epoch: 0,
            up_snap: 10,
            up_data: Bytes::from_static(b"logbuf"),
            up_fin: None,
            down_snap,
            down_base,
            down_data: Bytes::from_static(down),
            down_fin: None,
            app_state: Bytes::new(),
        }
    }

    #[test]
    fn scenario_1_unacked_writes_before_the_snapshot_are_transferred() {
        // snd_una 100, snapshot at 106, client has up to 102 (fig 4.9, 1).
        let (img, rp) = image(100, b"abcdefgh", 106).trim_for(102);
        assert_eq!(
            rp,
            ResumePoint {
                snd_max_seen: 102,
                discard: 0
            }
        );
        assert_eq!((img.down_base, &img.down_data[..]), (102, &b"cdef"[..]));
        assert_eq!(
            &img.up_data[..],
            b"logbuf",
            "read log + buffer travel whole"
        );
    }

    #[test]
    fn scenario_2_writes_after_the_snapshot_the_client_has_are_discarded() {
        // Snapshot at 103, client already has up to 107 (fig 3.10, 4.9, 2).
        let (img, rp) = image(100, b"abcdefgh", 103).trim_for(107);
        assert_eq!(
            rp,
            ResumePoint {
                snd_max_seen: 107,
                discard: 4
            }
        );
        assert!(img.down_data.is_empty());
        assert_eq!(img.down_base, 107);
    }

    #[test]
    fn lost_client_acks_are_an_implicit_ack() {
        // The client's position is ahead of snd_una (its acks were lost).
        assert_eq!(resume_point(100, 120, 110).snd_max_seen, 110);
        // A client position below snd_una cannot happen; snd_una wins.
        assert_eq!(resume_point(100, 120, 90).snd_max_seen, 100);
    }
}
